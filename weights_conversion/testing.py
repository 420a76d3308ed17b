"""Random-initialised PyTorch DINOv2 reference models, for tests and benchmarks.

No model hub is reachable where the tests run, so the references are built offline: the
official DINOv2 code (PyPI `dinov2`, which has no register tokens) for the torch-hub
layout, and transformers' Dinov2Model and Dinov2WithRegistersModel for the Hugging Face
layout. `randomize_` gives every parameter, LayerScale included, a random value of unit
scale, so that a dropped or swapped tensor changes the features far beyond float error.
"""

import math
from functools import partial

import torch

from lasegjax.model.encoder import VIT_SIZES


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter with random values that keep activations near unit scale."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("gamma", "lambda1") or (
                param.dim() == 1 and "norm" in name and leaf == "weight"
            ):
                # LayerScale and LayerNorm scales: far from the 1e-5 and 1.0 defaults.
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))
            elif leaf == "bias" or param.dim() == 1:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            elif param.dim() >= 2 and leaf == "weight":
                fan_in = math.prod(param.shape[1:])
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(fan_in))
            else:  # class, mask and register tokens, position embedding
                param.copy_(torch.randn(param.shape, generator=generator))
    return model.eval()


def hub_model(size: str, depth: int | None = None, seed: int = 0, img_size: int = 518):
    """Return the official DINOv2 ViT of `size` (torch-hub layout) with random weights.

    `img_size` sets the stored position-embedding grid (518 px: 37x37, as published).
    """
    from dinov2.layers import MemEffAttention
    from dinov2.layers import NestedTensorBlock as Block
    from dinov2.models.vision_transformer import DinoVisionTransformer

    vit = VIT_SIZES[size]
    # Built on the meta device because the library's own initialisation, which
    # `randomize_` overwrites anyway, takes seconds for the larger sizes.
    with torch.device("meta"):
        model = DinoVisionTransformer(
            img_size=img_size,
            patch_size=14,
            embed_dim=vit.width,
            depth=depth or vit.depth,
            num_heads=vit.num_heads,
            mlp_ratio=4,
            block_fn=partial(Block, attn_class=MemEffAttention),
            ffn_layer="swiglufused" if vit.mlp == "swiglu" else "mlp",
            # The released checkpoints were saved without block chunks (keys `blocks.N.`).
            block_chunks=0,
            init_values=1.0,
            # Uniform (zero) drop-path rates need no `Tensor.item()`, which meta tensors lack.
            drop_path_uniform=True,
        )
    return randomize_(model.to_empty(device="cpu"), seed)


def hf_model(size: str, depth: int | None = None, num_registers: int = 0, seed: int = 0):
    """Return transformers' Dinov2Model (or Dinov2WithRegistersModel) of `size`, random."""
    import transformers

    vit = VIT_SIZES[size]
    kwargs = dict(
        hidden_size=vit.width,
        num_hidden_layers=depth or vit.depth,
        num_attention_heads=vit.num_heads,
        mlp_ratio=4,
        use_swiglu_ffn=vit.mlp == "swiglu",
        image_size=518,
        patch_size=14,
        layerscale_value=1.0,
    )
    if num_registers:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=num_registers, **kwargs)
        model_class = transformers.Dinov2WithRegistersModel
    else:
        config, model_class = transformers.Dinov2Config(**kwargs), transformers.Dinov2Model
    with torch.device("meta"):
        model = model_class(config)
    return randomize_(model.to_empty(device="cpu"), seed)


def hub_features(model, images: torch.Tensor, taps) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Return (normed patch tokens of each tapped block, final normed patch tokens).

    One `forward_features` pass, with the tapped blocks' outputs captured by hooks and put
    through the final norm, as `get_intermediate_layers(norm=True)` does.
    """
    captured = {}
    hooks = [
        model.blocks[i].register_forward_hook(lambda _, __, out, i=i: captured.__setitem__(i, out))
        for i in taps
    ]
    try:
        with torch.no_grad():
            final = model.forward_features(images)["x_norm_patchtokens"]
            tapped = [model.norm(captured[i])[:, 1:] for i in taps]
    finally:
        for hook in hooks:
            hook.remove()
    return tapped, final


def hf_features(model, images: torch.Tensor, taps) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Return (normed patch tokens of each tapped block, final normed patch tokens)."""
    prefix = 1 + getattr(model.config, "num_register_tokens", 0)
    with torch.no_grad():
        outputs = model(pixel_values=images, output_hidden_states=True)
        tapped = [model.layernorm(outputs.hidden_states[i + 1])[:, prefix:] for i in taps]
    return tapped, outputs.last_hidden_state[:, prefix:]


def random_state_dict(rules, shapes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Return a random float32 state dict with the PyTorch keys and shapes of `rules`.

    Args:
      shapes: {Flax path: shape} of the target model, from which each key's shape follows.
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for rule in rules:
        target_shape = shapes[rule.target]
        source_shapes = rule.transform.source_shapes(target_shape, len(rule.sources))
        for key, shape in zip(rule.sources, source_shapes, strict=True):
            state[key] = torch.randn(shape, generator=generator)
    return state
