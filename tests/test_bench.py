"""Smoke tests of the benchmark scripts in bench/, each run once with the smallest settings.

Each script runs in its own process, because it chooses the number of XLA CPU devices
before JAX starts. The processes share one persistent compilation cache, which helps
when the tests run again.
"""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import LA_H5, LASCARQS_COPY, REPO, require

TINY_MODEL = [
    "--override",
    "model.encoder.depth=1",
    "--override",
    "model.encoder.num_taps=1",
    "--override",
    "model.decoder.channels=(8,8)",
    "--max_wait",
    "0",
]


@pytest.fixture(scope="module")
def environment(tmp_path_factory):
    cache = tmp_path_factory.mktemp("bench_jax_cache")
    return dict(
        os.environ,
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
        # Faster, less optimised XLA compiles: these runs check that the scripts work, and
        # their timings mean nothing.
        XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
    )


def run_script(name: str, arguments: list[str], environment: dict) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / name), *arguments, *TINY_MODEL],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def train_step_report(environment):
    pytest.importorskip("torch")
    arguments = ["--image_size", "28", "--batch_size", "2", "--steps", "2", "--blocks", "2"]
    arguments += ["--warmup", "1", "--num_batches", "1", "--no-breakdown"]
    return run_script("train_step_vs_torch.py", arguments, environment)


def test_train_step_bench_reports_ratio(train_step_report):
    assert re.search(r"\| ratio Flax / torch \| \*\*\d+\.\d\d\*\* \|", train_step_report)


def test_train_step_bench_first_losses_agree(train_step_report):
    # Same initial weights, batch and loss, so the first step's losses must match.
    match = re.search(r"first step: Flax ([\d.]+), torch ([\d.]+)", train_step_report)
    assert float(match.group(1)) == pytest.approx(float(match.group(2)), rel=1e-4)


def test_train_step_bench_names_machine(train_step_report):
    assert re.search(r"Machine: .+, \d+ cores", train_step_report)


def test_pipeline_bench_reports_rates(environment):
    require(LA_H5)
    # A given step time skips compiling the train step, which the train-step test covers.
    arguments = ["--image_size", "28", "--batch_size", "2", "--max_cases", "3"]
    arguments += ["--batches", "2", "--warmup_batches", "1", "--step_time", "0.1"]
    report = run_script("pipeline_throughput.py", arguments, environment)
    assert re.search(r"\| pipeline alone \| [\d.]+ \(median [\d.]+\) \|", report)
    assert "the pipeline keeps up" in report


def test_pipeline_bench_rejects_missing_data(environment, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "pipeline_throughput.py")]
        + ["--data_root", str(tmp_path / "missing"), "--max_wait", "0"],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert f"data folder {tmp_path / 'missing'} not found" in result.stderr


def test_predict_bench_reports_both_modes(environment):
    image = require(LASCARQS_COPY / "train_data" / "train_1" / "enhanced.nii.gz")
    arguments = ["--input", str(image), "--override", "data.image_size=(28,28)"]
    arguments += ["--batch_size", "44", "--repeats", "1", "--no-memory_analysis"]
    report = run_script("predict_volume.py", arguments, environment)
    assert "88 slices of 183x140 voxels" in report
    assert re.search(r"\| none \| [\d.]+ \([\d.]+\) \|", report)
    assert re.search(r"\| flip \| [\d.]+ \([\d.]+\) \|", report)
