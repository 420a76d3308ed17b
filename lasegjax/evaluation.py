"""Per-volume evaluation: slice-wise prediction, 3D metrics, and the files it writes.

Dice, IoU, HD95 and ASSD are computed per volume on the original voxel grid by
`lasegjax.metrics`, which also defines the conventions for empty masks. Means over cases
skip NaN.
"""

import os
import tempfile
from pathlib import Path

import jax
import matplotlib
import nibabel as nib
import numpy as np
from scipy import ndimage

from lasegjax import sharding
from lasegjax.data.pipeline import PreparedVolume, restore_volume, slice_windows
from lasegjax.metrics import mean_metrics, segmentation_metrics, summarize, write_reports

# Moved to lasegjax.metrics; re-exported for callers that import them from here.
from lasegjax.metrics import overlap_metrics as overlap_metrics
from lasegjax.metrics import write_metrics_csv as write_metrics_csv

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
    """Return a (params, images) -> sigmoid probabilities function; it donates nothing.

    `images` is a NumPy batch that every process has in full. With a mesh, the batch is
    split over its data and fsdp axes, each process feeding only its own devices, the
    parameters keep their shardings, and every process gets all probabilities back as a
    NumPy array. Each slice is thus predicted exactly once.
    """

    def predict(params, images):
        logits = model.apply({"params": params}, images)
        return jax.nn.sigmoid(logits[..., 0])

    if mesh is None:
        jitted = jax.jit(predict)
        return lambda params, images: np.asarray(jitted(params, images))

    batch_sharding = sharding.batch_sharding(mesh)
    # Input shardings come from the arguments: the parameters' own and the batch's.
    jitted = jax.jit(predict, out_shardings=batch_sharding)

    def predict_on_mesh(params, images):
        params = sharding.on_mesh(params, mesh)
        images = sharding.global_array_from_host(images, batch_sharding)
        return sharding.host_local_array(jitted(params, images))

    return predict_on_mesh


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


def save_mask_nifti(
    mask: np.ndarray, affine: np.ndarray, path: Path, reference_header=None
) -> None:
    """Write a uint8 mask to a NIfTI file, atomically (a temporary file, then a rename).

    Without `reference_header`, `affine` is stored as both qform and sform with code 1
    (scanner). With the header of the source image, its qform, sform, their codes, voxel
    size and units are copied, so viewers place the mask exactly over that image.
    """
    image = nib.Nifti1Image(mask.astype(np.uint8), affine)
    if reference_header is None:
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
    else:
        header = image.header
        header.set_xyzt_units(*reference_header.get_xyzt_units())
        image.set_qform(reference_header.get_qform(), code=int(reference_header["qform_code"]))
        image.set_sform(reference_header.get_sform(), code=int(reference_header["sform_code"]))
        header.set_zooms(reference_header.get_zooms()[: mask.ndim])
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name keeps the .nii.gz suffix so that nibabel compresses it.
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".nii.gz")
    os.close(handle)
    try:
        nib.save(image, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    """Predict every volume, compute per-volume metrics, and write the outputs.

    Labelled volumes get Dice, IoU, HD95 and ASSD (in mm, from the spacing in the volume's
    affine), see `lasegjax.metrics`. With `output_dir`, writes `metrics.csv`,
    `summary.json`, `boxplot.png`, one `<case>.nii.gz` mask per volume (with the input's
    affine) under `predictions/`, and `panel.png`.

    Returns:
      (summary, rows): the mean of each metric over volumes ("dice", "iou", "hd95",
      "assd"; NaN skipped), and one dict per volume.
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
            row.update(segmentation_metrics(prediction, prepared.label, prepared.spacing))
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
    label = f"step {step}" if step is not None else "evaluation"
    if output_dir is None:
        return mean_metrics(summarize(rows)), rows
    summary = mean_metrics(write_reports(rows, output_dir, f"{label}: {len(rows)} volumes"))
    if panel:
        save_panel(
            panel[: config.eval.num_panel_slices],
            output_dir / "panel.png",
            f"{label}: mean Dice {summary['dice']:.3f}",
        )
    return summary, rows
