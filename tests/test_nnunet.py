"""freetumor inside nnU-Net v2: labels and normalisation read from nnU-Net's files, raw datasets from prepared
folders, the batchgeneratorsv2 transform on many patches, the trainer's transform chain, and (slow) a few
iterations of ``nnUNetv2_train -tr nnUNetTrainerFreeTumor`` on phantoms."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import yaml

from freetumor_cli.app import app
from freetumor_cli.core.engines import RuleIntensity
from freetumor_cli.core.errors import ConfigError, InputError, OutputExistsError
from freetumor_cli.core.nnunet import (
    CONFIG_ENV,
    SET_ENV,
    CtIntensity,
    NnunetSynthesisConfig,
    PatchSynthesis,
    organ_labels,
    patch_synthesis,
    synthesis_config_from_env,
    trainer_folder,
    write_nnunet_dataset,
)
from freetumor_cli.core.phantom import make_phantom
from freetumor_cli.core.synthesis_config import SynthesisConfig
from freetumor_cli.core.transforms import synthesize_in_labelled_crop

from .conftest import write_phantom_root

ABDOMEN = {
    "background": 0,
    "liver": 1,
    "liver_tumor": 2,
    "pancreas": 3,
    "pancreas_tumor": 4,
    "kidney": 5,
    "kidney_tumor": 6,
}
TUMOR_OF = {1: 2, 3: 4, 5: 6}


def _values(labels: Any) -> list[tuple[str, int, int]]:
    return [(o.name, o.value, o.tumor_value) for o in labels.organs]


# --------------------------------------------------------------------------------------------------
# dataset.json labels, CT normalisation, settings


def test_organs_and_their_tumors_come_from_dataset_json_names() -> None:
    config = NnunetSynthesisConfig()
    assert _values(organ_labels(ABDOMEN, config)) == [("liver", 1, 2), ("pancreas", 3, 4), ("kidney", 5, 6)]
    # MSD / LiTS style: one organ and a lone tumor name
    assert _values(organ_labels({"background": 0, "Liver": 1, "cancer": 2}, config)) == [("liver", 1, 2)]
    assert _values(organ_labels({"background": 0, "kidneys": 1, "kidney tumours": 2, "cyst": 3}, config)) == [
        ("kidney", 1, 2)
    ]
    assert _values(organ_labels({"background": 0, "lung": 1, "lesion": 2}, config)) == [("lung", 1, 2)]
    # an organ without a tumor class gets no tumors; the others do
    partial = {"background": 0, "liver": 1, "liver_tumor": 2, "spleen": 3, "pancreas": 4}
    assert _values(organ_labels(partial, config)) == [("liver", 1, 2)]
    # choose organs; give values for names freetumor does not know
    assert _values(organ_labels(ABDOMEN, NnunetSynthesisConfig(organs=("kidney",)))) == [("kidney", 5, 6)]
    odd = {"background": 0, "hepar": 1, "hepar_lesion": 7}
    assert _values(organ_labels(odd, NnunetSynthesisConfig(labels={"liver": (1, 7)}))) == [("liver", 1, 7)]


@pytest.mark.parametrize(
    ("labels", "config", "says"),
    [
        ({"background": 0, "spleen": 1}, NnunetSynthesisConfig(), "names no organ with its tumor"),
        ({"background": 0, "liver": 1}, NnunetSynthesisConfig(), "names no organ with its tumor"),
        (ABDOMEN, NnunetSynthesisConfig(organs=("lung",)), "names no lung with its tumor"),
        # KiTS23 in nnU-Net: region-based labels need explicit values
        (
            {"background": 0, "kidney": [1, 2, 3], "kidney_tumor": 2, "masses": [2, 3]},
            NnunetSynthesisConfig(),
            "region-based labels need explicit values",
        ),
        (ABDOMEN, NnunetSynthesisConfig(labels={"liver": (1, 9)}), "not one of dataset.json's integer labels"),
        (
            {**ABDOMEN, "lung": 7, "lung_lesion": 8},
            NnunetSynthesisConfig(organs=("liver", "lung")),
            "must lie in one region",
        ),
    ],
)
def test_labels_freetumor_cannot_use_are_refused_with_what_to_set(
    labels: dict[str, Any], config: NnunetSynthesisConfig, says: str
) -> None:
    with pytest.raises(ConfigError, match=says) as info:
        organ_labels(labels, config)
    assert "\n" not in str(info.value)


PROPERTIES = {"0": {"mean": 100.0, "std": 40.0, "percentile_00_5": -20.0, "percentile_99_5": 220.0}}


def test_ct_normalisation_spacing_and_body_axis_come_from_the_plans() -> None:
    setup = patch_synthesis(
        ABDOMEN,
        spacing=(2.5, 0.8, 0.8),
        normalization_schemes=["CTNormalization"],
        intensity_properties=PROPERTIES,
        transpose_forward=(0, 1, 2),
    )
    ct = setup.intensity
    assert ct == CtIntensity(100.0, 40.0, -20.0, 220.0)
    assert ct.per_hu == pytest.approx(1 / 40)
    assert ct.value_range == pytest.approx((-3.0, 3.0))
    # nnU-Net's CTNormalization: clip to the percentiles, minus mean, divided by std
    np.testing.assert_allclose(ct.normalise(np.array([-500.0, 100.0, 140.0, 900.0])), [-3.0, 0.0, 1.0, 3.0])
    assert setup.spacing_mm == (2.5, 0.8, 0.8) and setup.body_axis == 0 and setup.channel == 0
    rule = setup.rule
    assert rule.hu_change == (65.0, 145.0) and rule.scale == pytest.approx(1 / 40)
    # the image files' slice axis (first in nnU-Net's arrays) moved last by transpose_forward
    moved = patch_synthesis(
        ABDOMEN,
        spacing=(0.8, 0.8, 2.5),
        normalization_schemes=["ZScoreNormalization", "CTNormalization"],
        intensity_properties={"1": PROPERTIES["0"]},
        transpose_forward=(1, 2, 0),
    )
    assert moved.body_axis == 2 and moved.channel == 1
    summary = json.loads(json.dumps(moved.summary()))
    assert summary["ct_channel"] == 1 and summary["hu_change"] == [65.0, 145.0]


@pytest.mark.parametrize(
    ("schemes", "spacing", "says"),
    [
        (["ZScoreNormalization"], (1.0, 1.0, 1.0), "no channel is normalised with CTNormalization"),
        (["CTNormalization", "CTNormalization"], (1.0, 1.0, 1.0), r"channels \[0, 1\] are normalised"),
        (["CTNormalization"], (1.0, 1.0), "needs a 3D configuration"),
    ],
)
def test_a_dataset_without_one_ct_channel_or_a_2d_configuration_is_refused(
    schemes: list[str], spacing: tuple[float, ...], says: str
) -> None:
    with pytest.raises(ConfigError, match=says):
        patch_synthesis(ABDOMEN, spacing=spacing, normalization_schemes=schemes, intensity_properties=PROPERTIES)


def test_settings_come_from_the_trainer_then_a_file_then_the_set_variable(tmp_path: Path) -> None:
    base = NnunetSynthesisConfig(prob=0.5, size="small")
    assert synthesis_config_from_env(base, {}) == base
    file = tmp_path / "synth.yaml"
    file.write_text(yaml.safe_dump({"size": "medium", "organs": ["liver"], "seed": 3}))
    config = synthesis_config_from_env(
        base,
        {
            CONFIG_ENV: str(file),
            SET_ENV: "seed=7 rules.abdomen_hu_change=[60,120] labels.liver=[1,2] 'organs=[liver, kidney]'",
        },
    )
    assert (config.prob, config.size, config.organs, config.seed) == (0.5, "medium", ("liver", "kidney"), 7)
    assert config.rules.abdomen_hu_change == (60.0, 120.0) and config.labels == {"liver": (1, 2)}
    for bad, says in (
        ("probability=0.5", "unknown configuration key 'probability'"),
        ("prob=2", "prob must lie in"),
        ("size=huge", "size must be one of"),
        ("organs=[spleen]", "unknown organ 'spleen'"),
        ("seed='3", "cannot be read"),
    ):
        with pytest.raises(ConfigError, match=says):
            synthesis_config_from_env(None, {SET_ENV: bad})


# --------------------------------------------------------------------------------------------------
# A raw nnU-Net dataset from a prepared folder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from freetumor_cli.core.prepare import PrepareConfig, prepare

    # names of its own: other modules' fixtures find theirs as root0 and prepared0
    root = write_phantom_root(tmp_path_factory.mktemp("nnunet_root"), labelled=2, organ_only=2)
    out = tmp_path_factory.mktemp("nnunet_prepared") / "prepared"
    prepare(root, out, PrepareConfig(folds=2, seed=1, store=False))
    return out


def test_a_raw_dataset_holds_every_case_with_labels_on_its_image_grid(prepared: Path, tmp_path: Path) -> None:
    from freetumor_cli.core.prepare import read_manifest

    result = write_nnunet_dataset(prepared, tmp_path / "raw", "Dataset901_Phantom")
    folder = tmp_path / "raw" / "Dataset901_Phantom"
    assert result.folder == folder and (result.written, result.reused) == (4, 0)
    assert result.roles == {"tumor-labelled": 2, "organ-only": 2}
    index = json.loads((folder / "dataset.json").read_text())
    assert index["labels"] == ABDOMEN and index["numTraining"] == 4 and index["file_ending"] == ".nii.gz"
    assert index["channel_names"] == {"0": "CT"}
    cases = json.loads((folder / "freetumor" / "cases.json").read_text())
    records = {f"{r['dataset']}_{r['case']}": r for r in read_manifest(prepared)}
    assert set(cases) == set(records)
    for case_id, record in records.items():
        image = folder / "imagesTr" / f"{case_id}_0000.nii.gz"
        label = folder / "labelsTr" / f"{case_id}.nii.gz"
        assert image.is_symlink() and image.resolve() == Path(record["image"]).resolve()
        written, source = nib.load(label), nib.load(record["label"])
        # the prepared label space (LiTS 1/2 and BTCV's organs unchanged), on the image's own grid
        np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(source.dataobj))
        assert written.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(written.affine, nib.load(image).affine)
        assert cases[case_id]["role"] == record["role"] and cases[case_id]["fold"] == record["fold"]
    splits = json.loads((folder / "freetumor" / "splits_final.json").read_text())
    assert len(splits) == 2
    for fold, split in enumerate(splits):
        assert set(split["val"]) == {c for c, r in records.items() if r["fold"] == fold}
        assert set(split["train"]) | set(split["val"]) == set(records) and not set(split["train"]) & set(split["val"])
    # a rerun adds what is missing and leaves the rest
    next(iter((folder / "labelsTr").glob("BTCV_*.nii.gz"))).unlink()
    again = write_nnunet_dataset(prepared, tmp_path / "raw", "Dataset901_Phantom")
    assert (again.written, again.reused) == (1, 3)


def test_a_raw_dataset_passes_nnunets_own_integrity_check(prepared: Path, tmp_path: Path) -> None:
    verify = pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity")
    result = write_nnunet_dataset(prepared, tmp_path, "Dataset908_Phantom")
    verify.verify_dataset_integrity(str(result.folder), 1)  # raises on any defect: geometry, labels, names


def test_an_organ_task_writes_its_own_labels_and_copies_when_asked(prepared: Path, tmp_path: Path) -> None:
    from freetumor_cli.core.prepare import read_manifest

    write_nnunet_dataset(prepared, tmp_path, "Dataset902_Liver", task_name="liver", copy=True)
    folder = tmp_path / "Dataset902_Liver"
    index = json.loads((folder / "dataset.json").read_text())
    assert index["labels"] == {"background": 0, "liver": 1, "liver_tumor": 2}
    for record in read_manifest(prepared):
        case_id = f"{record['dataset']}_{record['case']}"
        image = folder / "imagesTr" / f"{case_id}_0000.nii.gz"
        assert not image.is_symlink() and image.read_bytes() == Path(record["image"]).read_bytes()
        source = np.asarray(nib.load(record["label"]).dataobj)
        labels = np.asarray(nib.load(folder / "labelsTr" / f"{case_id}.nii.gz").dataobj)
        np.testing.assert_array_equal(labels, np.where(np.isin(source, (1, 2)), source, 0))


def test_a_raw_dataset_is_never_mixed_with_another(prepared: Path, tmp_path: Path) -> None:
    write_nnunet_dataset(prepared, tmp_path, "Dataset903_Phantom")
    with pytest.raises(OutputExistsError, match="other settings"):
        write_nnunet_dataset(prepared, tmp_path, "Dataset903_Phantom", task_name="liver")
    with pytest.raises(ConfigError, match="already holds dataset 903 as Dataset903_Phantom"):
        write_nnunet_dataset(prepared, tmp_path, "Dataset903_Other")
    foreign = tmp_path / "other" / "Dataset904_Theirs"
    (foreign / "imagesTr").mkdir(parents=True)
    with pytest.raises(OutputExistsError, match="freetumor did not write"):
        write_nnunet_dataset(prepared, tmp_path / "other", "Dataset904_Theirs")
    with pytest.raises(ConfigError, match="DatasetNNN_Name"):
        write_nnunet_dataset(prepared, tmp_path, "Liver501")
    with pytest.raises(InputError, match="not a prepared folder"):
        write_nnunet_dataset(tmp_path, tmp_path / "raw", "Dataset905_X")
    with pytest.raises(InputError, match="holds no case of the task covid"):
        write_nnunet_dataset(prepared, tmp_path / "raw", "Dataset905_X", task_name="covid")


def test_the_commands_print_the_trainer_folder_and_write_a_dataset(
    prepared: Path, tmp_path: Path, runner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = runner.invoke(app, ["nnunet", "trainer-path"])
    assert out.exit_code == 0, out.output
    folder = Path(out.stdout.strip().splitlines()[-1])
    assert folder == trainer_folder() and (folder / "freetumor_trainers.py").is_file()
    # nnU-Net imports each module of that folder by its bare name: only the trainer's may be there
    assert sorted(p.name for p in folder.glob("*.py")) == ["__init__.py", "freetumor_trainers.py"]
    # where nnU-Net's search for external trainers would fail, it says so (on stderr) and why
    monkeypatch.setitem(sys.modules, "torchvision", None)  # an import that fails
    warned = runner.invoke(app, ["nnunet", "trainer-path"])
    assert warned.exit_code == 0 and warned.stdout.strip().splitlines()[-1] == str(folder)
    assert "nnUNetv2_train cannot search for external trainers" in warned.stderr or "nnunetv2 is not installed" in (
        warned.stderr
    )

    monkeypatch.delenv("nnUNet_raw", raising=False)
    refused = runner.invoke(app, ["nnunet", "dataset", "--data", str(prepared)])
    assert refused.exit_code == 2 and "set nnUNet_raw" in refused.output
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    done = runner.invoke(app, ["nnunet", "dataset", "--data", str(prepared), "--dataset", "Dataset906_Phantom"])
    assert done.exit_code == 0, done.output
    assert "4 case(s) (2 organ-only, 2 tumor-labelled)" in done.output
    assert "nnUNetv2_plan_and_preprocess -d 906" in done.output
    assert (tmp_path / "raw" / "Dataset906_Phantom" / "dataset.json").is_file()
    missing = runner.invoke(app, ["nnunet", "dataset", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path)])
    assert missing.exit_code == 3 and "run freetumor prepare first" in missing.output


# --------------------------------------------------------------------------------------------------
# The batchgeneratorsv2 transform on nnU-Net patches (needs nnunetv2)


def _dataset_case(seed: int, *, real_tumor: bool) -> tuple[np.ndarray, np.ndarray]:
    """A phantom as nnU-Net holds it after preprocessing: HU and labels in (z, y, x) order, 2.5 × 2 × 2 mm."""
    p = make_phantom((96, 88, 56), (2.0, 2.0, 2.5), seed=seed, tumors={"liver": 1} if real_tumor else 0)
    return p.ct.array.transpose(2, 1, 0).astype(np.float32), p.labels.array.transpose(2, 1, 0).astype(np.int16)


SPACING = (2.5, 2.0, 2.0)
PATCH = (32, 48, 48)


@pytest.fixture(scope="module")
def cases() -> list[tuple[np.ndarray, np.ndarray]]:
    return [_dataset_case(seed, real_tumor=seed % 2 == 1) for seed in range(4)]


@pytest.fixture(scope="module")
def setup(cases: list[tuple[np.ndarray, np.ndarray]]) -> PatchSynthesis:
    # the dataset's foreground statistics, as nnU-Net's fingerprint takes them
    foreground = np.concatenate([hu[seg > 0] for hu, seg in cases])
    properties = {
        "mean": float(foreground.mean()),
        "std": float(foreground.std()),
        "percentile_00_5": float(np.percentile(foreground, 0.5)),
        "percentile_99_5": float(np.percentile(foreground, 99.5)),
    }
    return patch_synthesis(
        ABDOMEN, spacing=SPACING, normalization_schemes=["CTNormalization"], intensity_properties={"0": properties}
    )


def _patches(
    cases: list[tuple[np.ndarray, np.ndarray]], setup: PatchSynthesis, n: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Random patches as nnU-Net's loader cuts them: windows that may leave the case, the image padded with 0
    and the labels with -1 there. Returns (normalised image (1, X, Y, Z), labels (1, X, Y, Z), clipped HU)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        hu, seg = cases[int(rng.integers(len(cases)))]
        shape = np.array(hu.shape)
        lo = np.array([int(rng.integers(-p // 2, s - p // 2)) for s, p in zip(shape, PATCH, strict=True)])
        src = tuple(slice(max(a, 0), min(a + p, s)) for a, p, s in zip(lo, PATCH, shape, strict=True))
        dst = tuple(slice(b.start - a, b.stop - a) for a, b in zip(lo, src, strict=True))
        image = np.zeros(PATCH, np.float32)
        labels = np.full(PATCH, -1, np.int16)
        clipped = np.clip(hu[src], setup.intensity.lower, setup.intensity.upper)
        image[dst] = setup.intensity.normalise(hu[src])
        labels[dst] = seg[src]
        hu_patch = np.full(PATCH, setup.intensity.mean, np.float32)  # normalised 0 is the mean in HU
        hu_patch[dst] = clipped
        out.append((image[None], labels[None], hu_patch))
    return out


def _apply(transform: Any, image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One sample through ``transform`` as nnU-Net's loader calls its transforms (one thread, no autograd)."""
    import torch
    from threadpoolctl import threadpool_limits

    with torch.no_grad(), threadpool_limits(limits=1, user_api=None):
        out = transform(image=torch.from_numpy(image.copy()), segmentation=torch.from_numpy(labels.copy()))
    return out["image"].numpy(), out["segmentation"].numpy()


