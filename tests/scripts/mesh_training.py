"""Train a tiny segmenter for a few steps on several device meshes and print the results.

Run as a separate process, because the device count is fixed when JAX starts:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/scripts/mesh_training.py \\
      1,1,1 8,1,1 2,4,1 2,2,2

Prints one JSON object: per mesh, the loss at each step and the largest absolute and
relative parameter difference from the first mesh.
"""

import json
import math
import sys

import jax
import numpy as np

from lasegjax import sharding
from lasegjax.config import base_config
from lasegjax.model.segmenter import build_model
from lasegjax.train import create_train_state, make_train_step

STEPS = 3
BATCH = 8


def tiny_mesh_config(sizes):
    config = base_config()
    config.data.image_size = (28, 28)
    config.model.encoder.size = "tiny"
    config.model.encoder.depth = 2
    config.model.encoder.num_taps = 1
    config.model.encoder.frozen = False
    config.model.encoder.scan = True
    config.model.encoder.remat = "full"
    config.model.decoder.channels = (16, 8)
    config.train.batch_size = BATCH
    config.train.num_steps = 10
    config.train.warmup_steps = 1
    config.train.learning_rate = 1e-3
    config.train.dice_weight = 1.0
    config.mesh.data, config.mesh.fsdp, config.mesh.model = sizes
    return config


def batches(config):
    rng = np.random.default_rng(0)
    height, width = config.data.image_size
    for _ in range(STEPS):
        image = rng.normal(size=(BATCH, height, width, 1)).astype(np.float32)
        yy, xx = np.mgrid[:height, :width]
        centres = rng.uniform(8, 20, size=(BATCH, 2))
        mask = (yy[None] - centres[:, :1, None]) ** 2 + (xx[None] - centres[:, 1:, None]) ** 2
        mask = (mask < 36).astype(np.float32)[..., None]
        yield {"image": image + 2 * mask, "mask": mask}


def train(sizes):
    config = tiny_mesh_config(sizes)
    model = build_model(config.model)
    devices = jax.devices()[: math.prod(sizes)]
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    state, tx, labels = create_train_state(config, model, jax.random.PRNGKey(0), mesh)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    train_step = make_train_step(model, tx, labels, config, mesh, shardings)
    batch_sharding = sharding.batch_sharding(mesh)
    losses = []
    for batch in batches(config):
        batch = {k: sharding.global_array_from_host(v, batch_sharding) for k, v in batch.items()}
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    specs = {
        "qkv": str(state.params["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"].sharding.spec),
        "fc2": str(state.params["encoder"]["blocks_0"]["mlp"]["fc2"]["kernel"].sharding.spec),
    }
    return losses, jax.tree.map(np.asarray, state.params), specs


def main(mesh_args):
    jax.config.update("jax_default_prng_impl", "rbg")
    meshes = [tuple(int(v) for v in arg.split(",")) for arg in mesh_args]
    results = {}
    reference = None
    for sizes in meshes:
        losses, params, specs = train(sizes)
        if reference is None:
            reference = params
        diffs = jax.tree.leaves(
            jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params, reference)
        )
        scales = jax.tree.leaves(jax.tree.map(lambda b: float(np.abs(b).max()) + 1e-12, reference))
        results[",".join(map(str, sizes))] = {
            "losses": losses,
            "max_abs_param_diff": max(diffs),
            "max_rel_param_diff": max(d / s for d, s in zip(diffs, scales, strict=True)),
            "specs": specs,
        }
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
