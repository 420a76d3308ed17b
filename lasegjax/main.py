"""Command-line entry point: `python -m lasegjax.main --config=configs/demo.py --workdir=DIR`."""

import sys

from absl import app, flags
from ml_collections import config_flags

from lasegjax.errors import LasegError

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file (configs/*.py); override fields with --config.a.b=value.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Folder for checkpoints, logs and outputs; a rerun in it resumes. "
    "Default: runs/<config file name>.",
)


_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "Join a multi-process (multi-host) job with jax.distributed.initialize: auto joins when "
    "--coordinator_address is set or a SLURM job, TPU pod or JAX_COORDINATOR_ADDRESS is "
    "detected; on always joins (Cloud TPU pods); off never does.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for clusters JAX cannot detect."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes in the job (with --coordinator_address)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Index of this process, 0 ... num_processes - 1."
)


def main(argv):
    del argv
    from pathlib import Path

    from lasegjax import distributed
    from lasegjax.sharding import setup_host
    from lasegjax.train import train_and_evaluate

    setup_host(_CONFIG.value)
    try:
        distributed.initialize(
            _DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
        )
    except LasegError as err:
        sys.exit(f"error: {err}")

    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    workdir = _WORKDIR.value or str(Path("runs") / Path(config_file.split(":")[0]).stem)
    try:
        train_and_evaluate(_CONFIG.value, workdir)
    except LasegError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
