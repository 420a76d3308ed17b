"""The converted-encoder checkpoint: an orbax checkpoint with `params` and `metadata` items.

`params` contains the Flax parameters of `DinoV2Encoder` (no `encoder/` prefix), saved
without compression, because with compression orbax 0.12 keeps a second copy of the
arrays while it saves, and float weights barely compress. `metadata` is JSON with the architecture (`spec.EncoderSpec`),
the source file and layout, and the position-embedding resize recipe of the source, so
that training and export use the resize the weights were trained with.
"""

import logging
from pathlib import Path

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from lasegjax.errors import CheckpointError, ConfigError
from weights_conversion.spec import (
    EncoderSpec,
    Interpolation,
    check_spec_against_config,
)

FORMAT_VERSION = 1


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(
        ocp.CompositeCheckpointHandler(
            params=ocp.PyTreeCheckpointHandler(use_compression=False),
            metadata=ocp.JsonCheckpointHandler(),
        )
    )


def save_converted(out: str | Path, flat_params: dict, metadata: dict, force: bool = False) -> Path:
    """Write `flat_params` ({"a/b": array}) and `metadata` as a converted checkpoint at `out`."""
    out = Path(out).absolute()
    if out.exists() and any(out.iterdir()) and not force:
        raise CheckpointError(
            f"--out {out} already exists and is not empty; remove it or pass --force"
        )
    tree = flax.traverse_util.unflatten_dict(flat_params, sep="/")
    metadata = {"format_version": FORMAT_VERSION, **metadata}
    _checkpointer().save(
        out,
        args=ocp.args.Composite(
            params=ocp.args.PyTreeSave(tree), metadata=ocp.args.JsonSave(metadata)
        ),
        force=force,
    )
    return out


def is_converted_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / "metadata").is_dir() and (path / "params").is_dir()


def read_metadata(path: str | Path) -> tuple[EncoderSpec, Interpolation, dict]:
    """Return (spec, interpolation, full metadata) of a converted checkpoint."""
    path = Path(path).absolute()
    if not path.exists():
        raise CheckpointError(
            f"converted checkpoint {path} does not exist; create it with "
            "`python -m weights_conversion.to_flax --src FILE --out DIR`"
        )
    if not is_converted_checkpoint(path):
        raise CheckpointError(
            f"{path} is not a converted DINOv2 checkpoint (no 'params' and 'metadata' items); "
            "create one with `python -m weights_conversion.to_flax --src FILE --out DIR`"
        )
    try:
        restored = _checkpointer().restore(
            path, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())
        )
    except (ValueError, OSError, KeyError) as err:
        raise CheckpointError(f"could not read the metadata of {path}: {err}") from err
    metadata = dict(restored.metadata)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {metadata.get('format_version')}, this code reads "
            f"{FORMAT_VERSION}; convert the source checkpoint again"
        )
    interp = metadata["interpolation"]
    return EncoderSpec.from_json(metadata["encoder"]), Interpolation(**interp), metadata


def restore_params(path: str | Path, spec: EncoderSpec, depth: int | None = None) -> dict:
    """Restore the encoder parameters as {"a/b": np.ndarray}, optionally only `depth` blocks."""
    path = Path(path).absolute()
    module = spec.flax_module()
    abstract = jax.eval_shape(
        module.init,
        jax.random.PRNGKey(0),
        jax.ShapeDtypeStruct((1, spec.patch_size, spec.patch_size, spec.in_channels), np.float32),
    )["params"]
    flat = flax.traverse_util.flatten_dict(abstract, sep="/")

    if depth is not None:
        kept_blocks = {f"blocks_{i}" for i in range(depth)}
        flat = {
            k: v
            for k, v in flat.items()
            if not k.startswith("blocks_") or k.split("/")[0] in kept_blocks
        }

    target = flax.traverse_util.unflatten_dict(flat, sep="/")
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    try:
        restored = _checkpointer().restore(
            path,
            args=ocp.args.Composite(
                params=ocp.args.PyTreeRestore(
                    item=target, restore_args=restore_args, partial_restore=True
                )
            ),
        )
    except (ValueError, OSError, KeyError, RuntimeError) as err:
        raise CheckpointError(
            f"could not restore the parameters of {path}: {err}. The checkpoint is incomplete "
            "or corrupt; convert the source checkpoint again"
        ) from err

    params = flax.traverse_util.flatten_dict(restored.params, sep="/")
    for key, value in flat.items():
        if key not in params or tuple(params[key].shape) != tuple(value.shape):
            shape = None if key not in params else tuple(params[key].shape)
            raise CheckpointError(
                f"{path}: parameter {key!r} has shape {shape}, expected {tuple(value.shape)} "
                "for the recorded architecture; convert the source checkpoint again"
            )
    return params


