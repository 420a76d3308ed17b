"""Per-volume segmentation metrics, their summary over cases, and the files that report them.

Every metric compares one binary prediction with one binary truth on the same voxel grid:

- Dice = 2 TP / (2 TP + FP + FN) and IoU = TP / (TP + FP + FN), from voxel counts.
- HD95: the 95th percentile of the symmetric surface distances, in mm.
- ASSD: the mean of the symmetric surface distances, in mm.

The surface of a mask is its foreground voxels with at least one face-connected background
neighbour (the mask minus its binary erosion by the 6-neighbourhood). Voxels on the array
border count as surface. The symmetric surface distances are the distances from each
prediction surface voxel to the nearest truth surface voxel, pooled with those from each
truth surface voxel to the nearest prediction surface voxel. Distances are Euclidean
between voxel centres, scaled by the voxel spacing, so anisotropic voxels are measured
correctly. These definitions match `medpy.metric.binary.hd95` and `assd` of MedPy 0.5.2
with its default connectivity 1.

Conventions for empty masks:

- Both empty: Dice, IoU, HD95 and ASSD are all NaN. Each is a ratio or a distance with
  nothing to measure, and nnU-Net reports the same case as NaN. Such a case is left out of
  the means rather than counted as a perfect score.
- Only one empty: Dice = IoU = 0, and HD95 = ASSD = NaN, because there is no surface to
  measure a distance to.

Overlap metrics are therefore always in [0, 1] or NaN.

Summaries skip NaN: the mean, standard deviation and median of a metric are taken over the
cases where it is defined, and `num_nan` counts the cases left out.
"""

import csv
import json
import logging
import math
from pathlib import Path

import matplotlib
import numpy as np
from scipy import ndimage

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OVERLAP_METRICS = ("dice", "iou")
DISTANCE_METRICS = ("hd95", "assd")
METRICS = OVERLAP_METRICS + DISTANCE_METRICS
CSV_FIELDS = ("case", *METRICS, "tp", "fp", "fn")
METRIC_LABELS = {"dice": "Dice", "iou": "IoU", "hd95": "HD95", "assd": "ASSD"}
HD_PERCENTILE = 95.0


