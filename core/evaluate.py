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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

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
from freetumor_cli.core.metrics import (
    EARLY_RADIUS_MM,
    SIZE_BINS,
    Lesion,
    dice,
    match_lesions,
    surface_scores,
    union_box,
)
from freetumor_cli.core.outputs import write_text_atomic
from freetumor_cli.core.parallel import process_pool
from freetumor_cli.core.registry import EVAL_SPACES
from freetumor_cli.core.stage_configs import EvaluateConfig


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


@dataclass(frozen=True)
class ClassPool:
    """One class's per-case rows and lesions over every case: what its summary is computed from."""

    rows: list[dict[str, Any]]
    gt: list[dict[str, Any]]  # ground-truth lesions
    pred: list[dict[str, Any]]  # predicted lesions

    @classmethod
    def of(cls, cases: Sequence[CaseScores], name: str) -> ClassPool:
        lesions = [x for c in cases for x in c.lesions if x["class"] == name]
        return cls(
            rows=[r for c in cases for r in c.rows if r["class"] == name],
            gt=[x for x in lesions if x["source"] == "gt"],
            pred=[x for x in lesions if x["source"] == "pred"],
        )


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _detected(lesions: Sequence[dict[str, Any]]) -> int:
    return sum(x["matched"] for x in lesions)


def _sensitivity(pool: ClassPool) -> float | None:
    return _share(_detected(pool.gt), len(pool.gt))


def _precision(pool: ClassPool) -> float | None:
    return _share(_detected(pool.pred), len(pool.pred))


def _f1(pool: ClassPool) -> float | None:
    sens, prec = _sensitivity(pool), _precision(pool)
    return 2 * sens * prec / (sens + prec) if sens is not None and prec is not None and sens + prec > 0 else None


def _false_positives(pool: ClassPool) -> int:
    return sum(not x["matched"] for x in pool.pred)


def _tumor_free(pool: ClassPool) -> list[dict[str, Any]]:
    return [r for r in pool.rows if r["gt_lesions"] == 0]


def _specificity(pool: ClassPool) -> float | None:
    free = _tumor_free(pool)
    return _share(sum(r["pred_lesions"] == 0 for r in free), len(free))


def _early_sensitivity(pool: ClassPool) -> float | None:
    early = [x for x in pool.gt if x["radius_mm"] <= EARLY_RADIUS_MM]
    return _share(_detected(early), len(early))


def _by_size(pool: ClassPool) -> dict[str, dict[str, Any]]:
    by_size = {}
    for bin_name, _low, _high in SIZE_BINS:
        in_bin = [x for x in pool.gt if x["size_bin"] == bin_name]
        fp_bin = [x for x in pool.pred if x["size_bin"] == bin_name and not x["matched"]]
        by_size[bin_name] = {
            "gt_lesions": len(in_bin),
            "detected": _detected(in_bin),
            "sensitivity": _share(_detected(in_bin), len(in_bin)),
            "false_positives": len(fp_bin),
        }
    return by_size


def _stats_of(key: str) -> Callable[[ClassPool], Any]:
    return lambda pool: _stats([r[key] for r in pool.rows])


def _stats_and_infinite_of(key: str) -> Callable[[ClassPool], Any]:
    return lambda pool: {
        **_stats([r[key] for r in pool.rows]),
        "infinite": sum(r[key] == float("inf") for r in pool.rows),
    }


@dataclass(frozen=True)
class Metric:
    """One metric, from which the CSV columns, ``summary.json``, ``summary.md`` and the CLI's table come.

    Attributes:
        key: a ``case`` metric's key in a per-case row, which is its ``metrics_per_case.csv`` column and
            its entry in a class's summary; a ``lesions`` figure's entry in a class's ``lesions`` summary
            (it has no CSV column).
        scope: ``case`` (one value per case and class) or ``lesions`` (one figure per class, from the
            lesion matching of every case).
        summarize: the class's summary entry from its rows and lesions; None: the CSV only.
        heading: its column heading in ``summary.md`` (a case metric shows its mean); empty: not tabled.
        cli: its column heading in the table ``freetumor evaluate`` prints; empty: not shown.
        digits: decimals in both tables.
    """

    key: str
    scope: Literal["case", "lesions"] = "case"
    summarize: Callable[[ClassPool], Any] | None = None
    heading: str = ""
    cli: str = ""
    digits: int = 3

    def shown(self, class_summary: dict[str, Any]) -> Any:
        """The value the summary tables show for one class."""
        if self.scope == "case":
            return class_summary[self.key]["mean"]
        return class_summary["lesions"][self.key]


