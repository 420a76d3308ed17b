"""Compile the train step ahead of time for a device mesh and report XLA's memory and FLOPs.

Nothing is allocated: parameters, optimizer state and batch are abstract shapes with
shardings, so the ViT-g/14 step for a 16-device mesh compiles on a laptop.

Two targets:
  cpu      16 simulated CPU devices (XLA's CPU compiler; memory figures are CPU layouts).
  v5e:4x4  a Cloud TPU v5e slice with 16 chips, compiled by libtpu's compile-only client.
           Needs libtpu on the Python path but no TPU, for example:
             pip install --target /tmp/libtpu 'libtpu==0.0.42.*'   # the release jax 0.10.2 pins
             PYTHONPATH=/tmp/libtpu python bench/compile_train_step.py --target v5e:4x4

Example:
  python bench/compile_train_step.py --config configs/giant.py --target v5e:4x4 \\
      --mesh 1,16,1 --batch_per_device 2 --remat full --dtype bfloat16 --no-frozen
"""

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "giant.py"))
    parser.add_argument("--target", default="cpu", help="cpu, or a TPU topology such as v5e:4x4")
    parser.add_argument("--devices", type=int, default=16, help="CPU devices (target cpu)")
    parser.add_argument("--mesh", default="1,16,1", help="data,fsdp,model sizes")
    parser.add_argument("--batch_per_device", type=int, default=2)
    parser.add_argument("--image_size", type=int, default=448)
    parser.add_argument("--remat", default="full", help="none, full, dots or dots_no_batch")
    parser.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--frozen",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="freeze the encoder (the paper's setup); default: fine-tune it",
    )
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype")
    return parser.parse_args()


def load_config(path: str, args):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.data.image_size = (args.image_size, args.image_size)
    config.model.encoder.remat = args.remat
    config.model.encoder.scan = args.scan
    config.model.encoder.frozen = args.frozen
    config.train.dtype = args.dtype
    config.mesh.data, config.mesh.fsdp, config.mesh.model = map(int, args.mesh.split(","))
    return config


def target_devices(args):
    import jax

    if args.target == "cpu":
        return jax.devices()[: args.devices]
    from jax.experimental import topologies

    return topologies.get_topology_desc(topology_name=args.target, platform="tpu").devices


def main():
    args = parse_args()
    if args.target == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp

    if args.target == "cpu":
        jax.config.update("jax_num_cpu_devices", args.devices)
    jax.config.update("jax_default_prng_impl", "rbg")

    from lasegjax import estimates, sharding
    from lasegjax.model.segmenter import build_model
    from lasegjax.train import abstract_train_state, compute_dtype, make_train_step

    config = load_config(args.config, args)
    devices = target_devices(args)
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    config.train.batch_size = args.batch_per_device * math.prod(mesh.devices.shape)
    model = build_model(config.model, compute_dtype(config))

    start = time.perf_counter()
    _, abstract, tx, labels = abstract_train_state(config, model, jax.random.PRNGKey(0))
    shardings = sharding.tree_shardings(abstract, mesh)
    abstract = jax.tree.map(
        lambda leaf, target: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=target),
        abstract,
        shardings,
    )
    batch_sharding = sharding.batch_sharding(mesh)
    height, width = config.data.image_size
    channels = 2 * config.data.context_slices + 1
    batch = {
        "image": jax.ShapeDtypeStruct(
            (config.train.batch_size, height, width, channels), jnp.float32, sharding=batch_sharding
        ),
        "mask": jax.ShapeDtypeStruct(
            (config.train.batch_size, height, width, 1), jnp.float32, sharding=batch_sharding
        ),
    }
    train_step = make_train_step(model, tx, labels, config, mesh, shardings)
    lowered = train_step.lower(abstract, batch)
    lower_seconds = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - start
    costs = estimates.compiled_costs(compiled)

    params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract.params))
    gib = 2**30
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"jax {jax.__version__}; target {args.target} ({devices[0].device_kind})"
    )
    print()
    print("| quantity | value |")
    print("|---|---|")
    rows = [
        ("encoder", f"{config.model.encoder.size}, frozen={args.frozen}"),
        ("parameters", f"{params / 1e9:.3f} B"),
        ("mesh (data, fsdp, model)", str(tuple(mesh.devices.shape))),
        ("image size", f"{height}x{width}"),
        ("batch", f"{config.train.batch_size} ({args.batch_per_device} per device)"),
        ("scan / remat / dtype", f"{args.scan} / {args.remat} / {args.dtype}"),
        ("lower time", f"{lower_seconds:.1f} s"),
        ("compile time", f"{compile_seconds:.1f} s"),
        ("arguments per device", f"{costs.get('arguments', 0) / gib:.2f} GiB"),
        ("temporaries per device", f"{costs.get('temporaries', 0) / gib:.2f} GiB"),
        (
            "peak per device (args + outputs - aliased + temps)",
            f"{costs.get('peak', 0) / gib:.2f} GiB",
        ),
        ("FLOPs per device per step", f"{costs['flops'] / 1e12:.2f} TFLOP"),
    ]
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
