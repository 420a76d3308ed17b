"""Export lasegjax weights to PyTorch.

  python -m weights_conversion.to_torch --checkpoint runs/small --out export/small

`--checkpoint` is a training workdir (its `config.json` and `checkpoints/` folder), that
`checkpoints/` folder itself, or a converted-encoder folder from `to_flax`. The output
folder gets:

  dinov2_torch_hub.pth  the encoder as a torch-hub DINOv2 state dict
  dinov2_hf/            the encoder as a transformers Dinov2Model (or
                        Dinov2WithRegistersModel) folder
  encoder.json          architecture and position-embedding resize of the encoder
  segmenter.pth         (workdir only) state dict of `torch_model.TorchSegmenter`
  segmenter.json        (workdir only) its architecture; `torch_model.load_exported` reads both

The Hugging Face and torch-hub model code each resize the position embedding in their own
way. At input sizes other than the stored grid (518 px), their features therefore differ
slightly from the Flax model's, unless the source used the same recipe. `TorchSegmenter` and
`torch_model.DinoV2` use the recorded recipe and match the Flax model at every size.
"""

import json
import logging
import sys
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import torch
from absl import app, flags

from lasegjax.errors import CheckpointError, LasegError
from lasegjax.model.segmenter import build_model
from weights_conversion.checkpoint import is_converted_checkpoint, read_metadata, restore_params
from weights_conversion.mapping import encoder_rules, segmenter_rules, to_torch_state
from weights_conversion.spec import INTERPOLATIONS, EncoderSpec, Interpolation

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def hf_config(spec: EncoderSpec) -> dict:
    """Return the transformers config.json of a Dinov2Model(WithRegisters) for `spec`."""
    if spec.mlp == "swiglu":
        # transformers sizes the SwiGLU hidden layer from mlp_ratio as DINOv2 does:
        # two thirds of width * mlp_ratio, rounded up to a multiple of 8.
        mlp_ratio = 4
        if (int(spec.width * mlp_ratio * 2 / 3) + 7) // 8 * 8 != spec.mlp_hidden:
            raise CheckpointError(
                f"a SwiGLU MLP of {spec.mlp_hidden} hidden units for width {spec.width} has no "
                "transformers mlp_ratio; the Hugging Face export supports the published sizes only"
            )
    else:
        mlp_ratio = spec.mlp_hidden // spec.width
        if mlp_ratio * spec.width != spec.mlp_hidden:
            raise CheckpointError(
                f"MLP width {spec.mlp_hidden} is not a multiple of the width {spec.width}, so "
                "transformers' integer mlp_ratio cannot express it"
            )
    config = {
        "architectures": ["Dinov2WithRegistersModel" if spec.num_registers else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if spec.num_registers else "dinov2",
        "hidden_size": spec.width,
        "num_hidden_layers": spec.depth,
        "num_attention_heads": spec.num_heads,
        "mlp_ratio": mlp_ratio,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-6,
        "image_size": spec.pos_grid * spec.patch_size,
        "patch_size": spec.patch_size,
        "num_channels": spec.in_channels,
        "qkv_bias": True,
        "layerscale_value": 1.0,
        "drop_path_rate": 0.0,
        "use_swiglu_ffn": spec.mlp == "swiglu",
        "torch_dtype": "float32",
    }
    if spec.num_registers:
        config["num_register_tokens"] = spec.num_registers
    return config


def _tensors(state: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(dtype).contiguous() for k, v in state.items()}


def export_encoder(
    flat_params: dict,
    spec: EncoderSpec,
    interpolation: Interpolation,
    out: Path,
    hf_naming: str = "legacy",
    dtype: str = "float32",
) -> None:
    """Write the encoder as a torch-hub state dict, a Hugging Face folder and encoder.json."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = DTYPES[dtype]
    hub_rules = encoder_rules("torch_hub", spec.depth, spec.mlp, spec.num_registers)
    torch.save(
        _tensors(to_torch_state(hub_rules, flat_params), torch_dtype), out / "dinov2_torch_hub.pth"
    )

    hf_dir = out / "dinov2_hf"
    hf_dir.mkdir(exist_ok=True)
    hf_rules = encoder_rules(f"hf_{hf_naming}", spec.depth, spec.mlp, spec.num_registers)
    config = hf_config(spec) | {"torch_dtype": dtype}
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(
        _tensors(to_torch_state(hf_rules, flat_params), torch_dtype),
        hf_dir / "model.safetensors",
        metadata={"format": "pt"},
    )

    description = {
        "spec": spec.to_json(),
        "interpolation": {
            "recipe": interpolation.recipe,
            "offset": interpolation.offset,
            "antialias": interpolation.antialias,
        },
        "dinov2_kwargs": dinov2_kwargs(spec, interpolation),
    }
    (out / "encoder.json").write_text(json.dumps(description, indent=2) + "\n")


def dinov2_kwargs(spec: EncoderSpec, interpolation: Interpolation) -> dict:
    """Return the arguments of `torch_model.DinoV2` for `spec` and `interpolation`."""
    return {
        "width": spec.width,
        "depth": spec.depth,
        "num_heads": spec.num_heads,
        "mlp_hidden": spec.mlp_hidden,
        "mlp": spec.mlp,
        "patch_size": spec.patch_size,
        "in_channels": spec.in_channels,
        "num_registers": spec.num_registers,
        "pos_grid": spec.pos_grid,
        "interpolate_offset": interpolation.offset,
        "interpolate_antialias": interpolation.antialias,
    }


def interpolation_of(offset: float, antialias: bool) -> Interpolation:
    """Return the named recipe with these arguments, or an unnamed one."""
    for recipe in INTERPOLATIONS.values():
        if (recipe.offset, recipe.antialias) == (offset, antialias):
            return recipe
    return Interpolation("custom", offset, antialias)


def read_workdir_config(workdir: Path) -> ml_collections.ConfigDict:
    path = workdir / "config.json"
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"could not read the training config {path}: {err}") from err


def restore_trained_params(
    workdir: Path, model, config, step: int | None = None
) -> tuple[int, dict]:
    """Restore only `params` of the TrainState saved in `workdir/checkpoints`; return (step, params)."""
    directory = (workdir / "checkpoints").absolute()
    height, width = config.data.image_size
    abstract = jax.eval_shape(
        model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, height, width, 1), jnp.float32)
    )["params"]
    # A partial restore reads the parameters and skips optimizer state and data iterator.
    item = {"params": abstract}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    manager = ocp.CheckpointManager(
        directory, item_names=("state",), options=ocp.CheckpointManagerOptions(read_only=True)
    )
    try:
        steps = manager.all_steps()
        if not steps:
            raise CheckpointError(
                f"{directory} contains no checkpoint; train first or pass another --checkpoint"
            )
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise CheckpointError(
                f"{directory} has no step {step}; available steps: {sorted(steps)}"
            )
        args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        restored = manager.restore(step, args=ocp.args.Composite(state=args))
    except (ValueError, KeyError, OSError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(
            f"could not restore the parameters at step {step} of {directory}: {err}. The "
            "checkpoint does not match workdir/config.json or is incomplete"
        ) from err
    finally:
        manager.close()
    return step, restored.state["params"]


def segmenter_architecture(config, model) -> dict:
    """Return the `TorchSegmenter` architecture of a Flax `Segmenter` built from `config`."""
    encoder = model.encoder
    return {
        "encoder": {
            "width": encoder.width,
            "depth": encoder.depth,
            "num_heads": encoder.num_heads,
            "mlp_hidden": encoder.mlp_hidden,
            "mlp": encoder.mlp,
            "patch_size": encoder.patch_size,
            "in_channels": encoder.in_channels,
            "num_registers": encoder.num_registers,
            "pos_grid": encoder.pos_grid,
            "interpolate_offset": encoder.interpolate_offset,
            "interpolate_antialias": encoder.interpolate_antialias,
            "taps": list(encoder.taps),
            "norm_taps": encoder.norm_taps,
        },
        "input_channels": 2 * config.data.get("context_slices", 0) + 1,
        "fusion": config.model.fusion,
        "decoder": {
            "channels": list(config.model.decoder.channels),
            "image_integration": config.model.decoder.image_integration,
        },
    }


def export_workdir(workdir: Path, out: Path, step=None, hf_naming="legacy", dtype="float32") -> int:
    """Export the encoder and the whole segmenter trained in `workdir`; return the step."""
    config = read_workdir_config(workdir)
    model = build_model(config.model)
    step, params = restore_trained_params(workdir, model, config, step)
    flat = flax.traverse_util.flatten_dict(params, sep="/")

    encoder = model.encoder
    spec = EncoderSpec(
        size=config.model.encoder.size,
        width=encoder.width,
        depth=encoder.depth,
        num_heads=encoder.num_heads,
        mlp=encoder.mlp,
        mlp_hidden=encoder.mlp_hidden,
        patch_size=encoder.patch_size,
        in_channels=encoder.in_channels,
        num_registers=encoder.num_registers,
        pos_grid=encoder.pos_grid,
    )
    interpolation = interpolation_of(encoder.interpolate_offset, encoder.interpolate_antialias)
    encoder_flat = {
        k.removeprefix("encoder/"): v for k, v in flat.items() if k.startswith("encoder/")
    }
    export_encoder(encoder_flat, spec, interpolation, out, hf_naming, dtype)

    architecture = segmenter_architecture(config, model)
    rules = segmenter_rules(
        spec.depth,
        spec.mlp,
        spec.num_registers,
        config.model.fusion,
        len(config.model.decoder.channels),
    )
    state = _tensors(to_torch_state(rules, flat), DTYPES[dtype])
    torch.save(state, out / "segmenter.pth")
    architecture["step"] = step
    (out / "segmenter.json").write_text(json.dumps(architecture, indent=2) + "\n")
    return step


def export(
    checkpoint: str | Path, out: str | Path, step=None, hf_naming="legacy", dtype="float32"
) -> str:
    """Export a training workdir or a converted encoder; return a description of the export."""
    checkpoint, out = Path(checkpoint), Path(out)
    if hf_naming not in ("legacy", "current"):
        raise CheckpointError(f"--hf_naming={hf_naming} is invalid; use legacy or current")
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype={dtype} is invalid; use one of {list(DTYPES)}")
    if is_converted_checkpoint(checkpoint):
        spec, interpolation, _ = read_metadata(checkpoint)
        export_encoder(restore_params(checkpoint, spec), spec, interpolation, out, hf_naming, dtype)
        return f"the DINOv2 {spec.size} encoder of {checkpoint}"
    if checkpoint.name == "checkpoints" and (checkpoint.parent / "config.json").exists():
        checkpoint = checkpoint.parent
    if (checkpoint / "config.json").exists() and (checkpoint / "checkpoints").is_dir():
        step = export_workdir(checkpoint, out, step, hf_naming, dtype)
        return f"the segmenter of {checkpoint} at step {step}"
    raise CheckpointError(
        f"--checkpoint {checkpoint} is neither a training workdir (config.json and checkpoints/) "
        "nor a converted encoder from weights_conversion.to_flax"
    )


def define_flags() -> None:
    """Define the command-line flags; only when run as a program, so imports define none."""
    flags.DEFINE_string(
        "checkpoint",
        None,
        "Training workdir, its checkpoints/ folder, or a converted-encoder folder.",
    )
    flags.DEFINE_string("out", None, "Folder to write the PyTorch files to.")
    flags.DEFINE_integer("step", None, "Training step to export; default: the latest.")
    flags.DEFINE_enum(
        "hf_naming",
        "legacy",
        ["legacy", "current"],
        "Hugging Face key names: legacy (attention.attention.query, as published; read by "
        "transformers 4.x and 5.x) or current (attention.q_proj; transformers 5.x).",
    )
    flags.DEFINE_enum("dtype", "float32", list(DTYPES), "dtype of the written tensors.")
    flags.mark_flags_as_required(["checkpoint", "out"])


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # orbax logs each step of a save or restore through absl, and warnings about the
    # read-only manager that export opens; jax logs its backend search.
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("jax").setLevel(logging.WARNING)
    values = flags.FLAGS
    try:
        exported = export(
            values.checkpoint, values.out, values.step, values.hf_naming, values.dtype
        )
    except LasegError as err:
        sys.exit(f"error: {err}")
    logging.info("Exported %s to %s.", exported, Path(values.out).absolute())


if __name__ == "__main__":
    define_flags()
    app.run(main)
