"""Segment the left atrium in NIfTI or NRRD volumes with a trained model, one mask per volume.

  python -m lasegjax.predict --workdir runs/demo --input scans/ --output masks/

The model, its input size and the preprocessing come from the training run's
`config.json`, the parameters from its `checkpoints/` folder. Each volume is cut into
slices along the axis chosen at training time, predicted in batches, and mapped back onto
its own voxel grid. The mask is written as a uint8 {0, 1} NIfTI file with the input's
qform, sform and their codes, so it lines up with the image in ITK-SNAP, 3D Slicer and
nibabel. An NRRD input's mask gets the input's geometry as a RAS+ affine (qform and sform
code 1, scanner), so it lines up with the NRRD image in the same viewers.
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from lasegjax import checkpointing, evaluation, sharding
from lasegjax.config import base_config
from lasegjax.data import volume_io
from lasegjax.data.nifti_files import (
    NIFTI_SUFFIXES,
    case_name,
    is_nifti,
    list_nifti_files,
    load_nifti,
)
from lasegjax.data.pipeline import prepare_volume, restore_volume
from lasegjax.data.readers import LASC2018_IMAGE_NAME
from lasegjax.data.volume import Volume
from lasegjax.errors import CheckpointError, ConfigError, DataError, LasegError
from lasegjax.model.segmenter import build_model
from lasegjax.reporting import setup_logging
from lasegjax.train import compute_dtype

OUTPUT_SUFFIX = ".nii.gz"
NRRD_SUFFIX = ".nrrd"
INPUT_SUFFIXES = (*NIFTI_SUFFIXES, NRRD_SUFFIX)
TTA_MODES = ("none", "flip")
# Axes of a (Z, H, W) slice stack flipped by `--tta flip`: the identity, then each in-plane
# axis. Training augments with the same flips, so the model has seen flipped anatomy.
FLIP_AXES = ((), (1,), (2,))

_EPILOG = f"""\
outputs:
  For each input <name>.nii, <name>.nii.gz or <name>.nrrd, writes <output>/<name>{OUTPUT_SUFFIX}:
  a uint8 mask (1 = left atrium) on the input's voxel grid. A NIfTI input's qform, sform and
  their codes are copied. An NRRD input's space directions and origin become the affine
  (converted to RAS+), stored as qform and sform with code 1. A LASC2018 image
  <case>/{LASC2018_IMAGE_NAME} is named after its case folder. An existing output file is an error unless --overwrite is given, and an output that
  would replace an input image is always an error. Files are written to a temporary name
  and renamed, so an interrupted run leaves no partial mask.

test-time augmentation:
  --tta flip averages the probabilities of the slices as given and flipped along each of
  the two in-plane axes (3 forward passes per slice), then thresholds the average.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lasegjax.predict",
        description="Segment the left atrium in NIfTI or NRRD volumes with a trained lasegjax "
        "model.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--workdir",
        required=True,
        type=Path,
        help="training run folder, containing config.json and checkpoints/",
    )
    parser.add_argument(
        "--input",
        required=True,
        type=Path,
        help="a NIfTI (.nii, .nii.gz) or NRRD (.nrrd) image, or a folder of them (not searched "
        "recursively)",
    )
    parser.add_argument(
        "--output", required=True, type=Path, help="folder for the masks; created if missing"
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="'best' (highest validation Dice), 'latest', or a step number. Default: best "
        "when a checkpoint has a validation Dice, else latest",
    )
    parser.add_argument(
        "--largest_component",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep only the largest connected component of each mask. Default: "
        "eval.largest_component of the run's config",
    )
    parser.add_argument(
        "--tta",
        choices=TTA_MODES,
        default="none",
        help="test-time augmentation: 'flip' averages over in-plane flips (default: none)",
    )
    parser.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="slices per forward pass, a multiple of the device count. Default: "
        "eval.batch_size of the run's config",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="probability above which a voxel is foreground. Default: eval.threshold of the "
        "run's config",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser.parse_args(argv)


def list_inputs(path: Path) -> list[Path]:
    """Return the image file `path`, or the NIfTI and NRRD files directly inside the folder."""
    if not path.exists():
        raise DataError(
            f"input not found: {path}. Pass a NIfTI (.nii, .nii.gz) or NRRD (.nrrd) file or a "
            "folder of them"
        )
    if path.is_dir():
        return list_nifti_files(path, "--input", INPUT_SUFFIXES, kind="NIfTI or NRRD")
    if not path.name.endswith(INPUT_SUFFIXES):
        raise DataError(
            f"input {path} is not a NIfTI or NRRD file: expected a name ending in .nii, "
            ".nii.gz or .nrrd"
        )
    return [path]


