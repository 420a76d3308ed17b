"""End-to-end tests of `python -m lasegjax.evaluate` on NIfTI masks written with nibabel."""

import csv
import json
import math
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from lasegjax import evaluate, metrics
from lasegjax.errors import DataError
from tests.conftest import REPO

SPACING = (0.625, 0.625, 2.5)
AFFINE = np.array(
    [
        [0.625, 0.0, 0.0, -60.0],
        [0.0, 0.625, 0.0, -45.5],
        [0.0, 0.0, 2.5, 12.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
SHAPE = (32, 32, 12)


def box(start, size=(10, 10, 4)) -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))] = 1
    return mask


def write_mask(path, mask, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(mask.astype(np.uint8), affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, path)
    return path


# case -> (prediction, truth). Case "shifted" is off by 2 voxels along x (1.25 mm), case
# "missed" has an empty prediction.
CASES = {
    "exact": (box((8, 8, 4)), box((8, 8, 4))),
    "shifted": (box((10, 8, 4)), box((8, 8, 4))),
    "missed": (np.zeros(SHAPE, np.uint8), box((8, 8, 4))),
}


@pytest.fixture
def folders(tmp_path):
    pred_dir, truth_dir = tmp_path / "pred", tmp_path / "truth"
    for case, (prediction, truth) in CASES.items():
        write_mask(pred_dir / f"{case}.nii.gz", prediction)
        write_mask(truth_dir / f"{case}.nii", truth)
    return pred_dir, truth_dir


@pytest.fixture
def report(folders, tmp_path):
    pred_dir, truth_dir = folders
    output = tmp_path / "report"
    summary = evaluate.main(
        ["--pred", str(pred_dir), "--truth", str(truth_dir), "--output", str(output)]
    )
    return output, summary


def read_rows(output):
    with open(output / "metrics.csv", newline="") as f:
        return {row["case"]: row for row in csv.DictReader(f)}


def test_evaluate_csv_has_one_row_per_case(report):
    output, _ = report
    assert sorted(read_rows(output)) == sorted(CASES)


def test_evaluate_csv_exact_case(report):
    row = read_rows(report[0])["exact"]
    assert (float(row["dice"]), float(row["hd95"]), float(row["assd"])) == (1.0, 0.0, 0.0)


def test_evaluate_csv_shifted_case_matches_metrics(report):
    row = read_rows(report[0])["shifted"]
    expected = metrics.segmentation_metrics(*CASES["shifted"], SPACING)
    assert float(row["dice"]) == pytest.approx(0.8)
    assert float(row["iou"]) == pytest.approx(8 / 12)
    assert float(row["hd95"]) == pytest.approx(expected["hd95"])
    assert float(row["assd"]) == pytest.approx(expected["assd"])


def test_evaluate_csv_empty_prediction_case(report):
    row = read_rows(report[0])["missed"]
    assert float(row["dice"]) == 0.0
    assert math.isnan(float(row["hd95"]))


def test_evaluate_summary_json(report):
    output, summary = report
    saved = json.loads((output / "summary.json").read_text())
    assert saved == summary
    assert saved["num_cases"] == 3
    assert saved["metrics"]["dice"]["mean"] == pytest.approx(1.8 / 3)
    assert saved["metrics"]["hd95"]["num_nan"] == 1


def test_evaluate_writes_boxplot_png(report):
    assert (report[0] / "boxplot.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_default_output_is_pred_folder(folders):
    pred_dir, truth_dir = folders
    evaluate.main(["--pred", str(pred_dir), "--truth", str(truth_dir)])
    assert (pred_dir / "summary.json").is_file()


def test_evaluate_spacing_from_header_units(tmp_path):
    # pixdim in metres: 2 slices of 0.0025 m apart is 5 mm.
    affine = np.diag([0.000625, 0.000625, 0.0025, 1.0])
    prediction, truth = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    prediction[5, 5, 2] = truth[5, 5, 4] = 1
    for folder, mask in (("pred", prediction), ("truth", truth)):
        image = nib.Nifti1Image(mask, affine)
        image.header.set_xyzt_units("meter")
        (tmp_path / folder).mkdir()
        nib.save(image, tmp_path / folder / "a.nii.gz")
    summary = evaluate.main(["--pred", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth")])
    assert summary["metrics"]["hd95"]["mean"] == pytest.approx(5.0)


def test_evaluate_rejects_unmatched_names(folders):
    pred_dir, truth_dir = folders
    write_mask(pred_dir / "extra_pred.nii.gz", box((8, 8, 4)))
    write_mask(truth_dir / "extra_truth.nii.gz", box((8, 8, 4)))
    with pytest.raises(DataError) as error:
        evaluate.main(["--pred", str(pred_dir), "--truth", str(truth_dir)])
    message = str(error.value)
    assert f"only in --pred {pred_dir}: extra_pred" in message
    assert f"only in --truth {truth_dir}: extra_truth" in message


def test_evaluate_rejects_shape_mismatch(folders):
    pred_dir, truth_dir = folders
    write_mask(pred_dir / "shifted.nii.gz", np.zeros((32, 32, 10), np.uint8))
    with pytest.raises(DataError) as error:
        evaluate.main(["--pred", str(pred_dir), "--truth", str(truth_dir)])
    message = str(error.value)
    assert f"{pred_dir / 'shifted.nii.gz'} has shape (32, 32, 10)" in message
    assert f"{truth_dir / 'shifted.nii'} has shape (32, 32, 12)" in message


def test_evaluate_rejects_affine_mismatch(folders):
    pred_dir, truth_dir = folders
    moved = AFFINE.copy()
    moved[0, 3] += 0.5
    write_mask(pred_dir / "exact.nii.gz", CASES["exact"][0], moved)
    with pytest.raises(DataError) as error:
        evaluate.main(["--pred", str(pred_dir), "--truth", str(truth_dir)])
    message = str(error.value)
    assert "affines differ by up to 0.5 (tolerance 0.001)" in message
    assert str(pred_dir / "exact.nii.gz") in message
    assert "-59.5" in message
    assert str(truth_dir / "exact.nii") in message


def test_evaluate_accepts_affine_within_tolerance(folders):
    pred_dir, truth_dir = folders
    moved = AFFINE.copy()
    moved[0, 3] += 1e-5
    write_mask(pred_dir / "exact.nii.gz", CASES["exact"][0], moved)
    summary = evaluate.main(["--pred", str(pred_dir), "--truth", str(truth_dir)])
    assert summary["num_cases"] == 3


def test_evaluate_rejects_missing_folder(tmp_path, folders):
    _, truth_dir = folders
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"--pred {missing} not found"):
        evaluate.main(["--pred", str(missing), "--truth", str(truth_dir)])


def test_evaluate_rejects_empty_folder(tmp_path, folders):
    _, truth_dir = folders
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no NIfTI files"):
        evaluate.main(["--pred", str(tmp_path / "empty"), "--truth", str(truth_dir)])


def test_evaluate_rejects_unreadable_file(folders):
    pred_dir, truth_dir = folders
    (pred_dir / "exact.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(DataError, match=f"failed to read {pred_dir / 'exact.nii.gz'}"):
        evaluate.main(["--pred", str(pred_dir), "--truth", str(truth_dir)])


def test_evaluate_cli_prints_one_line_error(tmp_path, folders):
    _, truth_dir = folders
    missing = tmp_path / "nowhere"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lasegjax.evaluate",
            "--pred",
            str(missing),
            "--truth",
            str(truth_dir),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --pred {missing} not found")
    assert "Traceback" not in result.stderr
