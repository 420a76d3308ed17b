"""Faults during training: stop signals, a non-finite loss, an unreadable checkpoint."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from lasegjax import checkpointing
from lasegjax.interrupts import StopRequest
from lasegjax.train import NonFiniteLossError, train_and_evaluate
from tests.conftest import REPO, tiny_config
from tests.scripts.tiny_training import tiny_training_config


def test_stop_request_second_signal_aborts():
    previous = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested()
        assert stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


def test_sigterm_saves_checkpoint_and_next_run_resumes(tmp_path):
    workdir = tmp_path / "run"
    command = [
        sys.executable,
        str(REPO / "tests" / "scripts" / "tiny_training.py"),
        str(workdir),
        "2,1,1",
        "100000",
        "0",
        "--devices",
        "2",
    ]
    # Share compiled programs with this test process, which resumes the same config.
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        JAX_COMPILATION_CACHE_DIR=str(jax.config.jax_compilation_cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = []
    try:
        for line in proc.stdout:
            output.append(line)
            if "[step 2/" in line:
                proc.send_signal(signal.SIGTERM)
                break
        output.extend(proc.stdout)
        proc.wait(timeout=300)
    finally:
        proc.kill()
    text = "".join(output)
    assert proc.returncode == 0, text[-3000:]
    assert "Received SIGTERM" in text
    stopped = json.loads((workdir / "result.json").read_text())["stopped_at_step"]
    assert stopped >= 2
    assert f"Stopped by SIGTERM at step {stopped}" in text
    assert checkpointing.make_manager(workdir / "checkpoints", 3).latest_step() == stopped

    config = tiny_training_config("2,1,1", 100000, stopped + 1)
    train_and_evaluate(config, workdir)
    log = (workdir / "train.log").read_text()
    assert f"Resumed from the checkpoint at step {stopped}" in log
    assert checkpointing.make_manager(workdir / "checkpoints", 3).latest_step() == stopped + 1


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    config = tiny_config()
    config.train.learning_rate = 1e30
    config.train.warmup_steps = 0
    config.train.checkpoint_every = 1
    with pytest.raises(NonFiniteLossError, match=r"at step (\d+).* last good checkpoint is step"):
        train_and_evaluate(config, tmp_path)
    manager = checkpointing.make_manager(tmp_path / "checkpoints", 3)
    last = manager.latest_step()
    manager.close()
    assert last is not None
    step, params = checkpointing.load_params(tmp_path / "checkpoints", step=last)
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(params))


def damage_checkpoint(step_dir):
    """Overwrite every array data file of an orbax checkpoint with random bytes."""
    files = [path for path in step_dir.rglob("*") if path.is_file() and path.parent.name == "d"]
    assert files, f"no array data files under {step_dir}"
    rng = np.random.default_rng(0)
    for path in files:
        path.write_bytes(rng.bytes(64))


def test_unreadable_latest_checkpoint_falls_back_to_previous(tmp_path):
    train_and_evaluate(tiny_config(), tmp_path)
    _, expected = checkpointing.load_params(tmp_path / "checkpoints", step=6)
    damage_checkpoint(tmp_path / "checkpoints" / "6")

    train_and_evaluate(tiny_config(), tmp_path)

    log = (tmp_path / "train.log").read_text()
    assert "The checkpoint at step 6" in log
    assert "cannot be read" in log
    assert "Resumed from the checkpoint at step 3" in log
    assert (tmp_path / "checkpoints_unreadable" / "6").is_dir()
    step, actual = checkpointing.load_params(tmp_path / "checkpoints", step=6)
    assert step == 6
    jax.tree.map(np.testing.assert_array_equal, actual, expected)
