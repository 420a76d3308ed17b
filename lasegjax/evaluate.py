"""Compare predicted masks with truth masks: Dice, IoU, HD95 and ASSD per case, and a summary.

  python -m lasegjax.evaluate --pred masks/ --truth labels/ --output report/

Files are paired by case name (the file name without .nii.gz or .nii). Each pair must
have the same shape and voxel-to-world affine. Distances are in mm, from the truth file's
voxel size (NIfTI pixdim, converted from metres or microns when the header says so). See
`lasegjax.metrics` for the metric definitions and the conventions for empty masks.
"""

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from lasegjax import metrics
from lasegjax.data import volume_io
from lasegjax.data.nifti_files import files_by_case, list_nifti_files, load_nifti
from lasegjax.errors import DataError, LasegError
from lasegjax.reporting import setup_logging

# Largest difference between two affines' entries (mm for the translation, unitless for
# the rotation and scaling part) for which two files count as being on the same grid.
AFFINE_TOLERANCE = 1e-3

# Scale from the NIfTI header's spatial unit to mm; "unknown" is taken as mm, as most
# viewers do.
_UNIT_TO_MM = {"mm": 1.0, "meter": 1000.0, "micron": 1e-3, "unknown": 1.0}

_MAX_NAMES_LISTED = 10

