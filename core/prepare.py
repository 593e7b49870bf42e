"""Turn a data root of differently named datasets into validated, remapped data lists with folds.

Steps: :func:`scan_data_root` (or :func:`read_pairs`) finds image/label pairs; :func:`validate_case`
checks each one (image header only unless asked, label data always) and maps its labels into the
abdomen or chest space; :func:`prepare` writes ``manifest.jsonl`` (streamed), per-task MONAI data
lists for every fold, ``dataset.json``, ``labels.json`` and ``prepare_report.md``; then
:func:`build_case_store` writes the case store (:mod:`freetumor_cli.core.store`), which training reads.

Label files whose values change under the dataset's remap are written once, remapped, to
``<out>/labels/<dataset>/<case>.nii.gz``; others are referenced where they are. The data root is
never written to.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from freetumor_cli import __version__
from freetumor_cli.core import PathLike
from freetumor_cli.core.cases import case_name, read_datalist
from freetumor_cli.core.config import to_dict
from freetumor_cli.core.datasets import DATASETS, DatasetSpec, canonical_dataset
from freetumor_cli.core.errors import InputError
from freetumor_cli.core.io import Volume, check_data_size, is_nifti, save_volume, spatial_shape
from freetumor_cli.core.label_maps import (
    choose_scheme,
    grid_problem,
    integer_labels,
    integer_problem,
    label_values,
    relabel,
    written_by_freetumor,
)
from freetumor_cli.core.outputs import OutputLock, atomic_path, write_text_atomic
from freetumor_cli.core.parallel import process_pool
from freetumor_cli.core.registry import (
    ORGANS,
    REGIONS,
    TASKS,
    region_organs,
    totalsegmentator_to_region,
)
from freetumor_cli.core.stage_configs import PrepareConfig
from freetumor_cli.core.store import STORE_POINTER, BuildResult, build_store


@dataclass(frozen=True)
class Candidate:
    """A case found by scanning: maybe an image, maybe a label."""

    dataset: str
    case: str
    image: Path | None
    label: Path | None


class CaseSkipped(Exception):
    """A case that cannot be used, with the reason."""


@dataclass
class DatasetReport:
    found: int = 0
    valid: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)


def _nifti_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    with os.scandir(folder) as entries:
        return sorted(Path(e.path) for e in entries if e.is_file() and is_nifti(e.name) and not e.name.startswith("."))


def _scan_dataset(folder: Path, spec: DatasetSpec) -> Iterator[Candidate]:
    if spec.naming == "covid":
        images, labels = {}, {}
        for path in sorted(folder.rglob("*.nii*")):
            name = case_name(path)
            if name.endswith("_ct"):
                images[name[: -len("_ct")]] = path
            elif name.endswith("_seg"):
                labels[name[: -len("_seg")]] = path
        for case in sorted(set(images) | set(labels)):
            yield Candidate(spec.name, case, images.get(case), labels.get(case))
        return
    images = {}
    for path in _nifti_files(folder / "imagesTr"):
        name = case_name(path)
        images[name[len("img") :] if spec.naming == "btcv" and name.startswith("img") else name] = path
    labels = {}
    # Labels in labelsTr/ (nnU-Net), or flat in the dataset folder (as a label-only download may be).
    for path in _nifti_files(folder) + _nifti_files(folder / "labelsTr"):
        name = case_name(path)
        labels[name[len("label") :] if spec.naming == "btcv" and name.startswith("label") else name] = path
    for case in sorted(set(images) | set(labels)):
        shown = f"img{case}" if spec.naming == "btcv" else case
        yield Candidate(spec.name, shown, images.get(case), labels.get(case))


def scan_data_root(root: PathLike, datasets: Sequence[str] = ()) -> tuple[list[Candidate], list[str]]:
    """Find image/label pairs in every known dataset folder of ``root``.

    Returns:
        (candidates, folder names that are not known datasets).
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise InputError(f"data root not found: {root_path}", hint="pass --data-root, e.g. the --dest of fetch-labels")
    wanted = None
    if datasets:
        wanted = set()
        for name in datasets:
            canonical = canonical_dataset(name)
            if canonical is None:
                raise InputError(f"unknown dataset {name!r}", hint=f"known: {', '.join(DATASETS)}")
            wanted.add(canonical)
    candidates: list[Candidate] = []
    unknown: list[str] = []
    with os.scandir(root_path) as entries:
        folders = sorted((e.name, Path(e.path)) for e in entries if e.is_dir() and not e.name.startswith("."))
    for name, folder in folders:
        canonical = canonical_dataset(name)
        if canonical is None:
            unknown.append(name)
            continue
        if wanted is not None and canonical not in wanted:
            continue
        candidates.extend(_scan_dataset(folder, DATASETS[canonical]))
    return candidates, unknown


