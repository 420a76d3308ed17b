"""The one table between PyTorch state-dict keys and Flax parameter paths.

Each rule names one or more PyTorch keys, one Flax path (`/`-separated) and a transform
with an exact inverse. `to_flax_params` runs the rules forwards and `to_torch_state`
runs the same rules backwards, so the two directions cannot drift apart, and a round
trip returns bit-identical tensors: every transform only transposes, concatenates or
splits.

Three source layouts are covered:
  torch_hub: the DINOv2 repository's state dict (`blocks.N.attn.qkv`, `ls1.gamma`).
  hf_legacy: transformers' Dinov2Model and Dinov2WithRegistersModel as published
    (`attention.attention.query`, `mlp.weights_in`), loadable by transformers 4.x and 5.x.
  hf_current: the same models in transformers 5.x naming (`attention.q_proj`,
    `mlp.gate_proj` and `mlp.up_proj`).
The whole segmenter adds the rules of `segmenter_rules` for fusion and decoder.
"""

import dataclasses
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from lasegjax.errors import CheckpointError

LAYOUTS = ("torch_hub", "hf_legacy", "hf_current")


class Transform:
    """A bijection between n PyTorch tensors and one Flax array."""

    name = "identity"

    def to_flax(self, tensors: list[np.ndarray]) -> np.ndarray:
        return tensors[0]

    def to_torch(self, array: np.ndarray, count: int) -> list[np.ndarray]:
        return [array]

    def source_shapes(self, shape: tuple[int, ...], count: int) -> list[tuple[int, ...]]:
        """Return the PyTorch shapes that map to a Flax array of `shape`."""
        return [tuple(shape)]


class Linear(Transform):
    """torch Linear weight (out, in) <-> Flax Dense kernel (in, out)."""

    name = "linear"

    def to_flax(self, tensors):
        return tensors[0].T

    def to_torch(self, array, count):
        return [array.T]

    def source_shapes(self, shape, count):
        return [tuple(reversed(shape))]


class Conv(Transform):
    """torch Conv2d weight (out, in, kh, kw) <-> Flax Conv kernel (kh, kw, in, out)."""

    name = "conv"

    def to_flax(self, tensors):
        return tensors[0].transpose(2, 3, 1, 0)

    def to_torch(self, array, count):
        return [array.transpose(3, 2, 0, 1)]

    def source_shapes(self, shape, count):
        kh, kw, cin, cout = shape
        return [(cout, cin, kh, kw)]


