"""Train a tiny segmenter in this process: one process of a multi-process run on localhost,
or a single-process run for the signal tests.

  python tests/scripts/tiny_training.py WORKDIR DATA,FSDP,MODEL NUM_STEPS STOP_AT \\
      [--devices 8] [--process_id I --num_processes N --port P]

Each process exposes devices / N CPU devices. The tiny config reads the synthetic phantom
volumes with two data shards, so one process and two processes see the same batches.
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from lasegjax import distributed  # noqa: E402
from lasegjax.sharding import use_cpu_devices  # noqa: E402
from lasegjax.train import train_and_evaluate  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402


def tiny_training_config(mesh: str, num_steps: int, stop_at: int):
    """Return the tiny config of these runs on a mesh given as "data,fsdp,model"."""
    config = tiny_config(image_size=(28, 28))
    config.model.encoder.num_taps = 1
    config.model.encoder.scan = True
    config.model.decoder.channels = (16, 8)
    config.data.shards = 2
    config.data.phantom.shape = (40, 40, 8)
    config.data.augment.enabled = False
    config.mesh.data, config.mesh.fsdp, config.mesh.model = map(int, mesh.split(","))
    config.train.batch_size = 8
    config.train.num_steps = num_steps
    config.train.stop_at_step = stop_at
    config.train.checkpoint_every = 3
    config.eval.batch_size = 8
    config.eval.num_panel_slices = 0
    return config


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("mesh")
    parser.add_argument("num_steps", type=int)
    parser.add_argument("stop_at", type=int)
    parser.add_argument("--devices", type=int, default=8, help="CPU devices in all processes")
    parser.add_argument("--process_id", type=int)
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--port", type=int)
    args = parser.parse_args()

    use_cpu_devices(args.devices // args.num_processes)
    if args.num_processes > 1:
        distributed.initialize(
            "auto", f"localhost:{args.port}", args.num_processes, args.process_id
        )

    config = tiny_training_config(args.mesh, args.num_steps, args.stop_at)
    train_and_evaluate(config, args.workdir)


if __name__ == "__main__":
    main()
