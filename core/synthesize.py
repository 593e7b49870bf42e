"""File-level tumor synthesis: CT files in, CT + label + JSON (+ preview) files out.

:func:`synthesize_case` does one image; :func:`collect_cases` turns a file, a folder or a MONAI
data-list JSON into cases, finding organ labels beside images by the nnU-Net convention.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from freetumor_cli import __version__
from freetumor_cli.core.config import to_dict
from freetumor_cli.core.errors import FreetumorError, InputError, LabelError, OutputExistsError
from freetumor_cli.core.io import (
    OutputLock,
    Volume,
    case_name,
    check_same_grid,
    disk_dtype,
    is_nifti,
    load_volume,
    read_datalist,
    save_volume,
    write_text_atomic,
)
from freetumor_cli.core.registry import ORGANS, REGIONS, Organ, foreign_to_region
from freetumor_cli.core.synthesis_config import SynthesizeConfig

if TYPE_CHECKING:
    from freetumor_cli.core.tumor import TumorRecord


@dataclass(frozen=True)
class Case:
    """One input: an image, its organ labels (if known) and where the labels came from."""

    image: Path
    labels: Path | None
    name: str
    labels_found_by: str = "given"


@dataclass
class CaseResult:
    """What :func:`synthesize_case` wrote for one case."""

    case: str
    outputs: list[Path] = field(default_factory=list)
    tumors: list[list[TumorRecord]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: bool = False  # every output was there already, from the same configuration


def collect_cases(input_path: str | os.PathLike[str], labels: str | os.PathLike[str] | None = None) -> list[Case]:
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


def is_synthesize_output(path: str | os.PathLike[str]) -> bool:
    """Whether a file is one of synthesize's outputs (so that a folder run never reads its own outputs)."""
    return bool(OUTPUT_NAME.search(case_name(path)))


def output_paths(out_dir: Path, case: str, copy_index: int | None, *, preview: bool, organ: str) -> dict[str, Path]:
    """The files written for one copy of one case: ``<case>_<organ>_synthetic[_NNN]`` (+ ``_label``, ``.json``,
    ``_preview.png``), so that runs for two organs into one folder do not collide."""
    stem = f"{case}_{organ}_synthetic" + ("" if copy_index is None else f"_{copy_index:03d}")
    paths = {
        "image": out_dir / f"{stem}.nii.gz",
        "label": out_dir / f"{stem}_label.nii.gz",
        "json": out_dir / f"{stem}.json",
    }
    if preview:
        paths["preview"] = out_dir / f"{stem}_preview.png"
    return paths


def detect_label_scheme(values: np.ndarray, organ: Organ) -> str:
    """Guess how a label map is encoded from its values.

    Binary when only 0 and 1 occur; TotalSegmentator when a value exceeds freetumor's space for the
    organ's region; freetumor otherwise. (A TotalSegmentator crop holding only classes that are also
    freetumor values is read as freetumor: pass the scheme explicitly then.)
    """
    top = max(REGIONS[organ.region].labels)
    present = set(int(v) for v in values)
    if present <= {0, 1}:
        return "binary"
    if max(present) > top:
        return "totalsegmentator"
    return "freetumor"


def organ_labels_in_region(labels: Volume, organ: Organ, scheme: str) -> tuple[np.ndarray, str]:
    """Map a label volume into the organ's region space (abdomen 7-class or chest).

    Returns:
        (uint8 label array in the region space, the scheme used).

    Raises:
        LabelError: values not in the scheme, non-integer labels, or the organ is absent.
    """
    array = labels.array
    if not np.issubdtype(array.dtype, np.integer):
        if np.isnan(array).any() or not np.array_equal(array, np.rint(array)):
            raise LabelError(f"labels {labels.path} hold non-integer values", hint="pass an integer label map")
        array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() > 65535):
        raise LabelError(f"labels {labels.path} hold values outside 0..65535")
    values = present_values(array)
    used = detect_label_scheme(values, organ) if scheme == "auto" else scheme
    if used == "freetumor":
        allowed = set(REGIONS[organ.region].labels)
        bad = sorted(set(int(v) for v in values) - allowed)
        if bad:
            raise LabelError(
                f"labels {labels.path} hold values {bad} outside freetumor's {organ.region} scheme "
                f"({', '.join(f'{k} {v}' for k, v in REGIONS[organ.region].labels.items())})",
                hint="pass --label-scheme totalsegmentator or binary if the labels use another scheme",
            )
        region = array.astype(np.uint8)
    else:
        if used == "binary":
            bad = sorted(set(int(v) for v in values) - {0, 1})
            if bad:
                raise LabelError(f"labels {labels.path} are not a binary mask (values {bad[:5]})")
        mapping = foreign_to_region(used, organ)
        lut = np.zeros(int(values.max()) + 1, dtype=np.uint8)
        for source, target in mapping.items():
            if source < len(lut):
                lut[source] = target
        # Keep the memory order (NIfTI arrays are Fortran-ordered): writing is then a plain copy.
        region = lut[array.ravel(order="K")].reshape(array.shape, order="F" if array.flags.f_contiguous else "C")
    if not (region == organ.value).any():
        where = {
            "totalsegmentator": f"TotalSegmentator ids {', '.join(map(str, organ.totalseg_ids))}",
            "binary": "value 1 of the binary mask",
            "freetumor": f"value {organ.value}",
        }[used]
        raise LabelError(
            f"no {organ.name} in labels {labels.path} ({used} scheme, {where}; values present: "
            f"{', '.join(str(int(v)) for v in values[:12])})",
            hint="check --organ, or pass --label-scheme if the scheme was guessed wrong",
        )
    return region, used