def read_pairs(path: PathLike) -> list[Candidate]:
    """An explicit pairing: a CSV with columns image,label[,dataset][,case] or a MONAI data-list JSON.

    Relative paths are relative to the file's folder. Without a dataset column the dataset is the
    folder above the image's folder when it is a known dataset, else "custom".
    """
    file = Path(path)
    if not file.is_file():
        raise InputError(f"pairs file not found: {file}")
    rows: list[dict[str, Any]] = []
    if file.suffix == ".json":
        rows = read_datalist(file)
    else:
        with file.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        if rows and not {"image", "label"} <= set(rows[0]):
            raise InputError(f"pairs CSV {file} needs the columns image,label (optional dataset,case)")
    out = []
    for row in rows:
        image = Path(str(row["image"])) if row.get("image") else None
        label = Path(str(row["label"])) if row.get("label") else None
        image = image if image is None or image.is_absolute() else file.parent / image
        label = label if label is None or label.is_absolute() else file.parent / label
        ref = image or label
        dataset = row.get("dataset") or (canonical_dataset(ref.parent.parent.name) if ref else None) or "custom"
        out.append(
            Candidate(canonical_dataset(dataset) or dataset, row.get("case") or case_name(ref or "case"), image, label)
        )
    if not out:
        raise InputError(f"pairs file {file} holds no pairs")
    return out


def dataset_spec(name: str) -> DatasetSpec:
    """The registry entry, or an abdomen organ-label spec for custom datasets."""
    return DATASETS.get(name) or DatasetSpec(name, "abdomen", "organ")


def fold_of(dataset: str, case: str, *, seed: int, folds: int) -> int:
    """Deterministic fold from dataset, case id and seed."""
    digest = hashlib.sha256(f"{seed}/{dataset}/{case}".encode()).hexdigest()
    return int(digest[:12], 16) % folds


def _load_header(path: Path, what: str) -> Any:
    """The nibabel image of a case's file, its voxels not read (io's checks, failures as skip reasons)."""
    import nibabel as nib

    try:
        image: Any = nib.load(str(path))
    except Exception as exc:
        raise CaseSkipped(f"unreadable {what}: {type(exc).__name__}") from exc
    try:
        check_data_size(image, path, what)
    except InputError as exc:
        raise CaseSkipped(exc.message) from None
    if len(spatial_shape(image.shape)) != 3:
        raise CaseSkipped(f"{what} is not 3D (shape {tuple(image.shape)})")
    return image


def _read_array(image: Any, what: str) -> np.ndarray:
    try:
        array = np.asanyarray(image.dataobj)
    except Exception as exc:
        raise CaseSkipped(f"{what} data unreadable ({type(exc).__name__}: truncated or corrupt file?)") from exc
    return array.reshape(spatial_shape(array.shape))


