"""Find, split, read and prepare the training and validation volumes named by a config."""

import functools
import logging
import time
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from lasegjax.data import phantom, readers
from lasegjax.data.pipeline import PreparedVolume, check_image_size, prepare_volume, split_cases
from lasegjax.errors import ConfigError


def resolve_data_root(config, workdir: Path | None) -> Path:
    """Return `data.root`, or write the synthetic phantom set into the workdir when it is empty."""
    if config.data.root:
        return Path(config.data.root).expanduser()
    if workdir is None:
        raise ValueError("a workdir is needed to write the phantom dataset when data.root is empty")
    spec = config.data.phantom
    logging.info(
        "data.root is empty: writing %d synthetic LGE-MRI phantom volumes to %s and training on "
        "them. Pass --config.data.root=DIR to train on real data.",
        spec.num_cases,
        workdir / "phantom",
    )
    write = functools.partial(
        phantom.write_phantom_dataset,
        workdir / "phantom",
        num_cases=spec.num_cases,
        shape=tuple(spec.shape),
        spacing=tuple(spec.spacing),
        seed=config.seed,
    )
    if jax.process_count() == 1:
        return write()
    # The workdir is shared by all hosts: process 0 writes, the others wait and then read.
    if jax.process_index() == 0:
        write()
    multihost_utils.sync_global_devices("lasegjax: phantom dataset written")
    return write()


def load_prepared(refs, config) -> list[PreparedVolume]:
    return [prepare_volume(readers.load_case(ref), config.data) for ref in refs]


def load_datasets(config, workdir: Path | None, num_shards: int = 1, shards=None):
    """Return ({shard: training volumes}, validation volumes) as `PreparedVolume` lists.

    The training cases, sorted by id, go round-robin to `num_shards` data shards, and only
    the cases of `shards` (default: all) are read, so each host reads only its share.
    Every caller reads all validation volumes.
    """
    check_image_size(config.data.image_size, config.model.encoder.patch_size)
    root = resolve_data_root(config, workdir)
    refs = readers.list_cases(root, config.data.layout)
    if config.data.max_cases:
        refs = refs[: config.data.max_cases]
    by_id = {ref.case_id: ref for ref in refs}
    train_ids, val_ids = split_cases(
        sorted(by_id), config.data.val_fraction, config.data.num_val, config.data.split_seed
    )
    if num_shards > len(train_ids):
        raise ConfigError(
            f"data.shards is {num_shards} but there are only {len(train_ids)} training "
            f"volumes in {root}; every shard needs at least one volume, so set data.shards "
            f"to at most {len(train_ids)} (it must stay a multiple of the process count)"
        )
    shards = range(num_shards) if shards is None else shards
    start = time.perf_counter()
    train = {
        shard: load_prepared([by_id[i] for i in train_ids[shard::num_shards]], config)
        for shard in shards
    }
    val = load_prepared([by_id[i] for i in val_ids], config)
    logging.info(
        "Read %d of %d volumes from %s (%s layout) in %.1f s: training shard(s) %s of %d, "
        "and %d for validation (%s).",
        sum(len(v) for v in train.values()) + len(val),
        len(refs),
        root,
        refs[0].layout,
        time.perf_counter() - start,
        list(shards),
        num_shards,
        len(val),
        ", ".join(val_ids),
    )
    return train, val
