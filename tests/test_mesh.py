"""Device meshes, logical-axis sharding, scan and remat, and multi-process training.

The equivalence tests run in subprocesses, because a process fixes its device count when
JAX starts: one with 8 simulated CPU devices, and a real two-process `jax.distributed`
job on localhost with 4 CPU devices in each process.

Tolerances: losses agree within a relative 1e-5, since only the order of floating-point
sums differs between meshes. Parameters after 3 AdamW steps at learning rate 1e-3 agree
within 3e-4 absolute. Adam divides each update by the root of its second moment, so for
a parameter whose gradient is nearly zero, rounding noise alone can move the update by
up to the learning rate per step.
"""

import json
import math
import os
import platform
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from lasegjax import checkpointing, distributed, sharding
from lasegjax.errors import ConfigError
from lasegjax.model.segmenter import build_model
from lasegjax.train import abstract_train_state
from tests.conftest import REPO, tiny_config

SCRIPTS = REPO / "tests" / "scripts"
# Faster XLA CPU compilation for the subprocess runs; every mesh gets the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
LOSS_RTOL = 1e-5
PARAM_ATOL = 3e-4


def subprocess_env(extra_xla_flags: str = "") -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{FAST_COMPILE} {extra_xla_flags}".strip()
    env["PYTHONPATH"] = str(REPO)
    env.pop("JAX_NUM_CPU_DEVICES", None)
    return env


@pytest.mark.parametrize(
    "sizes, devices, expected",
    [
        ((-1, 1, 1), 8, (8, 1, 1)),
        ((2, -1, 1), 8, (2, 4, 1)),
        ((2, 2, -1), 8, (2, 2, 2)),
        ((1, 1, 1), 1, (1, 1, 1)),
    ],
)
def test_mesh_shape_resolves_remaining(sizes, devices, expected):
    config = dict(zip(sharding.MESH_AXES, sizes, strict=True))
    assert sharding.mesh_shape(config, devices) == expected


@pytest.mark.parametrize(
    "sizes, match",
    [
        ((-1, -1, 1), "at most one -1"),
        ((0, 1, 1), "positive sizes"),
        ((3, -1, 1), "needs a multiple of 3 devices"),
        ((2, 2, 1), "has 4 devices, but there are 8"),
    ],
)
def test_mesh_shape_rejects(sizes, match):
    config = dict(zip(sharding.MESH_AXES, sizes, strict=True))
    with pytest.raises(ConfigError, match=match):
        sharding.mesh_shape(config, 8)


def test_make_mesh_default_puts_devices_on_data():
    mesh = sharding.make_mesh()
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "model": 1}


def test_check_batch_divisible_names_shards():
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "model": 1})
    sharding.check_batch_divisible(4, mesh, "train.batch_size")
    with pytest.raises(ConfigError, match="train.batch_size 3 .* 2 batch shards"):
        sharding.check_batch_divisible(3, mesh, "train.batch_size")


def test_logical_to_spec_replicates_uneven_dimensions():
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "model": 1})
    assert sharding.logical_to_spec(("embed", "qkv"), (96, 288), mesh) == PartitionSpec(
        "fsdp", None
    )
    assert sharding.logical_to_spec(("embed", "qkv"), (95, 288), mesh) == PartitionSpec(None, None)


def test_logical_to_spec_model_axis():
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "model": 2})
    assert sharding.logical_to_spec(("mlp", "embed"), (384, 96), mesh) == PartitionSpec(
        "model", None
    )


def tiny_state_shardings(mesh_config):
    config = tiny_config()
    model = build_model(config.model)
    mesh = sharding.make_mesh(mesh_config)
    _, abstract, _, _ = abstract_train_state(config, model, jax.random.PRNGKey(0))
    return abstract, sharding.tree_shardings(abstract, mesh)


def test_state_shardings_fsdp_params_and_adam_moments():
    _, shardings = tiny_state_shardings({"data": 1, "fsdp": 2, "model": 1})
    block = shardings.params["encoder"]["blocks_0"]
    assert block["attn"]["qkv"]["kernel"].spec == PartitionSpec("fsdp", None)
    assert block["attn"]["proj"]["kernel"].spec == PartitionSpec(None, "fsdp")
    assert block["mlp"]["fc1"]["kernel"].spec == PartitionSpec("fsdp", None)
    assert block["norm1"]["scale"].spec == PartitionSpec(None)
    patch = shardings.params["encoder"]["patch_embed"]["proj"]["kernel"]
    assert patch.spec == PartitionSpec(None, None, None, "fsdp")
    moment_specs = {
        str(leaf.spec)
        for path, leaf in jax.tree_util.tree_flatten_with_path(shardings.opt_state)[0]
        if "qkv" in jax.tree_util.keystr(path) and "kernel" in jax.tree_util.keystr(path)
    }
    assert moment_specs == {str(PartitionSpec("fsdp", None))}


