"""Time the ViT-g/14 train step on one accelerator: images per second and model FLOPs utilisation.

Random 448-px inputs and randomly initialised weights; the step is the same jitted
function that training runs. FLOPs per step come from XLA's cost analysis of the compiled
step, and utilisation is measured FLOP/s divided by the accelerator's dense bf16 peak
(989 TFLOP/s for an NVIDIA H100 or H200 SXM, the default of --peak_tflops).

  python bench/gpu_train_step.py --batch_size 16 --steps 20
  python bench/gpu_train_step.py --no-frozen --remat full --batch_size 8   # fine-tuning

Prints a Markdown table to paste into docs/benchmarks.md, with the command and device.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "giant.py"))
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=448)
    parser.add_argument("--steps", type=int, default=20, help="timed steps after 2 warm-up")
    parser.add_argument("--frozen", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--peak_tflops", type=float, default=989.0)
    return parser.parse_args()


def main():
    args = parse_args()
    import jax
    import numpy as np

    from bench.compile_train_step import load_config
    from lasegjax import estimates, sharding
    from lasegjax.model.segmenter import build_model
    from lasegjax.train import compute_dtype, create_train_state, make_train_step

    jax.config.update("jax_default_prng_impl", "rbg")
    args.mesh = "1,1,1"
    config = load_config(args.config, args)
    config.train.batch_size = args.batch_size
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    model = build_model(config.model, compute_dtype(config))
    state, tx, labels = create_train_state(config, model, jax.random.PRNGKey(0), mesh)
    shardings = jax.tree.map(lambda leaf: leaf.sharding, state)
    batch_sharding = sharding.batch_sharding(mesh)
    rng = np.random.default_rng(0)
    size = args.image_size
    batch = {
        "image": rng.normal(size=(args.batch_size, size, size, 1)).astype(np.float32),
        "mask": (rng.random((args.batch_size, size, size, 1)) > 0.9).astype(np.float32),
    }
    batch = {k: sharding.global_array_from_host(v, batch_sharding) for k, v in batch.items()}

    start = time.perf_counter()
    step = make_train_step(model, tx, labels, config, mesh, shardings)
    compiled = step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    costs = estimates.compiled_costs(compiled)
    for _ in range(2):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    achieved = costs["flops"] / median
    stats = jax.local_devices()[0].memory_stats() or {}

    print(f"command: python {' '.join(sys.argv)}")
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}")
    print()
    print("| quantity | value |")
    print("|---|---|")
    rows = [
        ("encoder", f"{config.model.encoder.size}, frozen={args.frozen}"),
        ("batch / image size", f"{args.batch_size} / {size}x{size}"),
        ("scan / remat / dtype", f"{args.scan} / {args.remat} / {args.dtype}"),
        ("compile time", f"{compile_seconds:.1f} s"),
        ("median step time", f"{median * 1e3:.1f} ms over {args.steps} steps"),
        ("images per second", f"{args.batch_size / median:.1f}"),
        ("XLA FLOPs per step", f"{costs['flops'] / 1e12:.2f} TFLOP"),
        ("achieved", f"{achieved / 1e12:.1f} TFLOP/s"),
        ("model FLOPs utilisation", f"{100 * achieved / (args.peak_tflops * 1e12):.1f} %"),
        ("peak device memory", f"{stats.get('peak_bytes_in_use', 0) / 2**30:.2f} GiB"),
    ]
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
