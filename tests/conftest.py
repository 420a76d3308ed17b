"""Shared fixtures: paths to the real LGE-MRI data and small configs that train in seconds."""

from pathlib import Path

import pytest

from lasegjax.config import base_config
from lasegjax.hostmem import reuse_freed_memory
from lasegjax.sharding import use_cpu_devices

# Two CPU devices, so every training test also runs the batch-sharded step.
use_cpu_devices(2)
reuse_freed_memory()

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
    """Return a config for a 2-block, 96-wide encoder and a 3-stage decoder on small slices."""
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


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """Share compiled XLA programs between tests that build the same model.

    Compiling a train step takes tens of seconds on a 2-core CPU, and many tests build the
    same small model.
    """
    import jax

    jax.config.update("jax_default_prng_impl", "rbg")
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
