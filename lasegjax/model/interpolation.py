"""Bicubic resizing that reproduces `torch.nn.functional.interpolate` on a small grid.

DINOv2 checkpoints carry a position embedding for a 37x37 patch grid, and each source
(torch hub, torch hub with registers, Hugging Face) resizes it to the input's grid with
its own arguments. `jax.image.resize` uses a different cubic kernel (a = -0.5) and no
scale-factor offset, so features would drift from the source model. Here each output
axis is a dense (out, in) weight matrix built in NumPy at trace time, which is cheap for
a grid of a few dozen positions and exact up to float rounding.
"""

import math

import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys cubic convolution kernel with parameter `a`."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_weights(
    in_size: int, out_size: int, scale_factor: float | None = None, antialias: bool = False
) -> np.ndarray:
    """Return the (out_size, in_size) matrix of torch's bicubic resize along one axis.

    Args:
      in_size: Input length.
      out_size: Output length.
      scale_factor: The `scale_factor` passed to torch (output / input), or None when
        torch was called with `size`. torch maps output to input coordinates with
        1 / scale_factor when it is given, not with in_size / out_size.
      antialias: Whether torch was called with `antialias=True`. That path uses a
        separable filter with a = -0.5, truncates it at the borders and renormalises,
        while the plain path uses a = -0.75 and clamps indices at the borders.
    """
    scale = 1.0 / scale_factor if scale_factor else in_size / out_size
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    if antialias:
        support_scale = max(scale, 1.0)
        support = 2.0 * support_scale
        for i in range(out_size):
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), in_size)
            taps = np.arange(lo, hi)
            w = _cubic((taps - center + 0.5) / support_scale, a=-0.5)
            total = w.sum()
            if total != 0:
                w = w / total
            weights[i, lo:hi] = w
        return weights
    for i in range(out_size):
        src = (i + 0.5) * scale - 0.5
        left = math.floor(src)
        t = src - left
        for k in range(-1, 3):
            index = min(max(left + k, 0), in_size - 1)
            weights[i, index] += _cubic(np.array(k - t), a=-0.75)
    return weights
