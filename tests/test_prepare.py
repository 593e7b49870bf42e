"""``freetumor prepare`` on a small data root of phantom datasets in several layouts, with broken cases."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from freetumor_cli.app import app
from freetumor_cli.core.io import load_volume, save_volume
from freetumor_cli.core.phantom import make_phantom
from freetumor_cli.core.prepare import (
    PrepareConfig,
    build_case_store,
    fold_of,
    prepare,
    read_manifest,
    scan_data_root,
)
from freetumor_cli.core.seg_data import read_task_datalist


def _native(labels: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    out = np.zeros_like(labels)
    for source, target in mapping.items():
        out[labels == source] = target
    return out


def build_data_root(root: Path) -> dict[str, int]:
    """Datasets in their own conventions; returns the expected number of usable cases per dataset."""
    expected = {}
    for i in range(3):
        p = make_phantom((40, 36, 24), (8.0, 8.0, 8.0), seed=i, tumors=1)
        ct, lab = p.ct, p.labels.array
        save_volume(ct.array, ct, root / "Dataset003_Liver" / "imagesTr" / f"liver_{i}_0000.nii.gz")
        save_volume(
            _native(lab, {1: 1, 2: 2}), ct, root / "Dataset003_Liver" / "labelsTr" / f"liver_{i}.nii.gz", label=True
        )
        save_volume(ct.array, ct, root / "Dataset007_Pancreas" / "imagesTr" / f"pancreas_{i}_0000.nii.gz")
        save_volume(
            _native(lab, {3: 1, 4: 2}),
            ct,
            root / "Dataset007_Pancreas" / "labelsTr" / f"pancreas_{i}.nii.gz",
            label=True,
        )
        kits = _native(lab, {5: 1, 6: 2})
        kits[kits == 1] = np.where(
            np.arange(kits.size).reshape(kits.shape)[kits == 1] % 7 == 0, 3, 1
        )  # some cyst voxels
        save_volume(ct.array, ct, root / "Dataset220_KiTS2023" / "imagesTr" / f"case_{i:05d}_0000.nii.gz")
        save_volume(kits, ct, root / "Dataset220_KiTS2023" / "labelsTr" / f"case_{i:05d}.nii.gz", label=True)
        save_volume(ct.array, ct, root / "BTCV" / "imagesTr" / f"img000{i}.nii.gz")
        save_volume(
            _native(lab, {1: 1, 3: 3, 5: 5}), ct, root / "BTCV" / "labelsTr" / f"label000{i}.nii.gz", label=True
        )
        # COVID-19-20: the challenge's lesion-only labels (case 0, 1; lungs from lungmask, beside the data
        # root), and the authors' copy with lung masks merged in (Train_lungmask/: 1 lung, 2 lesion).
        lesion = np.zeros_like(p.lung.array)
        lesion[(p.lung.array == 1) & (np.indices(lesion.shape)[2] % 3 == 0)] = 1
        folder = root / "Covid19_20" if i < 2 else root / "Covid19_20" / "Train_lungmask"
        save_volume(ct.array, ct, folder / f"volume-covid19-A-{i}_ct.nii.gz")
        authors = np.where(lesion == 1, 2, (p.lung.array == 1).astype(np.uint8)).astype(np.uint8)
        save_volume(lesion if i < 2 else authors, ct, folder / f"volume-covid19-A-{i}_seg.nii.gz", label=True)
        save_volume(
            (p.lung.array == 1).astype(np.uint8),
            ct,
            root.parent / "lungmasks" / f"volume-covid19-A-{i}.nii.gz",
            label=True,
        )
        # Organ labels as a label-only download leaves them: flat in the dataset folder.
        save_volume(ct.array, ct, root / "Flare22" / "imagesTr" / f"FLARE22_{i}_0000.nii.gz")
        save_volume(_native(lab, {1: 1, 3: 3, 5: 5}), ct, root / "Flare22" / f"FLARE22_{i}.nii.gz", label=True)
    expected.update(
        {
            "Dataset003_Liver": 3,
            "Dataset007_Pancreas": 3,
            "Dataset220_KiTS2023": 3,
            "BTCV": 3,
            "Covid19_20": 3,
            "Flare22": 3,
        }
    )
    # Broken cases, all in WORD: affine mismatch, label value 9, missing label, truncated .gz, a 4D file.
    p = make_phantom((40, 36, 24), (8.0, 8.0, 8.0), seed=9)
    ct, lab = p.ct, p.labels.array
    word = root / "WORD"
    save_volume(ct.array, ct, word / "imagesTr" / "good_0000.nii.gz")
    save_volume(lab, ct, word / "labelsTr" / "good.nii.gz", label=True)
    save_volume(ct.array, ct, word / "imagesTr" / "moved_0000.nii.gz")
    moved = ct.affine.copy()
    moved[0, 3] += 20
    nib.save(nib.Nifti1Image(lab, moved), word / "labelsTr" / "moved.nii.gz")
    save_volume(ct.array, ct, word / "imagesTr" / "nine_0000.nii.gz")
    nine = lab.copy()
    nine[0, 0, 0] = 9
    save_volume(nine, ct, word / "labelsTr" / "nine.nii.gz", label=True)
    save_volume(ct.array, ct, word / "imagesTr" / "nolabel_0000.nii.gz")
    save_volume(ct.array, ct, word / "imagesTr" / "trunc_0000.nii.gz")
    full = gzip.compress(nib.Nifti1Image(lab, ct.affine).to_bytes())
    (word / "labelsTr" / "trunc.nii.gz").write_bytes(full[: len(full) // 2])
    nib.save(nib.Nifti1Image(np.zeros((40, 36, 24, 2), np.int16), ct.affine), word / "imagesTr" / "fourd_0000.nii.gz")
    save_volume(lab, ct, word / "labelsTr" / "fourd.nii.gz", label=True)
    expected["WORD"] = 1
    (root / "notes_folder").mkdir()
    return expected


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("data")
    return root, build_data_root(root)


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_scan_pairs_every_layout(data_root: tuple[Path, dict[str, int]]) -> None:
    root, _ = data_root
    candidates, unknown = scan_data_root(root)
    by = {(c.dataset, c.case): c for c in candidates}
    assert by[("BTCV", "img0001")].label.name == "label0001.nii.gz"
    assert by[("Covid19_20", "volume-covid19-A-1")].label.name.endswith("_seg.nii.gz")
    assert by[("Flare22", "FLARE22_2")].label.parent.name == "Flare22"
    assert by[("WORD", "nolabel")].label is None
    assert unknown == ["notes_folder"]


def test_prepare_outputs_skips_and_remaps(data_root: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    root, expected = data_root
    before = tree_digest(root)
    out = tmp_path / "prepared"
    result = prepare(root, out, PrepareConfig(folds=3, seed=1, organ_masks=str(root.parent / "lungmasks")))
    assert tree_digest(root) == before, "the data root was modified"
    assert {n: r.valid for n, r in result.reports.items()} == expected
    word = result.reports["WORD"]
    reasons = " | ".join(word.skipped)
    for reason in ("different affines", "not allowed", "missing label", "unreadable", "not 3D"):
        assert reason in reasons, (reason, reasons)
    report = (out / "prepare_report.md").read_text()
    assert "WORD" in report and "not allowed" in report and "notes_folder" in report
    stored = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert all(not Path(r[k]).is_absolute() for r in stored for k in ("image", "label") if r[k]), "relative paths"
    records = read_manifest(out)
    assert len(records) == sum(expected.values())
    pancreas = next(r for r in records if r["dataset"] == "Dataset007_Pancreas")
    assert pancreas["role"] == "tumor-labelled" and set(pancreas["organs"]) == {"pancreas"}
    assert set(np.unique(load_volume(pancreas["label"]).array)) <= {0, 3, 4}
    assert Path(pancreas["label"]).is_relative_to(out)
    kits = next(r for r in records if r["dataset"] == "Dataset220_KiTS2023")
    assert set(np.unique(load_volume(kits["label"]).array)) <= {0, 5, 6}  # cyst folded into kidney
    liver = next(r for r in records if r["dataset"] == "Dataset003_Liver")
    assert liver["label"] == liver["source_label"]  # identity remap: referenced in place
    covid = {r["case"]: r for r in records if r["dataset"] == "Covid19_20"}
    for case, record in covid.items():  # lungs merged into the challenge's labels; the authors' taken as they are
        assert record["region"] == "chest" and set(record["tumors"]) == {"lesion"} and set(record["organs"]) == {"lung"}
        assert set(np.unique(load_volume(record["label"]).array)) == {0, 1, 2}, case
    assert covid["volume-covid19-A-2"]["label"] == covid["volume-covid19-A-2"]["source_label"]  # Train_lungmask
    for task in ("liver", "pancreas", "kidney", "covid", "all"):
        lists = [json.loads((out / "datalists" / f"{task}_fold{k}.json").read_text()) for k in range(3)]
        cases = {(e["dataset"], e["case"]) for e in lists[0]["training"] + lists[0]["validation"]}
        for dl in lists:
            train = {(e["dataset"], e["case"]) for e in dl["training"]}
            val = {(e["dataset"], e["case"]) for e in dl["validation"]}
            assert not train & val and train | val == cases
        assert set().union(*({(e["dataset"], e["case"]) for e in dl["validation"]} for dl in lists)) == cases
    liver_cases = json.loads((out / "datalists" / "liver_fold0.json").read_text())
    assert {e["dataset"] for e in liver_cases["training"] + liver_cases["validation"]} >= {
        "Dataset003_Liver",
        "BTCV",
        "Flare22",
    }
    dataset_json = json.loads((out / "dataset.json").read_text())
    assert dataset_json["labels"]["kidney_tumor"] == 6 and dataset_json["channel_names"] == {"0": "CT"}
    assert json.loads((out / "labels.json").read_text())["task_remaps"]["pancreas"] == {"3": 1, "4": 2}
    # The prepared folder and the data root move together (another disk, another mount point): all resolves.
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copytree(root, moved / root.name)
    shutil.copytree(root.parent / "lungmasks", moved / "lungmasks")
    assert root.parent == tmp_path.parent
    (moved / tmp_path.name).mkdir()
    shutil.move(out, moved / tmp_path.name / "prepared")
    for record in read_manifest(moved / tmp_path.name / "prepared"):
        for key in ("image", "label"):
            assert record[key] is None or (Path(record[key]).is_file() and Path(record[key]).is_relative_to(moved))
    for entry in read_task_datalist(moved / tmp_path.name / "prepared", "pancreas", 0)["training"]:
        assert Path(entry["image"]).is_relative_to(moved) and Path(entry["label"]).is_file()


def test_folds_are_deterministic_from_case_and_seed() -> None:
    assert fold_of("BTCV", "img0001", seed=0, folds=5) == fold_of("BTCV", "img0001", seed=0, folds=5)
    folds = [fold_of("BTCV", f"img{i:04d}", seed=0, folds=5) for i in range(200)]
    assert set(folds) == set(range(5))
    other = [fold_of("BTCV", f"img{i:04d}", seed=1, folds=5) for i in range(200)]
    assert folds != other


def test_cli_strict_datasets_and_errors(data_root: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    root, _ = data_root
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["prepare", "--data-root", str(root), "--out", str(tmp_path / "a"), "--datasets", "lits", "--datasets", "BTCV"],
    )
    assert result.exit_code == 0, result.output
    assert "Dataset003_Liver: 3 found, 3 usable" in result.output
    result = runner.invoke(
        app, ["prepare", "--data-root", str(root), "--out", str(tmp_path / "b"), "--datasets", "WORD", "--strict"]
    )
    assert result.exit_code != 0 and "--strict" in result.output
    result = runner.invoke(app, ["prepare", "--data-root", str(root), "--out", str(root / "inside")])
    assert result.exit_code != 0 and "inside --data-root" in result.output
    result = runner.invoke(app, ["prepare", "--data-root", str(tmp_path / "missing"), "--out", str(tmp_path / "c")])
    assert result.exit_code != 0 and "data root not found" in result.output
    empty = tmp_path / "empty_root"
    (empty / "BTCV" / "imagesTr").mkdir(parents=True)
    result = runner.invoke(app, ["prepare", "--data-root", str(empty), "--out", str(tmp_path / "d")])
    assert result.exit_code != 0 and "no usable case" in result.output
    result = runner.invoke(
        app, ["prepare", "--data-root", str(root), "--out", str(tmp_path / "e"), "--datasets", "nope"]
    )
    assert result.exit_code != 0 and "unknown dataset" in result.output


def test_verify_images_catches_a_truncated_image(tmp_path: Path) -> None:
    p = make_phantom((40, 36, 24), (8.0, 8.0, 8.0), seed=4)
    root = tmp_path / "root"
    save_volume(p.labels.array, p.ct, root / "BTCV" / "labelsTr" / "label0001.nii.gz", label=True)
    data = gzip.compress(nib.Nifti1Image(p.ct.array, p.ct.affine).to_bytes())
    (root / "BTCV" / "imagesTr").mkdir(parents=True)
    (root / "BTCV" / "imagesTr" / "img0001.nii.gz").write_bytes(data[: len(data) // 2])
    save_volume(p.labels.array, p.ct, root / "BTCV" / "labelsTr" / "label0002.nii.gz", label=True)
    save_volume(p.ct.array, p.ct, root / "BTCV" / "imagesTr" / "img0002.nii.gz")
    fast = prepare(root, tmp_path / "fast", PrepareConfig())
    assert fast.valid == 2  # headers only: the truncated image is not read
    checked = prepare(root, tmp_path / "checked", PrepareConfig(verify_images=True))
    assert checked.valid == 1 and "image data unreadable" in " ".join(checked.reports["BTCV"].skipped)


def test_pairs_csv_and_workers(data_root: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    root, _ = data_root
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text(
        "image,label,dataset\n"
        f"{root}/Dataset003_Liver/imagesTr/liver_0_0000.nii.gz,{root}/Dataset003_Liver/labelsTr/liver_0.nii.gz,Dataset003_Liver\n"
        f"{root}/BTCV/imagesTr/img0001.nii.gz,{root}/BTCV/labelsTr/label0001.nii.gz,\n"
    )
    result = prepare(root, tmp_path / "p", PrepareConfig(), pairs=csv_file, workers=2)
    assert result.valid == 2 and set(result.reports) == {"Dataset003_Liver", "BTCV"}


def test_case_store_is_keyed_by_the_preprocessing(data_root: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    pytest.importorskip("monai")
    import blosc2

    root, _ = data_root
    out = tmp_path / "pp"
    config = PrepareConfig(datasets=("BTCV",), store=False)
    prepare(root, out, config)
    store, built = build_case_store(out, config)
    assert (built.built, built.reused, built.failed) == (3, 0, {})
    case = next(store.rglob("case.json")).parent
    image = blosc2.open(str(case / "image.b2nd"))[...]
    label = blosc2.open(str(case / "label.b2nd"))[...]
    assert image.dtype == np.float16 and image.min() >= 0 and image.max() <= 1 and label.dtype == np.uint8
    assert set(np.unique(label)) <= {0, 1, 3, 5}
    _, again = build_case_store(out, config)
    assert (again.built, again.reused) == (0, 3)
    from dataclasses import replace

    coarse = replace(config, preprocessing=replace(config.preprocessing, abdomen_spacing_mm=(12.0, 12.0, 12.0)))
    _, other = build_case_store(out, coarse)
    assert other.built == 3 and len(list(store.glob("pp-*"))) == 2
    first, second = (
        json.loads((folder / case.relative_to(case.parents[1])).joinpath("case.json").read_text())
        for folder in store.glob("pp-*")
    )
    assert first["shape"] != second["shape"] and first["digest"] != second["digest"]  # the same case, two grids


def test_lesion_only_labels_need_organ_masks(data_root: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    root, _ = data_root
    result = prepare(root, tmp_path / "p", PrepareConfig(datasets=("Covid19_20",), store=False))
    covid = result.reports["Covid19_20"]
    assert covid.valid == 1  # the authors' Train_lungmask copy; the challenge's lesion-only labels are skipped
    assert "--organ-masks" in " ".join(covid.examples.values())
    result = CliRunner().invoke(app, [
        "prepare", "--data-root", str(root), "--out", str(tmp_path / "q"), "--datasets", "covid19",
        "--organ-masks", str(tmp_path / "nowhere"), "--no-store",
    ])  # fmt: skip
    assert result.exit_code == 0 and "no organ mask for this case" in (tmp_path / "q" / "prepare_report.md").read_text()


def _prepare_cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["prepare", "--no-store", *(str(a) for a in args)])
    return result.exit_code, " ".join(result.output.split())


def test_totalsegmentator_masks_of_a_real_ct_are_prepared(totalseg_case: Path, tmp_path: Path) -> None:
    """A team with CTs and TotalSegmentator masks: --pairs finds them (values beyond freetumor's space are
    TotalSegmentator's), and the organs prepared are the shared case's freetumor-space organs, voxel for voxel."""
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"image,label,case\n{totalseg_case / 'ct.nii.gz'},{totalseg_case / 'totalseg_labels.nii.gz'},ts\n")
    code, output = _prepare_cli("--pairs", pairs, "--out", tmp_path / "p")
    assert code == 0, output
    record = json.loads((tmp_path / "p" / "manifest.jsonl").read_text().splitlines()[0])
    assert record["organs"] == {"liver": 38634, "pancreas": 644, "kidney": 7623}
    assert record["label_scheme"] == "totalsegmentator" and record["role"] == "organ-only"
    prepared = load_volume(tmp_path / "p" / record["label"])
    np.testing.assert_array_equal(prepared.array, load_volume(totalseg_case / "organs.nii.gz").array)


def test_an_ambiguous_map_is_refused_with_the_fix_not_guessed(totalseg_case: Path, tmp_path: Path) -> None:
    """TotalSegmentator --roi_subset output holds only classes 1-5: freetumor's scheme would read liver,
    pancreas and kidney into spleen, kidneys and gallbladder. prepare skips it naming the flag; synthesize
    refuses it; with --label-scheme totalsegmentator both use the liver and kidneys."""
    ts = load_volume(totalseg_case / "totalseg_labels.nii.gz")
    subset = np.where(ts.array <= 5, ts.array, 0).astype(np.uint8)
    path = tmp_path / "roi_subset.nii.gz"
    nib.save(nib.Nifti1Image(subset, ts.affine), path)  # as TotalSegmentator writes it: no freetumor header
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"image,label,case\n{totalseg_case / 'ct.nii.gz'},{path},ts\n")
    code, output = _prepare_cli("--pairs", pairs, "--out", tmp_path / "a")
    assert code == 3, output
    assert "no usable case" in output and "--label-scheme freetumor or --label-scheme totalsegmentator" in output
    code, output = _prepare_cli("--pairs", pairs, "--out", tmp_path / "b", "--label-scheme", "totalsegmentator")
    assert code == 0, output
    record = json.loads((tmp_path / "b" / "manifest.jsonl").read_text().splitlines()[0])
    assert record["organs"] == {"liver": 38634, "kidney": 7623}
    synth = CliRunner().invoke(
        app, ["synthesize", "--in", str(totalseg_case / "ct.nii.gz"), "--labels", str(path), "--organ", "liver",
              "-o", str(tmp_path / "s")],
    )  # fmt: skip
    assert synth.exit_code == 3, synth.output
    assert "--label-scheme totalsegmentator" in " ".join(synth.output.split())
    assert not list((tmp_path / "s").glob("*.nii.gz")) if (tmp_path / "s").exists() else True


def test_a_known_organ_dataset_with_totalsegmentator_masks(tmp_path: Path) -> None:
    """Phantom CTs in a known organ-only dataset's folder with TotalSegmentator masks: skipped with the hint
    by default (its labels are expected in freetumor's space), prepared with --label-scheme totalsegmentator."""
    root = tmp_path / "root"
    phantoms = [make_phantom((48, 44, 32), (6.0, 6.0, 6.0), seed=s) for s in range(2)]
    for i, p in enumerate(phantoms):
        assert p.totalseg is not None
        save_volume(p.ct.array, p.ct, root / "Flare22" / "imagesTr" / f"c{i}_0000.nii.gz")
        (root / "Flare22" / "labelsTr").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(p.totalseg.array, p.ct.affine), root / "Flare22" / "labelsTr" / f"c{i}.nii.gz")
    code, output = _prepare_cli("--data-root", root, "--out", tmp_path / "a")
    assert code == 3 and "pass --label-scheme totalsegmentator" in output, output
    code, output = _prepare_cli("--data-root", root, "--out", tmp_path / "b", "--label-scheme", "totalsegmentator")
    assert code == 0, output
    records = [json.loads(line) for line in (tmp_path / "b" / "manifest.jsonl").read_text().splitlines()]
    for record, p in zip(sorted(records, key=lambda r: r["case"]), phantoms, strict=True):
        organs = np.where(np.isin(p.labels.array, (1, 3, 5)), p.labels.array, 0)
        np.testing.assert_array_equal(load_volume(tmp_path / "b" / record["label"]).array, organs)
