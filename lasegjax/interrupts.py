"""Graceful stop on SIGTERM and SIGINT: finish the current step, save, and exit.

Cluster schedulers and preemptible TPU VMs send SIGTERM some seconds before killing a
job, and Ctrl-C sends SIGINT. The first signal only sets a flag, which the training loop
checks after each step; a second signal stops the process at once.
"""

import logging
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Context manager that records the first SIGTERM or SIGINT instead of dying on it."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            logging.warning(
                "Training runs outside the main thread, so SIGTERM and SIGINT cannot be caught "
                "to save a checkpoint before exiting."
            )
            return self
        for signum in HANDLED_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            # Second signal: give up on the clean stop.
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt(f"second {name}: stopping without saving")
        self.signal_name = name
        logging.warning(
            "Received %s: stopping after the current step and saving a checkpoint. Send it "
            "again to stop at once without saving.",
            name,
        )

    def requested(self) -> bool:
        """Return whether any process received a stop signal; all processes must call it."""
        local = self.signal_name is not None
        if jax.process_count() == 1:
            return local
        # NOTE: a host synchronisation every step; cheap next to a large model's step.
        flags = multihost_utils.process_allgather(np.asarray(local, np.int32))
        return bool(np.any(flags))