_EPILOG = """\
metrics (per case, on the truth file's voxel grid):
  dice, iou   overlap, from true/false positive and false negative voxel counts
  hd95        95th percentile of the symmetric surface distances, in mm
  assd        mean of the symmetric surface distances, in mm
  Masks are read as in training: 0 is background, the atrium label (such as 1 or
  255) is foreground.

empty masks:
  both empty: dice, iou, hd95 and assd are NaN (undefined; left out of the means).
  only one empty: dice = iou = 0, hd95 = assd = NaN (no surface to measure to).
  Summary statistics skip NaN and report how many cases were left out (num_nan).

outputs (in --output):
  metrics.csv   one row per case: case, dice, iou, hd95, assd, tp, fp, fn
  summary.json  number of cases; per metric the mean, sample standard deviation, median,
                num_values and num_nan (null where undefined)
  boxplot.png   one box per metric: dice and iou on one axis, hd95 and assd (mm) on another
  Existing files of these names are replaced.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lasegjax.evaluate",
        description="Compare predicted left-atrium masks with truth masks (NIfTI).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--pred", required=True, type=Path, help="folder of predicted masks (.nii or .nii.gz)"
    )
    parser.add_argument(
        "--truth", required=True, type=Path, help="folder of truth masks with the same names"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="folder for metrics.csv, summary.json and boxplot.png; created if missing. "
        "Default: the --pred folder",
    )
    parser.add_argument(
        "--affine_tolerance",
        type=float,
        default=AFFINE_TOLERANCE,
        help="largest allowed difference between the entries of a pair's affines (mm for "
        f"the translation). Default: {AFFINE_TOLERANCE}",
    )
    return parser.parse_args(argv)


def pair_cases(pred_dir: Path, truth_dir: Path) -> list[tuple[str, Path, Path]]:
    """Return (case, prediction file, truth file) for every case, sorted by case name."""
    predictions = files_by_case(list_nifti_files(pred_dir, "--pred"))
    truths = files_by_case(list_nifti_files(truth_dir, "--truth"))
    only_pred = sorted(set(predictions) - set(truths))
    only_truth = sorted(set(truths) - set(predictions))
    if only_pred or only_truth:
        parts = []
        if only_pred:
            parts.append(f"only in --pred {pred_dir}: {_name_list(only_pred)}")
        if only_truth:
            parts.append(f"only in --truth {truth_dir}: {_name_list(only_truth)}")
        raise DataError(
            f"unmatched case names ({'; '.join(parts)}). Files are paired by name without "
            ".nii.gz or .nii; rename or remove the unmatched files"
        )
    return [(case, predictions[case], truths[case]) for case in sorted(predictions)]


def check_same_grid(pred_path: Path, truth_path: Path, tolerance: float) -> tuple[float, ...]:
    """Raise unless both files have the same shape and affine; return the voxel size in mm."""
    prediction = load_nifti(pred_path)
    truth = load_nifti(truth_path)
    pred_shape = _spatial_shape(prediction)
    truth_shape = _spatial_shape(truth)
    if pred_shape != truth_shape:
        raise DataError(
            f"shapes differ: {pred_path} has shape {pred_shape} but {truth_path} has shape "
            f"{truth_shape}. Predict on the truth's voxel grid or resample the prediction"
        )
    difference = float(np.max(np.abs(prediction.affine - truth.affine)))
    if not difference <= tolerance:
        raise DataError(
            f"affines differ by up to {difference:.6g} (tolerance {tolerance:g}): {pred_path} "
            f"has {_affine_text(prediction.affine)} but {truth_path} has "
            f"{_affine_text(truth.affine)}. Write the prediction with the truth's affine, or "
            "raise --affine_tolerance if the difference is rounding"
        )
    return spacing_mm(truth.header, truth_path)


def spacing_mm(header, path: Path) -> tuple[float, ...]:
    """Return the voxel size of the first three axes in mm, from pixdim and the unit code."""
    unit = header.get_xyzt_units()[0]
    scale = _UNIT_TO_MM.get(unit)
    if scale is None:
        raise DataError(f"{path} has an unsupported spatial unit {unit!r}; expected mm")
    spacing = tuple(float(z) * scale for z in header.get_zooms()[:3])
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise DataError(f"{path} has an invalid voxel size {spacing} mm; fix pixdim in its header")
    return spacing


def evaluate_case(case: str, pred_path: Path, truth_path: Path, spacing) -> dict:
    """Return the metrics row of one case."""
    prediction = volume_io.read_nifti_mask(pred_path)
    truth = volume_io.read_nifti_mask(truth_path)
    return {"case": case, **metrics.segmentation_metrics(prediction, truth, spacing)}


def format_summary(summary: dict) -> str:
    """Return the summary as a small text table, one line per metric."""
    lines = [
        f"{summary['num_cases']} case(s); hd95 and assd in mm",
        "metric      mean       std    median  num_nan",
    ]
    for name, stats in summary["metrics"].items():
        cells = [_number(stats[key]) for key in ("mean", "std", "median")]
        lines.append(f"{name:<7} {cells[0]:>9} {cells[1]:>9} {cells[2]:>9} {stats['num_nan']:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the command line; return the summary. Raises LasegError on bad input."""
    args = parse_args(argv)
    setup_logging(None)
    output_dir = args.output if args.output is not None else args.pred
    cases = pair_cases(args.pred, args.truth)
    # Every pair is checked before any metric is computed, so a bad pair fails fast.
    spacings = [check_same_grid(p, t, args.affine_tolerance) for _, p, t in cases]

    rows = []
    with logging_redirect_tqdm():
        for (case, pred_path, truth_path), spacing in tqdm(
            list(zip(cases, spacings, strict=True)), unit="case", desc="evaluate"
        ):
            start = time.perf_counter()
            row = evaluate_case(case, pred_path, truth_path, spacing)
            rows.append(row)
            logging.info(
                "%s: Dice %.4f, IoU %.4f, HD95 %.2f mm, ASSD %.2f mm (%.1f s).",
                case,
                row["dice"],
                row["iou"],
                row["hd95"],
                row["assd"],
                time.perf_counter() - start,
            )
    title = f"{args.pred} vs {args.truth}: {len(rows)} case(s)"
    summary = metrics.write_reports(rows, output_dir, title)
    print(format_summary(summary))
    return summary


def cli() -> None:
    try:
        main()
    except LasegError as err:
        sys.exit(f"error: {err}")


def _spatial_shape(image: nib.Nifti1Image) -> tuple[int, ...]:
    shape = list(image.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    return tuple(shape)


def _affine_text(affine: np.ndarray) -> str:
    rows = ("[" + " ".join(f"{v:.6g}" for v in row) + "]" for row in np.asarray(affine)[:3])
    return "[" + " ".join(rows) + "]"


def _name_list(names: list[str]) -> str:
    listed = ", ".join(names[:_MAX_NAMES_LISTED])
    if len(names) > _MAX_NAMES_LISTED:
        listed += f" and {len(names) - _MAX_NAMES_LISTED} more"
    return listed


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    cli()