def _eligible(labels: np.ndarray) -> bool:
    """A patch holding an organ part the engine may use, and no real tumor."""
    organ = any(np.count_nonzero(labels == v) >= 8 for v in TUMOR_OF)
    return organ and not np.isin(labels, list(TUMOR_OF.values())).any()


def test_the_transform_inserts_a_tumor_inside_an_organ_of_many_patches(
    cases: list[tuple[np.ndarray, np.ndarray]], setup: PatchSynthesis
) -> None:
    pytest.importorskip("nnunetv2")
    from freetumor_cli.core.nnunet_trainer import TumorSynthesisTransform

    transform = TumorSynthesisTransform(setup)
    lower, upper = setup.intensity.value_range
    eligible = synthesized = padded = 0
    sizes = []
    for image, labels, _ in _patches(cases, setup, 240, seed=0):
        out_image, out_labels = _apply(transform, image, labels)
        seg, new = labels[0], out_labels[0]
        padded += bool((seg == -1).any())
        np.testing.assert_array_equal(out_labels[0][seg == -1], -1)  # padding is neither organ nor tumor
        np.testing.assert_array_equal(out_image[0][seg == -1], image[0][seg == -1])
        if not _eligible(seg):
            np.testing.assert_array_equal(out_image, image)  # no organ, or a real tumor: unchanged
            np.testing.assert_array_equal(out_labels, labels)
            continue
        eligible += 1
        tumor = new != seg
        if not tumor.any():
            np.testing.assert_array_equal(out_image, image)
            continue
        synthesized += 1
        organ_value = int(np.unique(seg[tumor])[0])
        assert set(np.unique(seg[tumor])) == {organ_value} and organ_value in TUMOR_OF  # inside one organ
        assert set(np.unique(new[tumor])) == {TUMOR_OF[organ_value]}  # its voxels carry that organ's tumor value
        changed = out_image[0] != image[0]
        darkened = changed | (image[0] <= lower + 1e-6)  # a voxel at the clipping bound cannot get darker
        assert darkened[tumor].mean() > 0.9, darkened[tumor].mean()
        assert np.all(seg[changed] == organ_value)  # the image changes only inside the organ
        assert np.all(out_image[0][changed] < image[0][changed])  # abdominal tumors are darker
        assert out_image.min() >= lower - 1e-6 and out_image.max() <= upper + 1e-6  # within the clipped range
        sizes.append(int(tumor.sum()))
    assert padded > 40 and eligible > 60, (padded, eligible)
    assert synthesized >= 0.8 * eligible, (synthesized, eligible)
    assert transform.synthesized == synthesized and transform.patches == 240
    assert len(set(sizes)) > 10  # every patch its own tumor


