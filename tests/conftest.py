"""Shared fixtures: paths to the real LGE-MRI data and small configs that train in seconds."""

from pathlib import Path

import pytest

from lasegjax.config import base_config

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "real"
LA_H5 = REAL_DATA / "LASC2018_UA-MT_h5"
LASCARQS_COPY = REAL_DATA / "LASC2018_lascarqs_layout"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path}")
    return path


@pytest.fixture
def lascarqs_root() -> Path:
    return require(LASCARQS_COPY)


@pytest.fixture
def la_h5_root() -> Path:
    return require(LA_H5)


def tiny_config(root="", image_size=(56, 56)):
    """Return a config for a 2-block, 32-wide encoder and a 3-stage decoder on small slices."""
    config = base_config()
    config.data.root = str(root)
    config.data.image_size = image_size
    config.data.num_threads = 1
    config.data.prefetch = 2
    config.data.num_val = 1
    config.data.phantom.num_cases = 3
    config.data.phantom.shape = (48, 48, 8)
    config.model.encoder.size = "tiny"
    config.model.encoder.depth = 2
    config.model.encoder.num_taps = 2
    config.model.encoder.frozen = False
    config.model.decoder.channels = (16, 8, 8)
    config.train.batch_size = 4
    config.train.num_steps = 6
    config.train.warmup_steps = 2
    config.train.learning_rate = 1e-3
    config.train.dice_weight = 1.0
    config.train.log_every = 1
    config.train.eval_every = 1000
    config.train.checkpoint_every = 3
    config.eval.batch_size = 8
    return config