def output_name(path: Path) -> str:
    """Return the case name of an input: the file name without its suffix.

    A LASC2018 image, <case>/lgemri.nrrd, is named after its case folder.
    """
    if path.name == LASC2018_IMAGE_NAME:
        return path.resolve().parent.name
    if path.name.endswith(NRRD_SUFFIX):
        return path.name[: -len(NRRD_SUFFIX)]
    return case_name(path)


def read_input(path: Path) -> tuple[np.ndarray, np.ndarray, object]:
    """Return (image, RAS+ affine, NIfTI header or None) of a NIfTI or NRRD input."""
    if is_nifti(path):
        image, affine = volume_io.read_nifti_image(path)
        return image, affine, load_nifti(path).header
    image, affine = volume_io.read_nrrd_image(path)
    return image, affine, None


def plan_outputs(inputs: list[Path], output_dir: Path, overwrite: bool) -> list[Path]:
    """Return the output path of each input, or raise before anything is computed."""
    if output_dir.exists() and not output_dir.is_dir():
        raise DataError(f"--output {output_dir} is a file; pass a folder")
    outputs = [output_dir / f"{output_name(path)}{OUTPUT_SUFFIX}" for path in inputs]

    first_input = {}
    for source, target in zip(inputs, outputs, strict=True):
        if target in first_input:
            raise DataError(
                f"{first_input[target]} and {source} would both be written to {target}. "
                "Rename one of them or predict them into different --output folders"
            )
        first_input[target] = source
        if target.resolve() == source.resolve():
            raise DataError(
                f"the mask for {source} would replace the image itself. Choose another --output"
            )

    existing = [target for target in outputs if target.exists()]
    if existing and not overwrite:
        listed = ", ".join(str(p) for p in existing[:5])
        more = f" and {len(existing) - 5} more" if len(existing) > 5 else ""
        raise DataError(
            f"output file {listed}{more} already exists. Pass --overwrite to replace it or "
            "choose another --output"
        )
    return outputs


def load_run_config(workdir: Path) -> ml_collections.ConfigDict:
    """Read `workdir/config.json`, with defaults for fields added since the run was trained."""
    path = workdir / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found. Pass the --workdir of a training run (the folder given to "
            "python -m lasegjax.main)"
        )
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"failed to read {path}: {err}") from err
    return ml_collections.ConfigDict(_merge(base_config().to_dict(), _lists_to_tuples(saved)))


def _lists_to_tuples(value):
    # JSON has no tuples; the model code hashes some config fields, which lists cannot be.
    if isinstance(value, dict):
        return {key: _lists_to_tuples(item) for key, item in value.items()}
    if isinstance(value, list):
        return tuple(_lists_to_tuples(item) for item in value)
    return value


def _merge(defaults: dict, saved: dict) -> dict:
    merged = dict(defaults)
    for key, value in saved.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve_checkpoint_step(manager: ocp.CheckpointManager, choice: str | None) -> int:
    """Return the step that `--checkpoint` selects among the manager's checkpoints."""
    checkpoint_dir = manager.directory
    steps = sorted(manager.all_steps())
    best = manager.best_step()
    if not steps:
        raise CheckpointError(f"no checkpoint found in {checkpoint_dir}")

    available = ", ".join(str(s) for s in steps)
    if choice is None:
        return best if best is not None else steps[-1]
    if choice == "latest":
        return steps[-1]
    if choice == "best":
        if best is None:
            raise CheckpointError(
                f"no checkpoint in {checkpoint_dir} has a validation Dice, so none is best. "
                f"Pass --checkpoint latest or a step ({available})"
            )
        return best
    try:
        step = int(choice)
    except ValueError:
        raise CheckpointError(
            f"--checkpoint {choice!r} is invalid: use 'best', 'latest' or a step ({available})"
        ) from None
    if step not in steps:
        raise CheckpointError(
            f"no checkpoint at step {step} in {checkpoint_dir}; available steps: {available}"
        )
    return step