def apply_checkpoint_recipe(config) -> None:
    """Set the config's encoder resize recipe to the one its converted checkpoint recorded.

    Does nothing without `model.encoder.checkpoint`. Raises CheckpointError if the
    checkpoint's architecture does not fit the config. Call it before `build_model`, and
    before the config is saved, so that a later export rebuilds the same model.
    """
    encoder = config.model.encoder
    if not encoder.checkpoint:
        return
    spec, interpolation, _ = read_metadata(encoder.checkpoint)
    check_spec_against_config(spec, encoder, f"checkpoint {encoder.checkpoint}")
    configured = (encoder.interpolate_offset, encoder.interpolate_antialias)
    if configured != (interpolation.offset, interpolation.antialias):
        logging.info(
            "Using the position-embedding resize of %s (offset %s, antialias %s) recorded in "
            "%s, in place of the config's offset %s, antialias %s.",
            interpolation.recipe,
            interpolation.offset,
            interpolation.antialias,
            encoder.checkpoint,
            encoder.interpolate_offset,
            encoder.interpolate_antialias,
        )
    encoder.interpolate_offset = interpolation.offset
    encoder.interpolate_antialias = interpolation.antialias


def load_encoder_params(config, params: dict) -> dict:
    """Return `params` with the `encoder` subtree replaced by the configured checkpoint.

    Raises CheckpointError if the checkpoint does not fit the config, and ConfigError if
    the config's resize recipe differs from the checkpoint's (see `apply_checkpoint_recipe`).
    """
    encoder = config.model.encoder
    path = encoder.checkpoint
    spec, interpolation, _ = read_metadata(path)
    check_spec_against_config(spec, encoder, f"checkpoint {path}")
    configured = (encoder.interpolate_offset, encoder.interpolate_antialias)
    if configured != (interpolation.offset, interpolation.antialias):
        raise ConfigError(
            f"model.encoder.interpolate_offset={configured[0]} and "
            f"interpolate_antialias={configured[1]}, but {path} was converted from a "
            f"{interpolation.recipe} source that resizes position embeddings with offset "
            f"{interpolation.offset} and antialias {interpolation.antialias}. Call "
            "weights_conversion.checkpoint.apply_checkpoint_recipe(config) before build_model, "
            "or set those two fields"
        )
    current = flax.traverse_util.flatten_dict(params["encoder"], sep="/")
    depth = sum(1 for key in current if key.endswith("/norm1/scale") and key.startswith("blocks_"))
    loaded = restore_params(path, spec, depth)
    if set(loaded) != set(current):
        raise CheckpointError(
            f"{path} contains parameters {sorted(set(loaded) - set(current))[:5]} that the "
            f"model lacks, and is missing {sorted(set(current) - set(loaded))[:5]}; check "
            "model.encoder in the config"
        )
    for key, value in current.items():
        if tuple(loaded[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{path}: parameter {key!r} has shape {tuple(loaded[key].shape)} but the model "
                f"expects {tuple(value.shape)}; check model.encoder in the config"
            )
    if depth < spec.depth:
        logging.info("Loaded the first %d of the %d blocks in %s.", depth, spec.depth, path)
    new_params = dict(params)
    new_params["encoder"] = flax.traverse_util.unflatten_dict(
        {k: np.asarray(v, dtype=current[k].dtype) for k, v in loaded.items()}, sep="/"
    )
    logging.info(
        "Loaded DINOv2 %s encoder weights from %s (position-embedding resize: %s).",
        spec.size,
        path,
        interpolation.recipe,
    )
    return new_params
