"""UNet-style decoder from the patch grid to the full input resolution."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype


def stage_sizes(grid: tuple[int, int], image: tuple[int, int], num_stages: int):
    """Return the (height, width) of each decoder stage.

    Each stage doubles the previous one, starting from the patch grid, and the last stage
    is the input size itself (448 px with 14-px patches: 64, 128, 256, 448).
    """
    sizes = [(grid[0] * 2 ** (i + 1), grid[1] * 2 ** (i + 1)) for i in range(num_stages - 1)]
    return sizes + [tuple(image)]


def resize_to(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinearly resize (B, H, W, C) to `size`, with antialiasing when shrinking."""
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    return jax.image.resize(x, (x.shape[0], *size, x.shape[3]), method="linear")


class ConvBlock(nn.Module):
    """Two 3x3 convolutions, each followed by GroupNorm and ReLU."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = nn.Conv(
                self.features,
                (3, 3),
                padding="SAME",
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"conv{i}",
            )(x)
            groups = min(8, self.features)
            x = nn.GroupNorm(
                num_groups=groups, dtype=jnp.float32, param_dtype=self.param_dtype, name=f"norm{i}"
            )(x)
            x = nn.relu(x).astype(self.dtype)
        return x


class UNetDecoder(nn.Module):
    """Upsample fused patch features in stages to a one-channel logit map.

    With `image_integration`, the input image resized to each stage's resolution is
    concatenated with that stage's features before its convolutions, which restores
    spatial detail lost to the 14-pixel patches.

    Attributes:
      channels: Output channels of each stage; the number of stages is its length.
      image_integration: Concatenate the resized image at every stage.
    """

    channels: Sequence[int] = (256, 128, 64, 32)
    image_integration: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array, images: jax.Array) -> jax.Array:
        """Decode (B, h, w, D) features for (B, H, W, C) images into (B, H, W, 1) logits."""
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Conv(self.channels[0], (1, 1), name="input_proj", **kwargs)(features)
        sizes = stage_sizes(features.shape[1:3], images.shape[1:3], len(self.channels))
        for index, (size, features_out) in enumerate(zip(sizes, self.channels, strict=True)):
            x = resize_to(x, size)
            if self.image_integration:
                image = resize_to(images.astype(jnp.float32), size).astype(self.dtype)
                x = jnp.concatenate([x, image], axis=-1)
            self.sow("intermediates", f"stage{index}_input", x)
            x = ConvBlock(features_out, name=f"stage{index}", **kwargs)(x)
        logits = nn.Conv(1, (1, 1), name="head", **kwargs)(x)
        return logits.astype(jnp.float32)