class Predictor:
    """A trained model with its parameters on a device mesh, predicting whole volumes."""

    def __init__(
        self, config, params, mesh, batch_size: int, tta: str, threshold: float, largest: bool
    ):
        if tta not in TTA_MODES:
            raise ValueError(f"tta {tta!r} is invalid: use one of {TTA_MODES}")
        sharding.check_batch_divisible(batch_size, mesh, "--batch_size")
        self.config = config
        self.params = params
        self.batch_size = batch_size
        self.flips = FLIP_AXES if tta == "flip" else FLIP_AXES[:1]
        self.threshold = threshold
        self.largest = largest
        model = build_model(config.model, compute_dtype(config))
        self.predict_fn = evaluation.make_predict_fn(model, mesh)

    def __call__(self, volume: Volume) -> np.ndarray:
        """Return the uint8 {0, 1} mask of `volume` on its own voxel grid."""
        mask = (self.probabilities(volume) > self.threshold).astype(np.uint8)
        if self.largest:
            mask = evaluation.largest_component(mask)
        return mask

    def probabilities(self, volume: Volume) -> np.ndarray:
        """Return the float32 foreground probabilities of `volume` on its own voxel grid."""
        prepared = prepare_volume(volume, self.config.data)
        probabilities = np.zeros(prepared.images.shape, np.float32)
        for axes in self.flips:
            images = np.ascontiguousarray(np.flip(prepared.images, axes))
            flipped = evaluation.predict_slices(
                self.predict_fn,
                self.params,
                images,
                self.batch_size,
                self.config.data.context_slices,
            )
            probabilities += np.flip(flipped, axes)
        probabilities /= len(self.flips)
        return restore_volume(probabilities, prepared, self.config.data.fit)


def load_predictor(args: argparse.Namespace, config) -> Predictor:
    """Restore the parameters that `--checkpoint` selects and build the predictor."""
    batch_size = args.batch_size if args.batch_size is not None else config.eval.batch_size
    if batch_size <= 0:
        raise ConfigError(f"--batch_size {batch_size} is invalid: pass a positive number")
    threshold = args.threshold if args.threshold is not None else config.eval.threshold
    if not 0.0 <= threshold < 1.0:
        raise ConfigError(f"--threshold {threshold} is invalid: pass a probability in [0, 1)")
    largest = args.largest_component
    if largest is None:
        largest = bool(config.eval.largest_component)

    # The only mesh of prediction: every device splits the batch of slices.
    mesh = sharding.make_mesh()
    sharding.check_batch_divisible(batch_size, mesh, "--batch_size")
    manager = checkpointing.open_read_only(args.workdir / "checkpoints")
    try:
        step = resolve_checkpoint_step(manager, args.checkpoint)
        params = checkpointing.restore_params(manager, step, sharding.replicated(mesh))
    finally:
        manager.close()
    logging.info("Restored the parameters of step %d from %s.", step, manager.directory)
    return Predictor(config, params, mesh, batch_size, args.tta, threshold, largest)


def predict_file(predictor: Predictor, source: Path, target: Path) -> None:
    """Predict the mask of the NIfTI or NRRD image `source` and write it to `target`."""
    start = time.perf_counter()
    image, affine, header = read_input(source)
    volume = Volume(
        case_id=output_name(source), image=image, mask=None, affine=affine, image_path=str(source)
    )
    mask = predictor(volume)
    evaluation.save_mask_nifti(mask, affine, target, reference_header=header)
    foreground = int(mask.sum())
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    logging.info(
        "%s -> %s: %s voxels, %d foreground (%.1f ml), %.1f s.",
        source,
        target,
        "x".join(str(s) for s in mask.shape),
        foreground,
        foreground * voxel_ml,
        time.perf_counter() - start,
    )


def main(argv: list[str] | None = None) -> list[Path]:
    """Run the command line; return the written mask files. Raises LasegError on bad input."""
    args = parse_args(argv)
    setup_logging(None)
    inputs = list_inputs(args.input)
    outputs = plan_outputs(inputs, args.output, args.overwrite)
    # Read each header now, so that a corrupt file fails before the model is loaded.
    for path in inputs:
        if is_nifti(path):
            load_nifti(path)
        else:
            volume_io.read_nrrd_affine(path)
    config = load_run_config(args.workdir)
    try:
        sharding.setup_host(config)
    except RuntimeError:
        # JAX was already initialised by the program that called main (tests, notebooks),
        # so its devices are used as they are.
        pass

    predictor = load_predictor(args, config)
    logging.info(
        "Predicting %d volume(s) into %s (test-time augmentation: %s).",
        len(inputs),
        args.output,
        args.tta,
    )
    args.output.mkdir(parents=True, exist_ok=True)
    with logging_redirect_tqdm():
        pairs = list(zip(inputs, outputs, strict=True))
        for source, target in tqdm(pairs, unit="volume", desc="predict"):
            predict_file(predictor, source, target)
    return outputs


def cli() -> None:
    # Importing orbax logs through absl, which without absl.app installs a default stderr
    # handler on the root logger; main installs the one this command uses.
    logging.getLogger().handlers.clear()
    try:
        main()
    except LasegError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    cli()
