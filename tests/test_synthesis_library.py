"""Synthesis as a library: the intensity seam, overlap composition, the in-memory API, the MONAI
transforms, per-case streams, parts, workers and the output layouts."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from freetumor_cli.app import app
from freetumor_cli.core.engines import RuleIntensity, Scene, TumorGeometry, compose_changes, engine_of
from freetumor_cli.core.errors import InputError, LabelError, OrganTooSmallError
from freetumor_cli.core.io import load_volume, save_volume
from freetumor_cli.core.phantom import Phantom, make_phantom
from freetumor_cli.core.registry import ORGANS
from freetumor_cli.core.synthesis_config import SynthesisConfig
from freetumor_cli.core.synthesize import synthesize_tumors
from freetumor_cli.core.tumor import place_tumors, synthesize_in_organ

from .conftest import oblique_affine

LIVER = ORGANS["liver"]
SPACING = (4.0, 4.0, 4.0)


def _liver(phantom: Phantom) -> np.ndarray:
    return phantom.labels.array == LIVER.value


class HalfRule:
    """A custom engine: a fixed 30 HU darkening per unit of profile."""

    name = "half"

    def change(self, tumor: TumorGeometry, scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        return (-30.0 * tumor.profile).astype(np.float32), -30.0


def test_an_intensity_model_gets_the_geometry_and_gives_the_change(small_phantom: Phantom) -> None:
    ct, liver = small_phantom.ct, _liver(small_phantom)
    common = {"spacing": ct.spacing, "affine": ct.affine, "size": "small", "count": 2}
    placement = place_tumors(liver, LIVER, rng=np.random.default_rng(4), **common)
    custom = synthesize_in_organ(ct.array, liver, LIVER, rng=np.random.default_rng(4), intensity=HalfRule(), **common)
    # The geometry is the engine's whatever the intensity: same voxels, same profile.
    np.testing.assert_array_equal(custom.tumor_mask, placement.tumor_mask)
    np.testing.assert_allclose(custom.change(), -30.0 * placement.profile(), atol=1e-4)
    assert all(t.intensity_change_hu == -30.0 for t in custom.tumors)
    assert all(0 < -t.mean_hu_change <= 30.0 for t in custom.tumors)
    # The rule: sign · d · profile, d in the region's range, scaled to a window without touching the config.
    rule = RuleIntensity.for_region("abdomen", SynthesisConfig(), window_hu=(-175.0, 250.0))
    assert rule.hu_change == (65.0, 145.0) and rule.scale == pytest.approx(1 / 425)
    profile = np.ones((2, 2, 2), np.float32)
    np.testing.assert_allclose(rule.of_profile(profile, -1.0, 85.0), -0.2)
    assert engine_of("rules") == engine_of(None) == "rules" and engine_of("TGAN.pt") == "generator"


def test_overlapping_tumors_are_no_darker_than_the_darkest_one(small_phantom: Phantom) -> None:
    ct, liver = small_phantom.ct, _liver(small_phantom)
    result = synthesize_in_organ(
        ct.array,
        liver,
        LIVER,
        spacing=ct.spacing,
        affine=ct.affine,
        rng=np.random.default_rng(0),
        size="small",
        count=10,
    )
    change = result.change()
    per_tumor = np.zeros((len(result.patches), *change.shape), np.float32)
    for k, (box, delta) in enumerate(result.patches):
        per_tumor[k][box] = delta
    overlap = (per_tumor != 0).sum(axis=0) > 1
    assert overlap.any(), "ten small tumors in a small liver overlap somewhere"
    np.testing.assert_allclose(change, per_tumor.min(axis=0))  # the darkest wins, never the sum
    assert change.min() >= -max(SynthesisConfig().abdomen_hu_change)
    assert (change[overlap] > per_tumor.sum(axis=0)[overlap] + 1e-3).any()
    # compose_changes: the magnitude wins for either sign.
    out = compose_changes([((slice(0, 2),), np.array([-1.0, 3.0])), ((slice(1, 3),), np.array([-5.0, 2.0]))], (3,))
    np.testing.assert_array_equal(out, [-1.0, -5.0, 2.0])


def test_the_tumor_share_of_an_organ_is_bounded(small_phantom: Phantom) -> None:
    ct, liver = small_phantom.ct, _liver(small_phantom)
    config = replace(SynthesisConfig(), max_tumor_share=0.02)
    result = synthesize_in_organ(
        ct.array, liver, LIVER, spacing=ct.spacing, affine=ct.affine, rng=np.random.default_rng(1),
        size="tiny", count=100, config=config,
    )  # fmt: skip
    share = result.tumor_mask.sum() / liver.sum()
    assert share <= 0.02 and len(result.tumors) < 100
    assert any("max_tumor_share" in n for n in result.notes)
    with pytest.raises(ValueError, match="max_tumor_share"):
        SynthesisConfig(max_tumor_share=0.0)


def test_the_tumor_share_holds_for_the_first_tumor_too(totalseg_case: Path) -> None:
    """Large tumors in a real 3 mm liver (1043 ml), one per call, 60 draws: none passes 30 % of the liver
    (without the cap on the first tumor, about one in four did, up to 47 %)."""
    from freetumor_cli.core.tumor import prepare_organ

    organs = load_volume(totalseg_case / "organs.nii.gz")
    liver = organs.array == 1
    config = SynthesisConfig()
    geometry = prepare_organ(liver, LIVER, spacing=organs.spacing, affine=organs.affine, config=config)
    shares = []
    for seed in range(60):
        placement = place_tumors(
            None, LIVER, spacing=organs.spacing, affine=organs.affine, rng=np.random.default_rng(seed),
            size="large", count=1, config=config, geometry=geometry,
        )  # fmt: skip
        assert len(placement.tumors) == 1 and placement.tumors[0].record.size_class == "large"
        shares.append(placement.tumor_mask.sum() / liver.sum())
    assert max(shares) <= 0.3 and min(shares) > 0.1, (min(shares), max(shares))
    # A cap no large tumor fits: the first one is refused with what happened; mix draws smaller ones, saying so.
    tight = replace(config, max_tumor_share=0.05)
    with pytest.raises(OrganTooSmallError, match=r"large tumor takes more than 5% of the liver \(1043.\d ml\)"):
        place_tumors(
            liver, LIVER, spacing=organs.spacing, affine=organs.affine, rng=np.random.default_rng(0), size="large",
            config=tight,
        )  # fmt: skip
    notes = []
    for seed in range(10):
        mixed = place_tumors(
            liver, LIVER, spacing=organs.spacing, affine=organs.affine, rng=np.random.default_rng(seed), size="mix",
            count=3, config=tight,
        )  # fmt: skip
        assert mixed.tumor_mask.sum() <= 0.05 * liver.sum() and mixed.tumors
        assert "large" not in {t.record.size_class for t in mixed.tumors}
        notes += mixed.notes
    assert any(n.startswith("mix: a large tumor would make more than 5% of the liver") for n in notes), notes


def test_synthesize_refuses_a_tumor_larger_than_the_share_and_says_why(totalseg_case: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "synthesize", "--in", str(totalseg_case / "ct.nii.gz"), "--labels", str(totalseg_case / "organs.nii.gz"),
            "--label-scheme", "freetumor",
            "--organ", "liver", "--size", "large", "--set", "rules.max_tumor_share=0.1", "-o", str(tmp_path / "o"),
        ],
    )  # fmt: skip
    assert result.exit_code == 3, result.output
    assert "more than 10% of the liver" in " ".join(result.output.split()), result.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("*.nii.gz"))


def test_the_in_memory_api_keeps_geometry_and_dtype_and_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    phantom = make_phantom((72, 64, 48), (4.0, 4.0, 4.0), seed=3)
    affine = oblique_affine((4.0, 4.0, 4.0))
    ct = nib.Nifti1Image(phantom.ct.array.astype(np.int16), affine)
    seg = nib.Nifti1Image(phantom.labels.array.astype(np.uint8), affine)
    before = np.asarray(ct.dataobj).copy()
    with pytest.raises(LabelError, match='label_scheme="freetumor" or label_scheme="totalsegmentator"'):
        synthesize_tumors(ct, seg, "liver", seed=7)  # 1, 3, 5 mean organs in both schemes
    out = synthesize_tumors(ct, seg, "liver", seed=7, size="small", count=2, label_scheme="freetumor")
    assert isinstance(out.image, nib.Nifti1Image) and out.image.shape == ct.shape
    np.testing.assert_allclose(out.image.affine, affine)
    assert np.asarray(out.image.dataobj).dtype == np.int16 and np.asarray(out.label.dataobj).dtype == np.uint8
    assert len(out.tumors) == 2 and out.label_scheme == "freetumor"
    assert (np.asarray(out.label.dataobj) == LIVER.tumor_value).any()
    np.testing.assert_array_equal(np.asarray(ct.dataobj), before)  # the input is not modified
    assert list(tmp_path.iterdir()) == []  # no files
    # Arrays in, arrays out; a bool organ mask is a binary scheme; the same seed, the same tumors.
    arrays = synthesize_tumors(before, phantom.labels.array == 1, "liver", affine=affine, seed=7, size="small", count=2)
    assert arrays.label_scheme == "binary" and arrays.image.dtype == np.int16
    np.testing.assert_array_equal(arrays.image, np.asarray(out.image.dataobj))
    other = synthesize_tumors(before, phantom.labels.array == 1, "liver", affine=affine, seed=8, size="small", count=2)
    assert not np.array_equal(other.image, arrays.image)
    with pytest.raises(InputError, match="affine"):
        synthesize_tumors(before, seg, "liver")
    with pytest.raises(InputError, match="unknown organ"):
        synthesize_tumors(ct, seg, "spleen")


def _crop(phantom: Phantom) -> tuple[np.ndarray, np.ndarray]:
    image = np.clip((phantom.ct.array.astype(np.float32) + 175) / 425, 0, 1)
    return image, phantom.labels.array.astype(np.float32)


def test_rand_tumor_synthd_is_a_randomizable_monai_transform(small_phantom: Phantom) -> None:
    torch = pytest.importorskip("torch")
    from monai.transforms import Compose, Randomizable

    from freetumor_cli.core.transforms import RandTumorGeometryd, RandTumorSynthd

    image, label = _crop(small_phantom)
    liver_only = np.where(label == 1, 1.0, 0.0).astype(np.float32)  # the liver task's label space

    def sample(transform: object, seed: int) -> dict:
        chain = Compose([transform])
        chain.set_random_state(seed=0)
        transform.set_random_state(seed)  # type: ignore[attr-defined]
        return chain({"ct": torch.from_numpy(image[None].copy()), "seg": torch.from_numpy(liver_only[None].copy())})

    synth = RandTumorSynthd(keys=["ct", "seg"], task="liver", spacing_mm=SPACING, window_hu=(-175, 250), size="small")
    assert isinstance(synth, Randomizable)
    a, b, c = sample(synth, 3), sample(synth, 3), sample(synth, 4)
    assert torch.equal(a["ct"], b["ct"]) and not torch.equal(a["ct"], c["ct"])
    # A fresh instance (another loader worker or process) seeded alike draws the same tumor.
    other = RandTumorSynthd(keys=["ct", "seg"], task="liver", spacing_mm=SPACING, window_hu=(-175, 250), size="small")
    assert torch.equal(sample(other, 3)["ct"], a["ct"])
    mask = a["synth_mask"][0].numpy()
    assert mask.any() and (a["seg"][0].numpy()[mask] == 2).all()
    assert (a["ct"][0].numpy()[mask] < image[mask]).mean() > 0.9  # liver tumors are darker
    assert float(a["ct"].min()) >= 0.0 and torch.equal(a["image_orig"][0], torch.from_numpy(image))
    assert int(a["organ_index"]) == 0
    never = RandTumorSynthd(keys=["ct", "seg"], task="liver", spacing_mm=SPACING, prob=0.0)
    untouched = sample(never, 3)
    assert not untouched["synth_mask"].any() and torch.equal(untouched["ct"][0], torch.from_numpy(image))
    geometry = RandTumorGeometryd(keys=["ct", "seg"], task="liver", spacing_mm=SPACING, size="small")
    g = sample(geometry, 3)
    profile, gmask = g["profile"][0].numpy(), g["synth_mask"][0].numpy()
    assert torch.equal(g["ct"][0], torch.from_numpy(image))  # the image stays as it is
    assert gmask.any() and (profile[gmask] > 0).all() and (profile[liver_only == 0] == 0).all()
    with pytest.raises(ValueError, match="image and the label"):
        RandTumorSynthd(keys=["ct"], task="liver")


def test_rand_tumor_synthd_reads_the_spacing_of_a_meta_tensor(small_phantom: Phantom) -> None:
    pytest.importorskip("torch")
    from monai.data import MetaTensor

    from freetumor_cli.core.transforms import RandTumorSynthd

    image, label = _crop(small_phantom)
    affine = np.diag([*SPACING, 1.0])
    data = {"image": MetaTensor(image[None], affine=affine), "label": MetaTensor((label == 1)[None].astype(np.float32))}
    out = RandTumorSynthd(task="liver", window_hu=(-175, 250), size="small").set_random_state(1)(data)
    assert out["synth_mask"].any()
    with pytest.raises(ValueError, match="spacing_mm"):
        RandTumorSynthd(task="liver")({"image": image[None], "label": (label == 1)[None].astype(np.float32)})


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def three_cases(tmp_path: Path, small_phantom: Phantom) -> Path:
    folder = tmp_path / "cts"
    for name in ("alpha", "beta", "gamma"):
        save_volume(small_phantom.ct.array, small_phantom.ct, folder / f"{name}.nii.gz")
        save_volume(small_phantom.labels.array, small_phantom.ct, folder / "labels" / f"{name}.nii.gz", label=True)
    return folder


def _run(*args: object) -> None:
    result = CliRunner().invoke(app, ["synthesize", *(str(a) for a in args)])
    assert result.exit_code == 0, result.output


def test_each_case_has_its_own_stream_and_adding_cases_changes_nobody_else(three_cases: Path, tmp_path: Path) -> None:
    two = tmp_path / "two"
    two.mkdir()
    for name in ("alpha", "beta"):
        shutil.copy(three_cases / f"{name}.nii.gz", two)
    common = ("--organ", "liver", "--labels", three_cases / "labels", "--size", "small", "--seed", "2")
    _run("--in", two, *common, "--out", tmp_path / "o2")
    _run("--in", three_cases, *common, "--out", tmp_path / "o3")
    for name in ("alpha", "beta"):
        stem = f"{name}_liver_synthetic"
        assert _digest(tmp_path / "o2" / f"{stem}.nii.gz") == _digest(tmp_path / "o3" / f"{stem}.nii.gz")
    # Identical inputs, different case ids: different tumors.
    images = {n: _digest(tmp_path / "o3" / f"{n}_liver_synthetic.nii.gz") for n in ("alpha", "beta", "gamma")}
    assert len(set(images.values())) == 3


def test_parts_and_workers_give_the_single_run_exactly_once(three_cases: Path, tmp_path: Path) -> None:
    common = ("--in", three_cases, "--labels", three_cases / "labels", "--organ", "liver", "--seed", "5")
    _run(*common, "--out", tmp_path / "single")
    for part in (0, 1):
        _run(*common, "--out", tmp_path / "parts", "--num-parts", "2", "--part-id", part)
    _run(*common, "--out", tmp_path / "workers", "--workers", "2")
    expected = {p.name: _digest(p) for p in (tmp_path / "single").glob("*.nii.gz")}
    assert len(expected) == 6
    for folder in ("parts", "workers"):
        assert {p.name: _digest(p) for p in (tmp_path / folder).glob("*.nii.gz")} == expected, folder
    result = CliRunner().invoke(app, ["synthesize", *map(str, common), "--out", str(tmp_path / "x"), "--num-parts", "2", "--part-id", "2"])  # fmt: skip
    assert result.exit_code == 2 and "--part-id must lie in 0..1" in result.output


def test_synthesize_cases_selects_a_part_and_counts_failures_and_earlier_outputs(
    three_cases: Path, small_phantom: Phantom, tmp_path: Path
) -> None:
    from freetumor_cli.core.synthesis_config import SynthesizeConfig
    from freetumor_cli.core.synthesize import synthesize_cases

    save_volume(small_phantom.ct.array, small_phantom.ct, three_cases / "delta.nii.gz")  # no label: fails
    config = SynthesizeConfig(organ="liver", size="small", copies=2)
    seen: list[str] = []
    copies: list[int] = []
    out = tmp_path / "out"

    def run(**parts: int) -> object:
        return synthesize_cases(
            three_cases, three_cases / "labels", config, out, num_parts=parts.get("num_parts", 1),
            part_id=parts.get("part_id", 0), on_start=lambda r: seen.append(f"start {len(r.cases)}"),
            on_copy_done=lambda: copies.append(1), on_case=lambda case, _result: seen.append(case.name),
        )  # fmt: skip

    first = run()
    assert (first.all_cases, first.part, first.done_before, first.written) == (4, None, 0, 6)
    assert [(name, type(error).__name__) for name, error in first.failures] == [("delta", "InputError")]
    assert seen == ["start 4", "alpha", "beta", "delta", "gamma"] and len(copies) == 8
    again = run()
    assert (again.done_before, again.written, len(again.failures)) == (3, 0, 1)
    part = run(num_parts=2, part_id=1)
    assert (part.all_cases, part.part, [c.name for c in part.cases]) == (4, (1, 2), ["beta", "gamma"])


def test_layout_monai_writes_a_data_list_of_the_outputs(three_cases: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _run("--in", three_cases, "--labels", three_cases / "labels", "--organ", "liver", "--out", out, "--layout", "monai")
    listed = json.loads((out / "datalist.json").read_text())
    assert len(listed["training"]) == 3 and listed["labels"]["2"] == "liver_tumor"
    for entry in listed["training"]:
        assert (out / entry["image"]).is_file() and (out / entry["label"]).is_file()


def _nnunet_dataset(three_cases: Path, tmp_path: Path) -> Path:
    out = tmp_path / "nnUNet_raw"
    _run(
        "--in", three_cases, "--labels", three_cases / "labels", "--organ", "liver", "--copies", "2",
        "--out", out, "--layout", "nnunet", "--dataset", "Dataset612_LiverSynth",
    )  # fmt: skip
    return out / "Dataset612_LiverSynth"


def test_layout_nnunet_writes_a_raw_dataset(three_cases: Path, tmp_path: Path) -> None:
    root = _nnunet_dataset(three_cases, tmp_path)
    images = sorted(p.name for p in (root / "imagesTr").iterdir())
    labels = sorted(p.name for p in (root / "labelsTr").iterdir())
    assert images == [n.replace(".nii.gz", "_0000.nii.gz") for n in labels] and len(labels) == 6
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["numTraining"] == 6 and meta["channel_names"] == {"0": "CT"} and meta["labels"]["liver_tumor"] == 2
    assert len(list((root / "freetumor").glob("*.json"))) == 6
    result = CliRunner().invoke(
        app, ["synthesize", "--in", str(three_cases), "--organ", "liver", "--layout", "nnunet", "--dataset", "Liver"]
    )
    assert result.exit_code == 2 and "DatasetNNN_Name" in result.output


@pytest.mark.slow
def test_layout_nnunet_passes_nnunets_own_integrity_check(three_cases: Path, tmp_path: Path) -> None:
    verify = pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity")
    root = _nnunet_dataset(three_cases, tmp_path)
    verify.verify_dataset_integrity(str(root), 1)  # raises on any defect


def _write_series(folder: Path, volume: np.ndarray, spacing: tuple[float, float, float]) -> list[np.ndarray]:
    """A CT series, one axial slice per file (``volume`` is indexed [column, row, slice]); returns each slice's LPS origin."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    origins = []
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"s{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.SeriesNumber, ds.InstanceNumber = "CT", "phantom", 1, k + 1
        origin = np.array([-100.0, -80.0, 20.0 + spacing[2] * k])
        origins.append(origin)
        ds.ImagePositionPatient = [float(v) for v in origin]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # row spacing (between rows), column spacing
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (volume[:, :, k].T + 1024).astype(np.int16).tobytes()  # rows are the image's y
        ds.save_as(ds.filename, enforce_file_format=True)
    return origins


