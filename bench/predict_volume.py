"""Time to segment one LGE-MRI volume with `lasegjax.predict`, with and without flip TTA.

  python bench/predict_volume.py
  python bench/predict_volume.py --workdir runs/demo_la --input scan.nii.gz

Each timed call is `lasegjax.predict.predict_file`, the per-file work of the command line.
It reads the NIfTI, prepares the slices and predicts them in batches of `--batch_size`.
Then it maps the probabilities back onto the voxel grid, thresholds them, keeps the
largest connected component and writes the mask. Each test-time augmentation mode
(`none`, then `flip`) gets a new `Predictor`, so its first call includes compiling the
predict program. That call is reported apart from the median of `--repeats` later calls.
The model columns add up the time spent inside the predict function during a call
(copies to and from the devices included); the rest is reading, preparation,
restoring, post-processing and writing.

The weights come from `--workdir` (a training run, restored as the command line does).
Without it, the model of `--config` gets random parameters (`--init random`, the default)
or is trained for `--train_steps` steps on the synthetic phantom set in a temporary workdir
(`--init train`). The masks of such a model are meaningless; the times depend on the
weights only in the largest-component step, whose input is the thresholded mask.

`--input` defaults to a real 88-slice volume (0.625 mm isotropic, cropped to the atrium).
An LA HDF5 file (`mri_norm2.h5`) is written to a temporary NIfTI with 0.625 mm voxels first.
"""

import argparse
import statistics
import tempfile
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
    peak_rss_bytes,
    print_report,
    wait_for_low_load,
)

