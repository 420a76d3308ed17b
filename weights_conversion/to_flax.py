"""Convert a DINOv2 PyTorch checkpoint into an orbax checkpoint for lasegjax's encoder.

  python -m weights_conversion.to_flax --src dinov2_vitg14_reg4_pretrain.pth \
      --out weights/dinov2_vitg14_reg4 --config configs/giant.py \
      --config.model.encoder.num_registers=4

`--src` is a torch-hub file (`dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`), a single
`.safetensors` or `.bin` state dict, or a Hugging Face model folder (`config.json` and
`model.safetensors`, `pytorch_model.bin` or their sharded index). Size, register count
and key layout are read from the tensors; with `--config`, a mismatch with
`model.encoder` is an error. Train from the result with
`--config.model.encoder.checkpoint=DIR`.
"""

import logging
import re
import sys
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from lasegjax.errors import CheckpointError, LasegError
from weights_conversion.checkpoint import save_converted
from weights_conversion.mapping import check_rules, encoder_rules, to_flax_params
from weights_conversion.sources import SourceCheckpoint, open_source
from weights_conversion.spec import (
    INTERPOLATIONS,
    EncoderSpec,
    Interpolation,
    check_spec_against_config,
    default_interpolation,
    spec_from_shapes,
)

# Keys whose shapes give the architecture, per layout. `block` matches a block's first
# LayerNorm. `gelu` and `swiglu` are block 0's MLP input weight, and the SwiGLU entry
# also gives the number of halves its output is split into.
_PROBE_KEYS = {
    "torch_hub": dict(
        cls="cls_token",
        pos="pos_embed",
        patch="patch_embed.proj.weight",
        registers="register_tokens",
        block=r"blocks\.(\d+)\.norm1\.weight",
        gelu="blocks.0.mlp.fc1.weight",
        swiglu=("blocks.0.mlp.w12.weight", 2),
    ),
    "hf_legacy": dict(
        cls="embeddings.cls_token",
        pos="embeddings.position_embeddings",
        patch="embeddings.patch_embeddings.projection.weight",
        registers="embeddings.register_tokens",
        block=r"encoder\.layer\.(\d+)\.norm1\.weight",
        gelu="encoder.layer.0.mlp.fc1.weight",
        swiglu=("encoder.layer.0.mlp.weights_in.weight", 2),
    ),
    "hf_current": dict(
        cls="embeddings.cls_token",
        pos="embeddings.position_embeddings",
        patch="embeddings.patch_embeddings.projection.weight",
        registers="embeddings.register_tokens",
        block=r"encoder\.layer\.(\d+)\.norm1\.weight",
        gelu="encoder.layer.0.mlp.fc1.weight",
        swiglu=("encoder.layer.0.mlp.gate_proj.weight", 1),
    ),
}


def infer_spec(source: SourceCheckpoint) -> EncoderSpec:
    """Read the architecture off the tensor shapes, checked against config.json if present."""
    shapes = source.shapes
    probe = _PROBE_KEYS[source.layout]
    for name in ("cls", "pos", "patch"):
        if probe[name] not in shapes:
            raise CheckpointError(
                f"{source.path} is missing {probe[name]!r}, which every DINOv2 checkpoint has"
            )

    width = shapes[probe["cls"]][-1]
    pattern = re.compile(probe["block"])
    indices = {int(m.group(1)) for key in shapes if (m := pattern.fullmatch(key))}
    if not indices:
        raise CheckpointError(
            f"{source.path} has no transformer blocks (no key like {probe['block']!r}); "
            "pass a DINOv2 backbone checkpoint"
        )
    depth = max(indices) + 1

    swiglu_key, halves = probe["swiglu"]
    if probe["gelu"] in shapes:
        mlp, mlp_hidden = "gelu", shapes[probe["gelu"]][0]
    elif swiglu_key in shapes:
        mlp, mlp_hidden = "swiglu", shapes[swiglu_key][0] // halves
    else:
        raise CheckpointError(
            f"{source.path}: block 0 has no MLP input weight ({probe['gelu']!r} or "
            f"{swiglu_key!r}); pass a complete DINOv2 backbone checkpoint"
        )

    registers = shapes[probe["registers"]][1] if probe["registers"] in shapes else 0
    spec = spec_from_shapes(
        width, depth, mlp, mlp_hidden, shapes[probe["patch"]], shapes[probe["pos"]][1], registers
    )
    if source.hf_config is not None:
        check_hf_config(source.hf_config, spec, source.path)
    return spec