def test_the_change_is_the_engines_hu_change_divided_by_the_datasets_std(
    cases: list[tuple[np.ndarray, np.ndarray]], setup: PatchSynthesis
) -> None:
    pytest.importorskip("nnunetv2")
    from freetumor_cli.core.nnunet_trainer import TumorSynthesisTransform

    hu_rule = RuleIntensity.for_region("abdomen", SynthesisConfig())
    lower, upper = setup.intensity.value_range
    compared = clipped = 0
    deepest: list[float] = []
    for seed, (image, labels, hu) in enumerate(_patches(cases, setup, 80, seed=1)):
        if not _eligible(labels[0]):
            continue
        transform = TumorSynthesisTransform(setup)
        transform.rng = np.random.default_rng(seed)
        out_image, out_labels = _apply(transform, image, labels)
        engine = synthesize_in_labelled_crop(
            hu, labels[0], setup.labels, rng=np.random.default_rng(seed), spacing_mm=SPACING, intensity=hu_rule,
            body_axis=setup.body_axis, config=SynthesisConfig(),
        )  # fmt: skip
        if engine is None:
            np.testing.assert_array_equal(out_image, image)
            continue
        np.testing.assert_array_equal(out_labels[0], engine.label)  # the same tumor
        change_hu = engine.image - hu
        deepest.append(float(change_hu.min()))
        expected = np.clip(image[0] + change_hu * setup.intensity.per_hu, lower, upper)
        np.testing.assert_allclose(out_image[0], expected, atol=1e-4)
        compared += 1
        clipped += bool(np.any(image[0] + change_hu * setup.intensity.per_hu < lower - 1e-3))
    assert compared > 20 and clipped > 0, (compared, clipped)
    assert max(deepest) < 0 and min(deepest) < -60  # every tumor darker; HU changes of the engine's range


