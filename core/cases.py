"""Cases: finding them, pairing images with labels, and data lists.

A case is an image and its label map, named by its case id (the file name without ``.nii.gz`` and
nnU-Net's ``_0000``). :func:`collect_cases` turns a CT file, a folder or a MONAI data-list JSON into cases,
finding organ labels beside images by the nnU-Net convention; :func:`match_cases` pairs predictions with
ground truth; :func:`read_datalist` reads MONAI data lists. ``prepare`` scans a whole data root of named
datasets with their own conventions (:mod:`freetumor_cli.core.prepare`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freetumor_cli.core import PathLike
from freetumor_cli.core.errors import InputError
from freetumor_cli.core.io import NIFTI_SUFFIXES, is_dicom_series, is_nifti


def case_name(path: PathLike) -> str:
    """The case id of an image path: the file name without ``.nii.gz``/``.nii`` and a trailing ``_0000``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.endswith("_0000"):
        name = name[: -len("_0000")]
    return name


DATALIST_SECTIONS = ("training", "validation", "test", "testing")


def read_datalist(path: PathLike, sections: Sequence[str] = DATALIST_SECTIONS) -> list[dict[str, Any]]:
    """Entries of a MONAI data-list JSON (the given sections, or a bare list), with paths made absolute.

    ``image`` and ``label`` values relative to the file are resolved against its folder; a bare string
    entry is an image path.

    Raises:
        InputError: unreadable JSON or an entry that is not a mapping.
    """
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read data list {file}: {exc}") from exc
    if isinstance(data, dict):
        raw = [e for key in sections for e in data.get(key, [])]
    elif isinstance(data, list):
        raw = data
    else:
        raw = []
    entries = []
    for entry in raw:
        if isinstance(entry, str):
            entry = {"image": entry}
        if not isinstance(entry, dict):
            raise InputError(f"data list {file}: entries must be objects with 'image'/'label', got {entry!r}")
        entry = dict(entry)
        for key in ("image", "label"):
            value = entry.get(key)
            if isinstance(value, list) and len(value) == 1:
                value = value[0]
            if value:
                if not isinstance(value, str):
                    raise InputError(f"data list {file}: {key} must be a path, got {value!r}")
                entry[key] = Path(value) if Path(value).is_absolute() else file.parent.absolute() / value
        entries.append(entry)
    return entries


@dataclass(frozen=True)
class Case:
    """One input: an image, its organ labels (if known) and where the labels came from."""

    image: Path
    labels: Path | None
    name: str
    labels_found_by: str = "given"


def collect_cases(input_path: PathLike, labels: PathLike | None = None) -> list[Case]:
    """Turn ``--in`` (a NIfTI file, a folder of them, or a MONAI data-list JSON) into cases.

    Args:
        input_path: the input.
        labels: a label file (single image) or a folder of label files named like the images
            (``case.nii.gz``); when None, labels are looked up beside each image.

    Raises:
        InputError: nothing usable was found.
    """
    path = Path(input_path)
    labels_path = Path(labels) if labels is not None else None
    if not path.exists():
        raise InputError(f"input not found: {path}", hint="pass a NIfTI file, a folder of them or a data-list JSON")
    if path.suffix == ".json":
        return _cases_from_datalist(path, labels_path)
    if is_dicom_series(path):
        if labels_path is None or labels_path.is_dir():
            raise InputError(
                f"{path} is a DICOM series: pass its organ labels as one NIfTI file with --labels",
                hint="e.g. TotalSegmentator -i <series folder> -o seg.nii.gz --ml",
            )
        return [Case(path, labels_path, path.name)]
    if path.is_dir():
        images = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and is_nifti(p) and not p.name.startswith(".") and not is_synthesize_output(p)
        )
        if not images:
            raise InputError(f"no .nii or .nii.gz files in folder {path} (outputs of synthesize are not inputs)")
        if labels_path is not None and not labels_path.is_dir():
            raise InputError(f"with a folder of images, --labels must be a folder too: {labels_path}")
        return [_case_for(image, labels_path) for image in images]
    if not is_nifti(path):
        raise InputError(f"input is not NIfTI (.nii or .nii.gz) nor a data-list JSON: {path}")
    return [_case_for(path, labels_path)]


