"""End-to-end tests of training: loss decrease on real slices, outputs, resume, errors."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from lasegjax import checkpointing
from lasegjax.errors import ConfigError, DataError
from lasegjax.model.segmenter import build_model
from lasegjax.optim import label_params
from lasegjax.train import create_train_state, train_and_evaluate
from tests.conftest import REPO, tiny_config


def read_losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r]


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
    """One short training on the embedded phantom data, with a validation at the end."""
    workdir = tmp_path_factory.mktemp("phantom_run")
    config = tiny_config()
    config.train.eval_every = 6
    result = train_and_evaluate(config, workdir)
    return workdir, result


def test_train_real_slices_lowers_loss(lascarqs_root, tmp_path):
    config = tiny_config(lascarqs_root, image_size=(70, 70))
    config.data.max_cases = 3
    config.train.num_steps = 40
    config.train.warmup_steps = 5
    config.train.learning_rate = 3e-3
    config.train.checkpoint_every = 1000
    config.train.eval_every = 1000
    train_and_evaluate(config, tmp_path)
    losses = read_losses(tmp_path)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_phantom_run_writes_resolved_config(phantom_run):
    workdir, _ = phantom_run
    assert json.loads((workdir / "config.json").read_text())["train"]["num_steps"] == 6


def test_phantom_run_writes_metrics_csv(phantom_run):
    workdir, _ = phantom_run
    lines = (workdir / "eval" / "step_0000006" / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("case,dice,iou")
    assert len(lines) == 2


def test_phantom_run_writes_prediction_with_input_affine(phantom_run):
    import nibabel as nib

    workdir, _ = phantom_run
    predictions = sorted((workdir / "eval" / "step_0000006" / "predictions").glob("*.nii.gz"))
    assert len(predictions) == 1
    case = predictions[0].name.removesuffix(".nii.gz")
    source = nib.load(next((workdir / "phantom").rglob(f"{case}/enhanced.nii.gz")))
    predicted = nib.load(predictions[0])
    np.testing.assert_allclose(predicted.affine, source.affine)
    assert predicted.shape == source.shape


def test_phantom_run_writes_panel_png(phantom_run):
    workdir, _ = phantom_run
    assert (workdir / "eval" / "step_0000006" / "panel.png").read_bytes()[:4] == b"\x89PNG"


def test_phantom_run_writes_tensorboard_events(phantom_run):
    workdir, _ = phantom_run
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))


def test_phantom_run_logs_fusion_weights(phantom_run):
    workdir, _ = phantom_run
    record = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])
    weights = [record[k] for k in record if k.startswith("train/fusion_weight_")]
    assert sum(weights) == pytest.approx(1.0, abs=1e-5)


def test_phantom_run_log_has_progress_line(phantom_run):
    workdir, _ = phantom_run
    log = (workdir / "train.log").read_text()
    assert "[step 6/6] loss" in log
    assert "steps/s | ETA" in log


def test_phantom_run_keeps_best_checkpoint(phantom_run):
    workdir, result = phantom_run
    assert result["best_step"] == 6
    step, params = checkpointing.load_params(workdir / "checkpoints", best=True)
    assert step == 6
    assert "encoder" in params


def test_phantom_run_log_says_encoder_random(phantom_run):
    workdir, _ = phantom_run
    assert "RANDOMLY INITIALISED" in (workdir / "train.log").read_text()


def test_resume_matches_uninterrupted_run(tmp_path):
    config = tiny_config()
    train_and_evaluate(config, tmp_path / "straight")
    interrupted = tiny_config()
    interrupted.train.stop_at_step = 3
    train_and_evaluate(interrupted, tmp_path / "resumed")
    train_and_evaluate(tiny_config(), tmp_path / "resumed")
    _, expected = checkpointing.load_params(tmp_path / "straight" / "checkpoints", step=6)
    step, actual = checkpointing.load_params(tmp_path / "resumed" / "checkpoints", step=6)
    assert step == 6
    jax.tree.map(np.testing.assert_array_equal, actual, expected)


def test_frozen_encoder_params_unchanged(tmp_path):
    config = tiny_config()
    config.model.encoder.frozen = True
    config.train.num_steps = 3
    train_and_evaluate(config, tmp_path)
    model = build_model(config.model)
    initial, _, _ = create_train_state(config, model, jax.random.PRNGKey(config.seed))
    _, trained = checkpointing.load_params(tmp_path / "checkpoints", step=3)
    jax.tree.map(np.testing.assert_array_equal, trained["encoder"], initial.params["encoder"])


def test_frozen_encoder_labels_every_encoder_param():
    config = tiny_config()
    config.model.encoder.frozen = True
    model = build_model(config.model)
    state, _, _ = create_train_state(config, model, jax.random.PRNGKey(0))
    labels = label_params(state.params, [("encoder/.*", "frozen"), (".*", "trainable")])
    assert set(jax.tree.leaves(labels["encoder"])) == {"frozen"}
    assert set(jax.tree.leaves(labels["decoder"])) == {"trainable"}


def test_train_rejects_missing_data_root(tmp_path):
    config = tiny_config(tmp_path / "nowhere")
    with pytest.raises(DataError, match="nowhere"):
        train_and_evaluate(config, tmp_path / "run")


def test_train_rejects_image_size_not_multiple_of_14(tmp_path):
    config = tiny_config(image_size=(50, 56))
    with pytest.raises(ConfigError, match="50x56 is invalid"):
        train_and_evaluate(config, tmp_path)


def test_train_rejects_unknown_dtype(tmp_path):
    config = tiny_config()
    config.train.dtype = "float16"
    with pytest.raises(ConfigError, match="train.dtype 'float16' is invalid"):
        train_and_evaluate(config, tmp_path)


def test_main_missing_root_prints_one_line_error(tmp_path):
    missing = tmp_path / "no_such_folder"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lasegjax.main",
            "--config=configs/demo.py",
            f"--workdir={tmp_path / 'run'}",
            f"--config.data.root={missing}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    assert str(missing) in last
    assert "Traceback" not in result.stderr