def test_patches_without_an_organ_with_a_real_tumor_or_only_padding_are_unchanged(setup: PatchSynthesis) -> None:
    pytest.importorskip("nnunetv2")
    from freetumor_cli.core.nnunet_trainer import TumorSynthesisTransform

    transform = TumorSynthesisTransform(setup)
    image = np.random.default_rng(0).normal(size=(1, *PATCH)).astype(np.float32)
    organ = np.zeros(PATCH, np.int16)
    organ[4:28, 8:40, 8:40] = 1
    with_tumor = organ.copy()
    with_tumor[14:18, 20:24, 20:24] = 2  # a real liver tumor
    other_tumor = organ.copy()
    other_tumor[0:2, 0:2, 0:2] = 6  # a real kidney tumor elsewhere in the patch
    padding = np.full(PATCH, -1, np.int16)
    for labels in (np.zeros(PATCH, np.int16), with_tumor, other_tumor, padding):
        out_image, out_labels = _apply(transform, image, labels[None])
        np.testing.assert_array_equal(out_image, image)
        np.testing.assert_array_equal(out_labels[0], labels)
    out_image, out_labels = _apply(transform, image, organ[None])
    assert (out_labels == 2).any() and transform.synthesized == 1
    never = TumorSynthesisTransform(replace(setup, config=NnunetSynthesisConfig(prob=0.0)))
    np.testing.assert_array_equal(_apply(never, image, organ[None])[1][0], organ)


