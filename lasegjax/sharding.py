"""Device mesh and logical-axis sharding of parameters, optimizer state and batches.

The mesh has three axes. `data` splits the batch only. `fsdp` splits the batch too, and
also the parameters and optimizer state along their `embed` dimension (fully sharded
data parallelism, gathered one block at a time in the forward and backward pass).
`model` splits attention heads and the MLP hidden dimension (tensor parallelism).

Each parameter gets logical axis names from its path (`LOGICAL_PARAM_AXES`), and
`LOGICAL_RULES` maps those names to mesh axes. A dimension that does not divide evenly
over its mesh axes stays replicated. The parameter pytree keeps its plain nested-dict
form, so weight conversion still maps checkpoint keys one to one.

On a CPU-only machine each core can be exposed as its own XLA device, so the per-device
parts of a step run on separate threads. A single XLA CPU device used about one core for
this model's small convolutions (jax 0.10.2, 2-core machine).
"""

import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lasegjax import hostmem
from lasegjax.errors import ConfigError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MODEL_AXIS = "model"
MESH_AXES = (DATA_AXIS, FSDP_AXIS, MODEL_AXIS)
# The batch dimension is split over both data-parallel axes.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)

# Logical axis name -> mesh axes.
LOGICAL_RULES = {
    "batch": BATCH_AXES,
    "embed": (FSDP_AXIS,),
    "qkv": (MODEL_AXIS,),
    "heads": (MODEL_AXIS,),
    "mlp": (MODEL_AXIS,),
}

# Path suffix -> logical axes, matched against the trailing keys of a parameter's path,
# so the same table serves the optimizer state (whose leaves end with the parameter path).
# The first matching suffix wins; parameters matching none are replicated.
LOGICAL_PARAM_AXES = (
    (("attn", "qkv", "kernel"), ("embed", "qkv")),
    (("attn", "qkv", "bias"), ("qkv",)),
    (("attn", "proj", "kernel"), ("heads", "embed")),
    (("mlp", "fc1", "kernel"), ("embed", "mlp")),
    (("mlp", "fc1", "bias"), ("mlp",)),
    (("mlp", "fc2", "kernel"), ("mlp", "embed")),
    (("mlp", "w12", "kernel"), ("embed", "mlp")),
    (("mlp", "w12", "bias"), ("mlp",)),
    (("mlp", "w3", "kernel"), ("mlp", "embed")),
    (("patch_embed", "proj", "kernel"), (None, None, None, "embed")),
    (("pos_embed",), (None, None, "embed")),
)


def use_cpu_devices(count: int) -> None:
    """Expose `count` CPU devices (0: one per core); call before JAX initialises its backends."""
    count = count or os.cpu_count() or 1
    jax.config.update("jax_num_cpu_devices", count)


def setup_host(config) -> None:
    """Apply the config's host settings. Call it before JAX initialises its backends.

    Exposes `config.cpu_devices` CPU devices and, unless `config.host_memory_reuse` is
    false, lets glibc reuse freed buffers (`hostmem.reuse_freed_memory`).
    """
    use_cpu_devices(config.cpu_devices)
    if config.get("host_memory_reuse", True):
        hostmem.reuse_freed_memory()


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
    """Resolve the (data, fsdp, model) sizes in `mesh_config`; one -1 takes the remaining devices."""
    sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
    text = ", ".join(f"mesh.{axis}={size}" for axis, size in zip(MESH_AXES, sizes, strict=True))
    if sizes.count(-1) > 1 or any(size == 0 or size < -1 for size in sizes):
        raise ConfigError(
            f"invalid mesh ({text}): use positive sizes and at most one -1 for the remaining "
            "devices"
        )
    fixed = math.prod(size for size in sizes if size != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ConfigError(
                f"the mesh ({text}) needs a multiple of {fixed} devices, but there are "
                f"{num_devices}; change the mesh sizes"
            )
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"the mesh ({text}) has {math.prod(sizes)} devices, but there are {num_devices}; "
            "make the product of the sizes equal the device count, or set one size to -1"
        )
    return tuple(sizes)


