"""Optimizer construction and path rules that freeze parameter groups."""

import logging
import re

import jax
import optax

from lasegjax.errors import ConfigError

FROZEN, TRAINABLE = "frozen", "trainable"


def path_string(path) -> str:
    """Return a tree path such as ('encoder', 'blocks_0', 'attn') as 'encoder/blocks_0/attn'."""
    return "/".join(str(getattr(key, "key", key)) for key in path)


def freeze_rules(config) -> list[tuple[str, str]]:
    """Return (regex, label) pairs; the first rule whose regex fully matches a path wins."""
    rules = []
    if config.model.encoder.frozen:
        rules.append(("encoder/.*", FROZEN))
    rules.append((".*", TRAINABLE))
    return rules


def label_params(params, rules):
    """Return a tree of labels, one per parameter, from the first matching rule."""

    def label(path, _):
        name = path_string(path)
        for pattern, value in rules:
            if re.fullmatch(pattern, name):
                return value
        raise ConfigError(f"parameter {name} matches no freeze rule in {rules}")

    return jax.tree_util.tree_map_with_path(label, params)


def _decay_mask(params):
    # Decay matrices and convolution kernels only; biases, norms, LayerScale, tokens and
    # fusion logits are left alone, as is usual for ViTs.
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim >= 2 and path_string(path).endswith("kernel"), params
    )


def learning_rate_schedule(train_config):
    """Linear warmup to `learning_rate`, then cosine decay over the remaining steps."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train_config.learning_rate,
        warmup_steps=min(train_config.warmup_steps, max(train_config.num_steps - 1, 1)),
        decay_steps=max(train_config.num_steps, 2),
        end_value=train_config.learning_rate * train_config.end_learning_rate_factor,
    )


def build_optimizer(config, params):
    """Return (optax transformation, labels): AdamW on trainable leaves, zero updates on frozen."""
    labels = label_params(params, freeze_rules(config))
    train_config = config.train
    trainable_tx = optax.chain(
        optax.clip_by_global_norm(train_config.grad_clip_norm),
        optax.adamw(
            learning_rate_schedule(train_config),
            weight_decay=train_config.weight_decay,
            mask=_decay_mask,
        ),
    )
    tx = optax.multi_transform({TRAINABLE: trainable_tx, FROZEN: optax.set_to_zero()}, labels)
    counts = {FROZEN: 0, TRAINABLE: 0}
    for leaf_label, leaf in zip(jax.tree.leaves(labels), jax.tree.leaves(params), strict=True):
        counts[leaf_label] += leaf.size
    logging.info(
        "Parameters: %s trainable, %s frozen.",
        f"{counts[TRAINABLE]:,}",
        f"{counts[FROZEN]:,}",
    )
    return tx, labels
