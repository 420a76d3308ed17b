"""Training and periodic validation of the segmenter.

The train step is a pure function (state, batch) -> (state, metrics), jitted once with
explicit shardings on the device mesh and the state donated. Frozen parameters pass
through `jax.lax.stop_gradient`, so no gradient is computed for them, and optax gives
them zero updates. With several processes (hosts), each reads its own data shards and
feeds its part of every batch; only process 0 writes logs, metrics and evaluation files.
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
import numpy as np
import optax

from lasegjax import checkpointing, estimates, sharding
from lasegjax.data.datasets import load_datasets
from lasegjax.data.pipeline import check_image_size, train_dataset
from lasegjax.distributed import is_primary
from lasegjax.errors import ConfigError, LasegError
from lasegjax.evaluation import evaluate_volumes, make_predict_fn
from lasegjax.interrupts import StopRequest
from lasegjax.losses import loss_from_sums, loss_sums, segmentation_loss
from lasegjax.model.fusion import fusion_weights
from lasegjax.model.segmenter import build_model
from lasegjax.optim import FROZEN, build_optimizer, learning_rate_schedule
from lasegjax.reporting import NullWriter, Progress, ScalarWriter, setup_logging
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


def sample_input(config) -> jax.ShapeDtypeStruct:
    """Return the shape of a one-slice model input for the configured size and context."""
    height, width = check_image_size(config.data.image_size, config.model.encoder.patch_size)
    channels = 2 * config.data.context_slices + 1
    return jax.ShapeDtypeStruct((1, height, width, channels), jnp.float32)


def init_params(model, config, rng):
    """Initialise parameters for the configured input size (on the default device)."""
    sample = sample_input(config)
    return jax.jit(model.init)(rng, jnp.zeros(sample.shape, sample.dtype))["params"]


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


def abstract_train_state(config, model, rng):
    """Return (init function, abstract state, tx, labels) without allocating any array.

    The init function maps nothing to a freshly initialised `TrainState`.
    """
    sample = sample_input(config)
    params_shape = jax.eval_shape(model.init, rng, sample)["params"]
    tx, labels = build_optimizer(config, params_shape)
    rng = np.asarray(jax.random.key_data(rng)) if _is_typed_key(rng) else np.asarray(rng)

    def init_state():
        init_rng, state_rng = jax.random.split(jnp.asarray(rng))
        params = model.init(init_rng, jnp.zeros(sample.shape, sample.dtype))["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng
        )

    return init_state, jax.eval_shape(init_state), tx, labels


def _is_typed_key(rng) -> bool:
    return jnp.issubdtype(getattr(rng, "dtype", None), jax.dtypes.prng_key)


def create_train_state(config, model, rng, mesh=None):
    """Return (state, tx, labels) with fresh parameters and optimizer state on `mesh`.

    Each array is created directly in its shards (`sharding.tree_shardings`), so a
    device stores only its own shards of the state. Converted encoder weights, if
    configured, are placed into the same shards from host memory.
    """
    mesh = mesh or sharding.make_mesh(config.get("mesh"))
    init_state, abstract, tx, labels = abstract_train_state(config, model, rng)
    shardings = sharding.tree_shardings(abstract, mesh)
    state = jax.jit(init_state, out_shardings=shardings)()
    # Loaded weights arrive as host (NumPy) arrays; the rest stay where they are.
    params = jax.tree.map(
        lambda value, target: (
            value
            if isinstance(value, jax.Array)
            else sharding.global_array_from_host(value, target)
        ),
        load_encoder_checkpoint(config, state.params),
        shardings.params,
    )
    return state.replace(params=params), tx, labels


def loss_and_gradients(model, labels, config, mesh):
    """Return (params, batch) -> ((loss, {"bce", "dice_loss"}), grads) for the train step.

    Frozen parameters (by `labels`) pass through `jax.lax.stop_gradient`. When the mesh
    only splits the batch, `data_parallel_gradients` computes the gradients. Otherwise
    XLA's partitioner inserts the gradient reductions and parameter gathers.
    """
    weights = (config.train.bce_weight, config.train.dice_weight)
    if sharding.params_replicated(mesh):
        return data_parallel_gradients(model, labels, weights, mesh)

    def loss_fn(params, batch):
        params = jax.tree.map(
            lambda p, label: jax.lax.stop_gradient(p) if label == FROZEN else p, params, labels
        )
        logits = model.apply({"params": params}, batch["image"])
        return segmentation_loss(logits, batch["mask"], *weights)

    return jax.value_and_grad(loss_fn, has_aux=True)


def make_train_step(model, tx, labels, config, mesh, state_shardings):
    """Return the jitted train step; the input state's buffers are donated to the output.

    The batch is split over the mesh's data and fsdp axes and the state laid out by
    `state_shardings`.
    """
    schedule = learning_rate_schedule(config.train)
    value_and_grad = loss_and_gradients(model, labels, config, mesh)

    def train_step(state: TrainState, batch):
        (loss, parts), grads = value_and_grad(state.params, batch)
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

    return jax.jit(
        train_step,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def data_parallel_gradients(model, labels, loss_weights, mesh):
    """Return (params, batch) -> ((loss, parts), grads) for replicated parameters.

    Each device computes, from its part of the batch, the gradient of the whole batch's
    loss with respect to its own copy of the trainable parameters. The loss sums are added
    over the mesh first, so the loss is that of the whole batch. The gradients are then
    summed over the mesh in a few flat buckets (`sharding.all_reduce_in_buckets`), where
    XLA's partitioner would emit one all-reduce of a tuple with an operand per parameter.
    Frozen parameters get zero gradients without an all-reduce.

    NOTE: the bucket copies may add up to one more copy of the trainable gradients at
    peak. This was not measured for a trained L/14 or g/14 encoder, which should use an
    fsdp mesh (and so the partitioner's path) for its optimizer state anyway.
    """
    axes = sharding.BATCH_AXES
    trainable = [label != FROZEN for label in jax.tree.leaves(labels)]

    def local(params, batch):
        leaves, treedef = jax.tree.flatten(params)
        if len(leaves) != len(trainable):
            raise ValueError(
                f"the parameters have {len(leaves)} leaves but the optimizer labels have "
                f"{len(trainable)}; build the labels from these parameters"
            )
        count = batch["mask"].size * jax.lax.axis_size(axes)

        def loss_of(own):
            own = iter(own)
            full = [
                next(own) if t else jax.lax.stop_gradient(p)
                for p, t in zip(leaves, trainable, strict=True)
            ]
            logits = model.apply({"params": treedef.unflatten(full)}, batch["image"])
            sums = jax.lax.psum(loss_sums(logits, batch["mask"]), axes)
            return loss_from_sums(sums, count, *loss_weights)

        # Varying copies, so that each device's gradient stays its own until the buckets.
        own = [
            jax.lax.pcast(p, axes, to="varying")
            for p, t in zip(leaves, trainable, strict=True)
            if t
        ]
        value, own_grads = jax.value_and_grad(loss_of, has_aux=True)(own)
        own_grads = iter(sharding.all_reduce_in_buckets(own_grads, axes))
        grads = [
            next(own_grads) if t else jnp.zeros_like(p)
            for p, t in zip(leaves, trainable, strict=True)
        ]
        return value, treedef.unflatten(grads)

    spec = jax.sharding.PartitionSpec
    return jax.shard_map(
        local, mesh=mesh, in_specs=(spec(), spec(axes)), out_specs=((spec(), spec()), spec())
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
    """Validate on every volume; every process predicts, process 0 writes the files."""
    start = time.perf_counter()
    output_dir = workdir / "eval" / f"step_{step:07d}" if is_primary() else None
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


def _check_loss_finite(metrics, step: int, last_saved, directory) -> None:
    loss = float(jax.device_get(metrics["loss"]))
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"the training loss is {loss} at step {step}; stopping without saving. The last "
            f"good checkpoint is step {last_saved} in {directory}, and it is kept. Lower "
            "train.learning_rate or check the input data for bad values"
        )


def data_shards(config) -> tuple[int, list[int]]:
    """Return (number of data shards, the shards this process reads)."""
    processes, index = jax.process_count(), jax.process_index()
    num_shards = config.data.get("shards", 0) or processes
    if num_shards % processes:
        raise ConfigError(
            f"data.shards is {num_shards}, which does not split evenly over {processes} "
            f"processes; use a multiple of {processes}, or 0 for one shard per process"
        )
    if config.train.batch_size % num_shards:
        raise ConfigError(
            f"train.batch_size {config.train.batch_size} does not split evenly over "
            f"{num_shards} data shards; use a multiple of {num_shards}"
        )
    per_process = num_shards // processes
    return num_shards, list(range(index * per_process, (index + 1) * per_process))


def _global_batch(local_batch: dict, batch_sharding) -> dict:
    return {
        key: jax.make_array_from_process_local_data(batch_sharding, value)
        for key, value in local_batch.items()
    }


def _abstract_batch(config, batch_sharding) -> dict:
    sample = sample_input(config)
    batch = config.train.batch_size
    return {
        "image": jax.ShapeDtypeStruct(
            (batch, *sample.shape[1:]), jnp.float32, sharding=batch_sharding
        ),
        "mask": jax.ShapeDtypeStruct(
            (batch, *sample.shape[1:3], 1), jnp.float32, sharding=batch_sharding
        ),
    }


def train_and_evaluate(config, workdir: str | Path) -> dict:
    """Train the model in `config`, validating and checkpointing into `workdir`.

    A run restarted in the same workdir resumes from its latest checkpoint, on the same or
    another mesh. Returns the final validation summary, with the best validation Dice and
    its step.
    """
    workdir = Path(workdir)
    primary = is_primary()
    setup_logging(workdir if primary else None, quiet=not primary)
    # Before the config is saved and the model built, so both use the checkpoint's resize.
    apply_checkpoint_recipe(config)
    if primary:
        save_resolved_config(config, workdir)
    logging.info(
        "Workdir: %s. JAX backend: %s, %d device(s) in %d process(es).",
        workdir.absolute(),
        jax.default_backend(),
        jax.device_count(),
        jax.process_count(),
    )

    jax.config.update("jax_default_prng_impl", config.prng_impl)
    dtype = compute_dtype(config)
    model = build_model(config.model, dtype)
    estimates.log_estimate(config, model)
    mesh = sharding.make_mesh(config.get("mesh"))
    sharding.log_mesh(mesh)
    sharding.check_batch_divisible(config.train.batch_size, mesh, "train.batch_size")
    sharding.check_batch_divisible(config.eval.batch_size, mesh, "eval.batch_size")
    num_shards, shards = data_shards(config)
    train_volumes, val_volumes = load_datasets(config, workdir, num_shards, shards)

    rng = jax.random.PRNGKey(config.seed)
    state, tx, labels = create_train_state(config, model, rng, mesh)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    logging.info(sharding.describe_shardings(state.params, state_shardings.params) + ".")
    manager = checkpointing.make_manager(workdir / "checkpoints", config.train.keep_checkpoints)
    latest, state = checkpointing.restore_latest(manager, state)
    if latest is not None:
        logging.info("Resumed from the checkpoint at step %d in %s.", latest, manager.directory)

    batch_sharding = sharding.batch_sharding(mesh)
    train_step = make_train_step(model, tx, labels, config, mesh, state_shardings)
    train_step = estimates.compile_and_report(
        train_step, state, _abstract_batch(config, batch_sharding), mesh=mesh
    )
    predict_fn = make_predict_fn(model, mesh)
    start_step = int(state.step)
    local_batch = config.train.batch_size // jax.process_count()
    data_iter = iter(
        train_dataset(train_volumes, config.data, local_batch, config.seed, start_step)
    )
    writer = ScalarWriter(workdir) if primary else NullWriter()
    num_steps = config.train.num_steps
    stop_at = config.train.get("stop_at_step", 0) or num_steps
    progress = Progress(start_step, num_steps)
    fusion_taps = model.encoder.taps
    summary = {}
    last_saved = latest

    logging.info("Training from step %d to %d.", start_step, num_steps)
    step = start_step
    train_config = config.train
    try:
        with StopRequest() as stop:
            while step < min(num_steps, stop_at):
                batch = _global_batch(next(data_iter), batch_sharding)
                state, metrics = train_step(state, batch)
                step += 1
                stopping = stop.requested()
                due_log = step % train_config.log_every == 0 or step in (num_steps, start_step + 1)
                due_eval = step % train_config.eval_every == 0 or step == num_steps
                due_save = step % train_config.checkpoint_every == 0 or step == stop_at
                if due_log:
                    _log_step(step, metrics, progress, writer, fusion_taps)
                if due_log or due_eval or due_save or stopping:
                    # Never save parameters that a non-finite loss may have corrupted.
                    _check_loss_finite(metrics, step, last_saved, manager.directory)
                if due_eval:
                    summary = _evaluate(
                        predict_fn, state.params, val_volumes, config, workdir, step, writer
                    )
                    metrics_to_save = {"val_dice": summary["dice"]}
                    checkpointing.save(manager, step, state, metrics_to_save, force=True)
                    last_saved = step
                elif due_save or stopping:
                    checkpointing.save(manager, step, state, force=True)
                    last_saved = step
                if stopping:
                    logging.warning(
                        "Stopped by %s at step %d; the checkpoint is saved in %s. Run the same "
                        "command again to resume.",
                        stop.signal_name or "a signal on another process",
                        step,
                        manager.directory,
                    )
                    summary = dict(summary, stopped_at_step=step)
                    break
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
    if primary:
        (workdir / "result.json").write_text(json.dumps(result, indent=2))
    manager.close()
    return result
