"""Slices per second of the training data pipeline against the train step's consumption.

  python bench/pipeline_throughput.py
  python bench/pipeline_throughput.py --num_threads 1 --step_time 0.45

Reads the training volumes of `--data_root` as training does (`load_datasets`, the same
split), then measures three rates for the configured batch:

1. pipeline alone: batches drawn from `train_dataset` (grain, augmentation on unless
   `--no-augment`) as fast as it yields them, after a few warm-up batches;
2. train step alone: the jitted train step of `lasegjax.train` fed one fixed host batch,
   copied to the devices each step as the training loop does;
3. training: the same step fed by the pipeline, as in `train_and_evaluate`, where both
   share the CPU cores.

With `--step_time S`, steps 2 and 3 are skipped and the model consumes
`batch_size / S` slices per second. The pipeline keeps up when its rate alone is at least
the step's. The third rate shows what feeding the step costs when the pipeline's threads
and XLA share the cores. The table also gives the CPU time of each measurement.
"""

import argparse
import dataclasses
import os
import resource
import statistics
import time
from pathlib import Path

from report import (
    REPO,
    OtherCpuUse,
    add_common_flags,
    load_config,
    load_text,
    markdown_table,
    memory_text,
    parse_image_size,
    peak_rss_bytes,
    print_report,
    wait_for_low_load,
)