def validate_case(
    candidate: Candidate, out_dir: str, verify_images: bool, organ_masks: str | None = None, label_scheme: str = "auto"
) -> dict[str, Any]:
    """Check one case and map its labels; returns its manifest record.

    Tumor labels without their organ (the COVID-19-20 challenge's lesion-only labels) get the organ from
    ``organ_masks`` (a folder of masks named by case, e.g. lungmask's outputs); without them the case is
    skipped, since tumors can neither be placed nor learned against an unknown organ.

    Raises:
        CaseSkipped: with the reason the case cannot be used.
    """
    if candidate.image is None:
        raise CaseSkipped("missing image")
    if candidate.label is None:
        raise CaseSkipped("missing label")
    spec = dataset_spec(candidate.dataset)
    remap = spec.remap_for(candidate.label)
    image = _load_header(candidate.image, "image")
    label = _load_header(candidate.label, "label")
    _check_grid(image, label, "label")
    if verify_images:
        _read_array(image, "image")
    labels = _read_array(label, "label")
    problem = integer_problem(labels)
    if problem:
        raise CaseSkipped(f"label {problem}")
    labels = integer_labels(labels)
    space = REGIONS[spec.region].labels
    values = label_values(labels).tolist()
    scheme = None
    if spec.role == "organ":
        scheme = _organ_label_scheme(spec, values, label.header, label_scheme)
        remap = totalsegmentator_to_region(spec.region) if scheme == "totalsegmentator" else remap
    # TotalSegmentator's other classes (spleen, bones, ...) are background; other maps must fit their scheme.
    allowed = set(values) if scheme == "totalsegmentator" else set(remap) | {0} if remap is not None else set(space)
    bad = [v for v in values if v not in allowed]
    if bad:
        hint = "; TotalSegmentator masks? pass --label-scheme totalsegmentator" if spec.role == "organ" else ""
        raise CaseSkipped(f"label values {bad} not allowed for {spec.name} (allowed {sorted(allowed)}{hint})")
    changed = remap is not None and any(remap.get(v, 0) != v for v in values)
    region_labels = relabel(labels, remap) if changed else labels
    organ_values = {o.value for o in region_organs(spec.region)}
    tumor_values = {o.tumor_value: o.value for o in region_organs(spec.region)}
    present_values = set(label_values(region_labels).tolist())
    if spec.role == "tumor" and not present_values & organ_values:
        tumors = sorted(present_values & set(tumor_values))
        if not tumors:
            raise CaseSkipped("no organ or tumor in the label")
        if organ_masks is None:
            raise CaseSkipped(
                f"tumor labels without their organ ({space[tumors[0]]} only; pass organ masks, e.g. lungmask's, with --organ-masks)"
            )
        region_labels = _merge_organ_mask(
            region_labels, image, Path(organ_masks), candidate.case, tumor_values[tumors[0]]
        )
        changed = True
    label_path = candidate.label
    if changed:
        label_path = Path(out_dir) / "labels" / spec.name / f"{candidate.case}.nii.gz"
        reference = Volume(region_labels, np.asarray(label.affine, dtype=np.float64), label.header)
        save_volume(region_labels, reference, label_path, label=True)
    counts = np.bincount(np.asarray(region_labels).ravel(order="K").astype(np.intp), minlength=len(space))
    present = {space[v]: int(counts[v]) for v in range(1, len(space)) if v < len(counts) and counts[v]}
    if not present:
        raise CaseSkipped("no organ or tumor in the label")
    zooms = [round(float(z), 4) for z in image.header.get_zooms()[:3]]
    return {
        "dataset": spec.name,
        "case": candidate.case,
        "image": str(candidate.image),
        "label": str(label_path),
        "source_label": str(candidate.label),
        "role": "tumor-labelled" if spec.role == "tumor" else "organ-only",
        "region": spec.region,
        "organs": {k: v for k, v in present.items() if not k.endswith(("tumor", "lesion"))},
        "tumors": {k: v for k, v in present.items() if k.endswith(("tumor", "lesion"))},
        "spacing": zooms,
        "shape": [int(s) for s in image.shape[:3]],
        **({"label_scheme": scheme} if scheme else {}),
    }


def _organ_label_scheme(spec: DatasetSpec, values: Sequence[int], header: Any, declared: str) -> str:
    """How an organ-only case's labels are encoded (``PrepareConfig.label_scheme``)."""
    if declared != "auto":
        return declared
    if spec.name in DATASETS:  # a known dataset's organ labels are in the region's space
        return "freetumor"
    choice = choose_scheme(values, spec.region, freetumor_file=written_by_freetumor(header))
    if choice.scheme is None:
        raise CaseSkipped(f"ambiguous labels: {choice.reason}")
    return choice.scheme


def _check_grid(image: Any, other: Any, what: str) -> None:
    problem = grid_problem(image, other)
    if problem:
        raise CaseSkipped(f"image and {what} {problem}")


def _merge_organ_mask(labels: np.ndarray, image: Any, folder: Path, case: str, organ: int) -> np.ndarray:
    """The organ from a mask file (any value above 0) where the labels hold nothing else."""
    candidates = sorted(p for p in folder.glob(f"{case}*") if is_nifti(p.name)) if folder.is_dir() else []
    if not candidates:
        raise CaseSkipped(f"no organ mask for this case in {folder} (expected {case}.nii.gz or {case}_*.nii.gz)")
    mask_image = _load_header(candidates[0], "organ mask")
    _check_grid(image, mask_image, "organ mask")
    mask = _read_array(mask_image, "organ mask") > 0
    merged = np.asarray(labels).astype(np.uint8, copy=True)
    merged[mask & (merged == 0)] = organ
    return merged


