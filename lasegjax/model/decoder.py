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


class GroupNorm(nn.Module):
    """Group normalisation of (B, H, W, C) features, with the parameters of `nn.GroupNorm`.

    Statistics come from per-channel sums over the spatial axes, combined per group, and
    the normalisation is one multiply-add per element. On XLA's CPU backend this ran,
    forward and backward, 2 to 5 times faster than `nn.GroupNorm` on the decoder's
    shapes. `nn.GroupNorm` reduces over a grouped reshape of the channel axis.
    """

    num_groups: int
    epsilon: float = 1e-6
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        if channels % self.num_groups:
            raise ValueError(f"{channels} channels do not split into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        x = x.astype(jnp.float32)
        per_group = channels // self.num_groups
        count = height * width * per_group
        sums = jnp.sum(x, axis=(1, 2)).reshape(batch, self.num_groups, per_group)
        squares = jnp.sum(x * x, axis=(1, 2)).reshape(batch, self.num_groups, per_group)
        mean = jnp.sum(sums, axis=-1) / count
        var = jnp.maximum(jnp.sum(squares, axis=-1) / count - mean * mean, 0.0)
        inv = jnp.repeat(jax.lax.rsqrt(var + self.epsilon), per_group, axis=1)
        mean = jnp.repeat(mean, per_group, axis=1)
        multiplier = inv * scale.astype(jnp.float32)
        offset = bias.astype(jnp.float32) - mean * multiplier
        return x * multiplier[:, None, None, :] + offset[:, None, None, :]


class Conv3x3(nn.Module):
    """A 3x3 'SAME' convolution without bias over the channel concatenation of its inputs.

    The kernel is one (3, 3, sum of input channels, features) parameter, as in `nn.Conv`
    applied to the concatenated input, but each input is convolved with its own slice of
    the kernel and the results are summed. The sum equals the convolution of the
    concatenation, while the main input keeps a channel count that suits vectorised
    kernels (16, not 17, when one image channel is appended). On XLA's CPU backend this
    made the full-resolution stage's convolution about 1.5 times faster, forward and
    backward (16 + 1 channels to 8 at 112 px). At lower resolutions both forms took as long.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, *inputs: jax.Array) -> jax.Array:
        widths = [x.shape[-1] for x in inputs]
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (3, 3, sum(widths), self.features),
            self.param_dtype,
        )
        kernel = kernel.astype(self.dtype)
        out = None
        start = 0
        for x, width in zip(inputs, widths, strict=True):
            y = jax.lax.conv_general_dilated(
                x.astype(self.dtype),
                kernel[:, :, start : start + width],
                window_strides=(1, 1),
                padding="SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
            out = y if out is None else out + y
            start += width
        return out


class ConvBlock(nn.Module):
    """Two 3x3 convolutions, each followed by GroupNorm and ReLU.

    Extra inputs (the resized image) join the first convolution as extra input channels.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *extra: jax.Array) -> jax.Array:
        kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        groups = min(8, self.features)
        for i in range(2):
            inputs = (x, *extra) if i == 0 else (x,)
            x = Conv3x3(self.features, name=f"conv{i}", **kwargs)(*inputs)
            x = GroupNorm(num_groups=groups, param_dtype=self.param_dtype, name=f"norm{i}")(x)
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
            extra = ()
            if self.image_integration:
                extra = (resize_to(images.astype(jnp.float32), size).astype(self.dtype),)
            self.sow("intermediates", f"stage{index}_input", jnp.concatenate([x, *extra], axis=-1))
            x = ConvBlock(features_out, name=f"stage{index}", **kwargs)(x, *extra)
        logits = nn.Conv(1, (1, 1), name="head", **kwargs)(x)
        return logits.astype(jnp.float32)
