"""Tests of slicing, normalisation, fitting, splitting and augmentation."""

import numpy as np
import pytest
from ml_collections import ConfigDict

from lasegjax.config import base_config
from lasegjax.data.pipeline import (
    PreparedVolume,
    augment_slice,
    check_image_size,
    normalize_intensity,
    prepare_volume,
    restore_volume,
    split_cases,
    through_plane_axis,
    train_dataset,
)
from lasegjax.data.volume import Volume
from lasegjax.errors import ConfigError, DataError


def make_volume(shape=(40, 30, 6), spacing=(1.0, 1.0, 2.5)) -> Volume:
    rng = np.random.default_rng(0)
    image = rng.normal(100.0, 20.0, shape).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    mask[10:30, 8:22, 1:5] = 1
    return Volume("case", image, mask, np.diag([*spacing, 1.0]), "/tmp/case.nii.gz")


def data_config(**overrides) -> ConfigDict:
    config = base_config().data
    config.image_size = (28, 42)
    for key, value in overrides.items():
        config[key] = value
    return config


def test_check_image_size_rejects_non_multiple():
    with pytest.raises(ConfigError, match="data.image_size 450x448 is invalid.*448 or 462"):
        check_image_size((450, 448))


def test_check_image_size_accepts_non_square():
    assert check_image_size((196, 378)) == (196, 378)


def test_through_plane_axis_auto_picks_coarsest():
    assert through_plane_axis(make_volume(spacing=(2.5, 1.0, 1.0)), "auto") == 0


def test_through_plane_axis_auto_isotropic_is_last():
    assert through_plane_axis(make_volume(spacing=(0.625, 0.625, 0.625)), "auto") == 2


def test_through_plane_axis_rejects_axis_3():
    with pytest.raises(ConfigError, match="data.slice_axis 3 is invalid"):
        through_plane_axis(make_volume(), 3)


def test_normalize_intensity_zero_mean_unit_std():
    image = np.random.default_rng(0).normal(500.0, 80.0, (20, 20, 5))
    out = normalize_intensity(image)
    assert abs(float(out.mean())) < 1e-4
    assert float(out.std()) == pytest.approx(1.0, rel=1e-4)


def test_prepare_volume_resize_shapes():
    prepared = prepare_volume(make_volume(), data_config(fit="resize"))
    assert prepared.images.shape == (6, 28, 42)
    assert prepared.masks.shape == (6, 28, 42)
    assert prepared.slice_shape == (40, 30)


def test_prepare_volume_mask_values_binary():
    prepared = prepare_volume(make_volume(), data_config())
    assert set(np.unique(prepared.masks)) <= {0, 1}


@pytest.mark.parametrize("fit", ["resize", "pad"])
def test_restore_volume_round_trip_original_grid(fit):
    volume = make_volume()
    config = data_config(fit=fit, image_size=(56, 42))
    prepared = prepare_volume(volume, config)
    restored = restore_volume(prepared.masks.astype(np.float32), prepared, fit) > 0.5
    assert restored.shape == volume.mask.shape
    overlap = 2 * np.sum(restored & (volume.mask > 0)) / (restored.sum() + volume.mask.sum())
    assert overlap > 0.95


def test_restore_volume_pad_crops_exactly():
    volume = make_volume(shape=(40, 30, 6))
    prepared = prepare_volume(volume, data_config(fit="pad", image_size=(42, 42)))
    restored = restore_volume(prepared.masks.astype(np.float32), prepared, "pad")
    np.testing.assert_array_equal(restored > 0.5, volume.mask > 0)


def test_prepare_volume_slices_along_first_axis_when_coarsest():
    volume = make_volume(shape=(6, 40, 30), spacing=(3.0, 1.0, 1.0))
    prepared = prepare_volume(volume, data_config())
    assert prepared.images.shape[0] == 6
    assert prepared.original_shape == (6, 40, 30)


def test_split_cases_by_volume_disjoint():
    ids = [f"case{i}" for i in range(10)]
    train, val = split_cases(ids, 0.2, 0, seed=0)
    assert not set(train) & set(val)
    assert len(val) == 2
    assert sorted(train + val) == sorted(ids)