def _case_for(image: Path, labels: Path | None) -> Case:
    name = case_name(image)
    if labels is None:
        found = find_labels_beside(image)
        return Case(image, found, name, "nnU-Net convention" if found else "none")
    if labels.is_dir():
        for candidate in (f"{name}.nii.gz", f"{name}.nii", image.name):
            if (labels / candidate).is_file():
                return Case(image, labels / candidate, name, "label folder")
        return Case(image, None, name, "none")
    return Case(image, labels, name)


def find_labels_beside(image: Path) -> Path | None:
    """The label file of ``imagesXx/<case>_0000.nii.gz`` by the nnU-Net convention, if it exists."""
    folder = image.parent
    if not folder.name.startswith("images"):
        return None
    label_folder = folder.parent / ("labels" + folder.name[len("images") :])
    name = case_name(image)
    for suffix in (".nii.gz", ".nii"):
        candidate = label_folder / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _cases_from_datalist(path: Path, labels: Path | None) -> list[Case]:
    cases = []
    for entry in read_datalist(path):
        image = entry.get("image")
        if not image:
            raise InputError(f"data list {path}: each entry needs an 'image' key, got {entry!r}")
        if entry.get("label"):
            cases.append(Case(image, entry["label"], case_name(image), "data list"))
        else:
            cases.append(_case_for(image, labels))
    if not cases:
        raise InputError(
            f"data list {path} holds no entries", hint="expected MONAI's {'training': [{'image': ..., 'label': ...}]}"
        )
    return cases


OUTPUT_NAME = re.compile(r"_synthetic(_\d{3})?(_label)?$")


def is_synthesize_output(path: PathLike) -> bool:
    """Whether a file is one of synthesize's outputs (so that a folder run never reads its own outputs)."""
    return bool(OUTPUT_NAME.search(case_name(path)))


@dataclass(frozen=True)
class CasePair:
    case: str
    gt: Path
    pred: Path | None


def match_cases(pred_dir: PathLike, gt: PathLike) -> tuple[list[CasePair], list[str]]:
    """Pair predictions with ground truth by case name (nnU-Net naming, ``_0000`` ignored).

    Returns:
        (one pair per ground-truth case, its prediction None when missing; prediction files that
        match no ground-truth case).

    Args:
        pred_dir: folder of predicted label maps.
        gt: folder of ground-truth label maps, or a MONAI data-list JSON (its ``label`` entries).
    """
    pred_path, gt_path = Path(pred_dir), Path(gt)
    if not pred_path.is_dir():
        raise InputError(f"prediction folder not found: {pred_path}")
    if not gt_path.exists():
        raise InputError(f"ground truth not found: {gt_path}")
    if gt_path.is_dir():
        gts = {
            case_name(p): p
            for p in sorted(gt_path.iterdir())
            if p.is_file() and is_nifti(p) and not p.name.startswith(".")
        }
    elif gt_path.suffix == ".json":
        gts = _labels_from_datalist(gt_path)
    else:
        raise InputError(f"--gt must be a folder of label maps or a data-list JSON: {gt_path}")
    if not gts:
        raise InputError(f"no ground-truth label maps in {gt_path}")
    preds: dict[str, Path] = {}
    for p in sorted(pred_path.iterdir()):
        if p.is_file() and is_nifti(p) and not p.name.startswith("."):
            preds.setdefault(case_name(p), p)
    unmatched = sorted(set(preds) - set(gts))
    if not set(preds) & set(gts):
        raise InputError(
            f"no prediction in {pred_path} matches a ground-truth case (e.g. {next(iter(gts))})",
            hint="files are matched by case name: case.nii.gz or case_0000.nii.gz",
        )
    pairs = [CasePair(name, path, preds.get(name)) for name, path in sorted(gts.items())]
    return pairs, unmatched


def _labels_from_datalist(path: Path) -> dict[str, Path]:
    return {case_name(e.get("image") or e["label"]): e["label"] for e in read_datalist(path) if e.get("label")}