def test_state_shardings_model_axis_splits_heads_and_mlp():
    _, shardings = tiny_state_shardings({"data": 1, "fsdp": 1, "model": 2})
    block = shardings.params["encoder"]["blocks_0"]
    assert block["attn"]["qkv"]["kernel"].spec == PartitionSpec(None, "model")
    assert block["attn"]["qkv"]["bias"].spec == PartitionSpec("model")
    assert block["mlp"]["fc2"]["kernel"].spec == PartitionSpec("model", None)
    assert shardings.step.spec == PartitionSpec()


def encoder_outputs_and_grads(scan: bool, remat: str):
    config = tiny_config()
    config.model.encoder.depth = 4
    config.model.encoder.scan = scan
    config.model.encoder.remat = remat
    model = build_model(config.model)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 56, 56, 1)), jnp.float32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), images)["params"]
    loss, grads = jax.jit(
        jax.value_and_grad(lambda p: jnp.mean(model.apply({"params": p}, images) ** 2))
    )(params)
    return params, loss, grads


def test_scan_and_remat_keep_params_and_gradients():
    reference_params, reference_loss, reference_grads = encoder_outputs_and_grads(False, "none")
    params, loss, grads = encoder_outputs_and_grads(True, "full")
    assert jax.tree.structure(params) == jax.tree.structure(reference_params)
    np.testing.assert_allclose(loss, reference_loss, rtol=1e-6)
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(reference_grads), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)


def test_remat_policy_rejects_unknown():
    config = tiny_config()
    config.model.encoder.remat = "sometimes"
    model = build_model(config.model)
    with pytest.raises(ValueError, match="remat policy 'sometimes' is invalid"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 56, 56, 1)))


def test_all_reduce_in_buckets_sums_each_array():
    """Small buckets and two dtypes, so arrays are split over several flat buckets."""
    mesh = sharding.make_mesh()
    axes = sharding.BATCH_AXES
    shapes = [(3, 4), (5,), (2, 2, 2), (7,), ()]
    dtypes = [jnp.float32, jnp.bfloat16, jnp.float32, jnp.float32, jnp.bfloat16]
    rng = np.random.default_rng(0)
    devices = mesh.devices.size
    arrays = [
        jnp.asarray(rng.normal(size=(devices, *shape)), dtype)
        for shape, dtype in zip(shapes, dtypes, strict=True)
    ]

    def reduce(*local):
        local = [a[0] for a in local]
        return tuple(sharding.all_reduce_in_buckets(local, axes, bucket_bytes=40))

    spec = PartitionSpec(axes)
    summed = jax.shard_map(
        reduce, mesh=mesh, in_specs=(spec,) * len(arrays), out_specs=(PartitionSpec(),) * 5
    )(*arrays)
    for array, result in zip(arrays, summed, strict=True):
        assert result.dtype == array.dtype
        assert result.shape == array.shape[1:]
        np.testing.assert_allclose(
            np.asarray(result, np.float32),
            np.asarray(array, np.float32).sum(axis=0),
            rtol=2e-2 if array.dtype == jnp.bfloat16 else 1e-6,
        )


@pytest.mark.parametrize("frozen", [False, True])
def test_data_parallel_gradients_match_whole_batch(frozen):
    """The shard_map gradients on 2 devices equal jax.grad of the loss of the whole batch."""
    from lasegjax.losses import segmentation_loss
    from lasegjax.train import create_train_state, data_parallel_gradients

    config = tiny_config()
    config.model.encoder.frozen = frozen
    config.train.bce_weight = 0.7
    mesh = sharding.make_mesh()
    assert mesh.shape[sharding.DATA_AXIS] == 2
    model = build_model(config.model)
    state, _, labels = create_train_state(config, model, jax.random.PRNGKey(0), mesh)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(4, 56, 56, 1)).astype(np.float32),
        "mask": (rng.random((4, 56, 56, 1)) > 0.6).astype(np.float32),
    }
    weights = (config.train.bce_weight, config.train.dice_weight)

    def whole_batch(params):
        params = jax.tree.map(
            lambda p, label: jax.lax.stop_gradient(p) if label == "frozen" else p, params, labels
        )
        logits = model.apply({"params": params}, batch["image"])
        return segmentation_loss(logits, batch["mask"], *weights)

    (loss, parts), grads = jax.jit(jax.value_and_grad(whole_batch, has_aux=True))(state.params)
    placed = jax.device_put(batch, sharding.batch_sharding(mesh))
    step = jax.jit(data_parallel_gradients(model, labels, weights, mesh))
    (dp_loss, dp_parts), dp_grads = step(state.params, placed)
    np.testing.assert_allclose(dp_loss, loss, rtol=1e-6)
    for key in parts:
        np.testing.assert_allclose(dp_parts[key], parts[key], rtol=1e-6)
    for path, expected in jax.tree_util.tree_leaves_with_path(grads):
        actual = dict(jax.tree_util.tree_leaves_with_path(dp_grads))[path]
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-7, err_msg=str(path))
    encoder_grads = jax.tree.leaves(dp_grads["encoder"])
    assert any(np.abs(g).max() > 0 for g in encoder_grads) is not frozen


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc's mallopt")
@pytest.mark.parametrize(
    "environment,expected",
    [
        ({}, True),
        ({"MALLOC_MMAP_THRESHOLD_": "65536"}, False),
        ({"MALLOC_TRIM_THRESHOLD_": "0"}, False),
    ],
)
def test_reuse_freed_memory_respects_environment(environment, expected):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | environment
    code = "from lasegjax.hostmem import reuse_freed_memory; print(reuse_freed_memory())"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(expected)