def present_values(array: np.ndarray) -> np.ndarray:
    """The sorted distinct values of an integer label array (flagged in a table, not sorted, when small)."""
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    low, high = int(array.min()), int(array.max())
    if low >= 0 and high < 65536:
        seen = np.zeros(high + 1, dtype=bool)
        seen[array.ravel(order="K")] = True
        return np.flatnonzero(seen)
    return np.unique(array)


def check_ct_values(image: Volume) -> list[str]:
    """Refuse NaN and infinite voxels; warn when the intensities do not look like CT in Hounsfield units."""
    array = image.array
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise InputError(
                f"image {image.path} has {bad} voxels that are NaN or infinite",
                hint="replace them (e.g. with -1024 HU) first",
            )
    sample = array[::4, ::4, ::2]
    low, high = np.percentile(sample, [0.5, 99.5]) if sample.size else (0.0, 0.0)
    if low > -500 or high > 4000 or high - low < 200:
        return [
            f"image {image.path} spans {low:.0f}..{high:.0f} (0.5-99.5 percentile): that does not look like "
            "CT in Hounsfield units (air is about -1000 HU), so the tumor contrast may be wrong"
        ]
    return []


def synthesize_case(
    case: Case,
    config: SynthesizeConfig,
    out_dir: str | os.PathLike[str],
    *,
    on_copy_done: Callable[[], None] | None = None,
    device: str = "cpu",
) -> CaseResult:
    """Synthesize ``config.copies`` variants of one case and write them to ``out_dir``.

    All checks happen before anything is written: a bad input leaves no file behind.
    """
    out = Path(out_dir)
    organ = ORGANS[config.organ]
    result = CaseResult(case.name)
    if case.labels is None:
        raise InputError(
            f"no organ labels for {case.image}",
            hint=(
                "pass --labels with a label map, a TotalSegmentator output (TotalSegmentator -i ct.nii.gz "
                "-o seg --ml) or a binary organ mask; or put it in labelsTr/ beside imagesTr/"
            ),
        )
    copies: list[int | None] = [None] if config.copies == 1 else list(range(1, config.copies + 1))
    all_paths = [output_paths(out, case.name, c, preview=config.preview, organ=organ.name) for c in copies]
    if not config.overwrite and all(_finished(paths, case, config) for paths in all_paths):
        result.skipped = True  # a rerun after an interruption: this case is done
        result.notes.append(f"{case.name}: already done (same configuration), skipped")
        return result
    # gzip (de)compression releases the GIL: read the image and its labels side by side, and import
    # the engine (scipy) meanwhile.
    with ThreadPoolExecutor(max_workers=2) as pool:
        image_job = pool.submit(load_volume, case.image, what="image")
        labels_job = pool.submit(load_volume, case.labels, what="labels")
        from freetumor_cli.core.tumor import prepare_organ, synthesize_in_organ

        image, labels = image_job.result(), labels_job.result()
    check_same_grid(image, labels)
    result.warnings.extend(check_ct_values(image))
    region_labels, scheme = organ_labels_in_region(labels, organ, config.label_scheme)
    if config.label_scheme == "auto":
        result.notes.append(f"labels {case.labels.name}: detected the {scheme} scheme")
    if case.labels_found_by == "nnU-Net convention":
        result.notes.append(f"labels found beside the image: {case.labels}")
    organ_mask = region_labels == organ.value
    source = image.array
    dtype = disk_dtype(image)
    geometry = prepare_organ(organ_mask, organ, spacing=image.spacing, affine=image.affine, config=config.rules)
    for copy_index, paths in zip(copies, all_paths, strict=True):
        seed = config.seed + (0 if copy_index is None else copy_index - 1)
        rng = np.random.default_rng(seed)
        synth = synthesize_in_organ(
            source,
            organ_mask,
            organ,
            spacing=image.spacing,
            affine=image.affine,
            rng=rng,
            size=config.size,
            count=config.count,
            radius_mm=config.radius_mm,
            config=config.rules,
            geometry=geometry,
        )
        if config.engine == "generator":
            from freetumor_cli.core.learned import apply_generator

            synth = apply_generator(synth, image, organ, str(config.generator), device=device)
        result.notes.extend(n for n in synth.notes if n not in result.notes)
        if copy_index in (None, 1) and not config.overwrite:
            # Checked after the first synthesis so that input problems are reported first, and
            # before the first write so that nothing is written when any output exists.
            existing = [p for paths in all_paths for p in paths.values() if p.exists()]
            if existing:
                raise OutputExistsError(
                    f"output exists from another configuration or an unfinished write: {existing[0]}",
                    hint="pass --overwrite to replace it, or choose another --out",
                )
        new_image = synth.apply(source.copy(order="K") if source.dtype == dtype else source.astype(dtype))
        new_labels = region_labels.copy(order="K")
        label_region = new_labels[synth.bbox]
        label_region[synth.tumor_mask & (label_region == organ.value)] = organ.tumor_value
        with ThreadPoolExecutor(max_workers=2) as pool:
            jobs = [
                pool.submit(save_volume, new_image, image, paths["image"]),
                pool.submit(save_volume, new_labels, image, paths["label"], label=True),
            ]
            for job in jobs:
                job.result()
        sidecar = {
            "tool": "freetumor",
            "version": __version__,
            "engine": config.engine,
            "seed": seed,
            "input": str(case.image),
            "labels": str(case.labels),
            "label_scheme": scheme,
            "organ": organ.name,
            "region": organ.region,
            "label_values": {"organ": organ.value, "tumor": organ.tumor_value},
            "spacing_mm": [round(float(s), 4) for s in image.spacing],
            "shape": list(image.shape),
            "tumors": [asdict(t) for t in synth.tumors],
            "notes": synth.notes,
            "config": to_dict(config),
        }
        write_text_atomic(paths["json"], json.dumps(sidecar, indent=2) + "\n")
        written = [paths["image"], paths["label"], paths["json"]]
        if config.preview:
            from freetumor_cli.core.preview import save_tumor_preview

            save_tumor_preview(
                before=image.like(np.asarray(source)),
                after=image.like(new_image),
                tumor_mask=new_labels == organ.tumor_value,
                centers=[t.center_voxel for t in synth.tumors],
                region=organ.region,
                path=paths["preview"],
                title=f"{case.name}: {len(synth.tumors)} synthetic {organ.tumor_name}(s), seed {seed}",
            )
            written.append(paths["preview"])
        result.outputs.extend(written)
        result.tumors.append(synth.tumors)
        if on_copy_done is not None:
            on_copy_done()
    return result


def _finished(paths: dict[str, Path], case: Case, config: SynthesizeConfig) -> bool:
    """Whether one copy's outputs are all there, written for this input with this configuration."""
    if not all(p.is_file() for p in paths.values()):
        return False
    try:
        sidecar = json.loads(paths["json"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    ours = {k: v for k, v in to_dict(config).items() if k != "overwrite"}
    theirs = {k: v for k, v in (sidecar.get("config") or {}).items() if k != "overwrite"}
    return ours == theirs and sidecar.get("input") == str(case.image)


def iter_results(
    cases: Iterable[Case],
    config: SynthesizeConfig,
    out_dir: str | os.PathLike[str],
    *,
    on_copy_done: Callable[[], None] | None = None,
    device: str = "cpu",
) -> Iterable[tuple[Case, CaseResult | Exception]]:
    """Run :func:`synthesize_case` over cases, yielding each result or the error that stopped it.

    The output folder is locked meanwhile: a second run into it stops at once. Cases finished by an
    earlier run with the same configuration are skipped.
    """
    with OutputLock(out_dir, "synthesize"):
        for case in cases:
            try:
                yield case, synthesize_case(case, config, out_dir, on_copy_done=on_copy_done, device=device)
            except FreetumorError as exc:
                yield case, exc