def _validate_job(
    args: tuple[Candidate, str, bool, str | None, str],
) -> tuple[Candidate, dict[str, Any] | None, str | None]:
    candidate, out_dir, verify, masks, label_scheme = args
    try:
        return candidate, validate_case(candidate, out_dir, verify, masks, label_scheme), None
    except CaseSkipped as exc:
        return candidate, None, str(exc)


@dataclass
class PrepareResult:
    out_dir: Path
    valid: int
    skipped: int
    reports: dict[str, DatasetReport]
    unknown_folders: list[str]
    datalists: list[Path]
    store_dir: Path | None = None
    store: BuildResult | None = None
    warnings: list[str] = field(default_factory=list)


def _task_entries(records: Iterable[dict[str, Any]], task_name: str) -> list[dict[str, Any]]:
    """The records of a task: cases of its region that hold one of its organs or their tumors."""
    task = TASKS[task_name]
    space = REGIONS[task.region].labels
    names = {space[v] for o in task.organs for v in (ORGANS[o].value, ORGANS[o].tumor_value)}
    out = []
    for r in records:
        if r["region"] == task.region and names & (set(r["organs"]) | set(r["tumors"])):
            out.append(
                {
                    "image": r["image"],
                    "label": r["label"],
                    "case": r["case"],
                    "dataset": r["dataset"],
                    "role": r["role"],
                    "fold": r["fold"],
                }
            )
    return out


def prepare(
    data_root: PathLike,
    out_dir: PathLike,
    config: PrepareConfig,
    *,
    pairs: PathLike | None = None,
    workers: int = 1,
    store_dir: PathLike | None = None,
    on_found: Callable[[int], None] | None = None,
    on_case_done: Callable[[], None] | None = None,
    on_store_start: Callable[[int], None] | None = None,
    on_store_case: Callable[[str, str], None] | None = None,
) -> PrepareResult:
    """Scan, validate, remap and split; write the manifest, data lists and reports; then, with
    ``config.store``, the case store (:func:`build_case_store`) in ``store_dir`` (default ``<out>/store``).

    Paths in the manifest are relative to ``out``, and in the data lists relative to their folder: the
    prepared folder works from any working folder, and keeps working when it and the data root are
    moved together.
    """
    out, root = Path(out_dir), Path(data_root)
    if pairs is None and not root.is_dir():
        raise InputError(f"data root not found: {root}", hint="pass --data-root, e.g. the --dest of fetch-labels")
    if pairs is None and root.resolve() in (out.resolve(), *out.resolve().parents):
        raise InputError(
            f"--out {out} lies inside --data-root {root}", hint="write prepared data outside the data root"
        )
    with OutputLock(out_dir, "prepare"):
        return _prepare(
            data_root, out_dir, config, pairs, workers, store_dir, on_found, on_case_done, on_store_start, on_store_case
        )


def _prepare(
    data_root: PathLike,
    out_dir: PathLike,
    config: PrepareConfig,
    pairs: PathLike | None,
    workers: int,
    store_dir: PathLike | None,
    on_found: Callable[[int], None] | None,
    on_case_done: Callable[[], None] | None,
    on_store_start: Callable[[int], None] | None,
    on_store_case: Callable[[str, str], None] | None,
) -> PrepareResult:
    out = Path(out_dir).absolute()
    root = Path(data_root)
    if pairs is not None:
        candidates, unknown = read_pairs(pairs), list[str]()
    else:
        candidates, unknown = scan_data_root(root, config.datasets)
    candidates = [
        replace(c, image=c.image.absolute() if c.image else None, label=c.label.absolute() if c.label else None)
        for c in candidates
    ]
    if on_found:
        on_found(len(candidates))
    out.mkdir(parents=True, exist_ok=True)
    reports: dict[str, DatasetReport] = defaultdict(DatasetReport)
    records: list[dict[str, Any]] = []
    jobs = [(c, str(out), config.verify_images, config.organ_masks, config.label_scheme) for c in candidates]
    with atomic_path(out / "manifest.jsonl") as tmp, tmp.open("w", encoding="utf-8") as manifest:
        results: Iterable[tuple[Candidate, dict[str, Any] | None, str | None]]
        pool = process_pool(workers) if workers > 1 else None
        try:
            results = pool.map(_validate_job, jobs, chunksize=16) if pool else map(_validate_job, jobs)
            for candidate, record, reason in results:
                report = reports[candidate.dataset]
                report.found += 1
                if record is None:
                    key = (reason or "unknown").split(" (")[0]
                    report.skipped[key] += 1
                    report.examples.setdefault(key, f"{candidate.case}: {reason}")
                else:
                    record["fold"] = fold_of(record["dataset"], record["case"], seed=config.seed, folds=config.folds)
                    manifest.write(json.dumps(_relative(record, out)) + "\n")
                    report.valid += 1
                    records.append(
                        {
                            k: record[k]
                            for k in ("dataset", "case", "image", "label", "role", "region", "organs", "tumors", "fold")
                        }
                    )
                if on_case_done:
                    on_case_done()
        finally:
            if pool:
                pool.shutdown()
        skipped = sum(sum(r.skipped.values()) for r in reports.values())
        result = PrepareResult(out, len(records), skipped, dict(reports), unknown, [])
        write_text_atomic(out / "prepare_report.md", report_markdown(result, config))
        if not records:  # raised inside the manifest's write: no empty manifest is left
            reasons = Counter[str]()
            for report in reports.values():
                reasons.update(report.skipped)
            hint = "check the data root layout (imagesTr/ with labelsTr/) or pass --pairs"
            common = reasons.most_common(1)[0][0] if reasons else ""
            if "label" in common:  # the labels are the matter, not the layout
                hint = "e.g. " + next(r.examples[common] for r in reports.values() if common in r.examples)
            raise InputError(
                f"no usable case found in {pairs or root} ({skipped} skipped; see {out / 'prepare_report.md'})",
                hint=hint,
            )
    _write_metadata(out, records, config, result)
    if result.warnings:
        write_text_atomic(out / "prepare_report.md", report_markdown(result, config))
    if config.strict and skipped:
        raise InputError(f"{skipped} case(s) skipped and --strict is set (reasons in {out / 'prepare_report.md'})")
    if config.store:
        result.store_dir, result.store = build_case_store(
            out, config, store_dir=store_dir, workers=workers, on_start=on_store_start, on_case_done=on_store_case
        )
    return result


