"""DINOv2 vision transformer in Flax linen.

Submodule and parameter names follow the DINOv2 torch-hub state dict (`patch_embed.proj`,
`blocks.N.attn.qkv`, `blocks.N.ls1.gamma`, ...), with `.` between a block list and its
index written as `_`, so conversion maps every checkpoint tensor to exactly one Flax
parameter. Published sizes (Oquab et al., "DINOv2", 2023, table 17):

  S/14: width 384, 12 blocks, 6 heads, GELU MLP 1536
  B/14: width 768, 12 blocks, 12 heads, GELU MLP 3072
  L/14: width 1024, 24 blocks, 16 heads, GELU MLP 4096
  g/14: width 1536, 40 blocks, 24 heads, SwiGLU MLP 4096
"""

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lasegjax.model.interpolation import bicubic_weights

Dtype = jnp.dtype


@dataclasses.dataclass(frozen=True)
class ViTSize:
    width: int
    depth: int
    num_heads: int
    mlp_hidden: int
    mlp: str  # "gelu" or "swiglu"


VIT_SIZES = {
    "tiny": ViTSize(width=96, depth=4, num_heads=3, mlp_hidden=384, mlp="gelu"),
    "small": ViTSize(width=384, depth=12, num_heads=6, mlp_hidden=1536, mlp="gelu"),
    "base": ViTSize(width=768, depth=12, num_heads=12, mlp_hidden=3072, mlp="gelu"),
    "large": ViTSize(width=1024, depth=24, num_heads=16, mlp_hidden=4096, mlp="gelu"),
    "giant": ViTSize(width=1536, depth=40, num_heads=24, mlp_hidden=4096, mlp="swiglu"),
}


def default_taps(depth: int, count: int = 4) -> tuple[int, ...]:
    """Return `count` block indices spread evenly over `depth` blocks, the last included."""
    count = min(count, depth)
    return tuple(int(round(depth * (i + 1) / count)) - 1 for i in range(count))


# Rematerialisation policies (`jax.checkpoint_policies`): what each block keeps from the
# forward pass for the backward pass; everything else is recomputed.
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep every intermediate
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only block inputs
    "dots": jax.checkpoint_policies.dots_saveable,  # also keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def make_block_fn(block: "Block", remat_policy: str):
    """Return (params, x) -> block output, rematerialised under `remat_policy`."""
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(
            f"remat policy {remat_policy!r} is invalid: use one of {sorted(REMAT_POLICIES)}"
        )

    def apply_block(params, x):
        return block.apply({"params": params}, x)

    if remat_policy == "none":
        return apply_block
    return jax.checkpoint(apply_block, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)


def run_blocks(apply_block, block_params: list, x, scan: bool):
    """Apply blocks in order, as a Python loop or as one scan over their stacked parameters."""
    if not block_params:
        return x
    if not scan or len(block_params) == 1:
        for params in block_params:
            x = apply_block(params, x)
        return x
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *block_params)
    x, _ = jax.lax.scan(lambda carry, params: (apply_block(params, carry), None), x, stacked)
    return x


class LayerScale(nn.Module):
    """Per-channel learnable scaling of a residual branch (`gamma`, as in CaiT and DINOv2)."""

    init_value: float = 1e-5
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        gamma = self.param(
            "gamma", nn.initializers.constant(self.init_value), (x.shape[-1],), self.param_dtype
        )
        return x * gamma.astype(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, tokens, width = x.shape
        head_dim = width // self.num_heads
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        qkv = dense(3 * width, "qkv")(x)
        # The torch layout splits the 3*width output as (3, heads, head_dim).
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim).astype(np.float32)
        # Softmax in float32 even under bfloat16 compute.
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, tokens, width)
        return dense(width, "proj")(out)


class Mlp(nn.Module):
    """Two-layer MLP with exact (erf) GELU, as `fc1` and `fc2`."""

    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
        x = nn.gelu(x, approximate=False)
        return nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(x)


class SwiGLU(nn.Module):
    """SwiGLU MLP with the gate and value projections fused in `w12`, output in `w3`."""

    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x12 = nn.Dense(2 * self.hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="w12")(
            x
        )
        gate, value = jnp.split(x12, 2, axis=-1)
        hidden = nn.silu(gate) * value
        return nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name="w3")(hidden)


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale on both residual branches."""

    num_heads: int
    mlp_hidden: int
    mlp: str = "gelu"
    layerscale_init: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        norm = lambda name: nn.LayerNorm(  # noqa: E731
            epsilon=1e-6, dtype=jnp.float32, param_dtype=self.param_dtype, name=name
        )
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = norm("norm1")(x).astype(self.dtype)
        y = Attention(self.num_heads, name="attn", **kwargs)(y)
        x = x + LayerScale(self.layerscale_init, self.param_dtype, name="ls1")(y)
        y = norm("norm2")(x).astype(self.dtype)
        mlp_cls = SwiGLU if self.mlp == "swiglu" else Mlp
        y = mlp_cls(self.mlp_hidden, name="mlp", **kwargs)(y)
        return x + LayerScale(self.layerscale_init, self.param_dtype, name="ls2")(y)


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection, a strided convolution named `proj`."""

    width: int
    patch_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        patch = (self.patch_size, self.patch_size)
        return nn.Conv(
            self.width,
            patch,
            strides=patch,
            padding="VALID",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="proj",
        )(images)


