"""Weighted fusion of the patch-token maps of several encoder blocks."""

import flax.linen as nn
import jax
import jax.numpy as jnp

FUSION_MODES = ("learned", "last_block", "mean")


class BlockFusion(nn.Module):
    """Combine per-block feature maps into one map.

    Modes:
      learned: one learnable logit per block, softmax-normalised, all zero at
        initialisation so every block starts with the same weight (Kundu et al., 2025,
        arXiv 2502.06615).
      last_block: only the last tapped block, as a plain DINOv2 feature extractor.
      mean: fixed equal weights.
    """

    mode: str = "learned"

    @nn.compact
    def __call__(self, features: list[jax.Array]) -> jax.Array:
        if self.mode not in FUSION_MODES:
            raise ValueError(f"fusion mode {self.mode!r} is not one of {FUSION_MODES}")
        if self.mode == "last_block":
            return features[-1]
        stacked = jnp.stack(features, axis=0)
        if self.mode == "mean":
            return stacked.mean(axis=0)
        logits = self.param("logits", nn.initializers.zeros, (len(features),), jnp.float32)
        weights = jax.nn.softmax(logits)
        self.sow("intermediates", "weights", weights)
        return jnp.einsum("n,n...->...", weights.astype(stacked.dtype), stacked)


def fusion_weights(params) -> jax.Array | None:
    """Return the softmax-normalised fusion weights in `params`, or None without learned fusion."""
    fusion = params.get("fusion", {})
    if "logits" not in fusion:
        return None
    return jax.nn.softmax(fusion["logits"])