def fold_warnings(records: Sequence[dict[str, Any]], folds: int, seed: int) -> list[str]:
    """Per task with tumor-labelled cases: the folds whose validation cannot measure tumor Dice (no
    validation case, or none with a tumor), and a number of folds that gives every fold a tumor case."""

    def tumor_folds(task: Any, k: int) -> tuple[list[int], list[int]]:
        space = REGIONS[task.region].labels
        names = {space[ORGANS[o].tumor_value] for o in task.organs}
        cases = _task_entries(records, task.name)
        with_tumor = {
            fold_of(r["dataset"], r["case"], seed=seed, folds=k)
            for r in records
            if r["region"] == task.region and names & set(r["tumors"])
        }
        used = {fold_of(r["dataset"], r["case"], seed=seed, folds=k) for r in cases}
        return sorted(set(range(k)) - used), sorted(used - with_tumor)

    warnings = []
    for task in TASKS.values():
        space = REGIONS[task.region].labels
        names = {space[ORGANS[o].tumor_value] for o in task.organs}
        if not any(r["region"] == task.region and names & set(r["tumors"]) for r in records):
            continue  # no tumor-labelled case: nothing to validate tumors on in any fold
        empty, tumor_free = tumor_folds(task, folds)
        if not empty and not tumor_free:
            continue
        parts = []
        if empty:
            parts.append(f"fold(s) {', '.join(map(str, empty))} have no validation case")
        if tumor_free:
            parts.append(f"fold(s) {', '.join(map(str, tumor_free))} validate on tumor-free cases only")
        fits = next((k for k in range(folds - 1, 1, -1) if tumor_folds(task, k) == ([], [])), None)
        advice = f"--folds {fits} gives every fold a tumor case" if fits else "more tumor-labelled cases are needed"
        warnings.append(
            f"{task.name}: with {folds} folds, {' and '.join(parts)}: training on them cannot measure tumor "
            f"Dice ({advice})"
        )
    return warnings