def test_a_dicom_series_is_an_input_and_outputs_keep_its_world_geometry(tmp_path: Path) -> None:
    pytest.importorskip("dicom2nifti")
    from freetumor_cli.core.io import load_image

    phantom = make_phantom((64, 56, 40), (4.0, 4.0, 4.0), seed=5)
    hu = phantom.ct.array.astype(np.int16)
    origins = _write_series(tmp_path / "series", hu, (4.0, 4.0, 4.0))
    read = load_image(tmp_path / "series")
    # Every DICOM pixel lies where the volume's affine says (LPS in DICOM, RAS in NIfTI).
    rng = np.random.default_rng(0)
    for i, j, k in rng.integers(0, [64, 56, 40], size=(20, 3)):
        lps = origins[k] + np.array([4.0 * i, 4.0 * j, 0.0])
        ras = lps * np.array([-1.0, -1.0, 1.0])
        voxel = np.rint(np.linalg.inv(read.affine) @ [*ras, 1.0])[:3].astype(int)
        assert read.array[tuple(voxel)] == hu[i, j, k]
    labels = save_volume(_labels_on(read, phantom, origins), read, tmp_path / "seg.nii.gz", label=True)
    out = tmp_path / "out"
    _run("--in", tmp_path / "series", "--labels", labels, "--organ", "liver", "--out", out)
    written = nib.load(out / "series_liver_synthetic.nii.gz")
    np.testing.assert_allclose(written.affine, read.affine)
    assert written.shape == read.shape
    result = CliRunner().invoke(app, ["synthesize", "--in", str(tmp_path / "series"), "--organ", "liver"])
    assert result.exit_code == 3 and "pass its organ labels" in result.output


