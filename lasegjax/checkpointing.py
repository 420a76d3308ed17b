"""One orbax CheckpointManager for the train state.

The manager keeps the latest `keep` checkpoints plus the one with the best validation
Dice. orbax writes each step into a temporary folder and renames it when complete, so an
interrupted save never replaces a good checkpoint. Arrays are saved sharded, each host
writing its own shards, and restore onto whatever shardings the target state has, so a
run can resume on another mesh or number of hosts. The position in the training data is
the step itself (see `train_dataset`), so no data-iterator state is saved.
"""

import logging
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from lasegjax.errors import CheckpointError

BEST_METRIC = "val_dice"


def _best_metric(metrics) -> float:
    return metrics[BEST_METRIC]


def make_manager(directory: str | Path, keep: int) -> ocp.CheckpointManager:
    """Return a manager over `directory` that keeps the latest `keep` and the best checkpoint."""
    options = ocp.CheckpointManagerOptions(
        best_fn=_best_metric,
        best_mode="max",
        preservation_policy=preservation.AnyPreservationPolicy(
            [
                preservation.LatestN(n=keep),
                preservation.BestN(
                    get_metric_fn=_best_metric,
                    reverse=False,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        ),
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(
        Path(directory).absolute(),
        options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler()},
    )


def save(manager, step: int, state, metrics: dict | None = None, force=False) -> bool:
    """Save the train state at `step`; return whether a save happened."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state))
    saved = manager.save(step, args=args, metrics=metrics, force=force)
    if saved:
        manager.wait_until_finished()
        logging.info("Saved checkpoint at step %d in %s.", step, manager.directory)
    return saved


def restore(manager, step: int, target_state):
    """Restore the train state at `step` onto the shapes, dtypes and shardings of `target_state`."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target_state))
    return manager.restore(step, args=args).state


def restore_latest(manager, target_state):
    """Restore the newest readable checkpoint; return (step or None, state).

    A checkpoint that fails to read (a damaged or partly deleted file) is moved to
    `<checkpoints>_unreadable/<step>`, with a warning, and the previous one is tried, so
    a later save at the same step cannot collide with it. Raises CheckpointError when
    checkpoints exist but none can be read.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
        try:
            return step, restore(manager, step, target_state)
        # orbax and TensorStore raise plain Exception for damaged array data.
        except Exception as err:  # noqa: BLE001
            moved = _move_unreadable(manager, step)
            logging.warning(
                "The checkpoint at step %d in %s cannot be read (%s: %s). Moved it to %s; "
                "trying the previous checkpoint.",
                step,
                manager.directory,
                type(err).__name__,
                str(err).splitlines()[0][:300] if str(err) else "",
                moved,
            )
    if steps:
        raise CheckpointError(
            f"none of the checkpoints {steps} in {manager.directory} could be read; they were "
            f"moved to {Path(str(manager.directory) + '_unreadable')}. Delete them to start "
            "again, or restore a copy of the checkpoint folder"
        )
    return None, target_state


def _move_unreadable(manager, step: int) -> Path:
    directory = Path(str(manager.directory))
    target = directory.with_name(directory.name + "_unreadable") / str(step)
    if jax.process_index() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target = target.with_name(f"{step}.{int(time.time())}")
        (directory / str(step)).rename(target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"lasegjax: moved checkpoint {step}")
    manager.reload()
    return target


def open_read_only(directory: str | Path) -> ocp.CheckpointManager:
    """Open a training run's checkpoints for reading only, with the best chosen by Dice."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(
            f"no checkpoints folder at {directory}. Pass the --workdir of a training run "
            "that saved at least one checkpoint"
        )
    options = ocp.CheckpointManagerOptions(
        read_only=True, best_fn=lambda metrics: metrics[BEST_METRIC], best_mode="max"
    )
    return ocp.CheckpointManager(
        directory.absolute(),
        item_handlers={"state": ocp.PyTreeCheckpointHandler()},
        options=options,
    )


def restore_params(manager: ocp.CheckpointManager, step: int, sharding: jax.sharding.Sharding):
    """Restore only the parameters of the train state at `step`, each leaf with `sharding`.

    Shapes and dtypes come from the checkpoint's metadata and the placement from
    `sharding`, so a run saved on any mesh restores onto the current devices. The optimizer
    state is not read.
    """
    saved = manager.item_metadata(step)["state"].tree["params"]
    target = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), saved
    )
    restore_args = jax.tree.map(lambda leaf: ocp.ArrayRestoreArgs(sharding=sharding), target)
    args = ocp.args.PyTreeRestore(
        item={"params": target}, restore_args={"params": restore_args}, partial_restore=True
    )
    return manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]


def load_params(directory: str | Path, step: int | None = None, best: bool = False):
    """Return (step, params) from a training checkpoint folder, on the first local device.

    Picks the best checkpoint by validation Dice with `best`, else `step`, else the latest.
    """
    manager = open_read_only(directory)
    try:
        if step is None:
            step = manager.best_step() if best else manager.latest_step()
        if step is None:
            raise CheckpointError(
                f"no checkpoint found in {directory}. Pass the checkpoints folder of a run that "
                "saved at least one step"
            )
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return step, restore_params(manager, step, device)
    finally:
        manager.close()
