"""Training and periodic validation of the segmenter.

The train step is a pure function (state, batch) -> (state, metrics), jitted once with
the state donated. Frozen parameters pass through `jax.lax.stop_gradient`, so no
gradient is computed for them, and optax gives them zero updates.
"""

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from lasegjax import checkpointing, estimates, sharding
from lasegjax.data.datasets import load_datasets
from lasegjax.data.pipeline import check_image_size, train_dataset
from lasegjax.errors import ConfigError, LasegError
from lasegjax.evaluation import evaluate_volumes, make_predict_fn
from lasegjax.losses import segmentation_loss
from lasegjax.model.fusion import fusion_weights
from lasegjax.model.segmenter import build_model
from lasegjax.optim import FROZEN, build_optimizer, learning_rate_schedule
from lasegjax.reporting import Progress, ScalarWriter, setup_logging
from weights_conversion.checkpoint import apply_checkpoint_recipe, load_encoder_params


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


class NonFiniteLossError(LasegError, FloatingPointError):
    """The training loss became NaN or infinite."""


def compute_dtype(config):
    names = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if config.train.dtype not in names:
        raise ConfigError(
            f"train.dtype {config.train.dtype!r} is invalid: use one of {list(names)}"
        )
    return names[config.train.dtype]


def init_params(model, config, rng):
    """Initialise parameters for the configured input size."""
    height, width = check_image_size(config.data.image_size, config.model.encoder.patch_size)
    channels = 2 * config.data.context_slices + 1
    sample = jnp.zeros((1, height, width, channels), jnp.float32)
    return jax.jit(model.init)(rng, sample)["params"]


def load_encoder_checkpoint(config, params):
    """Replace the encoder's parameters by converted DINOv2 weights, if a checkpoint is set.

    The checkpoint comes from `python -m weights_conversion.to_flax`. Its size and register
    count must match `model.encoder` (else CheckpointError). The config's position-embedding
    resize must be the one the checkpoint recorded, which `apply_checkpoint_recipe` sets
    (else ConfigError).
    """
    path = config.model.encoder.checkpoint
    if not path:
        logging.warning(
            "model.encoder.checkpoint is empty: the %s encoder is RANDOMLY INITIALISED, not "
            "pretrained DINOv2. Pass --config.model.encoder.checkpoint=DIR with converted "
            "weights for the paper's setup.",
            config.model.encoder.size,
        )
        return params
    return load_encoder_params(config, params)


def create_train_state(config, model, rng):
    """Return (state, tx, labels) with freshly initialised parameters and optimizer state."""
    init_rng, state_rng = jax.random.split(rng)
    params = init_params(model, config, init_rng)
    params = load_encoder_checkpoint(config, params)
    tx, labels = build_optimizer(config, params)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng
    )
    return state, tx, labels


def make_train_step(model, tx, labels, config, mesh):
    """Return the jitted train step; the input state's buffers are donated to the output.

    The batch is split over the mesh's data axis and the state is replicated, so XLA
    averages the gradients across devices.
    """
    train_config = config.train
    schedule = learning_rate_schedule(train_config)

    def loss_fn(params, batch):
        params = jax.tree.map(
            lambda p, label: jax.lax.stop_gradient(p) if label == FROZEN else p, params, labels
        )
        logits = model.apply({"params": params}, batch["image"])
        return segmentation_loss(
            logits, batch["mask"], train_config.bce_weight, train_config.dice_weight
        )

    def train_step(state: TrainState, batch):
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            **parts,
            "grad_norm": optax.global_norm(grads),
            "param_norm": optax.global_norm(params),
            "update_norm": optax.global_norm(updates),
            "learning_rate": schedule(state.step),
        }
        weights = fusion_weights(params)
        if weights is not None:
            for i in range(weights.shape[0]):
                metrics[f"fusion_weight_{i}"] = weights[i]
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    state_sharding = sharding.replicated(mesh)
    return jax.jit(
        train_step,
        in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
        out_shardings=(state_sharding, state_sharding),
        donate_argnums=(0,),
    )


def save_resolved_config(config, workdir: Path) -> None:
    """Write the config in force to `config.json`, keeping any earlier one from a resumed run."""
    path = workdir / "config.json"
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if path.exists() and path.read_text() != text:
        previous = workdir / f"config.{int(time.time())}.json"
        path.replace(previous)
        logging.warning(
            "The config differs from the one this workdir was started with; the "
            "old one is kept as %s.",
            previous,
        )
    path.write_text(text)


def _log_step(step, metrics, progress, writer, fusion_taps):
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    line, rate = progress.line(step, {k: scalars[k] for k in ("loss", "learning_rate")})
    if "fusion_weight_0" in scalars:
        weights = (scalars[f"fusion_weight_{i}"] for i in range(len(fusion_taps)))
        weight_texts = (f"b{tap}:{w:.3f}" for tap, w in zip(fusion_taps, weights, strict=True))
        line += " | fusion " + " ".join(weight_texts)
    logging.info(line)
    writer.write(
        step, {f"train/{k}": v for k, v in scalars.items()} | {"train/steps_per_second": rate}
    )
    return scalars