def make_mesh(mesh_config=None, devices=None) -> Mesh:
    """Return a (data, fsdp, model) mesh over `devices` (default: every device).

    Without a mesh config every device goes to the data axis.
    """
    devices = list(jax.devices() if devices is None else devices)
    config = mesh_config if mesh_config is not None else {DATA_AXIS: -1}
    shape = mesh_shape(config, len(devices))
    # Auto axes: XLA propagates shardings from the annotated inputs and outputs.
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == jax.device_count():
        # Orders devices so that the inner axes map onto fast interconnect links.
        return jax.make_mesh(shape, MESH_AXES, axis_types, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def params_replicated(mesh: Mesh) -> bool:
    """True when the mesh only splits the batch (fsdp and model axes of size 1)."""
    return mesh.shape[FSDP_AXIS] == 1 and mesh.shape[MODEL_AXIS] == 1


# Gradients are summed over the batch axes in buckets of about this many bytes.
GRADIENT_BUCKET_BYTES = 32 * 2**20


def all_reduce_in_buckets(arrays: list, axes, bucket_bytes: int = GRADIENT_BUCKET_BYTES) -> list:
    """Sum `arrays` over the mesh `axes` inside `shard_map`, a few large buckets at a time.

    Arrays of one dtype are concatenated into flat buckets of up to `bucket_bytes` (an
    array larger than that is a bucket of its own), and each bucket is one `psum`. One
    all-reduce of a gradient tuple ran one rendezvous per array on XLA's CPU backend,
    which cost about 7 ms per step for the demo model's 150 arrays.
    """
    buckets = []
    open_buckets = {}
    for index, array in enumerate(arrays):
        size = array.size * array.dtype.itemsize
        bucket = open_buckets.get(array.dtype)
        if bucket is None or bucket[1] + size > bucket_bytes:
            bucket = open_buckets[array.dtype] = [[], 0]
            buckets.append(bucket)
        bucket[0].append(index)
        bucket[1] += size
    out = list(arrays)
    for indices, _ in buckets:
        flat = jax.lax.psum(jnp.concatenate([arrays[i].ravel() for i in indices]), axes)
        start = 0
        for i in indices:
            out[i] = flat[start : start + arrays[i].size].reshape(arrays[i].shape)
            start += arrays[i].size
    return out


def batch_shards(mesh: Mesh) -> int:
    """Return how many pieces the batch dimension is split into."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def check_batch_divisible(batch_size: int, mesh: Mesh, field: str) -> None:
    """Raise unless `batch_size` splits evenly over the mesh's data and fsdp axes."""
    shards = batch_shards(mesh)
    if batch_size % shards:
        lower = max(shards, batch_size // shards * shards)
        raise ConfigError(
            f"{field} {batch_size} does not divide evenly over the {shards} batch shards of "
            f"the mesh {dict(mesh.shape)} (data x fsdp); use a multiple of {shards}, such "
            f"as {lower}"
        )


def _path_names(path) -> tuple[str, ...]:
    names = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            names.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            names.append(entry.name)
    return tuple(names)


def logical_axes(path, ndim: int) -> tuple:
    """Return the logical axis name (or None) of each dimension of the leaf at `path`."""
    names = _path_names(path)
    for suffix, axes in LOGICAL_PARAM_AXES:
        if names[-len(suffix) :] == suffix and len(axes) == ndim:
            return axes
    return (None,) * ndim


def logical_to_spec(axes, shape, mesh: Mesh, rules=None) -> PartitionSpec:
    """Map logical axes to a PartitionSpec, replicating dimensions that do not divide evenly."""
    rules = LOGICAL_RULES if rules is None else rules
    used, spec = set(), []
    for name, size in zip(axes, shape, strict=True):
        mesh_axes = tuple(
            axis for axis in rules.get(name, ()) if mesh.shape[axis] > 1 and axis not in used
        )
        split = math.prod(mesh.shape[axis] for axis in mesh_axes)
        if not mesh_axes or size % split:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def tree_shardings(tree, mesh: Mesh):
    """Return a NamedSharding for every array leaf of `tree` (concrete or abstract)."""

    def leaf_sharding(path, leaf):
        shape = getattr(leaf, "shape", ())
        spec = logical_to_spec(logical_axes(path, len(shape)), shape, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def describe_shardings(params, shardings) -> str:
    """Summarise how many parameters are sharded, for the start-up log."""
    leaves = jax.tree.leaves(params)
    specs = jax.tree.leaves(shardings)
    total = sum(int(np.prod(leaf.shape)) for leaf in leaves)
    sharded = sum(
        int(np.prod(leaf.shape))
        for leaf, sharding in zip(leaves, specs, strict=True)
        if any(axis is not None for axis in sharding.spec)
    )
    return f"{sharded:,} of {total:,} parameters sharded"


def host_local_array(array) -> np.ndarray:
    """Return the full value of a (possibly multi-host) array on every process."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def global_array_from_host(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Place a value that every process has in full onto a (possibly multi-host) sharding."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def on_mesh(tree, mesh: Mesh):
    """Return `tree` with every leaf not yet laid out on `mesh` replicated onto it."""

    def place(leaf):
        if isinstance(leaf, jax.Array) and getattr(leaf.sharding, "mesh", None) == mesh:
            return leaf
        return global_array_from_host(np.asarray(leaf), replicated(mesh))

    return jax.tree.map(place, tree)


def log_mesh(mesh: Mesh) -> None:
    logging.info(
        "Mesh %s over %d devices in %d process(es); the batch is split %d ways.",
        dict(mesh.shape),
        mesh.devices.size,
        jax.process_count(),
        batch_shards(mesh),
    )