def _write_metadata(out: Path, records: list[dict[str, Any]], config: PrepareConfig, result: PrepareResult) -> None:
    result.warnings.extend(fold_warnings(records, config.folds, config.seed))
    for task in TASKS.values():
        entries = [_relative(e, out / "datalists") for e in _task_entries(records, task.name)]
        if not entries:
            continue
        for fold in range(config.folds):
            datalist = {
                "name": f"freetumor {task.name}",
                "task": task.name,
                "fold": fold,
                "label_space": task.region,
                "task_remap": {str(k): v for k, v in task.region_to_task().items()},
                "training": [e for e in entries if e["fold"] != fold],
                "validation": [e for e in entries if e["fold"] == fold],
            }
            path = out / "datalists" / f"{task.name}_fold{fold}.json"
            write_text_atomic(path, json.dumps(datalist, indent=1) + "\n")
            result.datalists.append(path)
    abdomen = [r for r in records if r["region"] == "abdomen"]
    dataset_json = {
        "name": "freetumor",
        "description": "prepared by freetumor prepare",
        "channel_names": {"0": "CT"},
        "labels": {name: value for value, name in REGIONS["abdomen"].labels.items()},
        "numTraining": len(abdomen),
        "file_ending": ".nii.gz",
        "freetumor_version": __version__,
    }
    write_text_atomic(out / "dataset.json", json.dumps(dataset_json, indent=2) + "\n")
    labels_json = {
        **{name: {str(k): v for k, v in r.labels.items()} for name, r in REGIONS.items()},
        "task_remaps": {t.name: {str(k): v for k, v in t.region_to_task().items()} for t in TASKS.values()},
        "source_remaps": {n: {str(k): v for k, v in s.remap.items()} for n, s in DATASETS.items() if s.remap},
    }
    write_text_atomic(out / "labels.json", json.dumps(labels_json, indent=2) + "\n")
    write_text_atomic(
        out / "prepare_config.json", json.dumps({"version": __version__, **to_dict(config)}, indent=2) + "\n"
    )


def report_markdown(result: PrepareResult, config: PrepareConfig) -> str:
    lines = ["# freetumor prepare report", "", f"{result.valid} usable case(s), {result.skipped} skipped.", ""]
    lines += ["| dataset | found | usable | skipped | reasons |", "|---|---|---|---|---|"]
    for name, r in sorted(result.reports.items()):
        reasons = "; ".join(f"{reason}: {n} (e.g. {r.examples[reason]})" for reason, n in r.skipped.most_common())
        lines.append(f"| {name} | {r.found} | {r.valid} | {sum(r.skipped.values())} | {reasons or '-'} |")
    if result.unknown_folders:
        lines += ["", f"Folders that are not known datasets (ignored): {', '.join(result.unknown_folders)}"]
    lines += ["", f"Folds: {config.folds}, seed {config.seed}."]
    lines += [f"- warning: {w}" for w in result.warnings]
    return "\n".join(lines) + "\n"


PATH_KEYS = ("image", "label", "source_label")


def _relative(record: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``record`` with its paths relative to ``folder``: a prepared folder works from any working folder, and
    keeps working when it and the data root move together (to another disk, or mounted elsewhere on a node)."""
    return {k: (os.path.relpath(Path(v).absolute(), folder) if k in PATH_KEYS and v else v) for k, v in record.items()}


def read_manifest(out_dir: PathLike) -> list[dict[str, Any]]:
    """The records of ``<out>/manifest.jsonl``, their paths made absolute (they are stored relative to it)."""
    folder = Path(out_dir).absolute()
    path = folder / "manifest.jsonl"
    if not path.is_file():
        raise InputError(f"no manifest in {out_dir}", hint="run freetumor prepare without --num-parts first")
    try:
        with path.open(encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle if line.strip()]
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is damaged ({type(exc).__name__})", hint="run freetumor prepare again") from None
    return [{k: (str(folder / v) if k in PATH_KEYS and v else v) for k, v in r.items()} for r in records]


def build_case_store(
    out_dir: PathLike,
    config: PrepareConfig,
    *,
    store_dir: PathLike | None = None,
    workers: int = 1,
    num_parts: int = 1,
    part_id: int = 0,
    on_start: Callable[[int], None] | None = None,
    on_case_done: Callable[[str, str], None] | None = None,
) -> tuple[Path, BuildResult]:
    """Write (or complete) the case store of every case in ``<out>/manifest.jsonl``.

    The store goes to ``store_dir`` (default ``<out>/store``); a store elsewhere is recorded in
    ``<out>/store.json`` so that the training loops find it. See :mod:`freetumor_cli.core.store`.

    Returns:
        (the store folder, what the build did).
    """
    out = Path(out_dir)
    root = Path(store_dir) if store_dir is not None else out / "store"
    if store_dir is not None:
        write_text_atomic(out / STORE_POINTER, json.dumps({"path": str(root.resolve())}, indent=2) + "\n")
    records = read_manifest(out)
    result = build_store(
        records, root, config.preprocessing.for_region, workers=workers, num_parts=num_parts, part_id=part_id,
        on_start=on_start, on_case_done=on_case_done,
    )  # fmt: skip
    return root, result
