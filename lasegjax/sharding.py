"""Device mesh and shardings: the batch is split over all devices, the state replicated.

On a CPU-only machine each core can be exposed as its own XLA device, so the per-device
parts of a data-parallel step run on separate threads. A single XLA CPU device used about
one core for this model's small convolutions (jax 0.10.2, 2-core machine).
"""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lasegjax.errors import ConfigError

DATA_AXIS = "data"


def use_cpu_devices(count: int) -> None:
    """Expose `count` CPU devices (0: one per core); call before JAX initialises its backends."""
    count = count or os.cpu_count() or 1
    jax.config.update("jax_num_cpu_devices", count)


def make_mesh() -> Mesh:
    """Return a one-axis mesh over every device."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_divisible(batch_size: int, mesh: Mesh, field: str) -> None:
    """Raise unless `batch_size` splits evenly over the mesh's devices."""
    devices = mesh.devices.size
    if batch_size % devices:
        lower = max(devices, batch_size // devices * devices)
        raise ConfigError(
            f"{field} {batch_size} does not divide evenly over {devices} devices; use a "
            f"multiple of {devices}, such as {lower}"
        )
