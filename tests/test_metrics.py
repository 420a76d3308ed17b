"""Tests of lasegjax.metrics: known values, agreement with MedPy 0.5.2, empty-mask conventions.

MedPy implements the same definitions (surface by 6-connected erosion, HD95 and ASSD over
the pooled symmetric surface distances), so agreement is checked to a relative tolerance
of 1e-9, which only allows for floating-point summation order.
"""

import json
import math

import numpy as np
import pytest
from medpy.metric import binary as medpy_binary

from lasegjax import evaluation, metrics

SPACING = (0.625, 0.625, 2.5)  # mm; typical in-plane and slice spacing of LGE-MRI
MEDPY_RTOL = 1e-9


def cube(shape=(40, 40, 16), start=(10, 10, 4), size=(12, 12, 6)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))] = True
    return mask


def ellipsoid(shape, center, radius_mm, spacing) -> np.ndarray:
    """Return the voxels whose centres lie within `radius_mm` of `center` (voxel units)."""
    grid = np.indices(shape).astype(float)
    offsets = [(grid[a] - center[a]) * spacing[a] for a in range(3)]
    return sum(o**2 for o in offsets) <= radius_mm**2


def medpy_values(prediction, truth, spacing) -> dict[str, float]:
    return {
        "dice": medpy_binary.dc(prediction, truth),
        "iou": medpy_binary.jc(prediction, truth),
        "hd95": medpy_binary.hd95(prediction, truth, voxelspacing=spacing),
        "assd": medpy_binary.assd(prediction, truth, voxelspacing=spacing),
    }


def shifted_cube_pair(axis: int, offset: int):
    truth = cube()
    return np.roll(truth, offset, axis=axis), truth


def sphere_pair():
    shape = (48, 48, 20)
    truth = ellipsoid(shape, (24, 24, 10), 9.0, SPACING)
    prediction = ellipsoid(shape, (26.5, 23, 11), 9.0, SPACING)
    return prediction, truth


def nested_cube_pair():
    # Different surface sizes, so the pooled and per-direction averages differ.
    return cube(start=(14, 14, 6), size=(4, 4, 2)), cube()


def border_pair():
    # Masks touching the array border: border voxels count as surface.
    truth = np.zeros((20, 20, 8), bool)
    truth[:10, 5:15, :] = True
    prediction = np.zeros_like(truth)
    prediction[:12, 4:15, 1:] = True
    return prediction, truth


def random_blob_pair():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    noise = ndimage.gaussian_filter(rng.random((2, 36, 30, 12)), (0, 2, 2, 1))
    return noise[0] > 0.5, noise[1] > 0.5


MEDPY_CASES = {
    "cube_shift_x_2": lambda: shifted_cube_pair(0, 2),
    "cube_shift_y_3": lambda: shifted_cube_pair(1, -3),
    "cube_shift_z_1": lambda: shifted_cube_pair(2, 1),
    "sphere_shifted": sphere_pair,
    "nested_cubes": nested_cube_pair,
    "touching_border": border_pair,
    "random_blobs": random_blob_pair,
}


@pytest.mark.parametrize("name", sorted(MEDPY_CASES))
@pytest.mark.parametrize("metric", metrics.METRICS)
def test_metric_matches_medpy(name, metric):
    prediction, truth = MEDPY_CASES[name]()
    expected = medpy_values(prediction, truth, SPACING)[metric]
    actual = metrics.segmentation_metrics(prediction, truth, SPACING)[metric]
    assert actual == pytest.approx(expected, rel=MEDPY_RTOL, abs=1e-12)


@pytest.mark.parametrize("offset", [1, 2, 4])
def test_overlap_cube_shift_known_values(offset):
    # A cube of side n shifted by k voxels along x overlaps in n - k of its n layers.
    prediction, truth = shifted_cube_pair(0, offset)
    result = metrics.overlap_metrics(prediction, truth)
    side = 12
    assert result["dice"] == pytest.approx((side - offset) / side)
    assert result["iou"] == pytest.approx((side - offset) / (side + offset))


def test_overlap_counts_voxels():
    prediction, truth = shifted_cube_pair(0, 2)
    result = metrics.overlap_metrics(prediction, truth)
    assert (result["tp"], result["fp"], result["fn"]) == (10 * 12 * 6, 2 * 12 * 6, 2 * 12 * 6)


def test_distance_single_voxels_known_value():
    prediction = np.zeros((10, 10, 10), bool)
    truth = np.zeros_like(prediction)
    prediction[5, 5, 5] = True
    truth[5, 8, 7] = True
    distance = math.hypot(3 * SPACING[1], 2 * SPACING[2])
    result = metrics.distance_metrics(prediction, truth, SPACING)
    assert result["hd95"] == pytest.approx(distance)
    assert result["assd"] == pytest.approx(distance)
    assert medpy_binary.hd95(prediction, truth, voxelspacing=SPACING) == pytest.approx(distance)


def test_distance_parallel_planes_known_value():
    # One-voxel-thick planes are all surface, and every voxel's nearest partner lies
    # straight across, 3 slices of 2.5 mm away.
    prediction = np.zeros((12, 12, 10), bool)
    truth = np.zeros_like(prediction)
    prediction[:, :, 2] = True
    truth[:, :, 5] = True
    result = metrics.distance_metrics(prediction, truth, SPACING)
    assert result["hd95"] == pytest.approx(7.5)
    assert result["assd"] == pytest.approx(7.5)