def test_the_patch_function_changes_its_inputs_only_when_asked(
    cases: list[tuple[np.ndarray, np.ndarray]], setup: PatchSynthesis
) -> None:
    from freetumor_cli.core.nnunet import synthesize_in_patch

    image, labels, _ = next(p for p in _patches(cases, setup, 40, seed=3) if _eligible(p[1][0]))
    kept_image, kept_labels = image.copy(), labels.copy()
    copied = synthesize_in_patch(image, labels[0], setup, np.random.default_rng(5))
    assert copied is not None and copied.mask.any()
    np.testing.assert_array_equal(image, kept_image)
    np.testing.assert_array_equal(labels, kept_labels)
    written = synthesize_in_patch(image, labels[0], setup, np.random.default_rng(5), in_place=True)
    assert written is not None
    assert np.shares_memory(written.image, image) and np.shares_memory(written.label, labels)
    np.testing.assert_array_equal(image[0], copied.image)  # the same tumor, written into the patch itself
    np.testing.assert_array_equal(labels[0], copied.label)
    assert labels.dtype == np.int16  # nnU-Net's label dtype is kept


def _tumors(transform: Any, patches: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    return [_apply(transform, image, labels)[1][0] for image, labels, _ in patches]


def _in_worker(transform: Any, patches: Any, numpy_seed: int, queue: Any) -> None:
    np.random.seed(numpy_seed)  # as batchgenerators seeds each augmentation worker
    queue.put([t.tobytes() for t in _tumors(transform, patches)])


def test_the_transform_is_seeded_and_each_worker_process_draws_its_own_tumors(
    cases: list[tuple[np.ndarray, np.ndarray]], setup: PatchSynthesis
) -> None:
    pytest.importorskip("nnunetv2")
    from freetumor_cli.core.nnunet_trainer import TumorSynthesisTransform

    patches = [p for p in _patches(cases, setup, 60, seed=2) if _eligible(p[1][0])][:12]
    assert len(patches) == 12
    seeded = [TumorSynthesisTransform(setup) for _ in range(2)]
    first, again = (_tumors(t, patches) for t in seeded)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))  # same seed, same tumors
    other = TumorSynthesisTransform(replace(setup, config=NnunetSynthesisConfig(seed=1)))
    assert not all(np.array_equal(a, b) for a, b in zip(first, _tumors(other, patches), strict=True))

    # Two worker processes, as nnU-Net's augmenter forks them: each gets a copy of the parent's transform.
    context = multiprocessing.get_context("fork")
    results = []
    for numpy_seed in (1, 2, 1):
        queue = context.Queue()
        worker = context.Process(target=_in_worker, args=(TumorSynthesisTransform(setup), patches, numpy_seed, queue))
        worker.start()
        results.append(queue.get(timeout=60))
        worker.join(timeout=30)
    parent = [t.tobytes() for t in first]
    assert results[0] != parent and results[1] != parent  # not the parent's stream
    assert results[0] != results[1]  # nor each other's
    assert results[0] == results[2]  # and repeatable from the worker's seed


