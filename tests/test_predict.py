"""End-to-end tests of `python -m lasegjax.predict` with a tiny model trained on phantom data.

The model is trained for 6 steps, so its masks are poor; the tests check geometry, file
format, options and errors, not segmentation quality. Inputs are a real LGE-MRI volume and
an oblique copy of it.
"""

import csv
import json
import math
import shutil
import subprocess
import sys

import nibabel as nib
import nrrd
import numpy as np
import pytest

from lasegjax import checkpointing, metrics, predict, sharding
from lasegjax.data import volume_io
from lasegjax.data.volume import Volume
from lasegjax.errors import CheckpointError, ConfigError, DataError
from lasegjax.train import train_and_evaluate
from tests.conftest import LASCARQS_COPY, REPO, require, tiny_config

REAL_IMAGE = LASCARQS_COPY / "train_data" / "train_1" / "enhanced.nii.gz"
# The same run as test_train's phantom run, so the two share compiled programs.
NUM_STEPS = 6
UNVALIDATED_STEP = 3


def oblique_affines() -> tuple[np.ndarray, np.ndarray]:
    """Return (qform, sform): 0.625 x 0.625 x 2.5 mm voxels rotated 25 degrees off-axis.

    The sform is shifted 1 mm from the qform, so copying one into the other is detected.
    """
    axis = np.array([1.0, 2.0, 0.5]) / np.linalg.norm([1.0, 2.0, 0.5])
    angle = np.deg2rad(25.0)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross
    qform = np.eye(4)
    qform[:3, :3] = rotation @ np.diag([0.625, 0.625, 2.5])
    qform[:3, 3] = (-40.0, 22.5, 17.0)
    sform = qform.copy()
    sform[0, 3] += 1.0
    return qform, sform


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny model trained on phantom data, with checkpoints at step 3 and step 6 (validated)."""
    workdir = tmp_path_factory.mktemp("predict_run")
    config = tiny_config()
    config.train.eval_every = NUM_STEPS
    assert config.train.num_steps == NUM_STEPS
    assert config.train.checkpoint_every == UNVALIDATED_STEP
    train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder with a link to a real LGE-MRI volume and an oblique, subsampled copy of it."""
    real = require(REAL_IMAGE)
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "train_1.nii.gz").symlink_to(real)
    data = np.asarray(nib.load(real).dataobj)[::2, ::2, ::4].astype(np.int16)
    qform, sform = oblique_affines()
    image = nib.Nifti1Image(data, sform)
    image.set_qform(qform, code=1)
    image.set_sform(sform, code=2)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, folder / "oblique.nii")
    return folder


@pytest.fixture(scope="module")
def predicted(workdir, inputs, tmp_path_factory):
    output = tmp_path_factory.mktemp("predicted")
    written = predict.main(
        ["--workdir", str(workdir), "--input", str(inputs), "--output", str(output)]
    )
    return output, written


CASES = ["train_1", "oblique"]


def input_image(inputs, case):
    return nib.load(inputs / ("train_1.nii.gz" if case == "train_1" else "oblique.nii"))


def test_predict_writes_one_file_per_input(predicted):
    output, written = predicted
    assert sorted(p.name for p in written) == ["oblique.nii.gz", "train_1.nii.gz"]
    assert sorted(p.name for p in output.iterdir()) == ["oblique.nii.gz", "train_1.nii.gz"]


@pytest.mark.parametrize("case", CASES)
def test_predict_output_shape_matches_input(predicted, inputs, case):
    mask = nib.load(predicted[0] / f"{case}.nii.gz")
    assert mask.shape == input_image(inputs, case).shape


@pytest.mark.parametrize("case", CASES)
def test_predict_output_affine_matches_input(predicted, inputs, case):
    mask = nib.load(predicted[0] / f"{case}.nii.gz")
    np.testing.assert_allclose(mask.affine, input_image(inputs, case).affine, atol=1e-5)