def test_distance_uses_anisotropic_spacing():
    prediction = np.zeros((10, 10, 10), bool)
    truth = np.zeros_like(prediction)
    prediction[2, 2, 2] = True
    truth[2, 2, 4] = True
    assert metrics.distance_metrics(prediction, truth, (1.0, 1.0, 3.0))["hd95"] == 6.0
    assert metrics.distance_metrics(prediction, truth, (3.0, 3.0, 1.0))["hd95"] == 2.0


def test_distance_identical_masks_zero():
    truth = cube()
    result = metrics.distance_metrics(truth, truth.copy(), SPACING)
    assert result == {"hd95": 0.0, "assd": 0.0}


def test_distance_cube_shift_bounded_by_shift():
    # No surface voxel is farther from the other surface than the shift itself.
    prediction, truth = shifted_cube_pair(2, 2)
    forward, backward = metrics.surface_distances(prediction, truth, SPACING)
    assert max(forward.max(), backward.max()) == pytest.approx(2 * SPACING[2])


def test_surface_of_solid_cube_is_its_shell():
    mask = cube(size=(5, 4, 3))
    shell = metrics.surface(mask)
    assert shell.sum() == 5 * 4 * 3 - 3 * 2 * 1


def test_empty_both_overlap_is_nan():
    empty = np.zeros((8, 8, 8), bool)
    result = metrics.overlap_metrics(empty, empty)
    assert math.isnan(result["dice"])
    assert math.isnan(result["iou"])


def test_empty_both_distance_is_nan():
    empty = np.zeros((8, 8, 8), bool)
    result = metrics.distance_metrics(empty, empty, SPACING)
    assert math.isnan(result["hd95"])
    assert math.isnan(result["assd"])


@pytest.mark.parametrize("empty_side", ["prediction", "truth"])
def test_empty_one_side_overlap_is_zero(empty_side):
    mask = cube()
    empty = np.zeros_like(mask)
    pair = (empty, mask) if empty_side == "prediction" else (mask, empty)
    result = metrics.overlap_metrics(*pair)
    assert result["dice"] == 0.0
    assert result["iou"] == 0.0


@pytest.mark.parametrize("empty_side", ["prediction", "truth"])
def test_empty_one_side_distance_is_nan(empty_side):
    mask = cube()
    empty = np.zeros_like(mask)
    pair = (empty, mask) if empty_side == "prediction" else (mask, empty)
    result = metrics.distance_metrics(*pair, SPACING)
    assert math.isnan(result["hd95"])
    assert math.isnan(result["assd"])


def test_surface_distances_reject_empty_mask():
    with pytest.raises(ValueError, match="non-empty"):
        metrics.surface_distances(
            np.zeros((4, 4, 4)), cube((4, 4, 4), (1, 1, 1), (2, 2, 2)), SPACING
        )


def test_metrics_reject_shape_mismatch():
    with pytest.raises(ValueError, match=r"prediction shape \(4, 4, 4\) differs"):
        metrics.segmentation_metrics(np.ones((4, 4, 4)), np.ones((4, 4, 5)), SPACING)


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, float("nan"), 1.0)])
def test_distance_rejects_invalid_spacing(spacing):
    prediction, truth = shifted_cube_pair(0, 1)
    with pytest.raises(ValueError, match="voxel spacing .* is invalid"):
        metrics.distance_metrics(prediction, truth, spacing)


def test_evaluation_overlap_metrics_alias():
    assert evaluation.overlap_metrics is metrics.overlap_metrics


ROWS = [
    {"case": "a", "dice": 0.8, "iou": 0.6, "hd95": 2.0, "assd": 1.0},
    {"case": "b", "dice": 0.6, "iou": 0.4, "hd95": 4.0, "assd": 3.0},
    {"case": "c", "dice": 0.0, "iou": 0.0, "hd95": math.nan, "assd": math.nan},
]


def test_summarize_mean_skips_nan():
    summary = metrics.summarize(ROWS)
    assert summary["metrics"]["hd95"]["mean"] == pytest.approx(3.0)
    assert summary["metrics"]["hd95"]["num_nan"] == 1
    assert summary["metrics"]["hd95"]["num_values"] == 2


def test_summarize_overlap_includes_zero_dice():
    summary = metrics.summarize(ROWS)
    assert summary["metrics"]["dice"]["mean"] == pytest.approx(1.4 / 3)
    assert summary["metrics"]["dice"]["median"] == pytest.approx(0.6)


def test_summarize_std_is_sample_std():
    summary = metrics.summarize(ROWS)
    assert summary["metrics"]["assd"]["std"] == pytest.approx(np.std([1.0, 3.0], ddof=1))
    assert summary["num_cases"] == 3


def test_summarize_all_nan_gives_none():
    summary = metrics.summarize([ROWS[2]])
    assert summary["metrics"]["hd95"] == {
        "mean": None,
        "std": None,
        "median": None,
        "num_values": 0,
        "num_nan": 1,
    }


def test_mean_metrics_all_nan_is_nan():
    means = metrics.mean_metrics(metrics.summarize([ROWS[2]]))
    assert math.isnan(means["assd"])
    assert means["dice"] == 0.0


def test_write_reports_files(tmp_path):
    summary = metrics.write_reports(ROWS, tmp_path, "three cases")
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == "case,dice,iou,hd95,assd,tp,fp,fn"
    assert lines[3].startswith("c,0.0,0.0,nan,nan")
    # Strict JSON: undefined statistics are null, never NaN.
    saved = json.loads((tmp_path / "summary.json").read_text(), parse_constant=pytest.fail)
    assert saved == summary
    assert (tmp_path / "boxplot.png").read_bytes()[:4] == b"\x89PNG"