def test_distributed_off_and_bad_flags():
    distributed.initialize("off", "localhost:1", 2, 0)
    assert jax.process_count() == 1
    with pytest.raises(ConfigError, match="--distributed='maybe' is invalid"):
        distributed.initialize("maybe")
    with pytest.raises(ConfigError, match="needs --num_processes and --process_id"):
        distributed.initialize("auto", "localhost:1")


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, False),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, True),
        ({"TPU_WORKER_HOSTNAMES": "w0"}, False),
        ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, True),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ],
)
def test_cluster_detected(monkeypatch, env, expected):
    for name in (
        "SLURM_JOB_ID",
        "SLURM_NTASKS",
        "SLURM_NPROCS",
        "TPU_WORKER_HOSTNAMES",
        "JAX_COORDINATOR_ADDRESS",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert distributed.cluster_detected() is expected


def test_meshes_match_single_device():
    """Meshes (8,1,1), (2,4,1) and (2,2,2) train like one device for 3 steps."""
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "mesh_training.py"), "1,1,1", "8,1,1", "2,4,1", "2,2,2"],
        env=subprocess_env("--xla_force_host_platform_device_count=8"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(result.stdout.strip().splitlines()[-1])
    reference = runs.pop("1,1,1")
    assert runs["2,4,1"]["specs"]["qkv"] == "P('fsdp', None)"
    assert runs["2,2,2"]["specs"]["qkv"] == "P('fsdp', 'model')"
    assert runs["2,2,2"]["specs"]["fc2"] == "P('model', 'fsdp')"
    for mesh, run in runs.items():
        np.testing.assert_allclose(
            run["losses"], reference["losses"], rtol=LOSS_RTOL, err_msg=f"mesh {mesh}"
        )
        assert run["max_abs_param_diff"] < PARAM_ATOL, f"mesh {mesh}: {run}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def run_processes(workdir, mesh: str, num_steps: int, stop_at: int, num_processes: int):
    script = str(SCRIPTS / "tiny_training.py")
    args = [script, str(workdir), mesh, str(num_steps), str(stop_at)]
    if num_processes == 1:
        commands = [[sys.executable, *args]]
    else:
        port = str(free_port())
        commands = [
            [sys.executable, *args, "--process_id", str(i), "--num_processes", "2", "--port", port]
            for i in range(num_processes)
        ]
    procs = [
        subprocess.Popen(
            command,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for command in commands
    ]
    outputs = [proc.communicate(timeout=900)[0] for proc in procs]
    for index, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"process {index} failed:\n{output[-4000:]}"
    return outputs


def max_param_diff(first, second) -> float:
    diffs = jax.tree.map(
        lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), first, second
    )
    return max(jax.tree.leaves(diffs))


def test_two_processes_resume_on_other_mesh_match_one(tmp_path):
    """Two processes train 3 steps on (2,2,2), resume on (4,2,1) and match one process."""
    run_processes(tmp_path / "single", "8,1,1", 5, 0, num_processes=1)
    first = run_processes(tmp_path / "multi", "2,2,2", 5, 3, num_processes=2)
    second = run_processes(tmp_path / "multi", "4,2,1", 5, 0, num_processes=2)

    assert "Resumed from the checkpoint at step 3" in second[0]
    # Only process 0 logs progress and writes metrics.
    assert "[step 3/5]" in first[0]
    assert "[step 3/5]" not in first[1]
    records = [json.loads(line) for line in (tmp_path / "multi" / "metrics.jsonl").open()]
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == [1, 2, 3, 4, 5]
    for step in (3, 5):
        _, expected = checkpointing.load_params(tmp_path / "single" / "checkpoints", step=step)
        _, actual = checkpointing.load_params(tmp_path / "multi" / "checkpoints", step=step)
        assert max_param_diff(actual, expected) < PARAM_ATOL, f"step {step}"
    single = json.loads((tmp_path / "single" / "result.json").read_text())
    multi = json.loads((tmp_path / "multi" / "result.json").read_text())
    assert math.isclose(multi["dice"], single["dice"], rel_tol=1e-4)
