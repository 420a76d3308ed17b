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

from lasegjax.errors import ConfigError


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


def compiled_costs(compiled) -> dict:
    """Return XLA's per-device memory (bytes) and FLOPs for one call of a compiled program."""
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    result = {"flops": float((cost or {}).get("flops", 0.0))}
    if memory is not None:
        result.update(
            arguments=memory.argument_size_in_bytes,
            outputs=memory.output_size_in_bytes,
            aliased=memory.alias_size_in_bytes,
            temporaries=memory.temp_size_in_bytes,
            generated_code=memory.generated_code_size_in_bytes,
        )
        # Donated inputs share buffers with the outputs they alias.
        result["peak"] = (
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes
            + memory.generated_code_size_in_bytes
        )
    return result


def device_memory_limit() -> int | None:
    """Return the memory in bytes of one local accelerator, or None where JAX reports none."""
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def compile_and_report(jitted, *args, mesh=None):
    """Compile `jitted` for `args` ahead of time and log its per-device memory and FLOPs.

    Raises ConfigError before training starts when the program needs more memory than a
    device has. Returns the compiled program, which the training loop then calls.
    """
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    costs = compiled_costs(compiled)
    limit = device_memory_limit()
    peak = costs.get("peak")
    logging.info(
        "Compiled the train step in %.1f s: %s per device per step (arguments %s, temporaries "
        "%s), %.3g TFLOP per device per step%s.",
        time.perf_counter() - start,
        _gib(peak),
        _gib(costs.get("arguments")),
        _gib(costs.get("temporaries")),
        costs["flops"] / 1e12,
        f", device memory {_gib(limit)}" if limit else "",
    )
    if limit and peak and peak > limit:
        shape = dict(mesh.shape) if mesh is not None else "?"
        raise ConfigError(
            f"the train step needs {_gib(peak)} per device but each device has {_gib(limit)} "
            f"(mesh {shape}). Lower train.batch_size, raise mesh.fsdp, set "
            "model.encoder.remat=full, or use train.dtype=bfloat16"
        )
    return compiled


def _gib(value) -> str:
    return "?" if value is None else f"{value / 2**30:.2f} GiB"