class ConcatLinear(Transform):
    """Separate torch Linear weights <-> one Flax kernel with their outputs side by side.

    Fuses Hugging Face's query, key and value projections into DINOv2's `qkv`, and the
    SwiGLU gate and value projections into `w12` (gate first, as `w12(x).chunk(2)` reads).
    """

    name = "concat_linear"

    def to_flax(self, tensors):
        return np.concatenate(tensors, axis=0).T

    def to_torch(self, array, count):
        return [part.T for part in np.split(array, count, axis=1)]

    def source_shapes(self, shape, count):
        fan_in, fan_out = shape
        return [(fan_out // count, fan_in)] * count


class ConcatBias(Transform):
    """Separate torch bias vectors <-> one Flax bias, in the order of `ConcatLinear`."""

    name = "concat_bias"

    def to_flax(self, tensors):
        return np.concatenate(tensors, axis=0)

    def to_torch(self, array, count):
        return np.split(array, count, axis=0)

    def source_shapes(self, shape, count):
        return [(shape[0] // count,)] * count


IDENTITY, LINEAR, CONV = Transform(), Linear(), Conv()
CONCAT_LINEAR, CONCAT_BIAS = ConcatLinear(), ConcatBias()


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of the table: PyTorch keys, the Flax path they fill and the transform."""

    sources: tuple[str, ...]
    target: str
    transform: Transform


# Table rows: (PyTorch keys, Flax path, transform, condition). `{i}` is a block index,
# and the condition is None (always), "gelu", "swiglu" or "registers".
_Row = tuple[tuple[str, ...], str, Transform, str | None]


def _linear_rows(torch_name: str, flax_name: str, condition=None) -> list[_Row]:
    return [
        ((f"{torch_name}.weight",), f"{flax_name}/kernel", LINEAR, condition),
        ((f"{torch_name}.bias",), f"{flax_name}/bias", IDENTITY, condition),
    ]


def _norm_rows(torch_name: str, flax_name: str) -> list[_Row]:
    return [
        ((f"{torch_name}.weight",), f"{flax_name}/scale", IDENTITY, None),
        ((f"{torch_name}.bias",), f"{flax_name}/bias", IDENTITY, None),
    ]


def _fused_rows(torch_names: Iterable[str], flax_name: str, condition=None) -> list[_Row]:
    names = tuple(torch_names)
    return [
        (tuple(f"{n}.weight" for n in names), f"{flax_name}/kernel", CONCAT_LINEAR, condition),
        (tuple(f"{n}.bias" for n in names), f"{flax_name}/bias", CONCAT_BIAS, condition),
    ]


def _torch_hub_table() -> tuple[list[_Row], list[_Row]]:
    root = [
        (("cls_token",), "cls_token", IDENTITY, None),
        (("pos_embed",), "pos_embed", IDENTITY, None),
        (("mask_token",), "mask_token", IDENTITY, None),
        (("register_tokens",), "register_tokens", IDENTITY, "registers"),
        (("patch_embed.proj.weight",), "patch_embed/proj/kernel", CONV, None),
        (("patch_embed.proj.bias",), "patch_embed/proj/bias", IDENTITY, None),
        *_norm_rows("norm", "norm"),
    ]
    block = [
        *_norm_rows("blocks.{i}.norm1", "blocks_{i}/norm1"),
        *_linear_rows("blocks.{i}.attn.qkv", "blocks_{i}/attn/qkv"),
        *_linear_rows("blocks.{i}.attn.proj", "blocks_{i}/attn/proj"),
        (("blocks.{i}.ls1.gamma",), "blocks_{i}/ls1/gamma", IDENTITY, None),
        *_norm_rows("blocks.{i}.norm2", "blocks_{i}/norm2"),
        *_linear_rows("blocks.{i}.mlp.fc1", "blocks_{i}/mlp/fc1", "gelu"),
        *_linear_rows("blocks.{i}.mlp.fc2", "blocks_{i}/mlp/fc2", "gelu"),
        *_linear_rows("blocks.{i}.mlp.w12", "blocks_{i}/mlp/w12", "swiglu"),
        *_linear_rows("blocks.{i}.mlp.w3", "blocks_{i}/mlp/w3", "swiglu"),
        (("blocks.{i}.ls2.gamma",), "blocks_{i}/ls2/gamma", IDENTITY, None),
    ]
    return root, block


def _hf_table(current: bool) -> tuple[list[_Row], list[_Row]]:
    root = [
        (("embeddings.cls_token",), "cls_token", IDENTITY, None),
        (("embeddings.position_embeddings",), "pos_embed", IDENTITY, None),
        (("embeddings.mask_token",), "mask_token", IDENTITY, None),
        (("embeddings.register_tokens",), "register_tokens", IDENTITY, "registers"),
        (("embeddings.patch_embeddings.projection.weight",), "patch_embed/proj/kernel", CONV, None),
        (("embeddings.patch_embeddings.projection.bias",), "patch_embed/proj/bias", IDENTITY, None),
        *_norm_rows("layernorm", "norm"),
    ]
    layer = "encoder.layer.{i}"
    if current:
        qkv = [f"{layer}.attention.{n}_proj" for n in "qkv"]
        attn_out = f"{layer}.attention.o_proj"
        swiglu = [
            *_fused_rows(
                [f"{layer}.mlp.gate_proj", f"{layer}.mlp.up_proj"], "blocks_{i}/mlp/w12", "swiglu"
            ),
            *_linear_rows(f"{layer}.mlp.down_proj", "blocks_{i}/mlp/w3", "swiglu"),
        ]
    else:
        qkv = [f"{layer}.attention.attention.{n}" for n in ("query", "key", "value")]
        attn_out = f"{layer}.attention.output.dense"
        swiglu = [
            *_linear_rows(f"{layer}.mlp.weights_in", "blocks_{i}/mlp/w12", "swiglu"),
            *_linear_rows(f"{layer}.mlp.weights_out", "blocks_{i}/mlp/w3", "swiglu"),
        ]
    block = [
        *_norm_rows(f"{layer}.norm1", "blocks_{i}/norm1"),
        *_fused_rows(qkv, "blocks_{i}/attn/qkv"),
        *_linear_rows(attn_out, "blocks_{i}/attn/proj"),
        ((f"{layer}.layer_scale1.lambda1",), "blocks_{i}/ls1/gamma", IDENTITY, None),
        *_norm_rows(f"{layer}.norm2", "blocks_{i}/norm2"),
        *_linear_rows(f"{layer}.mlp.fc1", "blocks_{i}/mlp/fc1", "gelu"),
        *_linear_rows(f"{layer}.mlp.fc2", "blocks_{i}/mlp/fc2", "gelu"),
        *swiglu,
        ((f"{layer}.layer_scale2.lambda1",), "blocks_{i}/ls2/gamma", IDENTITY, None),
    ]
    return root, block


def _expand(rows: list[_Row], conditions: set[str], index=None, prefix=("", "")) -> list[Rule]:
    rules = []
    for sources, target, transform, condition in rows:
        if condition is not None and condition not in conditions:
            continue
        keys = tuple(prefix[0] + key.format(i=index) for key in sources)
        rules.append(Rule(keys, prefix[1] + target.format(i=index), transform))
    return rules


def encoder_rules(layout: str, depth: int, mlp: str, num_registers: int) -> list[Rule]:
    """Return the rules of a DINOv2 encoder with `depth` blocks in the given layout."""
    if layout == "torch_hub":
        root, block = _torch_hub_table()
    elif layout in ("hf_legacy", "hf_current"):
        root, block = _hf_table(current=layout == "hf_current")
    else:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    conditions = {mlp} | ({"registers"} if num_registers else set())
    rules = _expand(root, conditions)
    for index in range(depth):
        rules += _expand(block, conditions, index)
    return rules


def _segmenter_tables() -> tuple[list[_Row], list[_Row]]:
    """Return the fusion and decoder rows: those outside the stages, and one stage's."""
    root = [
        (("fusion.logits",), "fusion/logits", IDENTITY, "learned"),
        (("decoder.input_proj.weight",), "decoder/input_proj/kernel", CONV, None),
        (("decoder.input_proj.bias",), "decoder/input_proj/bias", IDENTITY, None),
        (("decoder.head.weight",), "decoder/head/kernel", CONV, None),
        (("decoder.head.bias",), "decoder/head/bias", IDENTITY, None),
    ]
    stage = []
    for conv in range(2):
        stage += [
            (
                (f"decoder.stage{{i}}.conv{conv}.weight",),
                f"decoder/stage{{i}}/conv{conv}/kernel",
                CONV,
                None,
            ),
            *_norm_rows(f"decoder.stage{{i}}.norm{conv}", f"decoder/stage{{i}}/norm{conv}"),
        ]
    return root, stage


def segmenter_rules(
    depth: int, mlp: str, num_registers: int, fusion: str, num_stages: int
) -> list[Rule]:
    """Return the rules of the whole segmenter, with the encoder in the torch-hub layout.

    PyTorch keys are those of `torch_model.TorchSegmenter`: `encoder.` plus a torch-hub
    key, `fusion.logits`, and the decoder's modules under their Flax names.
    """
    encoder_root, encoder_block = _torch_hub_table()
    conditions = {mlp} | ({"registers"} if num_registers else set())
    prefix = ("encoder.", "encoder/")
    rules = _expand(encoder_root, conditions, prefix=prefix)
    for index in range(depth):
        rules += _expand(encoder_block, conditions, index, prefix=prefix)

    root, stage = _segmenter_tables()
    rules += _expand(root, {fusion})
    for index in range(num_stages):
        rules += _expand(stage, set(), index)
    return rules


def _list_keys(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    listed = ", ".join(repr(k) for k in keys[:limit])
    return listed + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_rules(
    rules: list[Rule],
    source_shapes: Mapping[str, tuple[int, ...]],
    flax_shapes: Mapping[str, tuple[int, ...]],
    source_name: str,
) -> None:
    """Raise CheckpointError unless the source keys and shapes are exactly those the rules need.

    Args:
      source_shapes: Shape of every tensor in the PyTorch checkpoint, by key.
      flax_shapes: Shape of every Flax parameter, by `/`-separated path.
      source_name: The checkpoint's name in messages.
    """
    targets = {rule.target for rule in rules}
    if targets != set(flax_shapes):
        # A table that misses or invents a Flax parameter is a bug in this module.
        raise RuntimeError(
            f"conversion table and Flax model disagree: table only {sorted(targets - set(flax_shapes))}, "
            f"model only {sorted(set(flax_shapes) - targets)}"
        )
    needed = {key for rule in rules for key in rule.sources}
    missing = needed - set(source_shapes)
    unexpected = set(source_shapes) - needed
    if missing:
        raise CheckpointError(
            f"{source_name} is missing {len(missing)} tensor(s) that the model needs: "
            f"{_list_keys(missing)}. The file is incomplete or is not the DINOv2 "
            "variant its other tensors suggest; convert the complete backbone state dict"
        )
    if unexpected:
        raise CheckpointError(
            f"{source_name} has {len(unexpected)} tensor(s) that no Flax parameter takes: "
            f"{_list_keys(unexpected)}. Remove heads or other extra modules so that only "
            "the DINOv2 backbone remains, then convert again"
        )
    for rule in rules:
        expected = rule.transform.source_shapes(flax_shapes[rule.target], len(rule.sources))
        for key, shape in zip(rule.sources, expected, strict=True):
            actual = tuple(source_shapes[key])
            if actual != tuple(shape):
                raise CheckpointError(
                    f"{source_name}: tensor {key!r} has shape {actual}, but Flax parameter "
                    f"{rule.target!r} of shape {tuple(flax_shapes[rule.target])} needs "
                    f"{tuple(shape)}. The checkpoint is corrupt or belongs to another "
                    "architecture; check the file and the --config"
                )


def to_flax_params(
    rules: list[Rule], read: Callable[[str], np.ndarray], store=np.ascontiguousarray
) -> dict[str, object]:
    """Run the rules forwards and return {Flax path: array}.

    Args:
      read: Returns the tensor under a PyTorch key as a NumPy array. It is called once per
        key, so a reader can release each tensor after handing it over.
      store: Turns each converted array into what is kept (a contiguous NumPy copy by
        default, or a JAX array), so that the source array can be freed at once.
    """
    flat = {}
    for rule in rules:
        tensors = [read(key) for key in rule.sources]
        flat[rule.target] = store(rule.transform.to_flax(tensors))
        del tensors
    return flat


def to_torch_state(
    rules: list[Rule], flat_params: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Run the rules backwards and return {PyTorch key: contiguous array}.

    Raises CheckpointError if a Flax parameter is missing or no rule takes it.
    """
    unused = set(flat_params) - {rule.target for rule in rules}
    if unused:
        raise CheckpointError(
            f"no PyTorch key takes the Flax parameter(s) {_list_keys(unused)}; the parameters "
            "belong to a model configuration that this export does not support"
        )
    state = {}
    for rule in rules:
        if rule.target not in flat_params:
            raise CheckpointError(
                f"the Flax parameters are missing {rule.target!r}, which PyTorch key(s) "
                f"{list(rule.sources)} need; the checkpoint does not match its recorded "
                "architecture"
            )
        array = np.asarray(flat_params[rule.target])
        parts = rule.transform.to_torch(array, len(rule.sources))
        for key, part in zip(rule.sources, parts, strict=True):
            state[key] = np.ascontiguousarray(part)
    return state