def _evaluate(predict_fn, params, volumes, config, workdir, step, writer):
    start = time.perf_counter()
    output_dir = workdir / "eval" / f"step_{step:07d}"
    summary, rows = evaluate_volumes(predict_fn, params, volumes, config, output_dir, step)
    per_case = ", ".join(f"{r['case']} {r.get('dice', float('nan')):.3f}" for r in rows)
    logging.info(
        "[step %d] validation: mean Dice %.4f, mean IoU %.4f over %d volumes (%.1f s). Per "
        "volume: %s",
        step,
        summary["dice"],
        summary["iou"],
        len(rows),
        time.perf_counter() - start,
        per_case,
    )
    writer.write(step, {"val/dice": summary["dice"], "val/iou": summary["iou"]})
    return summary


def train_and_evaluate(config, workdir: str | Path) -> dict:
    """Train the model in `config`, validating and checkpointing into `workdir`.

    A run restarted in the same workdir resumes from its latest checkpoint. Returns the
    final validation summary, with the best validation Dice and its step.
    """
    workdir = Path(workdir)
    setup_logging(workdir)
    # Before the config is saved and the model built, so both use the checkpoint's resize.
    apply_checkpoint_recipe(config)
    save_resolved_config(config, workdir)
    logging.info(
        "Workdir: %s. JAX backend: %s, %d device(s).",
        workdir.absolute(),
        jax.default_backend(),
        jax.device_count(),
    )

    jax.config.update("jax_default_prng_impl", config.prng_impl)
    dtype = compute_dtype(config)
    model = build_model(config.model, dtype)
    estimates.log_estimate(config, model)
    train_volumes, val_volumes = load_datasets(config, workdir)

    mesh = sharding.make_mesh()
    sharding.check_batch_divisible(config.train.batch_size, mesh, "train.batch_size")
    sharding.check_batch_divisible(config.eval.batch_size, mesh, "eval.batch_size")
    rng = jax.random.PRNGKey(config.seed)
    state, tx, labels = create_train_state(config, model, rng)
    state = jax.device_put(state, sharding.replicated(mesh))
    data_iter = iter(
        train_dataset(train_volumes, config.data, config.train.batch_size, seed=config.seed)
    )
    manager = checkpointing.make_manager(workdir / "checkpoints", config.train.keep_checkpoints)
    latest = manager.latest_step()
    if latest is not None:
        state = checkpointing.restore(manager, latest, state, data_iter)
        logging.info("Resumed from the checkpoint at step %d in %s.", latest, manager.directory)

    train_step = make_train_step(model, tx, labels, config, mesh)
    predict_fn = make_predict_fn(model, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    writer = ScalarWriter(workdir)
    num_steps = config.train.num_steps
    stop_at = config.train.get("stop_at_step", 0) or num_steps
    start_step = int(state.step)
    progress = Progress(start_step, num_steps)
    fusion_taps = model.encoder.taps
    summary = {}
    last_saved = latest

    logging.info("Training from step %d to %d.", start_step, num_steps)
    step = start_step
    try:
        while step < min(num_steps, stop_at):
            batch = jax.device_put(next(data_iter), batch_sharding)
            state, metrics = train_step(state, batch)
            step += 1
            if step % config.train.log_every == 0 or step == num_steps or step == start_step + 1:
                scalars = _log_step(step, metrics, progress, writer, fusion_taps)
                if not math.isfinite(scalars["loss"]):
                    raise NonFiniteLossError(
                        f"the training loss is {scalars['loss']} at step {step}; stopping. The "
                        f"last good checkpoint is step {last_saved} in {manager.directory}. "
                        "Lower train.learning_rate or check the input data for bad values"
                    )
            if step % config.train.eval_every == 0 or step == num_steps:
                summary = _evaluate(
                    predict_fn, state.params, val_volumes, config, workdir, step, writer
                )
                checkpointing.save(
                    manager, step, state, data_iter, {"val_dice": summary["dice"]}, force=True
                )
                last_saved = step
            elif step % config.train.checkpoint_every == 0 or step == stop_at:
                checkpointing.save(manager, step, state, data_iter, force=True)
                last_saved = step
    finally:
        writer.close()
        manager.wait_until_finished()

    best_step = manager.best_step()
    result = dict(summary)
    if best_step is not None:
        result["best_step"] = best_step
        best_metrics = manager.metrics(best_step) if hasattr(manager, "metrics") else None
        if best_metrics:
            result["best_dice"] = best_metrics["val_dice"]
        logging.info("Best validation Dice %s at step %d.", result.get("best_dice"), best_step)
    (workdir / "result.json").write_text(json.dumps(result, indent=2))
    manager.close()
    return result
