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


def main(argv):
    del argv
    from pathlib import Path

    from lasegjax.sharding import use_cpu_devices
    from lasegjax.train import train_and_evaluate

    use_cpu_devices(_CONFIG.value.cpu_devices)

    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    workdir = _WORKDIR.value or str(Path("runs") / Path(config_file.split(":")[0]).stem)
    try:
        train_and_evaluate(_CONFIG.value, workdir)
    except LasegError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
