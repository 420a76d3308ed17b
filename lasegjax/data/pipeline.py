"""From 3D volumes to batches of normalised 2D slices, and from slice predictions back.

Each volume is normalised once, cut into slices along its through-plane axis and
fitted to the model's input size. The result (`PreparedVolume`) stays in memory and
records what is needed to map predictions back onto the original voxel grid. Training
batches come from a grain `MapDataset` over all slices of the training volumes, so
shuffling and augmentation are deterministic functions of the seed and the element index
and the iterator state alone is enough to resume.
"""

import dataclasses
import logging
import sys

import grain
import numpy as np
from scipy import ndimage

from lasegjax.data.volume import Volume
from lasegjax.errors import ConfigError, DataError

FIT_MODES = ("resize", "pad")


@dataclasses.dataclass
class PreparedVolume:
    """One volume in the model's input form, plus what is needed to undo the preparation.

    Attributes:
      case_id: Case name.
      images: float32 (Z, H, W) normalised slices at the model's input size.
      masks: uint8 (Z, H, W) labels at the model's input size, or None.
      label: uint8 label on the original (X, Y, Z) grid, or None; metrics use it.
      slice_axis: Axis of the original array that `images` runs along.
      slice_shape: In-plane shape (A, B) of an original slice.
      affine: Voxel-to-world matrix of the original image.
      image_path: Source file of the image.
    """

    case_id: str
    images: np.ndarray
    masks: np.ndarray | None
    label: np.ndarray | None
    slice_axis: int
    slice_shape: tuple[int, int]
    affine: np.ndarray
    image_path: str

    @property
    def original_shape(self) -> tuple[int, ...]:
        shape = list(self.slice_shape)
        shape.insert(self.slice_axis, self.images.shape[0])
        return tuple(shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def check_image_size(image_size, patch_size: int = 14) -> tuple[int, int]:
    """Return `image_size` as (height, width), or raise if a side is not a multiple of the patch."""
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    height, width = (int(s) for s in image_size)
    for side in (height, width):
        if side <= 0 or side % patch_size:
            lower = max(patch_size, side // patch_size * patch_size)
            raise ConfigError(
                f"data.image_size {height}x{width} is invalid: each side must be a positive "
                f"multiple of the patch size {patch_size} (for example {lower} or "
                f"{lower + patch_size})"
            )
    return height, width


def through_plane_axis(volume: Volume, slice_axis: int | str) -> int:
    """Return the axis to slice along: the given one, or with "auto" the coarsest-spaced axis.

    Ties (isotropic voxels) resolve to the last axis, the slice axis of most MRI exports.
    """
    if slice_axis == "auto":
        spacing = np.asarray(volume.spacing)
        coarsest = np.flatnonzero(np.isclose(spacing, spacing.max(), rtol=1e-3))
        return int(coarsest[-1])
    axis = int(slice_axis)
    if not -3 <= axis <= 2:
        raise ConfigError(f"data.slice_axis {slice_axis!r} is invalid: use 0, 1, 2, -1 or 'auto'")
    return axis % 3


def normalize_intensity(image: np.ndarray, percentiles=(0.5, 99.5)) -> np.ndarray:
    """Clip to the volume's percentiles, then z-score over the whole volume."""
    low, high = np.percentile(image, percentiles)
    clipped = np.clip(image, low, high)
    std = clipped.std()
    return ((clipped - clipped.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


def resize_stack(stack: np.ndarray, size: tuple[int, int], order: int = 1) -> np.ndarray:
    """Resize the last two axes of (Z, A, B) to `size` with spline interpolation of `order`."""
    if stack.shape[1:] == tuple(size):
        return stack
    zoom = (1.0, size[0] / stack.shape[1], size[1] / stack.shape[2])
    out = ndimage.zoom(stack, zoom, order=order, mode="nearest", grid_mode=True)
    assert out.shape[1:] == tuple(size), (out.shape, size)
    return out


def pad_or_crop_stack(stack: np.ndarray, size: tuple[int, int], value: float = 0.0):
    """Centre (Z, A, B) in a (Z, H, W) canvas, padding with `value` or cropping as needed."""
    out = np.full((stack.shape[0], *size), value, dtype=stack.dtype)
    src, dst = [slice(None)], [slice(None)]
    for have, want in zip(stack.shape[1:], size, strict=True):
        if have >= want:
            start = (have - want) // 2
            src.append(slice(start, start + want))
            dst.append(slice(None))
        else:
            start = (want - have) // 2
            src.append(slice(None))
            dst.append(slice(start, start + have))
    out[tuple(dst)] = stack[tuple(src)]
    return out


def fit_stack(stack: np.ndarray, size, mode: str, is_mask: bool) -> np.ndarray:
    """Bring a (Z, A, B) stack to the model's input size by resizing or padding."""
    if mode == "resize":
        if is_mask:
            resized = resize_stack(stack.astype(np.float32), size, order=1)
            return (resized > 0.5).astype(np.uint8)
        return resize_stack(stack, size, order=1)
    if mode == "pad":
        fill = 0 if is_mask else float(stack.min())
        return pad_or_crop_stack(stack, size, fill)
    raise ConfigError(f"data.fit {mode!r} is invalid: use one of {FIT_MODES}")


def unfit_stack(stack: np.ndarray, slice_shape, mode: str) -> np.ndarray:
    """Map a (Z, H, W) float stack at model size back to the (Z, A, B) original slices."""
    if mode == "resize":
        return resize_stack(stack, tuple(slice_shape), order=1)
    return pad_or_crop_stack(stack, tuple(slice_shape), value=float(stack.min()))


def prepare_volume(volume: Volume, data_config) -> PreparedVolume:
    """Normalise, slice and fit one volume as configured in the `data` config section."""
    size = check_image_size(data_config.image_size)
    axis = through_plane_axis(volume, data_config.slice_axis)
    if volume.image.ndim != 3:
        raise DataError(f"{volume.image_path}: expected a 3D image, got shape {volume.image.shape}")
    image = normalize_intensity(volume.image, tuple(data_config.clip_percentiles))
    stack = np.moveaxis(image, axis, 0)
    masks = label = None
    if volume.mask is not None:
        label = (volume.mask > 0).astype(np.uint8)
        masks = fit_stack(np.moveaxis(label, axis, 0), size, data_config.fit, is_mask=True)
        if data_config.fit == "pad":
            _warn_if_crop_cuts_label(volume, label, masks, stack.shape[1:], size)
    return PreparedVolume(
        case_id=volume.case_id,
        images=np.ascontiguousarray(fit_stack(stack, size, data_config.fit, is_mask=False)),
        masks=None if masks is None else np.ascontiguousarray(masks),
        label=label,
        slice_axis=axis,
        slice_shape=tuple(stack.shape[1:]),
        affine=np.asarray(volume.affine, dtype=np.float64),
        image_path=volume.image_path,
    )


def _warn_if_crop_cuts_label(volume: Volume, label, masks, slice_shape, size) -> None:
    # Padding and cropping copy voxels unchanged, so any label count lost was cropped away.
    # Predictions there are restored as background, so evaluation counts them as misses.
    lost = int(label.sum()) - int(masks.sum())
    if lost > 0:
        logging.warning(
            "%s: data.fit=pad crops %dx%d slices to %dx%d and cuts off %d of %d labelled "
            "voxels. Set data.fit=resize, or a data.image_size of at least the slice size.",
            volume.case_id,
            *slice_shape,
            *size,
            lost,
            int(label.sum()),
        )


def restore_volume(probabilities: np.ndarray, prepared: PreparedVolume, fit: str) -> np.ndarray:
    """Map (Z, H, W) slice probabilities back onto the original voxel grid as (X, Y, Z)."""
    restored = unfit_stack(probabilities.astype(np.float32), prepared.slice_shape, fit)
    return np.moveaxis(restored, 0, prepared.slice_axis)


def split_cases(case_ids: list[str], val_fraction: float, num_val: int, seed: int):
    """Split case ids into (train, validation) by volume, never by slice."""
    if len(case_ids) < 2:
        raise DataError(
            f"found {len(case_ids)} case(s); at least 2 are needed to hold out a validation "
            "volume. Add cases or point data.root at a larger dataset"
        )
    count = num_val or max(1, int(round(len(case_ids) * val_fraction)))
    count = min(count, len(case_ids) - 1)
    order = np.random.default_rng(seed).permutation(len(case_ids))
    val = sorted(case_ids[i] for i in order[:count])
    train = sorted(case_ids[i] for i in order[count:])
    return train, val


def slice_windows(images: np.ndarray, indices, context: int) -> np.ndarray:
    """Return (N, H, W, 2 * context + 1) stacks of each slice with its neighbours.

    Channel `context` is the slice itself; neighbours past either end of the volume
    repeat the end slice. With context 0 this is the slice with a channel axis.
    """
    indices = np.asarray(indices)
    offsets = np.arange(-context, context + 1)
    neighbours = np.clip(indices[:, None] + offsets[None, :], 0, len(images) - 1)
    return np.moveaxis(images[neighbours], 1, -1)


class SliceSource:
    """Random access to every (image, mask) slice of a list of prepared volumes.

    Each image is (H, W, 2 * context + 1): the slice and `context` neighbours on each side
    along the through-plane axis, which gives a 2D model some 3D context.
    """

    def __init__(self, volumes: list[PreparedVolume], context: int = 0):
        self._volumes = volumes
        self._context = context
        self._index = [(v, z) for v, vol in enumerate(volumes) for z in range(len(vol.images))]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> dict:
        volume_index, z = self._index[index]
        volume = self._volumes[volume_index]
        image = slice_windows(volume.images, [z], self._context)[0]
        return {"image": image, "mask": volume.masks[z]}


def augment_slice(example: dict, rng: np.random.Generator, aug_config) -> dict:
    """Apply a random flip, rotation, scaling and intensity change to one (H, W, C) slice."""
    image = example["image"].astype(np.float32)
    if image.ndim == 2:
        image = image[..., None]
    mask = example["mask"].astype(np.float32)
    if aug_config.flip:
        for axis in (0, 1):
            if rng.random() < 0.5:
                image, mask = np.flip(image, axis), np.flip(mask, axis)
    angle = np.deg2rad(rng.uniform(-aug_config.rotate_deg, aug_config.rotate_deg))
    scale = np.exp(rng.uniform(-np.log1p(aug_config.scale), np.log1p(aug_config.scale)))
    if angle or scale != 1.0:
        cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
        matrix = np.array([[cos, -sin], [sin, cos]])
        center = (np.array(mask.shape) - 1) / 2.0
        offset = center - matrix @ center
        image = np.stack(
            [
                ndimage.affine_transform(image[..., c], matrix, offset, order=1, mode="nearest")
                for c in range(image.shape[-1])
            ],
            axis=-1,
        )
        mask = ndimage.affine_transform(mask, matrix, offset, order=1, mode="constant")
    if aug_config.intensity:
        strength = aug_config.intensity
        image = image * np.exp(rng.uniform(-strength, strength)) + rng.uniform(-strength, strength)
        image = image + rng.normal(0.0, strength / 2, image.shape).astype(np.float32)
    return {
        "image": np.ascontiguousarray(image, dtype=np.float32),
        "mask": np.ascontiguousarray((mask > 0.5)[..., None], dtype=np.float32),
    }


def _as_example(example: dict) -> dict:
    image = example["image"].astype(np.float32)
    return {
        "image": image if image.ndim == 3 else image[..., None],
        "mask": example["mask"][..., None].astype(np.float32),
    }


def shard_seed(seed: int, shard: int, stream: int) -> int:
    """Return an independent 32-bit seed for one random stream of one data shard."""
    return int(np.random.SeedSequence([seed, shard, stream]).generate_state(1)[0])


def shard_batches(volumes: list[PreparedVolume], data_config, batch_size: int, seed: int, shard=0):
    """Return an endless grain `MapDataset` whose item k is batch k of one data shard.

    Each epoch is reshuffled and re-augmented with seeds derived from `seed`, the shard and
    the epoch, so batch k is the same whatever process reads it and whenever.
    """
    source = SliceSource(volumes, data_config.context_slices)
    if len(source) < batch_size:
        raise ConfigError(
            f"the per-shard batch of {batch_size} slices exceeds the {len(source)} training "
            f"slices of data shard {shard}; lower train.batch_size, data.shards, or add volumes"
        )
    dataset = grain.MapDataset.source(source).shuffle(seed=shard_seed(seed, shard, 0))
    aug = data_config.augment
    if aug.enabled:
        dataset = dataset.random_map(
            lambda example, rng: augment_slice(example, rng, aug), seed=shard_seed(seed, shard, 1)
        )
    else:
        dataset = dataset.map(_as_example)
    return dataset.batch(batch_size, drop_remainder=True).repeat()


class _ConcatenatedBatches:
    """Random access to batches built by concatenating batch k of several shards."""

    def __init__(self, datasets: list):
        self._datasets = datasets

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index: int) -> dict:
        parts = [dataset[index] for dataset in self._datasets]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def train_dataset(
    volumes, data_config, batch_size: int, seed: int, start_step: int = 0
) -> grain.IterDataset:
    """Return an endless grain `IterDataset` of this process's training batches.

    Args:
      volumes: The volumes of one data shard, or a dict {shard index: volumes} of the
        shards this process reads. Each shard contributes `batch_size / len(shards)` slices
        to every batch, in shard order.
      batch_size: Slices per batch on this process.
      start_step: Index of the first batch; a resumed run starts at its step, so the
        position in the data needs no checkpoint of its own.

    Each batch is a dict with float32 "image" (batch_size, H, W, 2 * data.context_slices + 1)
    and "mask" (batch_size, H, W, 1).
    """
    shards = volumes if isinstance(volumes, dict) else {0: volumes}
    if batch_size % len(shards):
        raise ConfigError(
            f"the batch of {batch_size} slices per process does not split evenly over its "
            f"{len(shards)} data shards; make train.batch_size a multiple of data.shards"
        )
    per_shard = batch_size // len(shards)
    datasets = [
        shard_batches(shard_volumes, data_config, per_shard, seed, shard)
        for shard, shard_volumes in sorted(shards.items())
    ]
    dataset = (
        datasets[0]
        if len(datasets) == 1
        else grain.MapDataset.source(_ConcatenatedBatches(datasets))
    )
    read_options = grain.ReadOptions(
        num_threads=data_config.num_threads, prefetch_buffer_size=data_config.prefetch
    )
    slices = sum(len(SliceSource(v)) for v in shards.values())
    logging.info(
        "Training data on this process: %d slices from %d volumes in data shard(s) %s, "
        "batches of %d starting at batch %d.",
        slices,
        sum(len(v) for v in shards.values()),
        sorted(shards),
        batch_size,
        start_step,
    )
    return dataset[start_step:].to_iter_dataset(read_options)
