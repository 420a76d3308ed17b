"""Segmentation losses on one-channel logits.

The loss is a function of a few sums over the batch (`loss_sums`), so a data-parallel
step can add each device's sums over the mesh and get exactly the loss of the whole
batch (`loss_from_sums`).
"""

import jax
import jax.numpy as jnp
import optax


def loss_sums(logits: jax.Array, masks: jax.Array) -> dict:
    """Return the sums of BCE, sigmoid * mask, sigmoid and mask over all pixels."""
    logits = logits.astype(jnp.float32)
    probs = jax.nn.sigmoid(logits)
    return {
        "bce": jnp.sum(optax.sigmoid_binary_cross_entropy(logits, masks)),
        "intersection": jnp.sum(probs * masks),
        "probs": jnp.sum(probs),
        "masks": jnp.sum(masks),
    }


def loss_from_sums(
    sums: dict, count: int, bce_weight: float, dice_weight: float, smooth: float = 1.0
):
    """Return (total, {"bce": ..., "dice_loss": ...}) from `loss_sums` over `count` pixels.

    The soft Dice pools the batch into one overlap, with `smooth` added to both terms, so
    that slices without atrium do not produce a 0/0 ratio.
    """
    bce = sums["bce"] / count
    dice = 1.0 - (2.0 * sums["intersection"] + smooth) / (sums["probs"] + sums["masks"] + smooth)
    total = bce_weight * bce + dice_weight * dice
    return total, {"bce": bce, "dice_loss": dice}


def soft_dice_loss(logits: jax.Array, masks: jax.Array, smooth: float = 1.0) -> jax.Array:
    """Return 1 - soft Dice over the whole batch, with `smooth` added to both terms."""
    _, parts = loss_from_sums(loss_sums(logits, masks), masks.size, 0.0, 1.0, smooth)
    return parts["dice_loss"]


def segmentation_loss(logits, masks, bce_weight: float, dice_weight: float):
    """Return (total, {"bce": ..., "dice_loss": ...}) for a weighted BCE + soft Dice loss."""
    return loss_from_sums(loss_sums(logits, masks), masks.size, bce_weight, dice_weight)
