"""Multi-host start-up: one process per host, joined by `jax.distributed.initialize`.

JAX finds the coordinator, process count and process index by itself on Cloud TPU VMs
and in SLURM jobs. Elsewhere they come from flags or from the environment variables
that `jax.distributed.initialize` reads (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`).
"""

import logging
import os

import jax

from lasegjax.errors import ConfigError


def cluster_detected() -> bool:
    """Return whether the environment describes a multi-process job."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    tasks = os.environ.get("SLURM_NTASKS") or os.environ.get("SLURM_NPROCS") or "1"
    if os.environ.get("SLURM_JOB_ID") and tasks.isdigit() and int(tasks) > 1:
        return True
    # Set by GKE on multi-host TPU slices. Plain Cloud TPU VMs may lack it, which is why
    # launch/tpu_pod.sh passes --distributed=on.
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Join the multi-process job, if there is one; call before any other JAX call.

    Args:
      mode: "auto" joins when a coordinator address is given or `cluster_detected()`.
        "on" always calls `jax.distributed.initialize`, for TPU pods whose environment
        has no marker. "off" never joins.
      coordinator_address, num_processes, process_id: Passed to JAX when set.
    """
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"--distributed={mode!r} is invalid: use auto, on or off")
    explicit = coordinator_address is not None
    if mode == "off" or (mode == "auto" and not explicit and not cluster_detected()):
        return
    if explicit and (num_processes is None or process_id is None):
        raise ConfigError(
            f"--coordinator_address={coordinator_address} needs --num_processes and "
            "--process_id as well"
        )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    logging.info(
        "Joined the multi-process job as process %d of %d, with %d local device(s).",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
    )


def is_primary() -> bool:
    """Return whether this is process 0, the one that writes logs, metrics and files."""
    return jax.process_index() == 0