def test_split_cases_deterministic():
    ids = [f"case{i}" for i in range(10)]
    assert split_cases(ids, 0.3, 0, seed=1) == split_cases(ids, 0.3, 0, seed=1)


def test_split_cases_rejects_single_case():
    with pytest.raises(DataError, match="found 1 case"):
        split_cases(["only"], 0.2, 0, seed=0)


def test_augment_slice_deterministic_for_seed():
    example = {
        "image": np.random.default_rng(0).normal(size=(28, 28)).astype(np.float32),
        "mask": np.zeros((28, 28), np.uint8),
    }
    aug = base_config().data.augment
    a = augment_slice(example, np.random.default_rng(5), aug)
    b = augment_slice(example, np.random.default_rng(5), aug)
    np.testing.assert_array_equal(a["image"], b["image"])


def test_augment_slice_keeps_mask_binary():
    mask = np.zeros((28, 28), np.uint8)
    mask[8:20, 10:18] = 1
    example = {"image": np.zeros((28, 28), np.float32), "mask": mask}
    out = augment_slice(example, np.random.default_rng(3), base_config().data.augment)
    assert set(np.unique(out["mask"])) <= {0.0, 1.0}
    assert out["mask"].shape == (28, 28, 1)


def prepared_list(count=3):
    config = data_config()
    return [prepare_volume(make_volume(), config) for _ in range(count)]


def test_train_dataset_batch_shapes():
    volumes = prepared_list()
    batch = next(iter(train_dataset(volumes, data_config(), batch_size=4, seed=0)))
    assert batch["image"].shape == (4, 28, 42, 1)
    assert batch["mask"].shape == (4, 28, 42, 1)


def test_train_dataset_same_seed_same_batches():
    volumes = prepared_list()
    first = iter(train_dataset(volumes, data_config(), batch_size=4, seed=0))
    second = iter(train_dataset(volumes, data_config(), batch_size=4, seed=0))
    for _ in range(3):
        np.testing.assert_array_equal(next(first)["image"], next(second)["image"])


def test_train_dataset_start_step_resumes():
    volumes = prepared_list()
    reference = iter(train_dataset(volumes, data_config(), batch_size=4, seed=0))
    expected = [next(reference)["image"] for _ in range(7)]
    resumed = iter(train_dataset(volumes, data_config(), batch_size=4, seed=0, start_step=5))
    np.testing.assert_array_equal(next(resumed)["image"], expected[5])
    np.testing.assert_array_equal(next(resumed)["image"], expected[6])


def test_train_dataset_shards_concatenate():
    volumes = prepared_list(4)
    shards = {0: volumes[0::2], 1: volumes[1::2]}
    both = next(iter(train_dataset(shards, data_config(), batch_size=4, seed=0)))
    first = next(iter(train_dataset({0: shards[0]}, data_config(), batch_size=2, seed=0)))
    second = next(iter(train_dataset({1: shards[1]}, data_config(), batch_size=2, seed=0)))
    np.testing.assert_array_equal(both["image"][:2], first["image"])
    np.testing.assert_array_equal(both["image"][2:], second["image"])


def test_train_dataset_shards_differ():
    volumes = prepared_list(2)
    first = next(iter(train_dataset({0: volumes}, data_config(), batch_size=4, seed=0)))
    second = next(iter(train_dataset({1: volumes}, data_config(), batch_size=4, seed=0)))
    assert not np.array_equal(first["image"], second["image"])


def test_train_dataset_rejects_uneven_shard_batch():
    volumes = prepared_list(2)
    with pytest.raises(ConfigError, match="does not split evenly over its 2 data shards"):
        train_dataset({0: volumes[:1], 1: volumes[1:]}, data_config(), batch_size=3, seed=0)


def test_train_dataset_rejects_batch_larger_than_data():
    volumes = prepared_list(1)
    with pytest.raises(ConfigError, match="batch of 64 slices exceeds the 6 training slices"):
        train_dataset(volumes, data_config(), batch_size=64, seed=0)


def test_prepared_volume_spacing_from_affine():
    prepared = prepare_volume(make_volume(spacing=(0.625, 0.625, 2.5)), data_config())
    assert isinstance(prepared, PreparedVolume)
    assert prepared.spacing == pytest.approx((0.625, 0.625, 2.5))