def check_hf_config(hf_config: dict, spec: EncoderSpec, path) -> None:
    """Raise CheckpointError where a Hugging Face config.json contradicts the tensors."""
    is_registers = hf_config.get("model_type") == "dinov2_with_registers"
    expected = {
        "hidden_size": spec.width,
        "num_hidden_layers": spec.depth,
        "num_attention_heads": spec.num_heads,
        "patch_size": spec.patch_size,
        "use_swiglu_ffn": spec.mlp == "swiglu",
        "num_register_tokens": spec.num_registers if is_registers else None,
        "image_size": spec.pos_grid * spec.patch_size,
    }
    if hf_config.get("model_type") not in ("dinov2", "dinov2_with_registers"):
        raise CheckpointError(
            f"{path}/config.json has model_type {hf_config.get('model_type')!r}; expected "
            "'dinov2' or 'dinov2_with_registers'"
        )
    if not is_registers and spec.num_registers:
        raise CheckpointError(
            f"{path} contains {spec.num_registers} register tokens but config.json sets "
            "model_type 'dinov2', which has none; fix config.json"
        )
    for field, value in expected.items():
        if value is None or field not in hf_config:
            continue
        if hf_config[field] != value:
            raise CheckpointError(
                f"{path}/config.json sets {field}={hf_config[field]!r} but the tensors imply "
                f"{value!r}; the folder mixes files of different models"
            )


def flax_shapes(spec: EncoderSpec) -> dict[str, tuple[int, ...]]:
    """Return {Flax path: shape} of the encoder parameters for `spec`."""
    dummy = jax.ShapeDtypeStruct(
        (1, spec.patch_size, spec.patch_size, spec.in_channels), jnp.float32
    )
    abstract = jax.eval_shape(spec.flax_module().init, jax.random.PRNGKey(0), dummy)["params"]
    return {
        k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(abstract, sep="/").items()
    }


def _store(array: np.ndarray) -> jax.Array:
    # orbax 0.12 saves jax.Arrays on the CPU without an extra copy, but copies NumPy arrays.
    return jnp.asarray(array, dtype=jnp.float32)


def convert_to_flax(
    src: str | Path,
    out: str | Path,
    config=None,
    interpolation: str = "auto",
    force: bool = False,
) -> tuple[EncoderSpec, Interpolation, Path]:
    """Convert `src` into a checkpoint at `out`; return (spec, interpolation, output path).

    Args:
      config: A full lasegjax config whose `model.encoder` the checkpoint must fit.
      interpolation: "auto" (the recipe of the source's code) or a key of `INTERPOLATIONS`.
    """
    source = open_source(src)
    spec = infer_spec(source)
    source_name = f"--src {source.path}"
    if config is not None:
        check_spec_against_config(spec, config.model.encoder, source_name)
    if interpolation == "auto":
        recipe = default_interpolation(source.format, spec.num_registers)
    elif interpolation in INTERPOLATIONS:
        recipe = INTERPOLATIONS[interpolation]
    else:
        raise CheckpointError(
            f"--interpolation={interpolation} is invalid; use auto or one of {list(INTERPOLATIONS)}"
        )
    rules = encoder_rules(source.layout, spec.depth, spec.mlp, spec.num_registers)
    check_rules(rules, source.shapes, flax_shapes(spec), source_name)
    dtypes = sorted(set(source.dtypes.values()))
    flat = to_flax_params(rules, source.read, store=_store)
    metadata = {
        "encoder": spec.to_json(),
        "interpolation": {
            "recipe": recipe.recipe,
            "offset": recipe.offset,
            "antialias": recipe.antialias,
        },
        "source": {
            "path": str(source.path.absolute()),
            "format": source.format,
            "layout": source.layout,
            "dtypes": dtypes,
        },
    }
    path = save_converted(out, flat, metadata, force=force)
    return spec, recipe, path


def define_flags() -> None:
    """Define the command-line flags; only when run as a program, so imports define none."""
    flags.DEFINE_string(
        "src", None, "torch-hub .pth, .safetensors/.bin file, or Hugging Face folder."
    )
    flags.DEFINE_string("out", None, "Folder to write the orbax checkpoint to.")
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Optional config file (configs/*.py) whose model.encoder the weights must fit.",
    )
    flags.DEFINE_enum(
        "interpolation",
        "auto",
        ["auto", *INTERPOLATIONS],
        "Position-embedding resize to record; auto: the one of the source's code.",
    )
    flags.DEFINE_bool("force", False, "Overwrite a non-empty --out folder.")
    flags.mark_flags_as_required(["src", "out"])


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # orbax logs each step of a save or restore through absl, and warnings about the
    # read-only manager that export opens; jax logs its backend search.
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("jax").setLevel(logging.WARNING)
    values = flags.FLAGS
    start = time.perf_counter()
    try:
        spec, recipe, path = convert_to_flax(
            values.src, values.out, values.config, values.interpolation, values.force
        )
    except LasegError as err:
        sys.exit(f"error: {err}")
    logging.info(
        "Wrote %s: DINOv2 %s (%d blocks, %d registers), position-embedding resize %s, in %.1f s. "
        "Train with --config.model.encoder.checkpoint=%s",
        path,
        spec.size,
        spec.depth,
        spec.num_registers,
        recipe.recipe,
        time.perf_counter() - start,
        path,
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