def test_the_trainer_puts_the_transform_right_after_the_spatial_transform(setup: PatchSynthesis) -> None:
    pytest.importorskip("nnunetv2")
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform
    from batchgeneratorsv2.transforms.utils.random import RandomTransform

    from freetumor_cli.core.nnunet_trainer import TumorSynthesisTransform, nnUNetTrainerFreeTumor

    trainer = object.__new__(nnUNetTrainerFreeTumor)  # the chain needs no dataset on disk
    trainer.tumor_synthesis = setup
    for dummy_2d in (False, True):
        chain = trainer.get_training_transforms(
            np.array(PATCH), (-0.5, 0.5), None, (0, 1, 2), dummy_2d, use_mask_for_norm=[False]
        )
        steps = list(chain.transforms)
        kinds = [type(t) for t in steps]
        at = kinds.index(TumorSynthesisTransform)
        spatial = kinds.index(SpatialTransform)
        assert at == spatial + (2 if dummy_2d else 1), kinds
        if dummy_2d:
            assert kinds[spatial + 1] is Convert2DTo3DTransform
        intensity = [i for i, t in enumerate(steps) if isinstance(t, RandomTransform)]
        assert intensity and min(intensity) > at  # noise, blur, brightness, contrast, gamma follow it
        assert kinds.count(TumorSynthesisTransform) == 1

    # the whole chain on an nnU-Net sample: the tumor comes out in the training target
    import torch

    organ = np.zeros((1, *PATCH), np.int16)
    organ[0, 4:28, 8:40, 8:40] = 1
    chain = trainer.get_training_transforms(np.array(PATCH), (-0.5, 0.5), None, (0, 1, 2), False)
    out = chain(image=torch.zeros((1, *PATCH)), segmentation=torch.from_numpy(organ))
    assert (out["segmentation"] == 2).any()