@pytest.mark.parametrize("form", ["qform", "sform"])
@pytest.mark.parametrize("case", CASES)
def test_predict_output_form_matches_input(predicted, inputs, case, form):
    mask = nib.load(predicted[0] / f"{case}.nii.gz").header
    source = input_image(inputs, case).header
    assert int(mask[f"{form}_code"]) == int(source[f"{form}_code"])
    np.testing.assert_allclose(
        getattr(mask, f"get_{form}")(), getattr(source, f"get_{form}")(), atol=1e-5
    )


@pytest.mark.parametrize("case", CASES)
def test_predict_output_zooms_and_units_match_input(predicted, inputs, case):
    mask = nib.load(predicted[0] / f"{case}.nii.gz").header
    source = input_image(inputs, case).header
    np.testing.assert_allclose(mask.get_zooms()[:3], source.get_zooms()[:3])
    assert mask.get_xyzt_units() == source.get_xyzt_units()


@pytest.mark.parametrize("case", CASES)
def test_predict_output_is_binary_uint8(predicted, case):
    mask = nib.load(predicted[0] / f"{case}.nii.gz")
    assert mask.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}


def test_predict_rejects_existing_output(workdir, inputs, predicted):
    output, _ = predicted
    before = (output / "oblique.nii.gz").read_bytes()
    with pytest.raises(DataError) as error:
        predict.main(["--workdir", str(workdir), "--input", str(inputs), "--output", str(output)])
    assert f"output file {output / 'oblique.nii.gz'}" in str(error.value)
    assert "Pass --overwrite" in str(error.value)
    assert (output / "oblique.nii.gz").read_bytes() == before


def test_predict_overwrite_with_flip_tta(workdir, inputs, tmp_path):
    target = tmp_path / "oblique.nii.gz"
    target.write_bytes(b"stale")
    predict.main(
        [
            "--workdir",
            str(workdir),
            "--input",
            str(inputs / "oblique.nii"),
            "--output",
            str(tmp_path),
            "--tta",
            "flip",
            "--overwrite",
        ]
    )
    mask = nib.load(target)
    assert mask.shape == input_image(inputs, "oblique").shape
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_predict_tta_flip_averages_flipped_volumes(workdir, inputs):
    # Flipping the slices in model space equals flipping the volume in-plane, so the flip
    # average must match predictions of the flipped volumes, flipped back.
    config = predict.load_run_config(workdir)
    mesh = sharding.make_mesh()
    manager = checkpointing.open_read_only(workdir / "checkpoints")
    params = checkpointing.restore_params(manager, NUM_STEPS, sharding.replicated(mesh))
    manager.close()
    image, affine = volume_io.read_nifti_image(inputs / "oblique.nii")
    plain = predict.Predictor(config, params, mesh, 8, "none", 0.5, False)
    flip = predict.Predictor(config, params, mesh, 8, "flip", 0.5, False)

    def probabilities(predictor, array):
        volume = Volume("oblique", np.ascontiguousarray(array), None, affine, "oblique.nii")
        return predictor.probabilities(volume)

    # The oblique volume is sliced along its 2.5 mm axis 2, so axes 0 and 1 are in-plane.
    expected = (
        probabilities(plain, image)
        + np.flip(probabilities(plain, np.flip(image, 0)), 0)
        + np.flip(probabilities(plain, np.flip(image, 1)), 1)
    ) / 3
    np.testing.assert_allclose(probabilities(flip, image), expected, atol=1e-5)


def test_checkpoint_default_is_best(workdir):
    manager = checkpointing.open_read_only(workdir / "checkpoints")
    assert predict.resolve_checkpoint_step(manager, None) == NUM_STEPS


def test_checkpoint_selects_step(workdir):
    manager = checkpointing.open_read_only(workdir / "checkpoints")
    assert predict.resolve_checkpoint_step(manager, str(UNVALIDATED_STEP)) == UNVALIDATED_STEP
    assert predict.resolve_checkpoint_step(manager, "latest") == NUM_STEPS


def test_checkpoint_rejects_unknown_step(workdir):
    manager = checkpointing.open_read_only(workdir / "checkpoints")
    with pytest.raises(CheckpointError, match="no checkpoint at step 7 .* available steps: 3, 6"):
        predict.resolve_checkpoint_step(manager, "7")


