"""Score a folder of predictions against ground truth: per case, per class, per lesion, aggregated.

Outputs (:func:`write_reports`): ``metrics_per_case.csv``, ``metrics_per_lesion.csv``,
``summary.json``, ``summary.md`` and PNG plots.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from freetumor_cli import __version__
from freetumor_cli.core import PathLike
from freetumor_cli.core.cases import DATALIST_SECTIONS, CasePair, collect_cases, match_cases, read_datalist
from freetumor_cli.core.config import to_dict
from freetumor_cli.core.errors import ConfigError, GeometryError, InputError, LabelError
from freetumor_cli.core.io import Volume, load_volume
from freetumor_cli.core.label_maps import (
    check_same_grid,
    integer_labels,
    integer_problem,
    label_values,
)
from freetumor_cli.core.metrics import EARLY_RADIUS_MM, SIZE_BINS, dice, match_lesions, surface_scores, union_box
from freetumor_cli.core.outputs import write_text_atomic
from freetumor_cli.core.parallel import process_pool
from freetumor_cli.core.registry import EVAL_SPACES, EvalSpaceName, check_choices


@dataclass(frozen=True)
class EvaluateConfig:
    """How predictions are scored.

    Attributes:
        label_space: the label space of both folders: a region's (``abdomen``, ``chest``) or a
            specialist task's (``task``: 0 background, 1 organ, 2 tumor).
        classes: class names or values to score; empty means the tumor classes of the scheme.
        tolerance_mm: normalized surface Dice tolerance.
        min_lesion_voxels: connected components smaller than this are ignored.
        lesion_iou: 0 counts any overlap as a detection; otherwise the IoU a match needs.
        skip_missing: skip cases without a prediction instead of scoring them as empty.
        resample_pred: resample predictions on another grid onto the ground truth's (nearest neighbour).
    """

    label_space: EvalSpaceName = "abdomen"
    classes: tuple[str, ...] = ()
    tolerance_mm: float = 2.0
    min_lesion_voxels: int = 1
    lesion_iou: float = 0.0
    skip_missing: bool = False
    resample_pred: bool = False

    def __post_init__(self) -> None:
        check_choices(self)
        if self.tolerance_mm < 0:
            raise ValueError("tolerance_mm must be >= 0")
        if self.min_lesion_voxels < 1:
            raise ValueError("min_lesion_voxels must be >= 1")
        if not 0 <= self.lesion_iou <= 1:
            raise ValueError("lesion_iou must lie in [0, 1]")


def resolve_classes(config: EvaluateConfig) -> dict[int, str]:
    """Class value -> name to score."""
    scheme = EVAL_SPACES[config.label_space]
    if not config.classes:
        return {v: n for v, n in scheme.items() if n.endswith(("tumor", "lesion"))}
    chosen: dict[int, str] = {}
    by_name = {n: v for v, n in scheme.items()}
    for item in config.classes:
        if item in by_name and by_name[item] != 0:
            chosen[by_name[item]] = item
        elif item.isdigit() and int(item) in scheme and int(item) != 0:
            chosen[int(item)] = scheme[int(item)]
        else:
            names = ", ".join(f"{v} {n}" for v, n in scheme.items() if v)
            raise ConfigError(
                f"unknown class {item!r} in the {config.label_space} label space", hint=f"choose among {names}"
            )
    return dict(sorted(chosen.items()))


@dataclass
class CaseScores:
    """Everything scored for one case."""

    case: str
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per class
    lesions: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _check_values(volume: Volume, scheme: dict[int, str], what: str, case: str) -> np.ndarray:
    problem = integer_problem(volume.array)
    if problem:
        raise LabelError(f"case {case}: {what} {volume.path} {problem}")
    array = integer_labels(volume.array)
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > max(scheme):
        values = sorted(set(label_values(array).tolist()) - set(scheme))
        raise LabelError(
            f"case {case}: {what} {volume.path} holds values {values[:8]} outside the scheme "
            f"({', '.join(f'{v} {n}' for v, n in scheme.items())})",
            hint="pass --label-space to match the files (abdomen, chest or task)",
        )
    return array


def _resample_nearest(pred: Volume, target: Volume) -> np.ndarray:
    from scipy import ndimage

    matrix = np.linalg.inv(pred.affine) @ target.affine  # target voxel -> pred voxel
    return ndimage.affine_transform(
        pred.array, matrix[:3, :3], offset=matrix[:3, 3], output_shape=target.shape, order=0, mode="constant", cval=0
    )


def evaluate_case(pair: CasePair, config: EvaluateConfig) -> CaseScores:
    """Score one case (every selected class, surface metrics and lesions)."""
    scheme = EVAL_SPACES[config.label_space]
    classes = resolve_classes(config)
    scores = CaseScores(pair.case)
    gt = load_volume(pair.gt, what="ground truth")
    gt_array = _check_values(gt, scheme, "ground truth", pair.case)
    if pair.pred is None:
        scores.notes.append(f"{pair.case}: no prediction, scored as empty")
        pred_array = np.zeros_like(gt_array)
    else:
        pred = load_volume(pair.pred, what="prediction")
        try:
            check_same_grid(gt, pred)
            pred_array = _check_values(pred, scheme, "prediction", pair.case)
        except GeometryError as exc:
            if not config.resample_pred:
                raise GeometryError(
                    f"case {pair.case}: {exc.message}",
                    hint="pass --resample-pred to resample predictions (nearest neighbour)",
                ) from None
            pred_array = _check_values(gt.like(_resample_nearest(pred, gt)), scheme, "prediction", pair.case)
            scores.notes.append(f"{pair.case}: prediction resampled onto the ground truth's grid")
    spacing = gt.spacing
    voxel_ml = gt.voxel_volume_ml
    for value, name in classes.items():
        p, g = pred_array == value, gt_array == value
        # Everything below works in the masks' union box: a small lesion in a large volume costs little.
        box = union_box(p, g)
        if box is not None:
            p, g = p[box], g[box]
        d_excl, d_empty = dice(p, g)
        surface = surface_scores(p, g, spacing, tolerance_mm=config.tolerance_mm)
        lesions = match_lesions(p, g, spacing, min_voxels=config.min_lesion_voxels, iou_threshold=config.lesion_iou)
        if box is not None:
            offset = np.array([s.start for s in box], dtype=np.float64)
            lesions = [
                replace(x, centroid_voxel=tuple(float(c) for c in np.asarray(x.centroid_voxel) + offset))
                for x in lesions
            ]
        gt_lesions = [x for x in lesions if x.source == "gt"]
        pred_lesions = [x for x in lesions if x.source == "pred"]
        pred_ml, gt_ml = float(p.sum()) * voxel_ml, float(g.sum()) * voxel_ml
        scores.rows.append(
            {
                "case": pair.case,
                "class": name,
                "value": value,
                "prediction_missing": pair.pred is None,
                "dice": d_excl,
                "dice_empty_as_one": d_empty,
                "nsd": surface.nsd,
                "hd95_mm": surface.hd95_mm,
                "msd_mm": surface.msd_mm,
                "gt_volume_ml": gt_ml,
                "pred_volume_ml": pred_ml,
                "volume_error_ml": pred_ml - gt_ml,
                "gt_lesions": len(gt_lesions),
                "pred_lesions": len(pred_lesions),
                "tp_lesions": sum(x.matched for x in gt_lesions),
                "fn_lesions": sum(not x.matched for x in gt_lesions),
                "fp_lesions": sum(not x.matched for x in pred_lesions),
            }
        )
        for lesion in lesions:
            row = {"case": pair.case, "class": name, **asdict(lesion)}
            row["centroid_voxel"] = " ".join(f"{c:.1f}" for c in lesion.centroid_voxel)
            scores.lesions.append(row)
    return scores


def _finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _stats(values: Sequence[float]) -> dict[str, float | int | None]:
    finite = _finite(values)
    if not finite:
        return {"n": 0, "mean": None, "std": None, "median": None}
    arr = np.asarray(finite, dtype=np.float64)
    return {"n": len(finite), "mean": float(arr.mean()), "std": float(arr.std()), "median": float(np.median(arr))}


def summarize(cases: Sequence[CaseScores], classes: dict[int, str], config: EvaluateConfig) -> dict[str, Any]:
    """Aggregate per-class and lesion-wise figures over cases."""
    summary: dict[str, Any] = {
        "tool": "freetumor",
        "version": __version__,
        "cases": len(cases),
        "config": to_dict(config),
        "conventions": {
            "dice": "empty ground truth excluded (NaN)",
            "dice_empty_as_one": "empty ground truth: 1 when the prediction is empty too, else 0",
            "surface": "HD95 and MSD are inf when exactly one mask is empty (not averaged) and NaN when both are; NSD is 0 and NaN",
            "lesion_match": "any-voxel overlap" if config.lesion_iou == 0 else f"IoU >= {config.lesion_iou}",
            "size_strata_mm": {name: [low, high] for name, low, high in SIZE_BINS},
            "early_lesion_radius_mm": EARLY_RADIUS_MM,
        },
        "classes": {},
    }
    for name in classes.values():
        rows = [r for c in cases for r in c.rows if r["class"] == name]
        lesions = [x for c in cases for x in c.lesions if x["class"] == name]
        gt_l = [x for x in lesions if x["source"] == "gt"]
        pred_l = [x for x in lesions if x["source"] == "pred"]
        tp, fn = sum(x["matched"] for x in gt_l), sum(not x["matched"] for x in gt_l)
        tp_pred, fp = sum(x["matched"] for x in pred_l), sum(not x["matched"] for x in pred_l)
        sens = tp / len(gt_l) if gt_l else None
        prec = tp_pred / len(pred_l) if pred_l else None
        f1 = 2 * sens * prec / (sens + prec) if sens is not None and prec is not None and sens + prec > 0 else None
        tumor_free = [r for r in rows if r["gt_lesions"] == 0]
        by_size = {}
        for bin_name, _low, _high in SIZE_BINS:
            in_bin = [x for x in gt_l if x["size_bin"] == bin_name]
            fp_bin = [x for x in pred_l if x["size_bin"] == bin_name and not x["matched"]]
            by_size[bin_name] = {
                "gt_lesions": len(in_bin),
                "detected": sum(x["matched"] for x in in_bin),
                "sensitivity": sum(x["matched"] for x in in_bin) / len(in_bin) if in_bin else None,
                "false_positives": len(fp_bin),
            }
        early = [x for x in gt_l if x["radius_mm"] <= EARLY_RADIUS_MM]
        summary["classes"][name] = {
            "dice": _stats([r["dice"] for r in rows]),
            "dice_empty_as_one": _stats([r["dice_empty_as_one"] for r in rows]),
            "nsd": _stats([r["nsd"] for r in rows]),
            "hd95_mm": {
                **_stats([r["hd95_mm"] for r in rows]),
                "infinite": sum(r["hd95_mm"] == float("inf") for r in rows),
            },
            "msd_mm": _stats([r["msd_mm"] for r in rows]),
            "volume_error_ml": _stats([r["volume_error_ml"] for r in rows]),
            "lesions": {
                "gt": len(gt_l),
                "predicted": len(pred_l),
                "tp": tp,
                "fn": fn,
                "fp": fp,
                "sensitivity": sens,
                "precision": prec,
                "f1": f1,
                "fp_per_case": fp / len(rows) if rows else None,
                "tumor_free_cases": len(tumor_free),
                "specificity": sum(r["pred_lesions"] == 0 for r in tumor_free) / len(tumor_free)
                if tumor_free
                else None,
                "early_sensitivity": sum(x["matched"] for x in early) / len(early) if early else None,
                "by_size": by_size,
            },
        }
    return summary


def evaluate(
    pred_dir: PathLike,
    gt: PathLike,
    config: EvaluateConfig,
    *,
    workers: int = 1,
    on_case_done: Callable[[str], None] | None = None,
) -> tuple[list[CaseScores], dict[str, Any], list[str]]:
    """Score every case; returns (per-case scores, summary, notes)."""
    classes = resolve_classes(config)
    pairs, unmatched = match_cases(pred_dir, gt)
    notes: list[str] = []
    if unmatched:
        notes.append(
            f"{len(unmatched)} prediction(s) match no ground-truth case and are ignored: {', '.join(unmatched[:10])}"
        )
    missing = [p.case for p in pairs if p.pred is None]
    if missing:
        what = "skipped (--skip-missing)" if config.skip_missing else "scored as empty"
        notes.append(
            f"{len(missing)} case(s) without a prediction, {what}: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"
        )
        if config.skip_missing:
            pairs = [p for p in pairs if p.pred is not None]
    results: list[CaseScores] = []
    if workers > 1 and len(pairs) > 1:
        with process_pool(workers) as pool:
            for scores in pool.map(evaluate_case, pairs, [config] * len(pairs)):
                results.append(scores)
                if on_case_done:
                    on_case_done(scores.case)
    else:
        for pair in pairs:
            scores = evaluate_case(pair, config)
            results.append(scores)
            if on_case_done:
                on_case_done(scores.case)
    for scores in results:
        notes.extend(n for n in scores.notes if "scored as empty" not in n)
    return results, summarize(results, classes, config), notes


def _csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


CASE_COLUMNS = (
    "case", "class", "value", "prediction_missing", "dice", "dice_empty_as_one", "nsd", "hd95_mm", "msd_mm",
    "gt_volume_ml", "pred_volume_ml", "volume_error_ml", "gt_lesions", "pred_lesions", "tp_lesions", "fn_lesions", "fp_lesions",
)  # fmt: skip
LESION_COLUMNS = (
    "case", "class", "source", "index", "voxels", "volume_ml", "radius_mm", "size_bin", "matched", "best_iou", "centroid_voxel",
)  # fmt: skip


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as Markdown tables."""
    lines = [f"# freetumor evaluation ({summary['cases']} cases)", ""]
    lines += [
        "| class | Dice (excl. empty GT) | Dice (empty=1) | NSD | HD95 mm | MSD mm | lesion sens. | early sens. (<=10 mm) | precision | F1 | FP/case | specificity |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in summary["classes"].items():
        les = c["lesions"]
        lines.append(
            f"| {name} | {_fmt(c['dice']['mean'])} | {_fmt(c['dice_empty_as_one']['mean'])} | {_fmt(c['nsd']['mean'])} | "
            f"{_fmt(c['hd95_mm']['mean'], 1)} | {_fmt(c['msd_mm']['mean'], 2)} | {_fmt(les['sensitivity'])} | "
            f"{_fmt(les['early_sensitivity'])} | {_fmt(les['precision'])} | {_fmt(les['f1'])} | {_fmt(les['fp_per_case'], 2)} | "
            f"{_fmt(les['specificity'])} |"
        )
    lines += [
        "",
        "Lesion sensitivity by equivalent-sphere radius:",
        "",
        "| class | " + " | ".join(n for n, _, _ in SIZE_BINS) + " |",
        "|---|" + "---|" * len(SIZE_BINS),
    ]
    for name, c in summary["classes"].items():
        cells = []
        for bin_name, _, _ in SIZE_BINS:
            b = c["lesions"]["by_size"][bin_name]
            cells.append(f"{_fmt(b['sensitivity'])} ({b['detected']}/{b['gt_lesions']})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    conv = summary["conventions"]
    lines += [
        "",
        f"Dice: {conv['dice']}; 'empty=1': {conv['dice_empty_as_one']}. Surface metrics: {conv['surface']}. Lesions: 26-connected components, matched by {conv['lesion_match']}.",
        "",
    ]
    return "\n".join(lines)


def write_plots(cases: Sequence[CaseScores], summary: dict[str, Any], out: Path) -> list[Path]:
    """Dice distribution per class, sensitivity by lesion size, false positives per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from freetumor_cli.core.outputs import atomic_path

    written = []
    names = list(summary["classes"])
    fig, ax = plt.subplots(figsize=(1.8 * max(len(names), 2) + 2, 4))
    data = [_finite(r["dice"] for c in cases for r in c.rows if r["class"] == n) or [float("nan")] for n in names]
    ax.boxplot(data, tick_labels=names, showmeans=True)
    ax.set_ylabel("Dice (empty ground truth excluded)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Dice per class")
    written.append(_save(fig, out / "dice_per_class.png", atomic_path, plt))
    written.append(_save(sensitivity_figure(summary), out / "sensitivity_by_size.png", atomic_path, plt))
    fig = false_positives_figure(
        {n: [r["fp_lesions"] for c in cases for r in c.rows if r["class"] == n] for n in names}
    )
    written.append(_save(fig, out / "false_positives_per_case.png", atomic_path, plt))
    return written


def sensitivity_figure(summary: dict[str, Any]) -> Any:
    """Lesion sensitivity per size bin and class, as ``detected/lesions`` over each bar; a bin without
    ground-truth lesions has no bar (its sensitivity is undefined, not 0) and says so."""
    import matplotlib.pyplot as plt

    names = list(summary["classes"])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(names), 1)
    for k, n in enumerate(names):
        by = summary["classes"][n]["lesions"]["by_size"]
        x = np.arange(len(SIZE_BINS)) + k * width
        values = [np.nan if by[b]["sensitivity"] is None else by[b]["sensitivity"] for b, _, _ in SIZE_BINS]
        ax.bar(x, values, width, label=n)
        for xi, (b, _, _) in zip(x, SIZE_BINS, strict=True):
            found, total = by[b]["detected"], by[b]["gt_lesions"]
            text, y = (f"{found}/{total}", by[b]["sensitivity"] + 0.01) if total else ("no lesions", 0.01)
            upright = not total and len(names) > 2  # narrow bars
            ax.text(xi, y, text, ha="center", va="bottom", fontsize=7, rotation=90 if upright else 0)
    ax.set_xticks(np.arange(len(SIZE_BINS)) + width * (len(names) - 1) / 2, [b for b, _, _ in SIZE_BINS])
    ax.set_ylim(0, 1.3)  # room above the bars for their counts and the legend
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("lesion sensitivity (detected/lesions)")
    ax.set_xlabel("equivalent-sphere radius")
    ax.legend(loc="upper right", ncol=min(len(names), 3), fontsize=8)
    ax.set_title("Sensitivity by lesion size")
    return fig


FP_PLOT_BINS = 30  # at most: one bin per count up to 30, wider integer bins beyond


def false_positives_figure(per_class: dict[str, list[int]]) -> Any:
    """A histogram of false-positive lesions per case per class, in at most :data:`FP_PLOT_BINS` bins of
    whole counts (one per count when the largest is small), so every bar is wide enough to see."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    largest = max([1, *(v for values in per_class.values() for v in values)])
    edges = np.unique(np.round(np.linspace(0, largest + 1, min(largest + 1, FP_PLOT_BINS) + 1))) - 0.5
    for n, values in per_class.items():
        ax.hist(values, bins=edges.tolist(), alpha=0.6, label=n)
    wide = edges[1] - edges[0] > 1.5
    ax.set_xlabel("false-positive lesions per case" + (f" (bins of about {edges[1] - edges[0]:.0f})" if wide else ""))
    ax.set_ylabel("cases")
    ax.legend()
    ax.set_title("False positives per case")
    return fig


def _save(fig: Any, path: Path, atomic_path: Any, plt: Any) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


def write_reports(cases: Sequence[CaseScores], summary: dict[str, Any], out: PathLike) -> list[Path]:
    """Write the CSVs, the JSON and Markdown summaries and the plots to ``out``."""
    folder = Path(out)
    rows = [r for c in cases for r in c.rows]
    lesions = [x for c in cases for x in c.lesions]
    written = [
        write_text_atomic(folder / "metrics_per_case.csv", _csv(rows, CASE_COLUMNS)),
        write_text_atomic(folder / "metrics_per_lesion.csv", _csv(lesions, LESION_COLUMNS)),
        write_text_atomic(folder / "summary.json", json.dumps(_json_safe(summary), indent=2) + "\n"),
        write_text_atomic(folder / "summary.md", summary_markdown(summary)),
    ]
    written += write_plots(cases, summary, folder)
    return written


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _has_folds(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "training" in data and "validation" in data


def predict_for_scoring(
    checkpoint: PathLike,
    data: PathLike,
    out_dir: PathLike,
    config: EvaluateConfig,
    *,
    overlap: float = 0.75,
    tta: bool = False,
    split: str = "validation",
    device: str = "auto",
    on_case_done: Callable[[Path], None] | None = None,
) -> tuple[Path, Path | None, EvaluateConfig, str]:
    """Predict ``data`` (a data list, a folder of CTs or one CT) with a checkpoint into ``<out>/predictions``.

    A data list of a prepared folder (``<prepared>/datalists/*.json``) is read from that folder's case
    store where it holds the cases at the network's preprocessing. Of a data list with ``training`` and
    ``validation`` sections (a fold's), ``split`` picks which are predicted: ``validation`` (default),
    ``training`` or ``all``. Cases with labels are listed in
    ``<out>/ground_truth.json``, and the configuration is set to score the network's classes in its
    region's label space (unless ``config.classes`` names some).

    Returns:
        (the predictions folder, the ground-truth list or None when no label is known, the scoring
        configuration, which path the images came by).
    """
    from freetumor_cli.core.predict import predict_cases

    data_path = Path(data)
    prepared = None
    if data_path.suffix == ".json" and data_path.is_file():
        sections = {"validation": ("validation",), "training": ("training",)}.get(split, DATALIST_SECTIONS)
        entries = read_datalist(data_path, sections) if _has_folds(data_path) else read_datalist(data_path)
        candidate = data_path.parent.parent
        prepared = candidate if (candidate / "manifest.jsonl").is_file() else None
    else:
        entries = [{"image": c.image, "label": c.labels} for c in collect_cases(data_path)]
    if not entries:
        raise InputError(f"no images in {data_path}")
    predictions = Path(out_dir) / "predictions"
    _, model_config, source = predict_cases(
        checkpoint, entries, predictions, overlap=overlap, tta=tta, prepared=prepared, on_case_done=on_case_done,
        device=device,
    )  # fmt: skip
    # Absolute: the list is read from --out, and these may be relative to the working folder.
    labelled = [
        {"image": str(Path(e["image"]).absolute()), "label": str(Path(e["label"]).absolute())}
        for e in entries
        if e.get("label")
    ]
    if not labelled:
        return predictions, None, config, source
    ground_truth = write_text_atomic(
        Path(out_dir) / "ground_truth.json", json.dumps({"testing": labelled}, indent=1) + "\n"
    )
    classes = config.classes or model_config.region_class_names
    return predictions, ground_truth, replace(config, label_space=model_config.region, classes=tuple(classes)), source
