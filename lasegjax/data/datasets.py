"""Find, split, read and prepare the training and validation volumes named by a config."""

import logging
import time
from pathlib import Path

from lasegjax.data import phantom, readers
from lasegjax.data.pipeline import PreparedVolume, check_image_size, prepare_volume, split_cases


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
    return phantom.write_phantom_dataset(
        workdir / "phantom",
        num_cases=spec.num_cases,
        shape=tuple(spec.shape),
        spacing=tuple(spec.spacing),
        seed=config.seed,
    )


def load_prepared(refs, config) -> list[PreparedVolume]:
    return [prepare_volume(readers.load_case(ref), config.data) for ref in refs]


def load_datasets(config, workdir: Path | None):
    """Return (train, validation) lists of `PreparedVolume`, split by volume."""
    check_image_size(config.data.image_size, config.model.encoder.patch_size)
    root = resolve_data_root(config, workdir)
    refs = readers.list_cases(root, config.data.layout)
    if config.data.max_cases:
        refs = refs[: config.data.max_cases]
    by_id = {ref.case_id: ref for ref in refs}
    train_ids, val_ids = split_cases(
        sorted(by_id), config.data.val_fraction, config.data.num_val, config.data.split_seed
    )
    start = time.perf_counter()
    train = load_prepared([by_id[i] for i in train_ids], config)
    val = load_prepared([by_id[i] for i in val_ids], config)
    logging.info(
        "Read %d volumes from %s (%s layout) in %.1f s: %d for training, %d for validation (%s).",
        len(refs),
        root,
        refs[0].layout,
        time.perf_counter() - start,
        len(train),
        len(val),
        ", ".join(val_ids),
    )
    return train, val