def test_the_trainer_stops_on_a_dataset_it_cannot_use_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("nnunetv2")
    from types import SimpleNamespace

    from freetumor_cli.core.nnunet_trainer import nnUNetTrainerFreeTumor

    trainer = object.__new__(nnUNetTrainerFreeTumor)
    trainer.was_initialized = False
    trainer.dataset_json = {"labels": {"background": 0, "spleen": 1}}
    trainer.configuration_manager = SimpleNamespace(spacing=[1.0, 1.0, 1.0], normalization_schemes=["CTNormalization"])
    trainer.plans_manager = SimpleNamespace(
        foreground_intensity_properties_per_channel=PROPERTIES, transpose_forward=[0, 1, 2]
    )
    with pytest.raises(SystemExit) as info:
        trainer.initialize()
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("freetumor: error: dataset.json names no organ") and "\n" not in err


# --------------------------------------------------------------------------------------------------
# nnU-Net's own commands on phantoms

SMOKE_TRAINER = '''
import json, os
import numpy as np
from freetumor_cli.core.nnunet_trainer import nnUNetTrainerFreeTumor


class nnUNetTrainerFreeTumorSmoke(nnUNetTrainerFreeTumor):
    """A few iterations, and what reached the network written down."""

    def initialize(self):
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 4, 1
        self.seen = []
        super().initialize()

    def train_step(self, batch):
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        for j, key in enumerate(batch["keys"]):
            seg = target[j, 0].numpy()
            tumor, organ = np.isin(seg, (2, 4, 6)), np.isin(seg, (1, 3, 5))
            self.seen.append({"case": str(key), "tumor": int(tumor.sum()), "organ": int(organ.sum())})
        return super().train_step(batch)

    def on_train_end(self):
        super().on_train_end()
        with open(os.path.join(self.output_folder, "seen.json"), "w") as handle:
            json.dump(self.seen, handle)

    def perform_actual_validation(self, save_probabilities=False):
        pass
'''