DEFAULT_DATA = REPO.parent / "shared" / "data" / "real" / "LASC2018_UA-MT_h5"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser)
    parser.add_argument(
        "--data_root",
        default=str(DEFAULT_DATA),
        help="dataset folder in a supported layout (default: ../shared/data/real/"
        "LASC2018_UA-MT_h5, the LA HDF5 layout)",
    )
    parser.add_argument(
        "--num_threads", type=int, help="grain reader threads (default: data.num_threads)"
    )
    parser.add_argument(
        "--prefetch", type=int, help="batches prepared ahead (default: data.prefetch)"
    )
    parser.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="augment the slices, as training does (default: on)",
    )
    parser.add_argument("--batch_size", type=int, help="slices per batch (train.batch_size)")
    parser.add_argument("--image_size", type=parse_image_size, help="slice size N or H,W in pixels")
    parser.add_argument(
        "--max_cases", type=int, help="read only the first N cases (data.max_cases)"
    )
    parser.add_argument(
        "--batches", type=int, default=100, help="timed pipeline batches (default 100)"
    )
    parser.add_argument(
        "--warmup_batches", type=int, default=5, help="untimed batches first (default 5)"
    )
    parser.add_argument(
        "--steps", type=int, default=20, help="timed train steps in each step measurement"
    )
    parser.add_argument(
        "--step_time",
        type=float,
        help="seconds per train step to compare against, instead of measuring it",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of shuffling and augmentation")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.steps < 1:
        parser.error("--batches and --steps must be positive")
    return args


def build_config(args):
    config = load_config(args.config, args.override)
    config.data.root = args.data_root
    config.data.augment.enabled = args.augment
    if args.num_threads is not None:
        config.data.num_threads = args.num_threads
    if args.prefetch is not None:
        config.data.prefetch = args.prefetch
    if args.batch_size:
        config.train.batch_size = args.batch_size
    if args.image_size:
        config.data.image_size = args.image_size
    if args.max_cases:
        config.data.max_cases = args.max_cases
    return config


def cpu_seconds() -> float:
    """Return the CPU time of this process so far, over all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclasses.dataclass
class Rate:
    """Wall and CPU time per batch of one measurement, and other processes' CPU use."""

    wall: float
    cpu: float
    other_cpu: float | None
    load: str


def time_pipeline(iterator, warmup: int, count: int) -> tuple[Rate, float]:
    """Time `count` batches of `iterator` after `warmup`; return (rate, median seconds)."""
    for _ in range(warmup):
        next(iterator)
    monitor = OtherCpuUse()
    load = load_text()
    times = []
    monitor.start()
    cpu_start = cpu_seconds()
    previous = time.perf_counter()
    for _ in range(count):
        next(iterator)
        now = time.perf_counter()
        times.append(now - previous)
        previous = now
    cpu = (cpu_seconds() - cpu_start) / count
    return Rate(sum(times) / count, cpu, monitor.stop(), load), statistics.median(times)


def time_steps(trainer, next_batch, count: int) -> Rate:
    """Time `count` train steps, blocking only at the end, as the training loop does.

    The host thus prepares the next batch while the devices run the step.
    """
    import jax

    monitor = OtherCpuUse()
    load = load_text()
    state = trainer.state
    metrics = None
    monitor.start()
    cpu_start = cpu_seconds()
    start = time.perf_counter()
    for _ in range(count):
        batch = {
            key: jax.make_array_from_process_local_data(trainer.batch_sharding, value)
            for key, value in next_batch().items()
        }
        state, metrics = trainer.step_fn(state, batch)
    jax.block_until_ready((state, metrics))
    wall = (time.perf_counter() - start) / count
    cpu = (cpu_seconds() - cpu_start) / count
    trainer.state = state
    return Rate(wall, cpu, monitor.stop(), load)


def measure(args, config) -> dict:
    """Read the data and time the pipeline and, unless `--step_time`, the train step."""
    from lasegjax.data.datasets import load_datasets
    from lasegjax.data.pipeline import SliceSource, train_dataset

    batch_size = config.train.batch_size
    start = time.perf_counter()
    train_volumes, _ = load_datasets(config, None, num_shards=1, shards=[0])
    volumes = train_volumes[0]
    result = {
        "load_seconds": time.perf_counter() - start,
        "volumes": len(volumes),
        "slices": len(SliceSource(volumes)),
    }

    iterator = iter(train_dataset(volumes, config.data, batch_size, args.seed))
    result["pipeline"], result["pipeline_median"] = time_pipeline(
        iterator, args.warmup_batches, args.batches
    )
    if args.step_time is not None:
        return result

    from train_step_vs_torch import FlaxTrainer

    trainer = FlaxTrainer(config, args.seed)
    result["compile_seconds"] = trainer.compile_seconds
    fixed = next(iterator)
    del iterator
    time_steps(trainer, lambda: fixed, 2)  # the first calls allocate the buffers
    result["step"] = time_steps(trainer, lambda: fixed, args.steps)

    # A fresh stream, so the fed steps see batches the pipeline has not prepared yet.
    train_iterator = iter(train_dataset(volumes, config.data, batch_size, args.seed + 1))
    time_steps(trainer, lambda: next(train_iterator), 2)
    result["fed"] = time_steps(trainer, lambda: next(train_iterator), args.steps)
    return result


def cores_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    data_root = args.data_root
    if not Path(data_root).is_dir():
        raise SystemExit(
            f"error: data folder {data_root} not found. Pass --data_root with a dataset in a "
            "supported layout (see README.md, 'Training on your data')"
        )
    load_line = wait_for_low_load(args.max_load, args.max_wait)
    config = build_config(args)

    from lasegjax.sharding import setup_host

    setup_host(config)
    import jax

    jax.config.update("jax_default_prng_impl", config.prng_impl)
    result = measure(args, config)

    batch_size = config.train.batch_size
    pipeline = result["pipeline"]
    measured = "step" in result
    step_seconds = result["step"].wall if measured else args.step_time
    rows = [
        [
            "pipeline alone",
            f"{1000 * pipeline.wall:.1f} (median {1000 * result['pipeline_median']:.1f})",
            f"{1000 * pipeline.cpu:.0f}",
            f"{batch_size / pipeline.wall:.0f}",
            cores_text(pipeline.other_cpu),
            f"{args.batches} batches after {args.warmup_batches} warm-up",
        ],
    ]
    if measured:
        for key, label, how in (
            ("step", "train step alone", "one fixed batch"),
            ("fed", "train step fed by the pipeline", "as in training"),
        ):
            rate = result[key]
            rows.append(
                [
                    label,
                    f"{1000 * rate.wall:.1f}",
                    f"{1000 * rate.cpu:.0f}",
                    f"{batch_size / rate.wall:.0f}",
                    cores_text(rate.other_cpu),
                    f"{args.steps} steps, {how}",
                ]
            )
    else:
        rows.append(["train step (--step_time)", f"{1000 * step_seconds:.1f}", "", "", "", "given"])
    headers = [
        "measurement",
        "wall ms per batch (mean)",
        "CPU ms per batch",
        "slices/s",
        "other processes (cores)",
        "how",
    ]
    table = markdown_table(headers, rows)

    pipeline_rate = batch_size / pipeline.wall
    consumption = batch_size / step_seconds
    ratio = pipeline_rate / consumption
    reading = (
        f"the pipeline {'keeps up' if ratio >= 1 else 'does not keep up'}: alone it yields "
        f"{pipeline_rate:.0f} slices/s, {ratio:.1f} times the {consumption:.0f} slices/s that "
        "the train step consumes"
    )
    if measured:
        slowdown = result["fed"].wall / result["step"].wall - 1
        reading += (
            f". Fed by the pipeline in the same process, the step's wall time changes by "
            f"{100 * slowdown:+.0f} %; the augmentation threads take {1000 * pipeline.cpu:.0f} "
            f"ms of CPU time per batch on the same {len(os.sched_getaffinity(0))} cores as XLA"
        )
    height, width = config.data.image_size
    setup = (
        f"`{data_root}`: {result['volumes']} training volumes, {result['slices']} slices "
        f"(read and prepared in {result['load_seconds']:.1f} s); batch {batch_size} of "
        f"{height}x{width}x{2 * config.data.context_slices + 1}, augmentation "
        f"{'on' if config.data.augment.enabled else 'off'}, num_threads "
        f"{config.data.num_threads}, prefetch {config.data.prefetch}, "
        f"{len(jax.devices())} XLA CPU device(s)"
    )
    notes = [load_line, f"load average when the pipeline timing started {pipeline.load}"]
    if measured:
        notes += [
            f"load average when the step timings started {result['step'].load} (fixed batch) "
            f"and {result['fed'].load} (fed)",
            f"Flax train-step compile {result['compile_seconds']:.1f} s",
        ]
    notes.append(f"peak RSS of the process: {memory_text(peak_rss_bytes())}")
    print_report(
        "Data pipeline against train step",
        [("", f"Setup: {setup}."), ("", table), ("", f"Reading: {reading}.")],
        notes,
    )
    return {
        "pipeline_slices_per_second": pipeline_rate,
        "step_seconds": step_seconds,
        "keeps_up": ratio >= 1,
    }


if __name__ == "__main__":
    main()
