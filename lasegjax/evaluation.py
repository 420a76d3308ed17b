"""Per-volume evaluation: slice-wise prediction, 3D Dice and IoU, and the files it writes.

Metrics are computed per volume on the original voxel grid, from true positives, false
positives and false negatives. When both prediction and truth are empty, Dice and IoU
are undefined and reported as NaN; means over cases skip NaN (`np.nanmean`).
"""

import csv
import logging
from pathlib import Path

import jax
import matplotlib
import nibabel as nib
import numpy as np
from scipy import ndimage

from lasegjax import sharding
from lasegjax.data.pipeline import PreparedVolume, restore_volume, slice_windows

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def overlap_metrics(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Return Dice and IoU of two binary arrays (NaN for both when both are empty)."""
    prediction = prediction.astype(bool)
    truth = truth.astype(bool)
    tp = int(np.count_nonzero(prediction & truth))
    fp = int(np.count_nonzero(prediction & ~truth))
    fn = int(np.count_nonzero(~prediction & truth))
    if tp + fp + fn == 0:
        return {"dice": float("nan"), "iou": float("nan"), "tp": 0, "fp": 0, "fn": 0}
    return {
        "dice": 2 * tp / (2 * tp + fp + fn),
        "iou": tp / (tp + fp + fn),
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep only the largest 26-connected foreground component of a 3D mask.

    The left atrium with its vein ostia is one connected structure, so smaller islands
    are false positives.
    """
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return (labels == sizes.argmax()).astype(mask.dtype)


def make_predict_fn(model, mesh=None):
    """Return a jitted (params, images) -> sigmoid probabilities function; it donates nothing.

    With a mesh, the images are split over its data axis and the parameters replicated.
    """

    def predict(params, images):
        logits = model.apply({"params": params}, images)
        return jax.nn.sigmoid(logits[..., 0])

    if mesh is None:
        return jax.jit(predict)
    return jax.jit(
        predict,
        in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
        out_shardings=sharding.batch_sharding(mesh),
    )


def predict_slices(
    predict_fn, params, images: np.ndarray, batch_size: int, context: int = 0
) -> np.ndarray:
    """Return (Z, H, W) probabilities for a volume's (Z, H, W) slices, in fixed-size batches.

    Each slice is fed with `context` neighbours on each side as extra channels.

    The last batch is padded to `batch_size` so that one compiled program serves every
    volume.
    """
    outputs = []
    for start in range(0, len(images), batch_size):
        indices = np.arange(start, min(start + batch_size, len(images)))
        chunk = slice_windows(images, indices, context)
        count = len(chunk)
        if count < batch_size:
            pad = np.zeros((batch_size - count, *chunk.shape[1:]), chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        probs = predict_fn(params, chunk)
        outputs.append(np.asarray(probs)[:count])
    return np.concatenate(outputs)


def save_mask_nifti(mask: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a uint8 mask with `affine` as both qform and sform, as viewers expect."""
    image = nib.Nifti1Image(mask.astype(np.uint8), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.nii.gz")
    nib.save(image, tmp)
    tmp.replace(path)


def save_panel(rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: Path, title: str):
    """Save a PNG grid with one row per slice: image, truth and prediction overlays."""
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for row, (label, image, truth, prediction) in zip(axes, rows, strict=True):
        for ax, name, overlay in zip(
            row, ("image", "truth", "prediction"), (None, truth, prediction), strict=True
        ):
            ax.imshow(image.T, cmap="gray", origin="lower")
            if overlay is not None:
                ax.contour(
                    overlay.T.astype(float),
                    levels=[0.5],
                    colors="lime" if name == "truth" else "red",
                    linewidths=1.0,
                )
            ax.set_title(f"{label} {name}", fontsize=8)
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _panel_rows(prepared: PreparedVolume, probabilities: np.ndarray, threshold: float, count: int):
    """Pick up to `count` slices spread over the extent of the atrium."""
    if prepared.masks is None:
        return []
    with_atrium = np.flatnonzero(prepared.masks.reshape(len(prepared.masks), -1).any(axis=1))
    if not len(with_atrium):
        return []
    # Spread over the middle of the atrium; its first and last slices hold only slivers.
    positions = np.linspace(0.3, 0.7, count) if count > 1 else np.array([0.5])
    picks = with_atrium[(positions * (len(with_atrium) - 1)).round().astype(int)]
    return [
        (
            f"{prepared.case_id} z={z}",
            prepared.images[z],
            prepared.masks[z],
            probabilities[z] > threshold,
        )
        for z in np.unique(picks)
    ]


def evaluate_volumes(
    predict_fn,
    params,
    volumes: list[PreparedVolume],
    config,
    output_dir: Path | None = None,
    step: int | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Predict every volume, compute per-volume Dice and IoU, and write the outputs.

    With `output_dir`, writes `metrics.csv`, one `<case>.nii.gz` mask per volume (with the
    input's affine) under `predictions/`, and `panel.png`.

    Returns:
      (summary, rows): mean Dice and IoU over volumes, and one dict per volume.
    """
    rows, panel = [], []
    threshold = config.eval.threshold
    for prepared in volumes:
        probabilities = predict_slices(
            predict_fn, params, prepared.images, config.eval.batch_size, config.data.context_slices
        )
        restored = restore_volume(probabilities, prepared, config.data.fit)
        prediction = (restored > threshold).astype(np.uint8)
        if config.eval.largest_component:
            prediction = largest_component(prediction)
        row = {"case": prepared.case_id}
        if prepared.label is not None:
            row.update(overlap_metrics(prediction, prepared.label))
        rows.append(row)
        if output_dir is not None and config.eval.save_predictions:
            save_mask_nifti(
                prediction,
                prepared.affine,
                output_dir / "predictions" / f"{prepared.case_id}.nii.gz",
            )
        if len(panel) < config.eval.num_panel_slices:
            per_volume = max(1, config.eval.num_panel_slices // max(len(volumes), 1))
            panel.extend(_panel_rows(prepared, probabilities, threshold, per_volume))
    dice = [r["dice"] for r in rows if "dice" in r]
    iou = [r["iou"] for r in rows if "iou" in r]
    summary = {
        "dice": float(np.nanmean(dice)) if dice else float("nan"),
        "iou": float(np.nanmean(iou)) if iou else float("nan"),
    }
    if output_dir is not None:
        write_metrics_csv(rows, output_dir / "metrics.csv")
        if panel:
            label = f"step {step}" if step is not None else "evaluation"
            save_panel(
                panel[: config.eval.num_panel_slices],
                output_dir / "panel.png",
                f"{label}: mean Dice {summary['dice']:.3f}",
            )
    return summary, rows


def write_metrics_csv(rows: list[dict], path: Path) -> None:
    """Write one line per volume with its Dice, IoU and voxel counts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["case", "dice", "iou", "tp", "fp", "fn"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    logging.info("Wrote per-volume metrics to %s.", path)
