"""Rough memory and step-time estimates printed before a run starts on a CPU.

Training a large encoder on a CPU is possible but slow; the estimate lets a user stop
before committing hours. FLOPs come from XLA's cost analysis of the lowered (not
compiled) train step, the CPU's speed from a short matrix-multiply probe, and memory
from parameter, optimizer and activation sizes.
"""

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np


def _matmul_flops_per_second(size: int = 512, repeats: int = 5) -> float:
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        matmul(a).block_until_ready()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def forward_flops(model, config) -> float:
    """Return XLA's FLOP count for one forward pass over one training batch."""
    height, width = config.data.image_size
    batch = config.train.batch_size
    images = jax.ShapeDtypeStruct((batch, height, width, 1), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    lowered = jax.jit(model.apply).lower(variables, images)
    cost = lowered.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost.get("flops", 0.0)) if cost else 0.0


def estimate(config, model) -> dict:
    """Return estimated parameter count, memory in GiB and seconds per train step."""
    height, width = config.data.image_size
    batch = config.train.batch_size
    images = jax.ShapeDtypeStruct((1, height, width, 1), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)["params"]
    encoder_count = sum(np.prod(p.shape) for p in jax.tree.leaves(params["encoder"]))
    total_count = sum(np.prod(p.shape) for p in jax.tree.leaves(params))
    trainable = total_count - encoder_count if config.model.encoder.frozen else total_count
    flops = forward_flops(model, config)
    # Backward costs about twice the forward for trainable parts; a frozen encoder is
    # run forward only.
    encoder_share = encoder_count / max(total_count, 1)
    step_flops = flops * (
        3.0 if not config.model.encoder.frozen else 1.0 + 2.0 * (1 - encoder_share)
    )
    # Activations kept for the backward pass: decoder feature maps at every stage, plus
    # every encoder block's inputs when the encoder trains.
    channels = list(config.model.decoder.channels)
    decoder_act = sum(
        batch * height * width / 4 ** (len(channels) - 1 - i) * (c + 1) * 6
        for i, c in enumerate(channels)
    )
    tokens = (height // config.model.encoder.patch_size) * (
        width // config.model.encoder.patch_size
    )
    encoder_act = (
        0
        if config.model.encoder.frozen
        else batch * tokens * model.encoder.width * 12 * model.encoder.depth
    )
    bytes_total = 4 * (total_count + 3 * trainable) + 4 * (decoder_act + encoder_act)
    return {
        "parameters": int(total_count),
        "trainable": int(trainable),
        "memory_gib": bytes_total / 2**30,
        "step_flops": step_flops,
        "step_seconds": step_flops / _matmul_flops_per_second(),
    }


def log_estimate(config, model) -> None:
    """On a CPU backend, log estimated memory and step time for the encoders larger than S/14."""
    if jax.default_backend() != "cpu" or config.model.encoder.size in ("tiny", "small"):
        return
    result = estimate(config, model)
    logging.warning(
        "Running the %s encoder on a CPU. Estimate for batch %d at %dx%d: %.2f B parameters "
        "(%.1f M trainable), about %.1f GiB of memory and %.0f s per train step (%.1f TFLOP "
        "per step). Set --config.train.batch_size or --config.data.image_size lower, or run "
        "on an accelerator.",
        config.model.encoder.size,
        config.train.batch_size,
        *config.data.image_size,
        result["parameters"] / 1e9,
        result["trainable"] / 1e6,
        result["memory_gib"],
        result["step_seconds"],
        result["step_flops"] / 1e12,
    )
