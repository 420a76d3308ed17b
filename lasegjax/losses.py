"""Segmentation losses on one-channel logits."""

import jax
import jax.numpy as jnp
import optax


def soft_dice_loss(logits: jax.Array, masks: jax.Array, smooth: float = 1.0) -> jax.Array:
    """Return 1 - soft Dice over the whole batch, with `smooth` added to both terms.

    The batch is pooled into one overlap so that slices without atrium do not produce
    a 0/0 ratio.
    """
    probs = jax.nn.sigmoid(logits.astype(jnp.float32))
    intersection = jnp.sum(probs * masks)
    total = jnp.sum(probs) + jnp.sum(masks)
    return 1.0 - (2.0 * intersection + smooth) / (total + smooth)


def segmentation_loss(logits, masks, bce_weight: float, dice_weight: float):
    """Return (total, {"bce": ..., "dice_loss": ...}) for a weighted BCE + soft Dice loss."""
    logits = logits.astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(logits, masks).mean()
    dice = soft_dice_loss(logits, masks)
    total = bce_weight * bce + dice_weight * dice
    return total, {"bce": bce, "dice_loss": dice}