def test_checkpoint_rejects_invalid_choice(workdir):
    manager = checkpointing.open_read_only(workdir / "checkpoints")
    with pytest.raises(CheckpointError, match="--checkpoint 'newest' is invalid"):
        predict.resolve_checkpoint_step(manager, "newest")


def test_checkpoint_without_metrics_has_no_best(workdir, tmp_path):
    step = str(UNVALIDATED_STEP)
    shutil.copytree(workdir / "checkpoints" / step, tmp_path / "checkpoints" / step)
    manager = checkpointing.open_read_only(tmp_path / "checkpoints")
    assert predict.resolve_checkpoint_step(manager, None) == UNVALIDATED_STEP
    with pytest.raises(CheckpointError, match="none is best. Pass --checkpoint latest"):
        predict.resolve_checkpoint_step(manager, "best")


def test_predict_rejects_missing_input(workdir, tmp_path):
    missing = tmp_path / "missing.nii.gz"
    with pytest.raises(DataError, match=f"input not found: {missing}"):
        predict.main(["--workdir", str(workdir), "--input", str(missing), "--output", "x"])


def test_predict_rejects_empty_folder(workdir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no NIfTI or NRRD files"):
        predict.main(
            ["--workdir", str(workdir), "--input", str(tmp_path / "empty"), "--output", "x"]
        )


def test_predict_rejects_unreadable_file(workdir, tmp_path):
    broken = tmp_path / "in" / "broken.nii.gz"
    broken.parent.mkdir()
    broken.write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(DataError, match=f"failed to read {broken}"):
        predict.main(
            ["--workdir", str(workdir), "--input", str(broken.parent), "--output", str(tmp_path)]
        )


def test_predict_rejects_other_formats(workdir, tmp_path):
    other = tmp_path / "scan.mha"
    other.write_bytes(b"ObjectType = Image")
    with pytest.raises(DataError, match="is not a NIfTI or NRRD file"):
        predict.main(["--workdir", str(workdir), "--input", str(other), "--output", "x"])


def test_predict_rejects_output_replacing_input(workdir, inputs):
    with pytest.raises(DataError, match="would replace the image itself"):
        predict.main(
            [
                "--workdir",
                str(workdir),
                "--input",
                str(inputs / "train_1.nii.gz"),
                "--output",
                str(inputs),
                "--overwrite",
            ]
        )


def test_predict_rejects_workdir_without_config(inputs, tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'config.json'} not found"):
        predict.main(
            ["--workdir", str(tmp_path), "--input", str(inputs), "--output", str(tmp_path / "o")]
        )


def test_predict_rejects_indivisible_batch_size(workdir, inputs, tmp_path):
    with pytest.raises(ConfigError, match="--batch_size 3 does not divide evenly"):
        predict.main(
            [
                "--workdir",
                str(workdir),
                "--input",
                str(inputs),
                "--output",
                str(tmp_path),
                "--batch_size",
                "3",
            ]
        )


def test_predict_cli_prints_one_line_error(workdir, tmp_path):
    missing = tmp_path / "missing.nii.gz"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lasegjax.predict",
            "--workdir",
            str(workdir),
            "--input",
            str(missing),
            "--output",
            str(tmp_path / "out"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: input not found: {missing}. Pass a NIfTI (.nii, .nii.gz) or NRRD (.nrrd) file "
        "or a folder of them"
    )


def write_lps_nrrd(path, data, affine):
    """Write `data` as NRRD in LPS world space whose geometry equals the RAS+ `affine`."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    header = {
        "space": "left-posterior-superior",
        "space directions": lps[:3, :3].T,
        "space origin": lps[:3, 3],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    nrrd.write(str(path), data, header)


@pytest.fixture(scope="module")
def nrrd_predicted(workdir, inputs, tmp_path_factory):
    """The oblique volume saved as a LASC2018 case, <case>/lgemri.nrrd in LPS, and its mask."""
    source = nib.load(inputs / "oblique.nii")
    image = tmp_path_factory.mktemp("nrrd") / "case_07" / "lgemri.nrrd"
    write_lps_nrrd(image, np.asarray(source.dataobj), source.affine)
    output = tmp_path_factory.mktemp("nrrd_predicted")
    written = predict.main(
        ["--workdir", str(workdir), "--input", str(image), "--output", str(output)]
    )
    return written


def test_predict_nrrd_names_lasc2018_mask_after_case_folder(nrrd_predicted):
    assert [p.name for p in nrrd_predicted] == ["case_07.nii.gz"]


def test_predict_nrrd_mask_has_input_geometry(nrrd_predicted, inputs):
    source = nib.load(inputs / "oblique.nii")
    mask = nib.load(nrrd_predicted[0])
    assert mask.shape == source.shape
    np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
    assert int(mask.header["qform_code"]) == 1
    assert int(mask.header["sform_code"]) == 1


def test_predict_nrrd_matches_nifti_mask(nrrd_predicted, predicted):
    from_nifti = np.asarray(nib.load(predicted[0] / "oblique.nii.gz").dataobj)
    np.testing.assert_array_equal(np.asarray(nib.load(nrrd_predicted[0]).dataobj), from_nifti)


def test_predict_rejects_corrupt_nrrd_before_loading_model(tmp_path):
    broken = tmp_path / "in" / "broken.nrrd"
    broken.parent.mkdir()
    broken.write_bytes(b"\x89PNG\r\n not an NRRD header")
    # No workdir exists: the header check has to fail first.
    with pytest.raises(DataError, match=f"{broken}"):
        predict.main(
            [
                "--workdir",
                str(tmp_path / "no_run"),
                "--input",
                str(broken.parent),
                "--output",
                str(tmp_path / "out"),
            ]
        )


def read_eval_rows(workdir):
    with open(workdir / "eval" / f"step_{NUM_STEPS:07d}" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_training_eval_csv_has_surface_metrics(workdir):
    rows = read_eval_rows(workdir)
    assert list(rows[0]) == list(metrics.CSV_FIELDS)


def test_training_eval_hd95_uses_volume_spacing(workdir):
    # Recompute from the written prediction and the phantom truth (1.25 x 1.25 x 2.5 mm).
    row = read_eval_rows(workdir)[0]
    eval_dir = workdir / "eval" / f"step_{NUM_STEPS:07d}"
    prediction = volume_io.read_nifti_mask(eval_dir / "predictions" / f"{row['case']}.nii.gz")
    truth_path = next((workdir / "phantom").rglob(f"{row['case']}/atriumSegImgMO.nii.gz"))
    truth = volume_io.read_nifti_mask(truth_path)
    spacing = nib.load(truth_path).header.get_zooms()
    expected = metrics.segmentation_metrics(prediction, truth, spacing)
    assert not math.isnan(expected["hd95"])
    assert float(row["hd95"]) == pytest.approx(expected["hd95"])
    assert float(row["assd"]) == pytest.approx(expected["assd"])


def test_training_eval_writes_summary_and_boxplot(workdir):
    eval_dir = workdir / "eval" / f"step_{NUM_STEPS:07d}"
    summary = json.loads((eval_dir / "summary.json").read_text())
    assert summary["num_cases"] == 1
    assert set(summary["metrics"]) == set(metrics.METRICS)
    assert (eval_dir / "boxplot.png").read_bytes()[:4] == b"\x89PNG"


def test_training_result_has_surface_means(workdir):
    result = json.loads((workdir / "result.json").read_text())
    assert result["hd95"] > 0
    assert result["assd"] > 0


def test_predict_rejects_invalid_threshold(workdir, inputs, tmp_path):
    with pytest.raises(ConfigError, match=r"--threshold 1.5 is invalid"):
        predict.main(
            [
                "--workdir",
                str(workdir),
                "--input",
                str(inputs),
                "--output",
                str(tmp_path),
                "--threshold",
                "1.5",
            ]
        )
