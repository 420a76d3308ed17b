"""One orbax CheckpointManager for train state and data-iterator state.

The manager keeps the latest `keep` checkpoints plus the one with the best validation
Dice. orbax writes each step into a temporary folder and renames it when complete, so an
interrupted save never replaces a good checkpoint.
"""

import logging
from pathlib import Path

import grain
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

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
        Path(directory).absolute(), options=options, item_names=("state", "data_iter")
    )


def save(manager, step: int, state, data_iter, metrics: dict | None = None, force=False) -> bool:
    """Save train state and data-iterator state at `step`; return whether a save happened."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=grain.checkpoint.CheckpointSave(data_iter),
    )
    saved = manager.save(step, args=args, metrics=metrics, force=force)
    if saved:
        manager.wait_until_finished()
        logging.info("Saved checkpoint at step %d in %s.", step, manager.directory)
    return saved


def restore(manager, step: int, abstract_state, data_iter):
    """Restore the train state (matching `abstract_state`) and `data_iter` in place."""
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data_iter=grain.checkpoint.CheckpointRestore(data_iter),
    )
    restored = manager.restore(step, args=args)
    return restored.state


def restore_state_only(manager, step: int, abstract_state):
    """Restore only the train state at `step`, for evaluation and prediction."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    return manager.restore(step, args=args).state


def load_params(directory: str | Path, step: int | None = None, best: bool = False):
    """Return (step, params) from a training checkpoint folder, as a nested dict of arrays.

    Picks the best checkpoint by validation Dice with `best`, else `step`, else the latest.
    """
    manager = make_manager(directory, keep=1_000_000)
    if step is None:
        step = manager.best_step() if best else manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint found in {directory}")
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return step, state.state["params"]