def _labels_on(read, phantom: Phantom, origins: list[np.ndarray]) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The phantom's labels resampled (nearest, exactly) onto the grid the series was read as."""
    index = np.indices(read.shape).reshape(3, -1)
    ras = read.affine[:3, :3] @ index + read.affine[:3, 3:4]
    lps = ras * np.array([[-1.0], [-1.0], [1.0]])
    ijk = np.rint((lps - origins[0][:, None]) / 4.0).astype(int)
    return phantom.labels.array[tuple(ijk)].reshape(read.shape).astype(np.uint8)


def test_the_readme_python_and_monai_examples_run(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("torch")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python and MONAI", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_mix_draws_only_the_allowed_sizes(small_phantom: Phantom) -> None:
    ct, liver = small_phantom.ct, _liver(small_phantom)
    config = replace(SynthesisConfig(), mix_sizes=("tiny",))
    placement = place_tumors(
        liver, LIVER, spacing=ct.spacing, affine=ct.affine, rng=np.random.default_rng(2), count=8, config=config
    )
    assert {t.record.size_class for t in placement.tumors} == {"tiny"}
    fixed = place_tumors(  # a fixed size is not restricted by mix_sizes
        liver, LIVER, spacing=ct.spacing, affine=ct.affine, rng=np.random.default_rng(2), size="small", config=config
    )
    assert fixed.tumors[0].record.size_class == "small"
    with pytest.raises(ValueError, match="mix_sizes"):
        SynthesisConfig(mix_sizes=("huge",))
