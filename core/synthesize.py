"""File-level tumor synthesis: CT files in, CT + label + JSON (+ preview) files out.

:func:`synthesize_case` does one case (:mod:`freetumor_cli.core.cases` finds them); :func:`synthesize_tumors`
does a CT held in memory.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from freetumor_cli import __version__
from freetumor_cli.core import PathLike
from freetumor_cli.core.cases import OUTPUT_NAME, Case, collect_cases
from freetumor_cli.core.config import to_dict
from freetumor_cli.core.engines import wrong_contrast
from freetumor_cli.core.errors import FreetumorError, InputError, LabelError, OutputExistsError
from freetumor_cli.core.io import Volume, load_image, load_volume, save_volume, working_copy
from freetumor_cli.core.label_maps import (
    check_same_grid,
    choose_scheme,
    integer_labels,
    integer_problem,
    label_values,
    relabel,
    written_by_freetumor,
)
from freetumor_cli.core.outputs import OutputLock, check_name_lengths, write_text_atomic
from freetumor_cli.core.registry import ORGANS, REGIONS, Organ, foreign_to_region
from freetumor_cli.core.synthesis_config import SynthesisConfig, SynthesizeConfig

if TYPE_CHECKING:
    from freetumor_cli.core.engines import IntensityModel
    from freetumor_cli.core.tumor import OrganGeometry, SynthesisResult, TumorRecord


@dataclass
class CaseResult:
    """What :func:`synthesize_case` wrote for one case."""

    case: str
    outputs: list[Path] = field(default_factory=list)
    tumors: list[list[TumorRecord]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: bool = False  # every output was there already, from the same configuration


def output_paths(
    out_dir: Path, case: str, copy_index: int | None, *, preview: bool, organ: str, layout: str = "flat",
    dataset: str = "Dataset501_Synthetic",
) -> dict[str, Path]:  # fmt: skip
    """The files written for one copy of one case.

    Their stem is ``<case>_<organ>_synthetic[_NNN]``, so that runs for two organs into one folder do not
    collide. ``flat`` and ``monai`` put ``<stem>.nii.gz``, ``<stem>_label.nii.gz``, ``<stem>.json`` (and
    ``<stem>_preview.png``) in ``out_dir``; ``nnunet`` writes ``<dataset>/imagesTr/<stem>_0000.nii.gz``,
    ``<dataset>/labelsTr/<stem>.nii.gz``, and the records under ``<dataset>/freetumor/``.
    """
    stem = f"{case}_{organ}_synthetic" + ("" if copy_index is None else f"_{copy_index:03d}")
    if layout == "nnunet":
        root = out_dir / dataset
        paths = {
            "image": root / "imagesTr" / f"{stem}_0000.nii.gz",
            "label": root / "labelsTr" / f"{stem}.nii.gz",
            "json": root / RECORDS_FOLDER / f"{stem}.json",
        }
        if preview:
            paths["preview"] = root / RECORDS_FOLDER / f"{stem}_preview.png"
        return paths
    paths = {
        "image": out_dir / f"{stem}.nii.gz",
        "label": out_dir / f"{stem}_label.nii.gz",
        "json": out_dir / f"{stem}.json",
    }
    if preview:
        paths["preview"] = out_dir / f"{stem}_preview.png"
    return paths


RECORDS_FOLDER = "freetumor"  # in an nnU-Net dataset: the JSON records and previews, beside imagesTr
DATALIST_NAME = "datalist.json"


def write_layout_index(out_dir: PathLike, config: SynthesizeConfig) -> Path | None:
    """The index of the outputs' layout, rebuilt from every record in the folder (so reruns and parts add up).

    ``nnunet``: ``<dataset>/dataset.json`` (channel CT, the region's labels, ``numTraining``);
    ``monai``: ``datalist.json`` with a ``training`` entry per output, paths relative to it. ``flat``
    writes nothing.
    """
    out = Path(out_dir)
    region = REGIONS[ORGANS[config.organ].region]
    if config.layout == "nnunet":
        root = out / config.dataset
        cases = sorted(p.name[: -len(".nii.gz")] for p in (root / "labelsTr").glob("*.nii.gz"))
        if not cases:
            return None
        index = {
            "channel_names": {"0": "CT"},
            "labels": {name: value for value, name in sorted(region.labels.items())},
            "numTraining": len(cases),
            "file_ending": ".nii.gz",
            "description": f"synthetic {region.name} tumors from freetumor {__version__}",
        }
        return write_text_atomic(root / "dataset.json", json.dumps(index, indent=2) + "\n")
    if config.layout == "monai":
        entries = []
        for record in sorted(out.glob("*_synthetic*.json")):
            stem = record.name[: -len(".json")]
            image, label = out / f"{stem}.nii.gz", out / f"{stem}_label.nii.gz"
            if OUTPUT_NAME.search(stem) and image.is_file() and label.is_file():
                entries.append({"image": image.name, "label": label.name})
        if not entries:
            return None
        index = {"labels": {str(v): n for v, n in sorted(region.labels.items())}, "training": entries}
        return write_text_atomic(out / DATALIST_NAME, json.dumps(index, indent=2) + "\n")
    return None


def organ_labels_in_region(
    labels: Volume, organ: Organ, scheme: str, *, flag: str = "--label-scheme "
) -> tuple[np.ndarray, str]:
    """Map a label volume into the organ's region space (abdomen 7-class or chest).

    Returns:
        (uint8 label array in the region space, the scheme used).

    Raises:
        LabelError: values not in the scheme, non-integer labels, or the organ is absent.
    """
    problem = integer_problem(labels.array)
    if problem:
        raise LabelError(f"labels {labels.name} {problem}", hint="pass an integer label map")
    array = integer_labels(labels.array)
    low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if low < 0 or high > 65535:
        raise LabelError(f"labels {labels.name} hold values outside 0..65535")
    used = scheme
    if scheme == "auto":
        freetumor_file = written_by_freetumor(labels.header)
        # The value range decides most maps (two fast passes); the values present (a full scan) the rest.
        decided = freetumor_file or high <= 1 or high > max(REGIONS[organ.region].labels)
        values = np.array([low, high]) if decided else label_values(array)
        choice = choose_scheme(values, organ.region, binary=True, freetumor_file=freetumor_file, flag=flag)
        if choice.scheme is None:
            raise LabelError(f"labels {labels.name} are ambiguous: {choice.reason}")
        used = choice.scheme
    if used == "freetumor":
        allowed = set(REGIONS[organ.region].labels)
        if not set(range(low, high + 1)) <= allowed:
            bad = sorted(set(int(v) for v in label_values(array)) - allowed)
            if bad:
                raise LabelError(
                    f"labels {labels.name} hold values {bad} outside freetumor's {organ.region} scheme "
                    f"({', '.join(f'{k} {v}' for k, v in REGIONS[organ.region].labels.items())})",
                    hint="pass --label-scheme totalsegmentator or binary if the labels use another scheme",
                )
        region = array.astype(np.uint8, copy=False)  # read only from here on: the caller copies to write
    else:
        if used == "binary" and high > 1:
            bad = sorted(set(int(v) for v in label_values(array)) - {0, 1})
            raise LabelError(f"labels {labels.name} are not a binary mask (values {bad[:5]})")
        mapping = foreign_to_region(used, organ)
        region = relabel(array, mapping)
    if not (region == organ.value).any():
        where = {
            "totalsegmentator": f"TotalSegmentator ids {', '.join(map(str, organ.totalseg_ids))}",
            "binary": "value 1 of the binary mask",
            "freetumor": f"value {organ.value}",
        }[used]
        raise LabelError(
            f"no {organ.name} in labels {labels.name} ({used} scheme, {where}; values present: "
            f"{', '.join(str(int(v)) for v in label_values(array)[:12])})",
            hint="check --organ, or pass --label-scheme if the scheme was guessed wrong",
        )
    return region, used


def check_ct_values(image: Volume) -> list[str]:
    """Refuse NaN and infinite voxels; warn when the intensities do not look like CT in Hounsfield units."""
    array = image.array
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise InputError(
                f"image {image.name} has {bad} voxels that are NaN or infinite",
                hint="replace them (e.g. with -1024 HU) first",
            )
    sample = array[::4, ::4, ::2]
    low, high = np.percentile(sample, [0.5, 99.5]) if sample.size else (0.0, 0.0)
    if low > -500 or high > 4000 or high - low < 200:
        return [
            f"image {image.name} spans {low:.0f}..{high:.0f} (0.5-99.5 percentile): that does not look like "
            "CT in Hounsfield units (air is about -1000 HU), so the tumor contrast may be wrong"
        ]
    return []


def synthesize_case(
    case: Case,
    config: SynthesizeConfig,
    out_dir: PathLike,
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
    all_paths = [
        output_paths(
            out, case.name, c, preview=config.preview, organ=organ.name, layout=config.layout, dataset=config.dataset
        )
        for c in copies
    ]
    check_name_lengths([p for paths in all_paths for p in paths.values()])
    states = ["todo"] * len(copies) if config.overwrite else [_copy_state(paths, case, config) for paths in all_paths]
    if all(state == "done" for state in states):
        result.skipped = True  # a rerun after an interruption: this case is done
        result.notes.append(f"{case.name}: already done (same configuration), skipped")
        return result
    # gzip (de)compression releases the GIL: read the image and its labels side by side, and import
    # the engine (scipy) meanwhile.
    with ThreadPoolExecutor(max_workers=2) as pool:
        image_job = pool.submit(load_image, case.image, what="image")
        labels_job = pool.submit(load_volume, case.labels, what="labels")
        from freetumor_cli.core.tumor import prepare_organ

        image, labels = image_job.result(), labels_job.result()
    check_same_grid(image, labels)
    result.warnings.extend(check_ct_values(image))
    region_labels, scheme = organ_labels_in_region(labels, organ, config.label_scheme)
    if config.label_scheme == "auto":
        result.notes.append(f"labels {case.labels.name}: detected the {scheme} scheme")
    if case.labels_found_by == "nnU-Net convention":
        result.notes.append(f"labels found beside the image: {case.labels}")
    geometry = prepare_organ(
        region_labels == organ.value, organ, spacing=image.spacing, affine=image.affine, config=config.rules
    )
    intensity = None
    if config.engine == "generator":
        from freetumor_cli.core.learned import GeneratorIntensity

        intensity = GeneratorIntensity(str(config.generator), organ, device=device)
    checked = False
    copy_notes: dict[str, list[int | None]] = {}  # what the engine decided -> the copies it concerns
    for copy_index, paths, state in zip(copies, all_paths, states, strict=True):
        if state == "done":  # finished by an interrupted run with this configuration: its own stream, kept
            result.outputs.extend(paths.values())
            result.notes.append(f"{copy_name(case.name, [copy_index])}: done before (same configuration), kept")
            if on_copy_done is not None:
                on_copy_done()
            continue
        stream = case_stream(config.seed, case.name, copy_index)
        synth, new_image, new_labels = insert_tumors(
            image, region_labels, organ, rng=np.random.default_rng(stream), config=config,
            geometry=geometry, intensity=intensity,
        )  # fmt: skip
        for message in synth.notes:
            copy_notes.setdefault(message, []).append(copy_index)
        if config.engine == "generator" and synth.tumors:
            mean_change = float(np.mean([t.mean_hu_change for t in synth.tumors]))
            warning = wrong_contrast(organ.region, mean_change, "the generator's tumors")
            if warning:
                result.warnings.append(f"{copy_name(case.name, [copy_index])}: {warning}")
        if not checked and "foreign" in states:
            # Checked after the first synthesis so that input problems are reported first, and
            # before the first write so that nothing is written when another run's outputs are there.
            foreign = all_paths[states.index("foreign")]["json"]
            raise OutputExistsError(
                f"output exists from another configuration or input: {foreign}",
                hint="pass --overwrite to replace it, or choose another --out",
            )
        checked = True
        if state == "unfinished":
            result.notes.append(f"{copy_name(case.name, [copy_index])}: finishing the write an interrupted run left")
        try:
            written = _write_copy(paths, image, new_image, new_labels)
            if config.preview:
                from freetumor_cli.core.preview import save_tumor_preview

                save_tumor_preview(
                    before=image,
                    after=image.like(new_image),
                    tumor_mask=new_labels == organ.tumor_value,
                    centers=[t.center_voxel for t in synth.tumors],
                    region=organ.region,
                    path=paths["preview"],
                    title=f"{case.name}: {len(synth.tumors)} synthetic {organ.tumor_name}(s), seed {config.seed}",
                )
                written.append(paths["preview"])
            # The record goes last: it marks the copy as finished (a rerun keeps what it finds with one).
            sidecar = {
                "tool": "freetumor",
                "version": __version__,
                "engine": config.engine,
                "seed": config.seed,
                "stream": list(stream),
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
            written.append(paths["json"])
        except BaseException:
            # A copy is whole or absent: what it wrote before failing goes (finished copies stay).
            for path in paths.values():
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
            raise
        result.outputs.extend(written)
        result.tumors.append(synth.tumors)
        if on_copy_done is not None:
            on_copy_done()
    result.notes.extend(f"{copy_name(case.name, which)}: {message}" for message, which in copy_notes.items())
    return result


def _write_copy(paths: dict[str, Path], image: Volume, new_image: np.ndarray, new_labels: np.ndarray) -> list[Path]:
    """Write one copy's CT and labels (side by side: gzip releases the GIL)."""
    for folder in {p.parent for p in paths.values()}:
        folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [
            pool.submit(save_volume, new_image, image, paths["image"]),
            pool.submit(save_volume, new_labels, image, paths["label"], label=True),
        ]
        for job in jobs:
            job.result()
    return [paths["image"], paths["label"]]


def copy_name(case: str, copies: Sequence[int | None]) -> str:
    """How messages name a case's output(s): ``case``, ``case copy 2`` or ``case copies 1, 3``."""
    numbers = [c for c in copies if c is not None]
    if not numbers:
        return case
    return f"{case} cop{'y' if len(numbers) == 1 else 'ies'} {', '.join(map(str, numbers))}"


def case_stream(seed: int, case: str, copy_index: int | None = None) -> tuple[int, int, int]:
    """The entropy of one case's random stream: the seed, the case id and the copy.

    Each case of a batch gets its own tumors, and adding or removing cases changes nobody else's.
    The case id is hashed with CRC-32, which (unlike ``hash``) is the same in every process.
    """
    return (int(seed), zlib.crc32(case.encode("utf-8")), 0 if copy_index is None else int(copy_index))


def insert_tumors(
    image: Volume,
    region_labels: np.ndarray,
    organ: Organ,
    *,
    rng: np.random.Generator,
    config: SynthesizeConfig,
    geometry: OrganGeometry | None = None,
    intensity: IntensityModel | None = None,
) -> tuple[SynthesisResult, np.ndarray, np.ndarray]:
    """Tumors into one CT volume: (what was done, the new image in the input's dtype, the new labels).

    ``region_labels`` are in freetumor's scheme for the organ's region; the new labels mark the
    tumors with the organ's tumor value. Neither input is modified.
    """
    from freetumor_cli.core.tumor import synthesize_in_organ

    source = image.array
    synth = synthesize_in_organ(
        source, region_labels == organ.value if geometry is None else None, organ,
        spacing=image.spacing, affine=image.affine, rng=rng, size=config.size, count=config.count,
        radius_mm=config.radius_mm, config=config.rules, geometry=geometry, intensity=intensity,
    )  # fmt: skip
    new_image = synth.apply(working_copy(image))
    new_labels = region_labels.astype(np.uint8, copy=True, order="K")
    label_box = new_labels[synth.bbox]
    label_box[synth.tumor_mask & (label_box == organ.value)] = organ.tumor_value
    return synth, new_image, new_labels


@dataclass
class SynthesizedImage:
    """What :func:`synthesize_tumors` returns.

    Attributes:
        image: the CT with tumors: a nibabel image when a nibabel image came in (same affine and
            header, the input's dtype), else an array of the input's dtype.
        label: organs and tumors in freetumor's scheme for the organ's region (uint8), of the same kind.
        tumors: one record per tumor (size class, center in voxels and world mm, radii, volume, HU).
        notes: what the engine decided on the caller's behalf.
        label_scheme: how the labels were read (freetumor, totalsegmentator or binary).
    """

    image: Any
    label: Any
    tumors: list[TumorRecord]
    notes: list[str]
    label_scheme: str


def synthesize_tumors(
    image: Any,
    labels: Any,
    organ: str,
    *,
    affine: Any = None,
    seed: int | np.random.Generator = 0,
    size: str = "mix",
    count: int | None = 1,
    radius_mm: float | None = None,
    label_scheme: str = "auto",
    rules: SynthesisConfig | None = None,
    generator: PathLike | None = None,
    device: str = "cpu",
) -> SynthesizedImage:
    """Insert synthetic tumors into a CT held in memory: no files are read or written.

    Args:
        image: the CT in HU, a nibabel image or a 3D array (then pass ``affine``).
        labels: the organ labels on the same grid, of the same kind: freetumor's scheme, a
            TotalSegmentator multilabel map or a binary organ mask (bool or 0/1).
        organ: the target organ (``liver``, ``pancreas``, ``kidney``, ``lung``).
        affine: the voxel-to-world matrix of array inputs.
        seed: a seed or a ``numpy.random.Generator``: the same seed gives the same tumors.
        size: a size class (``tiny``, ``small``, ``medium``, ``large``) or ``mix``.
        count: tumors to insert; None draws the count from the size class's range.
        radius_mm: an exact tumor radius in mm (overrides ``size``).
        label_scheme: ``auto`` or the scheme of ``labels``.
        rules: the rule engine's constants.
        generator: a generator checkpoint for learned intensities (``train-synth``, ``fetch-weights``).
        device: where the generator runs.

    Raises:
        InputError, GeometryError, LabelError, OrganTooSmallError: as the ``synthesize`` command.

    Example:
        >>> import nibabel as nib
        >>> from freetumor_cli import synthesize_tumors
        >>> out = synthesize_tumors(nib.load("ct.nii.gz"), nib.load("seg.nii.gz"), "liver", seed=1)
        >>> out.image.to_filename("ct_tumor.nii.gz"); out.label.to_filename("ct_tumor_label.nii.gz")
    """
    from freetumor_cli.core.io import _nifti_image, volume_from

    if organ not in ORGANS:
        raise InputError(f"unknown organ {organ!r}", hint=f"choose one of {', '.join(ORGANS)}")
    config = SynthesizeConfig(
        organ=organ, size=size, count=count, radius_mm=radius_mm, label_scheme=label_scheme,
        engine="generator" if generator else "rules", generator=str(generator) if generator else None,
        **({"rules": rules} if rules is not None else {}),
    )  # fmt: skip
    ct = volume_from(image, affine, what="image")
    label_array = labels.astype(np.uint8) if isinstance(labels, np.ndarray) and labels.dtype == bool else labels
    label_volume = volume_from(label_array, ct.affine if isinstance(labels, np.ndarray) else None, what="labels")
    check_same_grid(ct, label_volume)
    warnings = check_ct_values(ct)
    target = ORGANS[organ]
    region_labels, scheme = organ_labels_in_region(label_volume, target, config.label_scheme, flag="label_scheme=")
    intensity = None
    if generator:
        from freetumor_cli.core.learned import GeneratorIntensity

        intensity = GeneratorIntensity(generator, target, device=device)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    synth, new_image, new_labels = insert_tumors(ct, region_labels, target, rng=rng, config=config, intensity=intensity)
    if isinstance(image, np.ndarray):
        return SynthesizedImage(new_image, new_labels, synth.tumors, warnings + synth.notes, scheme)
    return SynthesizedImage(
        _nifti_image(new_image, ct, label=False),
        _nifti_image(new_labels, ct, label=True),
        synth.tumors,
        warnings + synth.notes,
        scheme,
    )


def _copy_state(paths: dict[str, Path], case: Case, config: SynthesizeConfig) -> str:
    """What a rerun finds of one copy's outputs: ``done``, ``todo`` (nothing), ``unfinished`` (files of an
    interrupted write, without the record that a copy's write ends with) or ``foreign`` (another
    configuration's or input's finished copy, which is never replaced without ``--overwrite``)."""
    try:
        sidecar = json.loads(paths["json"].read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "unfinished" if any(p.exists() for p in paths.values()) else "todo"
    except (OSError, ValueError):
        return "unfinished"  # a record cut short is no record
    if not isinstance(sidecar, dict):
        return "unfinished"
    ours = {k: v for k, v in to_dict(config).items() if k != "overwrite"}
    theirs = {k: v for k, v in (sidecar.get("config") or {}).items() if k != "overwrite"}
    if ours != theirs or sidecar.get("input") != str(case.image):
        return "foreign"
    return "done" if all(p.is_file() for p in paths.values()) else "unfinished"


def _run_case(case: Case, config: SynthesizeConfig, out_dir: str, device: str) -> CaseResult | FreetumorError:
    try:
        return synthesize_case(case, config, out_dir, device=device)
    except FreetumorError as exc:
        return exc


def iter_results(
    cases: Iterable[Case],
    config: SynthesizeConfig,
    out_dir: PathLike,
    *,
    on_copy_done: Callable[[], None] | None = None,
    device: str = "cpu",
    workers: int = 1,
    part: tuple[int, int] | None = None,
) -> Generator[tuple[Case, CaseResult | Exception], None, None]:
    """Run :func:`synthesize_case` over cases, yielding each result or the error that stopped it.

    The output folder is locked meanwhile: a second run into it stops at once (with ``part``, each
    part of a job locks its own share, and the parts write side by side). Cases finished by an
    earlier run with the same configuration are skipped. With ``workers`` > 1 the cases run in that
    many processes and results come as they finish; each case's tumors are the same either way.
    The lock is held until the iterator is exhausted or closed: a caller that stops early closes it
    (``contextlib.closing``), as the command does.
    """
    cases = list(cases)
    with OutputLock(out_dir, "synthesize", part=part):
        yield from _results(cases, config, out_dir, on_copy_done=on_copy_done, device=device, workers=workers)
        write_layout_index(out_dir, config)


@dataclass
class SynthesisRun:
    """What :func:`synthesize_cases` did.

    Attributes:
        cases: the cases of this run (of its part, with ``part``).
        all_cases: the cases of the input, every part's.
        part: (part id, number of parts), or None for the whole input.
        copies: output sets per case.
        done_before: cases whose outputs an earlier run with the same configuration wrote (skipped).
        failures: (case, the error that stopped it) per case that failed.
    """

    cases: list[Case]
    all_cases: int
    part: tuple[int, int] | None
    copies: int
    done_before: int = 0
    failures: list[tuple[str, FreetumorError]] = field(default_factory=list)

    @property
    def written(self) -> int:
        """Output sets written by this run."""
        return (len(self.cases) - len(self.failures) - self.done_before) * self.copies


def synthesize_cases(
    input_path: PathLike,
    labels: PathLike | None,
    config: SynthesizeConfig,
    out_dir: PathLike,
    *,
    device: str = "cpu",
    workers: int = 1,
    num_parts: int = 1,
    part_id: int = 0,
    on_start: Callable[[SynthesisRun], None] | None = None,
    on_copy_done: Callable[[], None] | None = None,
    on_case: Callable[[Case, CaseResult | FreetumorError], None] | None = None,
) -> SynthesisRun:
    """Synthesize every case of an input (one CT, a folder or a data list), or one part of them.

    A case that fails does not stop the others: it is counted in the returned run's ``failures``. A
    single CT (no parts) that fails raises its error instead.

    Args:
        input_path, labels: what :func:`~freetumor_cli.core.cases.collect_cases` reads.
        num_parts, part_id: run part ``part_id`` of ``num_parts`` (every ``num_parts``-th case); each part
            locks its own share of ``out_dir``.
        on_start: called once the cases of this run are known, before any is synthesized.
        on_copy_done: called per output set done, skipped or given up (so ``copies`` times per case).
        on_case: called per case with its result or the error that stopped it.

    Raises:
        InputError: no label file for a single CT; FreetumorError: the single CT's error.
    """
    cases = collect_cases(input_path, labels)
    if len(cases) == 1 and cases[0].labels is None and labels is not None:
        raise InputError(f"no label file for {cases[0].image} in {labels}")
    all_cases = len(cases)
    part = None
    if num_parts > 1 or part_id:
        from freetumor_cli.core.parallel import select_part

        cases = select_part(cases, num_parts, part_id)
        part = (part_id, num_parts)
    run = SynthesisRun(cases, all_cases, part, config.copies)
    if on_start is not None:
        on_start(run)

    def copies_done() -> None:
        for _ in range(config.copies):
            if on_copy_done is not None:
                on_copy_done()

    results = iter_results(cases, config, out_dir, on_copy_done=on_copy_done, device=device, workers=workers, part=part)
    with contextlib.closing(results):  # closed at once on an error: that releases the output folder
        for case, result in results:
            if isinstance(result, FreetumorError):
                if len(cases) == 1 and part is None:
                    raise result
                run.failures.append((case.name, result))
                copies_done()
            else:
                assert isinstance(result, CaseResult)  # iter_results yields a result or a FreetumorError
                if result.skipped:
                    run.done_before += 1
                    copies_done()
            if on_case is not None:
                on_case(case, result)
    return run


def _results(
    cases: list[Case],
    config: SynthesizeConfig,
    out_dir: PathLike,
    *,
    on_copy_done: Callable[[], None] | None,
    device: str,
    workers: int,
) -> Iterator[tuple[Case, CaseResult | Exception]]:
    if workers <= 1 or len(cases) <= 1:
        for case in cases:
            try:
                yield case, synthesize_case(case, config, out_dir, on_copy_done=on_copy_done, device=device)
            except FreetumorError as exc:
                yield case, exc
        return
    from concurrent.futures import as_completed

    from freetumor_cli.core.parallel import process_pool

    with process_pool(min(workers, len(cases))) as pool:
        futures = {pool.submit(_run_case, case, config, str(out_dir), device): case for case in cases}
        for future in as_completed(futures):
            result = future.result()
            if on_copy_done is not None and isinstance(result, CaseResult) and not result.skipped:
                for _ in result.tumors:
                    on_copy_done()
            yield futures[future], result