def overlap_metrics(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Return Dice, IoU and the TP/FP/FN voxel counts of two binary arrays.

    Both empty gives Dice = IoU = NaN; only one empty gives 0 (see the module docstring).
    """
    prediction = np.asarray(prediction).astype(bool)
    truth = np.asarray(truth).astype(bool)
    _check_same_shape(prediction, truth)
    tp = int(np.count_nonzero(prediction & truth))
    fp = int(np.count_nonzero(prediction & ~truth))
    fn = int(np.count_nonzero(~prediction & truth))
    if tp + fp + fn == 0:
        return {"dice": math.nan, "iou": math.nan, "tp": 0, "fp": 0, "fn": 0}
    return {
        "dice": 2 * tp / (2 * tp + fp + fn),
        "iou": tp / (tp + fp + fn),
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def surface(mask: np.ndarray) -> np.ndarray:
    """Return the boolean surface of a binary mask: foreground minus its 6-connected erosion."""
    mask = np.asarray(mask).astype(bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    # border_value=0 erodes voxels on the array border, so they count as surface.
    return mask & ~ndimage.binary_erosion(mask, structure=structure, iterations=1)


def surface_distances(
    prediction: np.ndarray, truth: np.ndarray, spacing
) -> tuple[np.ndarray, np.ndarray]:
    """Return the directed surface distances in mm (prediction to truth, truth to prediction).

    Both masks must be non-empty. `spacing` is the voxel size along each array axis in mm.
    """
    prediction = np.asarray(prediction).astype(bool)
    truth = np.asarray(truth).astype(bool)
    _check_same_shape(prediction, truth)
    spacing = _check_spacing(spacing, prediction.ndim)
    if not prediction.any() or not truth.any():
        raise ValueError("surface distances need a non-empty prediction and truth")

    # Crop to the bounding box of both masks plus a one-voxel margin, which makes the
    # distance transforms much cheaper. Every surface voxel lies inside the crop, so the
    # nearest-surface distances do not change. The margin keeps the erosion the same too,
    # because a mask can touch the crop edge only where it touches the array border.
    box = _bounding_box(prediction | truth, margin=1)
    prediction, truth = prediction[box], truth[box]

    prediction_surface = surface(prediction)
    truth_surface = surface(truth)
    # distance_transform_edt measures each nonzero voxel's distance to the nearest zero, so
    # the surface to measure to is passed as the zeros.
    to_truth = ndimage.distance_transform_edt(~truth_surface, sampling=spacing)
    to_prediction = ndimage.distance_transform_edt(~prediction_surface, sampling=spacing)
    return to_truth[prediction_surface], to_prediction[truth_surface]


def distance_metrics(prediction: np.ndarray, truth: np.ndarray, spacing) -> dict[str, float]:
    """Return HD95 and ASSD in mm, with the empty-mask conventions of the module docstring."""
    prediction_empty = not np.any(prediction)
    truth_empty = not np.any(truth)
    if prediction_empty or truth_empty:
        return {"hd95": math.nan, "assd": math.nan}
    forward, backward = surface_distances(prediction, truth, spacing)
    pooled = np.concatenate([forward, backward])
    return {
        "hd95": float(np.percentile(pooled, HD_PERCENTILE)),
        "assd": float(pooled.mean()),
    }


def segmentation_metrics(prediction: np.ndarray, truth: np.ndarray, spacing) -> dict[str, float]:
    """Return Dice, IoU, HD95 (mm), ASSD (mm) and the TP/FP/FN counts of one volume."""
    metrics = overlap_metrics(prediction, truth)
    metrics.update(distance_metrics(prediction, truth, spacing))
    return metrics


def summarize(rows: list[dict]) -> dict:
    """Return the number of cases and, per metric, mean, SD, median and counts over the rows.

    NaN values are skipped and counted in `num_nan`. The SD is the sample standard deviation
    (ddof=1). A statistic without enough values (none; fewer than two for the SD) is None.
    """
    summary = {"num_cases": len(rows), "metrics": {}}
    for name in METRICS:
        values = np.asarray([row[name] for row in rows if name in row], dtype=np.float64)
        defined = values[~np.isnan(values)]
        summary["metrics"][name] = {
            "mean": float(defined.mean()) if defined.size else None,
            "std": float(defined.std(ddof=1)) if defined.size > 1 else None,
            "median": float(np.median(defined)) if defined.size else None,
            "num_values": int(defined.size),
            "num_nan": int(values.size - defined.size),
        }
    return summary


def mean_metrics(summary: dict) -> dict[str, float]:
    """Return {metric: mean} from a `summarize` result, with NaN where no value was defined."""
    return {
        name: math.nan if stats["mean"] is None else stats["mean"]
        for name, stats in summary["metrics"].items()
    }


def write_metrics_csv(rows: list[dict], path: Path) -> None:
    """Write one line per volume: case, Dice, IoU, HD95 and ASSD in mm, and TP/FP/FN counts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    logging.info("Wrote per-volume metrics to %s.", path)


def write_summary_json(summary: dict, path: Path) -> None:
    """Write a `summarize` result as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    logging.info("Wrote the metric summary to %s.", path)


def save_boxplot(rows: list[dict], path: Path, title: str = "") -> None:
    """Save a PNG with one box per metric: Dice and IoU on the left, HD95 and ASSD (mm) right.

    NaN values are left out of the boxes.
    """
    fig, (overlap_ax, distance_ax) = plt.subplots(1, 2, figsize=(8, 4))
    for ax, names, label in (
        (overlap_ax, OVERLAP_METRICS, "score"),
        (distance_ax, DISTANCE_METRICS, "distance (mm)"),
    ):
        data = []
        for name in names:
            values = np.asarray([row[name] for row in rows if name in row], dtype=np.float64)
            data.append(values[~np.isnan(values)])
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), [METRIC_LABELS[name] for name in names])
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    overlap_ax.set_ylim(-0.02, 1.02)
    distance_ax.set_ylim(bottom=0)
    fig.suptitle(title or _count_text(len(rows)))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    logging.info("Wrote the metric box plot to %s.", path)


def write_reports(rows: list[dict], output_dir: Path, title: str = "") -> dict:
    """Write `metrics.csv`, `summary.json` and `boxplot.png` into `output_dir`; return the summary."""
    output_dir = Path(output_dir)
    summary = summarize(rows)
    write_metrics_csv(rows, output_dir / "metrics.csv")
    write_summary_json(summary, output_dir / "summary.json")
    save_boxplot(rows, output_dir / "boxplot.png", title)
    return summary


def _check_same_shape(prediction: np.ndarray, truth: np.ndarray) -> None:
    if prediction.shape != truth.shape:
        raise ValueError(
            f"prediction shape {prediction.shape} differs from truth shape {truth.shape}"
        )


def _check_spacing(spacing, ndim: int) -> np.ndarray:
    spacing = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if spacing.size != ndim or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(
            f"voxel spacing {spacing.tolist()} is invalid: expected {ndim} positive sizes in mm"
        )
    return spacing


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=others))
        box.append(slice(max(present[0] - margin, 0), present[-1] + margin + 1))
    return tuple(box)


def _count_text(count: int) -> str:
    return f"{count} case" if count == 1 else f"{count} cases"
