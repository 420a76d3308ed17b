"""Logs, progress lines and scalar summaries of a training run.

Scalars go to TensorBoard event files (tensorboardX) and to `metrics.jsonl`, one JSON
object per line, so runs can be compared without TensorBoard.
"""

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
from absl import logging as absl_logging


def setup_logging(workdir: Path | None, quiet: bool = False) -> None:
    """Send INFO logs to stderr and, with a workdir, to `workdir/train.log` as well.

    With `quiet` (processes other than 0 of a multi-host job), only warnings and errors
    are logged.
    """
    root = logging.getLogger()
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    # absl.app installs its own stderr handler on the root logger; one handler is enough.
    root.removeHandler(absl_logging.get_absl_handler())
    for handler in list(root.handlers):
        if getattr(handler, "_lasegjax", False):
            root.removeHandler(handler)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr)]
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(workdir / "train.log"))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._lasegjax = True
        root.addHandler(handler)
    # absl and orbax log every file operation at INFO.
    for name in ("absl", "orbax", "jax._src"):
        logging.getLogger(name).setLevel(logging.WARNING)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class ScalarWriter:
    """Write scalars to TensorBoard and to a JSON-lines file."""

    def __init__(self, workdir: Path):
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(logdir=str(workdir / "tensorboard"))
        self._jsonl = open(workdir / "metrics.jsonl", "a")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self._tb.add_scalar(name, float(value), step)
        record = {"step": step, **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        self._tb.close()
        self._jsonl.close()


class NullWriter:
    """Stand-in for `ScalarWriter` on processes that write no files."""

    def write(self, step: int, scalars: dict[str, float]) -> None:
        del step, scalars

    def close(self) -> None:
        pass


class Progress:
    """Track steps per second and the estimated time to the last step."""

    def __init__(self, start_step: int, num_steps: int):
        self._num_steps = num_steps
        self._last_step = start_step
        self._last_time = time.perf_counter()

    def line(self, step: int, scalars: dict[str, float]) -> tuple[str, float]:
        """Return the progress line for `step` and the steps per second since the last call."""
        now = time.perf_counter()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        eta = (self._num_steps - step) / rate if rate > 0 else float("inf")
        scalar_text = " ".join(f"{k} {v:.4g}" for k, v in scalars.items())
        eta_text = format_duration(eta) if np.isfinite(eta) else "?"
        return (
            f"[step {step}/{self._num_steps}] {scalar_text} | {rate:.2f} steps/s | ETA {eta_text}",
            rate,
        )