def _external_trainers_load() -> str | None:
    """Why nnUNetv2_train could not find an external trainer here, or None."""
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    if probe.returncode:
        return "torchvision does not import beside this torch: " + probe.stderr.strip().splitlines()[-1]
    return None


@pytest.mark.slow
def test_nnunet_plans_preprocesses_and_trains_with_synthetic_tumors_in_its_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("nnunetv2")
    reason = _external_trainers_load()
    if reason:  # nnU-Net's search for -tr imports timm, and timm torchvision (see the README)
        pytest.skip(reason)
    from freetumor_cli.core.prepare import PrepareConfig, prepare

    root = write_phantom_root(tmp_path / "data", labelled=3, organ_only=3)
    prepare(root, tmp_path / "prepared", PrepareConfig(folds=5, store=False))
    write_nnunet_dataset(tmp_path / "prepared", tmp_path / "raw", "Dataset907_Phantom")
    ext = tmp_path / "ext"
    ext.mkdir()
    (ext / "smoke_trainers.py").write_text(SMOKE_TRAINER)
    env = {
        **os.environ,
        "nnUNet_raw": str(tmp_path / "raw"),
        "nnUNet_preprocessed": str(tmp_path / "preprocessed"),
        "nnUNet_results": str(tmp_path / "results"),
        "nnUNet_extTrainer": os.pathsep.join([str(trainer_folder()), str(ext)]),
        "nnUNet_n_proc_DA": "2",
        "OMP_NUM_THREADS": "2",
    }
    bin_dir = Path(sys.executable).parent
    for command in (
        ["nnUNetv2_plan_and_preprocess", "-d", "907", "-c", "3d_fullres", "-np", "1", "--verify_dataset_integrity"],
        ["nnUNetv2_train", "907", "3d_fullres", "0", "-tr", "nnUNetTrainerFreeTumorSmoke", "-device", "cpu"],
    ):
        executable = shutil.which(command[0], path=str(bin_dir)) or command[0]
        run = subprocess.run([executable, *command[1:]], env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    fold = (
        tmp_path / "results" / "Dataset907_Phantom" / "nnUNetTrainerFreeTumorSmoke__nnUNetPlans__3d_fullres" / "fold_0"
    )
    settings = json.loads((fold / "freetumor_synthesis.json").read_text())
    assert [o["organ"] for o in settings["organs"]] == ["liver", "pancreas", "kidney"]
    assert settings["spacing_mm"] == [4.0, 4.0, 4.0]
    seen = json.loads((fold / "seen.json").read_text())
    assert len(seen) == 8  # 4 iterations of 2 patches
    # organ-only cases hold no real tumor: every tumor voxel in their patches is synthetic
    synthetic = [s for s in seen if s["case"].startswith("BTCV_") and s["tumor"] > 0]
    assert synthetic, seen