def _case(key: str, aggregate: Callable[[str], Callable[[ClassPool], Any]] | None = _stats_of, **shown: Any) -> Metric:
    return Metric(key, "case", aggregate(key) if aggregate else None, **shown)


def _lesions(key: str, summarize: Callable[[ClassPool], Any], **shown: Any) -> Metric:
    return Metric(key, "lesions", summarize, **shown)


# In CSV order (case metrics) and table order; the summary's entries follow it too.
METRICS: tuple[Metric, ...] = (
    _case("dice", heading="Dice (excl. empty GT)", cli="Dice"),
    _case("dice_empty_as_one", heading="Dice (empty=1)", cli="Dice (empty=1)"),
    _case("nsd", heading="NSD", cli="NSD"),
    _case("hd95_mm", _stats_and_infinite_of, heading="HD95 mm", cli="HD95 mm", digits=1),
    _case("msd_mm", heading="MSD mm", digits=2),
    _case("gt_volume_ml", None),
    _case("pred_volume_ml", None),
    _case("volume_error_ml"),
    _case("gt_lesions", None),
    _case("pred_lesions", None),
    _case("tp_lesions", None),
    _case("fn_lesions", None),
    _case("fp_lesions", None),
    _lesions("gt", lambda pool: len(pool.gt)),
    _lesions("predicted", lambda pool: len(pool.pred)),
    _lesions("tp", lambda pool: _detected(pool.gt)),
    _lesions("fn", lambda pool: sum(not x["matched"] for x in pool.gt)),
    _lesions("fp", _false_positives),
    _lesions("sensitivity", _sensitivity, heading="lesion sens.", cli="lesion sens."),
    _lesions(
        "early_sensitivity", _early_sensitivity, heading=f"early sens. (<={EARLY_RADIUS_MM:g} mm)", cli="early sens."
    ),
    _lesions("precision", _precision, heading="precision", cli="precision"),
    _lesions("f1", _f1, heading="F1"),
    _lesions(
        "fp_per_case",
        lambda pool: _share(_false_positives(pool), len(pool.rows)),
        heading="FP/case",
        cli="FP/case",
        digits=2,
    ),
    _lesions("tumor_free_cases", lambda pool: len(_tumor_free(pool))),
    _lesions("specificity", _specificity, heading="specificity"),
    _lesions("by_size", _by_size),
)
CASE_METRICS = tuple(m for m in METRICS if m.scope == "case")
CASE_COLUMNS = ("case", "class", "value", "prediction_missing", *(m.key for m in CASE_METRICS))
LESION_COLUMNS = ("case", "class", *(f.name for f in fields(Lesion)))


def summarize(cases: Sequence[CaseScores], classes: dict[int, str], config: EvaluateConfig) -> dict[str, Any]:
    """Aggregate per-class and lesion-wise figures over cases (every :data:`METRICS` entry that summarizes)."""
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
        pool = ClassPool.of(cases, name)
        entry = {m.key: m.summarize(pool) for m in METRICS if m.scope == "case" and m.summarize}
        entry["lesions"] = {m.key: m.summarize(pool) for m in METRICS if m.scope == "lesions" and m.summarize}
        summary["classes"][name] = entry
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


def csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as CSV with the given columns (floats to 6 significant digits; a missing key is left empty).

    Raises:
        ValueError: a row holds a key without a column (it would be dropped silently).
    """
    known = set(columns)
    for row in rows:
        unknown = [k for k in row if k not in known]
        if unknown:
            raise ValueError(f"row key {unknown[0]!r} has no CSV column; columns: {', '.join(columns)}")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_table(summary: dict[str, Any], *, where: Literal["markdown", "cli"]) -> tuple[list[str], list[list[str]]]:
    """The per-class summary table of ``summary.md`` or of the CLI, from :data:`METRICS`.

    Returns:
        (column headings, one row of cells per class).
    """
    shown = [(m, m.heading if where == "markdown" else m.cli) for m in METRICS]
    shown = [(m, heading) for m, heading in shown if heading]
    headings = ["class", *(heading for _, heading in shown)]
    rows = [[name, *(_fmt(m.shown(c), m.digits) for m, _ in shown)] for name, c in summary["classes"].items()]
    return headings, rows


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as Markdown tables."""
    lines = [f"# freetumor evaluation ({summary['cases']} cases)", ""]
    headings, rows = summary_table(summary, where="markdown")
    lines += ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
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
        write_text_atomic(folder / "metrics_per_case.csv", csv_text(rows, CASE_COLUMNS)),
        write_text_atomic(folder / "metrics_per_lesion.csv", csv_text(lesions, LESION_COLUMNS)),
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