class DinoV2Encoder(nn.Module):
    """DINOv2 ViT that returns the patch-token maps of selected blocks.

    Attributes:
      width, depth, num_heads, mlp_hidden, mlp: Architecture (see `VIT_SIZES`).
      patch_size: Side of a square patch in pixels.
      num_registers: Register tokens inserted after the class token (0 or 4).
      pos_grid: Side of the patch grid the position embedding is stored for (37 for
        518-px DINOv2 pretraining).
      taps: Block indices whose outputs are returned.
      norm_taps: Apply the final LayerNorm to each returned block output, as DINOv2's
        `get_intermediate_layers(norm=True)` does.
      interpolate_offset: Added to the target grid size before computing torch's scale
        factor (0.1 for torch-hub DINOv2 without registers). With 0, the target size is
        passed directly, as Hugging Face and the register models do.
      interpolate_antialias: torch's `antialias` flag for the position-embedding resize.
      scan_blocks: Run each run of blocks between two taps as one `jax.lax.scan` over the
        blocks' stacked parameters, so XLA compiles one block instead of `depth`. The
        parameters stay stored per block (`blocks_N`).
      remat_policy: Rematerialisation of each block in the backward pass (`REMAT_POLICIES`).
    """

    width: int
    depth: int
    num_heads: int
    mlp_hidden: int
    mlp: str = "gelu"
    patch_size: int = 14
    in_channels: int = 3
    num_registers: int = 0
    pos_grid: int = 37
    layerscale_init: float = 1e-5
    taps: Sequence[int] = ()
    norm_taps: bool = True
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    scan_blocks: bool = False
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def interpolate_pos_embed(self, pos_embed, grid_h: int, grid_w: int):
        """Resize the patch part of `pos_embed` (1, 1 + G*G, D) to a grid_h x grid_w grid."""
        cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
        if (grid_h, grid_w) == (self.pos_grid, self.pos_grid):
            return pos_embed
        if self.interpolate_offset:
            scale_h = (grid_h + self.interpolate_offset) / self.pos_grid
            scale_w = (grid_w + self.interpolate_offset) / self.pos_grid
        else:
            scale_h = scale_w = None
        w_h = bicubic_weights(self.pos_grid, grid_h, scale_h, self.interpolate_antialias)
        w_w = bicubic_weights(self.pos_grid, grid_w, scale_w, self.interpolate_antialias)
        grid = patch_pos.reshape(self.pos_grid, self.pos_grid, -1).astype(jnp.float32)
        resized = jnp.einsum(
            "oi,ijd,pj->opd",
            jnp.asarray(w_h, jnp.float32),
            grid,
            jnp.asarray(w_w, jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )
        return jnp.concatenate([cls_pos, resized.reshape(1, grid_h * grid_w, -1)], axis=1)

    @nn.compact
    def __call__(self, images) -> list[jax.Array]:
        """Encode (B, H, W, C) images; H and W must be multiples of `patch_size`.

        Returns a list with one (B, H / patch, W / patch, width) map per tapped block.
        """
        batch, height, width, _ = images.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size "
                f"{self.patch_size}; resize or pad the input"
            )
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        taps = tuple(self.taps) or default_taps(self.depth)
        init = nn.initializers.truncated_normal(0.02)

        x = PatchEmbed(
            self.width, self.patch_size, self.dtype, self.param_dtype, name="patch_embed"
        )(images.astype(self.dtype))
        x = x.reshape(batch, grid_h * grid_w, self.width)

        cls_token = self.param("cls_token", init, (1, 1, self.width), self.param_dtype)
        pos_embed = self.param(
            "pos_embed", init, (1, 1 + self.pos_grid**2, self.width), self.param_dtype
        )
        # Used by DINOv2 only for masked-image pretraining; kept so checkpoints map one to one.
        self.param("mask_token", nn.initializers.zeros, (1, self.width), self.param_dtype)

        cls = jnp.broadcast_to(cls_token.astype(self.dtype), (batch, 1, self.width))
        x = jnp.concatenate([cls, x], axis=1)
        x = x + self.interpolate_pos_embed(pos_embed, grid_h, grid_w).astype(self.dtype)
        if self.num_registers:
            registers = self.param(
                "register_tokens", init, (1, self.num_registers, self.width), self.param_dtype
            )
            registers = jnp.broadcast_to(
                registers.astype(self.dtype), (batch, self.num_registers, self.width)
            )
            x = jnp.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)

        final_norm = nn.LayerNorm(
            epsilon=1e-6, dtype=jnp.float32, param_dtype=self.param_dtype, name="norm"
        )
        block_kwargs = dict(
            num_heads=self.num_heads,
            mlp_hidden=self.mlp_hidden,
            mlp=self.mlp,
            layerscale_init=self.layerscale_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        if self.is_initializing():
            # Parameter shapes do not depend on the token count, so one token per image is
            # enough to create them. The blocks then run on the real tokens below.
            for index in range(self.depth):
                Block(**block_kwargs, name=f"blocks_{index}")(x[:, :1])
        block_params = [self.variables["params"][f"blocks_{index}"] for index in range(self.depth)]
        apply_block = make_block_fn(Block(**block_kwargs, parent=None), self.remat_policy)

        prefix = 1 + self.num_registers
        outputs = []
        start = 0
        # Blocks after the last tap do not change the outputs, so they are not run. They
        # still have parameters, so every checkpoint key maps to one.
        for tap in sorted(taps):
            x = run_blocks(apply_block, block_params[start : tap + 1], x, self.scan_blocks)
            start = tap + 1
            out = final_norm(x) if self.norm_taps else x
            patches = out[:, prefix:].astype(self.dtype)
            outputs.append(patches.reshape(batch, grid_h, grid_w, self.width))
        if not self.norm_taps and self.is_initializing():
            final_norm(x)
        return outputs