DEFAULT_INPUT = (
    REPO.parent
    / "shared"
    / "data"
    / "real"
    / "LASC2018_lascarqs_layout"
    / "train_data"
    / "train_1"
    / "enhanced.nii.gz"
)
LA_H5_SPACING_MM = 0.625


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser)
    parser.add_argument(
        "--input",
        default=str(DEFAULT_INPUT),
        help="NIfTI image or LA HDF5 file (default: the first real volume in "
        "../shared/data/real/LASC2018_lascarqs_layout, 88 slices)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="training run to restore (config.json and checkpoints/); default: see --init",
    )
    parser.add_argument(
        "--checkpoint", help="with --workdir: best, latest or a step (as lasegjax.predict)"
    )
    parser.add_argument(
        "--init",
        choices=("random", "train"),
        default="random",
        help="without --workdir: random parameters, or a model trained for --train_steps "
        "steps on phantom data (default: random)",
    )
    parser.add_argument(
        "--train_steps", type=int, default=2, help="steps of --init train (default 2)"
    )
    parser.add_argument(
        "--batch_size", type=int, help="slices per forward pass (default: eval.batch_size)"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed calls after the first (default 5)"
    )
    parser.add_argument(
        "--memory_analysis",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compile the predict program once more to report XLA's memory analysis (default: on)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of random parameters")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be positive")
    return args


def nifti_input(path: Path, folder: Path) -> Path:
    """Return `path` if it is NIfTI, else write the image of an LA HDF5 file as NIfTI."""
    if path.name.endswith((".nii", ".nii.gz")):
        return path
    if path.suffix != ".h5":
        raise SystemExit(f"error: --input {path} is neither NIfTI (.nii, .nii.gz) nor HDF5 (.h5)")
    import nibabel as nib
    import numpy as np

    from lasegjax.data import volume_io

    image, _ = volume_io.read_h5_case(path)
    target = folder / f"{path.parent.name}.nii.gz"
    nib.save(nib.Nifti1Image(image, np.diag([LA_H5_SPACING_MM] * 3 + [1.0])), target)
    return target


def train_tiny_run(config, workdir: Path, steps: int) -> None:
    """Train `config` for `steps` steps on phantom data, with a validated checkpoint at the end."""
    import logging

    from lasegjax.train import train_and_evaluate

    config.data.root = ""
    config.train.num_steps = steps
    config.train.warmup_steps = 1
    config.train.eval_every = steps
    config.train.checkpoint_every = steps
    config.train.log_every = steps
    train_and_evaluate(config, workdir)
    logging.getLogger().setLevel(logging.WARNING)


class PredictorFactory:
    """Builds a `Predictor` per TTA mode from a workdir or from random parameters."""

    def __init__(self, args, workdir: Path | None, config, output: Path):
        self.args = args
        self.workdir = workdir
        self.config = config
        self.output = output
        self.restore_seconds = []
        self.params = None

    def batch_size(self) -> int:
        return self.args.batch_size or self.config.eval.batch_size

    def build(self, tta: str):
        import jax

        from lasegjax import predict, sharding
        from lasegjax.model.segmenter import build_model
        from lasegjax.train import compute_dtype, init_params

        if self.workdir is not None:
            argv = ["--workdir", str(self.workdir), "--input", self.args.input]
            argv += ["--output", str(self.output), "--tta", tta, "--overwrite"]
            argv += ["--batch_size", str(self.batch_size())]
            if self.args.checkpoint:
                argv += ["--checkpoint", self.args.checkpoint]
            start = time.perf_counter()
            predictor = predict.load_predictor(predict.parse_args(argv), self.config)
            self.restore_seconds.append(time.perf_counter() - start)
            return predictor
        mesh = sharding.make_mesh()
        if self.params is None:
            model = build_model(self.config.model, compute_dtype(self.config))
            params = init_params(model, self.config, jax.random.PRNGKey(self.args.seed))
            self.params = sharding.on_mesh(params, mesh)
        evaluation = self.config.eval
        return predict.Predictor(
            self.config,
            self.params,
            mesh,
            self.batch_size(),
            tta,
            evaluation.threshold,
            evaluation.largest_component,
        )


class TimedPredictFn:
    """Wrap a predict function and add up the seconds spent in it.

    `evaluation.make_predict_fn` returns NumPy arrays, so each call ends when its batch
    has been computed and copied back to the host.
    """

    def __init__(self, predict_fn):
        self.predict_fn = predict_fn
        self.seconds = 0.0

    def __call__(self, params, images):
        start = time.perf_counter()
        probabilities = self.predict_fn(params, images)
        self.seconds += time.perf_counter() - start
        return probabilities


def time_mode(predictor, source: Path, output: Path, repeats: int) -> dict:
    """Time `predict_file` (the first call, then `repeats` calls) and the model within it."""
    import nibabel as nib
    import numpy as np

    from lasegjax import predict

    timed = TimedPredictFn(predictor.predict_fn)
    predictor.predict_fn = timed
    target = output / "mask.nii.gz"

    def call() -> tuple[float, float]:
        timed.seconds = 0.0
        start = time.perf_counter()
        predict.predict_file(predictor, source, target)
        return time.perf_counter() - start, timed.seconds

    first, first_model = call()
    mask = np.asarray(nib.load(target).dataobj)
    monitor = OtherCpuUse()
    monitor.start()
    totals, models = zip(*(call() for _ in range(repeats)), strict=True)
    return {
        "first": first,
        "first_model": first_model,
        "steady": statistics.median(totals),
        "spread": (min(totals), max(totals)),
        "model": statistics.median(models),
        "rest": statistics.median(t - m for t, m in zip(totals, models, strict=True)),
        "foreground": float(mask.mean()),
        "shape": mask.shape,
        "other_cpu": monitor.stop(),
        "peak_rss": peak_rss_bytes(),
    }


def predict_memory(predictor) -> dict:
    """Compile the predict program once more and return XLA's memory analysis of it."""
    import jax
    import jax.numpy as jnp

    from lasegjax import estimates, sharding
    from lasegjax.model.segmenter import build_model
    from lasegjax.train import compute_dtype

    config = predictor.config
    model = build_model(config.model, compute_dtype(config))
    mesh = jax.tree.leaves(predictor.params)[0].sharding.mesh
    batch_sharding = sharding.batch_sharding(mesh)

    def probabilities(params, images):
        return jax.nn.sigmoid(model.apply({"params": params}, images)[..., 0])

    height, width = config.data.image_size
    images = jax.ShapeDtypeStruct(
        (predictor.batch_size, height, width, 2 * config.data.context_slices + 1),
        jnp.float32,
        sharding=batch_sharding,
    )
    jitted = jax.jit(probabilities, out_shardings=batch_sharding)
    return estimates.compiled_costs(jitted.lower(predictor.params, images).compile())


def main(argv=None) -> dict:
    args = parse_args(argv)
    source = Path(args.input)
    if not source.is_file():
        raise SystemExit(
            f"error: input {source} not found. Pass --input with a NIfTI image or an LA HDF5 "
            "file (mri_norm2.h5)"
        )
    load_line = wait_for_low_load(args.max_load, args.max_wait)
    scratch = tempfile.TemporaryDirectory(prefix="bench_predict_")
    folder = Path(scratch.name)

    from lasegjax import predict
    from lasegjax.sharding import setup_host

    if args.workdir is not None:
        config = predict.load_run_config(args.workdir)
        workdir, origin = args.workdir, f"restored from {args.workdir}"
    else:
        config = load_config(args.config, args.override)
        workdir = folder / "run" if args.init == "train" else None
        origin = (
            f"trained for {args.train_steps} steps on phantom data in a temporary workdir"
            if workdir is not None
            else "random initialisation (no training)"
        )
    setup_host(config)
    import jax

    jax.config.update("jax_default_prng_impl", config.prng_impl)
    train_seconds = None
    if args.init == "train" and args.workdir is None:
        start = time.perf_counter()
        train_tiny_run(config, workdir, args.train_steps)
        train_seconds = time.perf_counter() - start

    source = nifti_input(source, folder)
    factory = PredictorFactory(args, workdir, config, folder)
    run = {"origin": origin, "train_seconds": train_seconds, "results": {}, "loads": {}}
    for tta in ("none", "flip"):
        run["loads"][tta] = load_text()
        output = folder / tta
        output.mkdir()
        run["results"][tta] = time_mode(factory.build(tta), source, output, args.repeats)
    run["costs"] = predict_memory(factory.build("none")) if args.memory_analysis else {}
    run["restore_seconds"] = factory.restore_seconds
    run["batch_size"] = factory.batch_size()
    run["slices"], run["slice_shape"] = slice_geometry(source, config)
    scratch.cleanup()
    print_results(args, config, load_line, run)
    return run


def slice_geometry(source: Path, config) -> tuple[int, tuple[int, int]]:
    """Return the slice count and in-plane shape of the NIfTI `source` as prediction cuts it."""
    from lasegjax.data import volume_io
    from lasegjax.data.pipeline import through_plane_axis
    from lasegjax.data.volume import Volume

    image, affine = volume_io.read_nifti_image(source)
    axis = through_plane_axis(
        Volume("input", image, None, affine, str(source)), config.data.slice_axis
    )
    in_plane = tuple(size for index, size in enumerate(image.shape) if index != axis)
    return image.shape[axis], in_plane


def print_results(args, config, load_line: str, run: dict) -> None:
    import jax

    from lasegjax.model.segmenter import build_model

    results = run["results"]
    rows = []
    for tta, result in results.items():
        low, high = result["spread"]
        rows.append(
            [
                tta,
                f"{result['first']:.2f} ({result['first_model']:.2f})",
                f"{result['steady']:.2f}",
                f"{low:.2f}-{high:.2f}",
                f"{result['model']:.2f}",
                f"{result['rest']:.2f}",
                f"{run['slices'] / result['steady']:.0f}",
            ]
        )
    headers = [
        "TTA",
        "first call (s) (of it in the model)",
        "steady median (s)",
        "min-max (s)",
        "of it in the model (s)",
        "rest (s)",
        "slices/s",
    ]
    table = markdown_table(headers, rows)
    height, width = config.data.image_size
    encoder = build_model(config.model).encoder
    setup = (
        f"`{Path(args.input).name}`: {run['slices']} slices of {run['slice_shape'][0]}x"
        f"{run['slice_shape'][1]} voxels, predicted at {height}x{width} in batches of "
        f"{run['batch_size']} on {len(jax.devices())} XLA CPU device(s); "
        f"{config.model.encoder.size} encoder (depth {encoder.depth}, width {encoder.width}), "
        f"decoder {tuple(config.model.decoder.channels)}; parameters: {run['origin']}. The "
        "model columns count the time inside the predict function (host-to-device copy, "
        "forward pass, copy back), the rest is reading, preparing, restoring to the voxel "
        "grid, post-processing and writing"
    )
    notes = [load_line]
    for tta, result in results.items():
        other = result["other_cpu"]
        notes.append(
            f"TTA {tta}: load average {run['loads'][tta]} before its first call"
            + (f"; other processes used {other:.2f} cores during the repeats" if other else "")
            + f"; foreground fraction of the mask {result['foreground']:.3f}; peak RSS "
            f"{memory_text(result['peak_rss'])} after it"
        )
    costs = run["costs"]
    if costs:
        notes.append(
            f"XLA memory analysis of the predict program, per device: "
            f"{memory_text(costs.get('peak'))} (arguments {memory_text(costs.get('arguments'))}, "
            f"temporaries {memory_text(costs.get('temporaries'))})"
        )
    if run["train_seconds"] is not None:
        notes.append(f"training the temporary model took {run['train_seconds']:.0f} s")
    if run["restore_seconds"]:
        restores = ", ".join(f"{seconds:.1f}" for seconds in run["restore_seconds"])
        notes.append(f"restoring the parameters took {restores} s (not in the table)")
    notes.append(f"peak RSS of the process: {memory_text(peak_rss_bytes())}")
    print_report("Predict one volume", [("", f"Setup: {setup}."), ("", table)], notes)


if __name__ == "__main__":
    main()
