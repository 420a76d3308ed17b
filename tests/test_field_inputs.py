"""Tests of the input variants met in real LA datasets, read from NIfTI and NRRD files on disk.

Most cases start from a 97 x 131 x 40 crop of a real LGE-MRI volume and its LA mask, whose
foreground touches the crop's first and last x planes. Each test writes the variant with
nibabel or pynrrd into tmp_path and reads it back through the public readers.
"""

import gzip
import logging
import re
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, inv_ornt_aff

from lasegjax.config import base_config
from lasegjax.data.pipeline import prepare_volume, restore_volume, through_plane_axis
from lasegjax.data.readers import CaseRef, detect_layout, list_cases, load_case
from lasegjax.errors import DataError
from lasegjax.evaluation import save_mask_nifti
from tests.conftest import LASCARQS_COPY, require

REAL_CASE = LASCARQS_COPY / "train_data" / "train_1"
# The in-plane size 97 x 131 is not a multiple of 14. The mask spans x = 15 ... 166 of the
# full volume, so it is cut by both x faces of this crop.
CROP = (slice(60, 157), slice(5, 136), slice(20, 60))
CROP_SHAPE = (97, 131, 40)
ANISOTROPIC = np.array([[0.625, 0, 0, -30.0], [0, 0.625, 0, 12.5], [0, 0, 2.5, 40.0], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def real_crop() -> tuple[np.ndarray, np.ndarray]:
    """Return the float32 image crop and its uint8 {0, 1} mask crop."""
    folder = require(REAL_CASE)
    image = nib.load(folder / "enhanced.nii.gz").get_fdata(dtype=np.float32)[CROP]
    mask = np.asarray(nib.load(folder / "atriumSegImgMO.nii.gz").dataobj)[CROP]
    return np.ascontiguousarray(image), np.ascontiguousarray(mask.astype(np.uint8))


def _save(path: Path, data: np.ndarray, affine: np.ndarray = ANISOTROPIC, image_class=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save((image_class or nib.Nifti1Image)(data, affine), path)
    return path


def _write_case(folder: Path, image, mask=None, affine=ANISOTROPIC, suffix=".nii.gz") -> CaseRef:
    image_path = _save(folder / f"enhanced{suffix}", image, affine)
    mask_path = None if mask is None else _save(folder / f"atriumSegImgMO{suffix}", mask, affine)
    return CaseRef(folder.name, str(image_path), mask_path and str(mask_path), "lascarqs")


def _data_config(fit="resize", image_size=(56, 56)):
    config = base_config().data
    config.fit = fit
    config.image_size = image_size
    return config


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * np.sum(a & b) / (a.sum() + b.sum())


# 1. Orientations other than RAS.
#
# Each case is a nibabel orientation transform: row i gives the new axis of old axis i and
# whether it is flipped. The expected prepared stack is written out per case, from the
# reference stack whose axes are (old z, old x, old y).
ORIENTATIONS = {
    # Stored like a DICOM-derived LPS volume: x and y reversed, slices unchanged.
    "flip_x_y": (
        [[0, -1], [1, -1], [2, 1]],
        2,
        lambda stack: stack[:, ::-1, ::-1],
    ),
    # Slices first and in reverse order, x last and reversed.
    "slices_first": (
        [[2, -1], [1, 1], [0, -1]],
        0,
        lambda stack: stack[::-1].transpose(0, 2, 1)[:, :, ::-1],
    ),
    # Slices in the middle, y reversed.
    "slices_middle": (
        [[0, 1], [2, -1], [1, 1]],
        1,
        lambda stack: stack[:, :, ::-1],
    ),
}


@pytest.fixture(scope="module")
def oriented_cases(real_crop, tmp_path_factory):
    """Read the crop and each reoriented copy from disk, keyed by case name."""
    image, mask = real_crop
    root = tmp_path_factory.mktemp("orientations")
    volumes = {"reference": load_case(_write_case(root / "reference", image, mask))}
    for name, (ornt, _, _) in ORIENTATIONS.items():
        ornt = np.asarray(ornt)
        affine = ANISOTROPIC @ inv_ornt_aff(ornt, image.shape)
        ref = _write_case(
            root / name,
            apply_orientation(image, ornt),
            apply_orientation(mask, ornt).astype(np.uint8),
            affine,
        )
        volumes[name] = load_case(ref)
    return volumes


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_orientation_slice_axis_follows_coarse_axis(oriented_cases, name):
    prepared = prepare_volume(oriented_cases[name], _data_config())
    assert prepared.slice_axis == ORIENTATIONS[name][1]


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_orientation_prepared_images_match_reference(oriented_cases, name):
    config = _data_config()
    reference = prepare_volume(oriented_cases["reference"], config)
    prepared = prepare_volume(oriented_cases[name], config)
    expected = ORIENTATIONS[name][2](reference.images)
    np.testing.assert_allclose(prepared.images, expected, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_orientation_prepared_masks_match_reference(oriented_cases, name):
    config = _data_config()
    reference = prepare_volume(oriented_cases["reference"], config)
    prepared = prepare_volume(oriented_cases[name], config)
    np.testing.assert_array_equal(prepared.masks, ORIENTATIONS[name][2](reference.masks))


@pytest.mark.parametrize("fit", ["resize", "pad"])
@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_orientation_restore_matches_reoriented_reference(oriented_cases, name, fit):
    config = _data_config(fit, (140, 140))
    reference = prepare_volume(oriented_cases["reference"], config)
    prepared = prepare_volume(oriented_cases[name], config)
    restored_reference = restore_volume(reference.masks.astype(np.float32), reference, fit)
    restored = restore_volume(prepared.masks.astype(np.float32), prepared, fit)
    expected = apply_orientation(restored_reference, np.asarray(ORIENTATIONS[name][0]))
    np.testing.assert_allclose(restored, expected, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_orientation_restore_keeps_file_grid(oriented_cases, name):
    volume = oriented_cases[name]
    prepared = prepare_volume(volume, _data_config())
    restored = restore_volume(prepared.masks.astype(np.float32), prepared, "resize") > 0.5
    assert restored.shape == volume.image.shape
    assert _dice(restored, volume.mask) > 0.97


def test_orientation_reoriented_voxel_same_world_point(oriented_cases):
    # Voxel (0, 0, 0) of the slices-first copy is the last slice, last x, first y of the crop.
    volume = oriented_cases["slices_first"]
    reference = oriented_cases["reference"]
    corner = np.array([CROP_SHAPE[0] - 1, 0, CROP_SHAPE[2] - 1, 1.0])
    np.testing.assert_allclose(volume.affine @ [0, 0, 0, 1.0], reference.affine @ corner)


def test_orientation_prediction_written_with_file_affine(oriented_cases, tmp_path):
    volume = oriented_cases["flip_x_y"]
    prepared = prepare_volume(volume, _data_config())
    restored = restore_volume(prepared.masks.astype(np.float32), prepared, "resize") > 0.5
    path = tmp_path / "prediction.nii.gz"
    save_mask_nifti(restored, prepared.affine, path)
    written = nib.load(path)
    np.testing.assert_allclose(written.affine, volume.affine, atol=1e-5)
    assert nib.aff2axcodes(written.affine) == ("L", "P", "S")
    assert written.shape == volume.image.shape


def _oblique_affine(spacing) -> np.ndarray:
    # Rotations of 25 degrees about z, then 15 degrees about x: a typical oblique LA stack.
    a, b = np.deg2rad(25.0), np.deg2rad(15.0)
    rot_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rot_x @ rot_z @ np.diag(spacing)
    affine[:3, 3] = (-20.0, 35.0, 10.0)
    return affine


def test_oblique_affine_read_unchanged(real_crop, tmp_path):
    image, mask = real_crop
    affine = _oblique_affine((0.625, 2.5, 0.625))
    volume = load_case(_write_case(tmp_path / "train_1", image, mask, affine))
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)


def test_oblique_affine_voxels_not_resampled(real_crop, tmp_path):
    image, mask = real_crop
    volume = load_case(
        _write_case(tmp_path / "train_1", image, mask, _oblique_affine((0.625, 2.5, 0.625)))
    )
    np.testing.assert_array_equal(volume.image, image)


def test_oblique_affine_slice_axis_from_column_norms(real_crop, tmp_path):
    image, mask = real_crop
    volume = load_case(
        _write_case(tmp_path / "train_1", image, mask, _oblique_affine((0.625, 2.5, 0.625)))
    )
    assert through_plane_axis(volume, "auto") == 1


def test_oblique_affine_prediction_round_trip(real_crop, tmp_path):
    image, mask = real_crop
    affine = _oblique_affine((0.625, 2.5, 0.625))
    volume = load_case(_write_case(tmp_path / "train_1", image, mask, affine))
    prepared = prepare_volume(volume, _data_config())
    restored = restore_volume(prepared.masks.astype(np.float32), prepared, "resize") > 0.5
    path = tmp_path / "prediction.nii.gz"
    save_mask_nifti(restored, prepared.affine, path)
    written = nib.load(path)
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    assert written.shape == CROP_SHAPE


# 2. Anisotropic spacing.


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_anisotropic_slice_axis_is_coarse_axis(real_crop, tmp_path, axis):
    image, mask = real_crop
    spacing = [0.625, 0.625, 0.625]
    spacing[axis] = 2.5
    ref = _write_case(tmp_path / "train_1", image, mask, np.diag([*spacing, 1.0]))
    assert through_plane_axis(load_case(ref), "auto") == axis


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_anisotropic_prepared_slice_count(real_crop, tmp_path, axis):
    image, mask = real_crop
    spacing = [0.625, 0.625, 0.625]
    spacing[axis] = 2.5
    ref = _write_case(tmp_path / "train_1", image, mask, np.diag([*spacing, 1.0]))
    prepared = prepare_volume(load_case(ref), _data_config())
    assert prepared.images.shape == (CROP_SHAPE[axis], 56, 56)


# 3. Integer images and scale factors.


def test_int16_scale_factors_applied(real_crop, tmp_path):
    image, _ = real_crop
    slope = float(image.max() - image.min()) / 60000.0
    inter = float(image.min() + image.max()) / 2.0
    stored = np.round((image - inter) / slope).astype(np.int16)
    img = nib.Nifti1Image(stored, ANISOTROPIC)
    img.header.set_slope_inter(slope, inter)
    path = tmp_path / "train_1" / "enhanced.nii.gz"
    path.parent.mkdir()
    nib.save(img, path)
    volume = load_case(CaseRef("train_1", str(path), None, "lascarqs"))
    np.testing.assert_allclose(volume.image, image, atol=slope)


def test_int16_extremes_read_exactly(real_crop, tmp_path):
    image, _ = real_crop
    stored = np.clip(image * 1000.0, -30000, 30000).astype(np.int16)
    stored[0, 0, 0], stored[-1, -1, -1] = -32768, 32767
    volume = load_case(_write_case(tmp_path / "train_1", stored))
    np.testing.assert_array_equal(volume.image, stored.astype(np.float32))


def test_int16_extremes_keep_order_after_prepare(real_crop, tmp_path):
    image, _ = real_crop
    stored = np.clip(image * 1000.0, -30000, 30000).astype(np.int16)
    stored[0, 0, 0], stored[-1, -1, -1] = -32768, 32767
    volume = load_case(_write_case(tmp_path / "train_1", stored))
    prepared = prepare_volume(volume, _data_config("pad", (140, 140)))
    # The percentile clip maps both extremes to the clip bounds, and wrapping would swap them.
    assert prepared.images[0, 21, 4] < prepared.images[-1, 21 + 96, 4 + 130]


def test_uint16_above_int16_range_read_exactly(real_crop, tmp_path):
    image, _ = real_crop
    scaled = (image - image.min()) / (image.max() - image.min())
    stored = (30000 + scaled * 35535).astype(np.uint16)
    stored[-1, -1, -1] = 65535
    volume = load_case(_write_case(tmp_path / "train_1", stored))
    assert nib.load(volume.image_path).get_data_dtype() == np.uint16
    np.testing.assert_array_equal(volume.image, stored.astype(np.float32))


def test_uint16_above_int16_range_no_wrap(real_crop, tmp_path):
    image, _ = real_crop
    stored = np.full(image.shape, 40000, np.uint16)
    stored[-1, -1, -1] = 65535
    volume = load_case(_write_case(tmp_path / "train_1", stored))
    assert float(volume.image.min()) == 40000.0
    assert float(volume.image.max()) == 65535.0


# 4. 4D files.


def test_4d_singleton_image_squeezed(real_crop, tmp_path):
    image, mask = real_crop
    volume = load_case(_write_case(tmp_path / "train_1", image[..., None], mask))
    assert volume.image.shape == CROP_SHAPE


def test_4d_singleton_mask_squeezed(real_crop, tmp_path):
    image, mask = real_crop
    volume = load_case(_write_case(tmp_path / "train_1", image, mask[..., None]))
    np.testing.assert_array_equal(volume.mask, mask)


def test_5d_singleton_image_squeezed(real_crop, tmp_path):
    image, mask = real_crop
    volume = load_case(_write_case(tmp_path / "train_1", image[..., None, None], mask))
    assert volume.image.shape == CROP_SHAPE


def test_true_4d_image_rejected_with_shape(real_crop, tmp_path):
    image, mask = real_crop
    series = np.stack([image, image], axis=-1)
    ref = _write_case(tmp_path / "train_1", series, mask)
    pattern = f"in {re.escape(ref.image_path)}, got shape \\(97, 131, 40, 2\\)"
    with pytest.raises(DataError, match=pattern):
        load_case(ref)


# 5. Mask encodings.


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda m: m.astype(np.uint8), id="uint8_0_1"),
        pytest.param(lambda m: (m * 255).astype(np.uint8), id="uint8_0_255"),
        pytest.param(lambda m: (m * 255).astype(np.float32), id="float_0_255"),
        pytest.param(lambda m: m.astype(np.int16), id="int16_0_1"),
        pytest.param(lambda m: np.where(m > 0, 0.9999, 1e-6).astype(np.float32), id="float_0_9999"),
        pytest.param(
            lambda m: np.where(m > 0, 1.0001, -1e-6).astype(np.float32), id="float_1_0001"
        ),
    ],
)
def test_mask_encoding_binarised(real_crop, tmp_path, encode):
    image, mask = real_crop
    volume = load_case(_write_case(tmp_path / "train_1", image, encode(mask)))
    np.testing.assert_array_equal(volume.mask, mask)


def test_mask_scale_factor_binarised(real_crop, tmp_path):
    image, mask = real_crop
    img = nib.Nifti1Image((mask * 255).astype(np.uint8), ANISOTROPIC)
    img.header.set_slope_inter(1.0 / 255.0, 0.0)
    _save(tmp_path / "train_1" / "enhanced.nii.gz", image)
    nib.save(img, tmp_path / "train_1" / "atriumSegImgMO.nii.gz")
    volume = load_case(list_cases(tmp_path)[0])
    np.testing.assert_array_equal(volume.mask, mask)


def test_mask_interpolated_float_cut_at_half(tmp_path):
    mask = np.zeros((8, 8, 4), np.float32)
    mask[2:6, 2:6] = 1.0
    mask[1, 2:6] = 0.3
    mask[6, 2:6] = 0.7
    volume = load_case(_write_case(tmp_path / "train_1", np.ones((8, 8, 4), np.float32), mask))
    np.testing.assert_array_equal(volume.mask, (mask > 0.5).astype(np.uint8))


def test_mask_interpolated_0_255_cut_at_half_maximum(tmp_path):
    mask = np.zeros((8, 8, 4), np.float32)
    mask[2:6, 2:6] = 255.0
    mask[1, 2:6] = 100.4
    mask[6, 2:6] = 200.6
    volume = load_case(_write_case(tmp_path / "train_1", np.ones((8, 8, 4), np.float32), mask))
    np.testing.assert_array_equal(volume.mask, (mask > 127.5).astype(np.uint8))


def test_mask_interpolated_integers_rejected_with_hint(tmp_path):
    # Integer-valued interpolation results cannot be distinguished from a multi-label mask.
    mask = np.zeros((16, 16, 4), np.uint8)
    mask[:, :, 1:3] = np.arange(16, dtype=np.uint8)[:, None, None] * 17
    ref = _write_case(tmp_path / "train_1", np.ones(mask.shape, np.float32), mask)
    with pytest.raises(DataError, match=r"\(16 values\).*nearest-neighbour interpolation"):
        load_case(ref)


def test_mask_empty_accepted(real_crop, tmp_path):
    image, mask = real_crop
    volume = load_case(_write_case(tmp_path / "train_1", image, np.zeros_like(mask)))
    assert int(volume.mask.sum()) == 0


def test_mask_multi_label_rejected(real_crop, tmp_path):
    image, mask = real_crop
    labels = mask.copy()
    labels[:10][labels[:10] > 0] = 2
    ref = _write_case(tmp_path / "train_1", image, labels)
    pattern = f"{re.escape(ref.mask_path)} is not a binary mask: it contains the labels " + (
        r"\{0, 1, 2\}"
    )
    with pytest.raises(DataError, match=pattern):
        load_case(ref)


def test_mask_multi_label_message_names_fix(real_crop, tmp_path):
    image, mask = real_crop
    ref = _write_case(tmp_path / "train_1", image, mask * 3 + (mask == 0).astype(np.uint8))
    with pytest.raises(DataError, match="Save the left-atrium label alone as a binary mask"):
        load_case(ref)


def test_mask_multi_label_float_rejected(real_crop, tmp_path):
    image, mask = real_crop
    labels = mask.astype(np.float32)
    labels[:10][labels[:10] > 0] = 2.0001
    with pytest.raises(DataError, match=r"contains the labels \{0, 1, 2\}"):
        load_case(_write_case(tmp_path / "train_1", image, labels))


def test_mask_negative_label_rejected(real_crop, tmp_path):
    image, mask = real_crop
    labels = mask.astype(np.int16) * -1
    with pytest.raises(DataError, match=r"contains the labels \{-1, 0\}"):
        load_case(_write_case(tmp_path / "train_1", image, labels))


def test_mask_shape_mismatch_names_both_files(real_crop, tmp_path):
    image, mask = real_crop
    ref = _write_case(tmp_path / "train_1", image, mask[:, :, :-1])
    pattern = (
        f"{re.escape(ref.image_path)} has shape \\(97, 131, 40\\) but "
        f"{re.escape(ref.mask_path)} has shape \\(97, 131, 39\\)"
    )
    with pytest.raises(DataError, match=pattern):
        load_case(ref)


def test_mask_other_affine_logged(real_crop, tmp_path, caplog):
    image, mask = real_crop
    ref = _write_case(tmp_path / "train_1", image, mask)
    _save(Path(ref.mask_path), mask, np.eye(4))
    with caplog.at_level(logging.WARNING):
        load_case(ref)
    assert f"the mask {ref.mask_path} has another voxel-to-world affine" in caplog.text


def test_mask_same_affine_not_logged(real_crop, tmp_path, caplog):
    image, mask = real_crop
    ref = _write_case(tmp_path / "train_1", image, mask)
    with caplog.at_level(logging.WARNING):
        load_case(ref)
    assert "voxel-to-world affine" not in caplog.text


# 6. NaN and inf voxels.


def test_nan_and_inf_image_rejected_with_count(real_crop, tmp_path):
    image, mask = real_crop
    broken = image.copy()
    broken[0, :5, 0] = np.nan
    broken[10, 10, 10] = np.inf
    broken[11, 10, 10] = -np.inf
    ref = _write_case(tmp_path / "train_1", broken, mask)
    with pytest.raises(DataError, match=f"{re.escape(ref.image_path)} contains 7 NaN or inf"):
        load_case(ref)


def test_nan_mask_rejected(real_crop, tmp_path):
    image, mask = real_crop
    broken = mask.astype(np.float32)
    broken[0, 0, 0] = np.nan
    ref = _write_case(tmp_path / "train_1", image, broken)
    with pytest.raises(DataError, match=f"{re.escape(ref.mask_path)} contains 1 NaN or inf"):
        load_case(ref)


# 7. File formats and damaged files.


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_suffix_read(real_crop, tmp_path, suffix):
    image, mask = real_crop
    volume = load_case(_write_case(tmp_path / "train_1", image, mask, suffix=suffix))
    np.testing.assert_array_equal(volume.image, image)


def test_nifti2_read(real_crop, tmp_path):
    image, mask = real_crop
    path = _save(tmp_path / "train_1" / "enhanced.nii.gz", image, image_class=nib.Nifti2Image)
    volume = load_case(CaseRef("train_1", str(path), None, "lascarqs"))
    np.testing.assert_array_equal(volume.image, image)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_truncated_rejected(real_crop, tmp_path, suffix):
    image, mask = real_crop
    ref = _write_case(tmp_path / "train_1", image, mask, suffix=suffix)
    raw = Path(ref.image_path).read_bytes()
    Path(ref.image_path).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=f"failed to read {re.escape(ref.image_path)}"):
        load_case(ref)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_garbage_bytes_rejected(real_crop, tmp_path, suffix):
    image, mask = real_crop
    ref = _write_case(tmp_path / "train_1", image, mask, suffix=suffix)
    garbage = np.random.default_rng(0).bytes(4096)
    if suffix == ".nii.gz":
        garbage = gzip.compress(garbage)
    Path(ref.mask_path).write_bytes(garbage)
    with pytest.raises(DataError, match=f"failed to read {re.escape(ref.mask_path)}"):
        load_case(ref)


def test_nifti_zero_voxel_size_rejected(real_crop, tmp_path):
    image, mask = real_crop
    ref = _write_case(tmp_path / "train_1", image, mask)
    # nibabel stores an sform with a zero column as given, but a qform could not hold it.
    img = nib.Nifti1Image(image, ANISOTROPIC)
    img.set_qform(None, code=0)
    img.set_sform(np.diag([0.625, 0.0, 2.5, 1.0]), code=2)
    nib.save(img, ref.image_path)
    pattern = (
        f"{re.escape(ref.image_path)} has an invalid voxel-to-world affine "
        r"\(voxel sizes 0\.625, 0, 2\.5 mm"
    )
    with pytest.raises(DataError, match=pattern):
        load_case(ref)


# 8. In-plane sizes that are not multiples of 14, with foreground on the border.


@pytest.mark.parametrize(
    ("fit", "image_size"),
    [("resize", (56, 70)), ("resize", (112, 140)), ("pad", (112, 140)), ("pad", (98, 154))],
)
def test_border_foreground_round_trip_dice(real_crop, tmp_path, fit, image_size):
    image, mask = real_crop
    volume = load_case(_write_case(tmp_path / "train_1", image, mask))
    prepared = prepare_volume(volume, _data_config(fit, image_size))
    restored = restore_volume(prepared.masks.astype(np.float32), prepared, fit) > 0.5
    assert _dice(restored, mask) > 0.97


@pytest.mark.parametrize(
    ("fit", "image_size"),
    [("resize", (56, 70)), ("resize", (112, 140)), ("pad", (112, 140)), ("pad", (98, 154))],
)
@pytest.mark.parametrize("face", [0, -1])
def test_border_foreground_round_trip_kept(real_crop, tmp_path, fit, image_size, face):
    image, mask = real_crop
    volume = load_case(_write_case(tmp_path / "train_1", image, mask))
    prepared = prepare_volume(volume, _data_config(fit, image_size))
    restored = restore_volume(prepared.masks.astype(np.float32), prepared, fit) > 0.5
    truth = int(mask[face].sum())
    assert truth > 0
    # Linear resizing can move the contour by about one voxel, so a face keeps most, not all.
    assert abs(int(restored[face].sum()) - truth) <= 0.1 * truth


def test_pad_crop_cutting_label_logged(real_crop, tmp_path, caplog):
    image, mask = real_crop
    volume = load_case(_write_case(tmp_path / "train_1", image, mask))
    with caplog.at_level(logging.WARNING):
        prepare_volume(volume, _data_config("pad", (84, 126)))
    assert "data.fit=pad crops 97x131 slices to 84x126 and cuts off" in caplog.text


# 9. Raw LASC2018 NRRD files.

LPS_DIRECTIONS = np.diag([0.625, 0.625, 2.5])
LPS_ORIGIN = np.array([-60.0, 80.0, -20.0])


def _write_nrrd(path: Path, data: np.ndarray, header: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if header is None:
        header = {
            "space": "left-posterior-superior",
            "space directions": LPS_DIRECTIONS,
            "space origin": LPS_ORIGIN,
        }
    nrrd.write(str(path), data, header)
    return path


def _as_uint8(image: np.ndarray) -> np.ndarray:
    # The challenge's lgemri.nrrd files store unsigned 8-bit intensities.
    scaled = (image - image.min()) / (image.max() - image.min())
    return np.round(scaled * 255).astype(np.uint8)


def _write_lasc2018_case(folder: Path, image, mask, header=None) -> tuple[Path, Path]:
    image_path = _write_nrrd(folder / "lgemri.nrrd", _as_uint8(image), header)
    mask_path = _write_nrrd(folder / "laendo.nrrd", (mask * 255).astype(np.uint8), header)
    return image_path, mask_path


@pytest.fixture
def lasc2018_root(real_crop, tmp_path) -> Path:
    image, mask = real_crop
    _write_lasc2018_case(tmp_path / "Training Set" / "CASE_B", image, mask)
    _write_lasc2018_case(tmp_path / "Training Set" / "CASE_A", image[::-1], mask[::-1])
    (tmp_path / "Training Set" / "CASE_A" / "lawall.nrrd").write_bytes(b"not read")
    return tmp_path


def test_lasc2018_layout_detected(lasc2018_root):
    assert detect_layout(lasc2018_root) == "lasc2018"


def test_lasc2018_case_ids(lasc2018_root):
    assert [ref.case_id for ref in list_cases(lasc2018_root)] == ["CASE_A", "CASE_B"]


def test_lasc2018_mask_paths(lasc2018_root):
    ref = list_cases(lasc2018_root, layout="lasc2018")[1]
    assert ref.mask_path == str(lasc2018_root / "Training Set" / "CASE_B" / "laendo.nrrd")


def test_lasc2018_case_without_mask(real_crop, tmp_path):
    _write_nrrd(tmp_path / "Testing Set" / "CASE_C" / "lgemri.nrrd", _as_uint8(real_crop[0]))
    assert list_cases(tmp_path)[0].mask_path is None


def test_lasc2018_image_values(real_crop, lasc2018_root):
    volume = load_case(list_cases(lasc2018_root)[1])
    np.testing.assert_array_equal(volume.image, _as_uint8(real_crop[0]).astype(np.float32))


def test_lasc2018_image_dtype(lasc2018_root):
    assert load_case(list_cases(lasc2018_root)[1]).image.dtype == np.float32


def test_lasc2018_mask_255_binarised(real_crop, lasc2018_root):
    volume = load_case(list_cases(lasc2018_root)[1])
    np.testing.assert_array_equal(volume.mask, real_crop[1])


def test_lasc2018_lps_affine_converted_to_ras(lasc2018_root):
    volume = load_case(list_cases(lasc2018_root)[1])
    expected = np.diag([-0.625, -0.625, 2.5, 1.0])
    expected[:3, 3] = (60.0, -80.0, -20.0)
    np.testing.assert_allclose(volume.affine, expected)


def test_lasc2018_oblique_lps_world_point(real_crop, tmp_path):
    directions = _oblique_affine((0.625, 0.625, 2.5))[:3, :3].T
    header = {"space": "LPS", "space directions": directions, "space origin": LPS_ORIGIN}
    image_path, mask_path = _write_lasc2018_case(tmp_path / "CASE_A", *real_crop, header)
    volume = load_case(CaseRef("CASE_A", str(image_path), str(mask_path), "lasc2018"))
    voxel = np.array([10.0, 20.0, 5.0])
    lps = LPS_ORIGIN + voxel @ directions
    np.testing.assert_allclose((volume.affine @ [*voxel, 1.0])[:3], lps * [-1, -1, 1])


def test_lasc2018_ras_space_kept(real_crop, tmp_path):
    header = {"space": "RAS", "space directions": LPS_DIRECTIONS, "space origin": LPS_ORIGIN}
    image_path, _ = _write_lasc2018_case(tmp_path / "CASE_A", *real_crop, header)
    volume = load_case(CaseRef("CASE_A", str(image_path), None, "lasc2018"))
    np.testing.assert_allclose(volume.affine[:3, 3], LPS_ORIGIN)


def test_lasc2018_spacings_only_header(real_crop, tmp_path):
    image_path, _ = _write_lasc2018_case(
        tmp_path / "CASE_A", *real_crop, {"spacings": [0.625, 2.5, 0.625]}
    )
    volume = load_case(CaseRef("CASE_A", str(image_path), None, "lasc2018"))
    np.testing.assert_allclose(volume.affine, np.diag([0.625, 2.5, 0.625, 1.0]))


def test_lasc2018_header_without_geometry_gets_challenge_spacing(real_crop, tmp_path):
    image_path, _ = _write_lasc2018_case(tmp_path / "CASE_A", *real_crop, {})
    volume = load_case(CaseRef("CASE_A", str(image_path), None, "lasc2018"))
    assert volume.spacing == (0.625, 0.625, 0.625)


def test_lasc2018_anisotropic_slice_axis(lasc2018_root):
    volume = load_case(list_cases(lasc2018_root)[1])
    assert through_plane_axis(volume, "auto") == 2


@pytest.mark.parametrize("encoding", ["raw", "gzip"])
def test_lasc2018_encodings_read(real_crop, tmp_path, encoding):
    header = {"space directions": LPS_DIRECTIONS, "space": "LPS", "encoding": encoding}
    image_path, mask_path = _write_lasc2018_case(tmp_path / "CASE_A", *real_crop, header)
    volume = load_case(CaseRef("CASE_A", str(image_path), str(mask_path), "lasc2018"))
    np.testing.assert_array_equal(volume.mask, real_crop[1])


def test_lasc2018_prediction_written_as_ras_nifti(lasc2018_root, tmp_path):
    volume = load_case(list_cases(lasc2018_root)[1])
    prepared = prepare_volume(volume, _data_config())
    restored = restore_volume(prepared.masks.astype(np.float32), prepared, "resize") > 0.5
    path = tmp_path / "prediction.nii.gz"
    save_mask_nifti(restored, prepared.affine, path)
    assert nib.aff2axcodes(nib.load(path).affine) == ("L", "P", "S")


@pytest.mark.parametrize("encoding", ["raw", "gzip"])
def test_lasc2018_truncated_file_rejected(real_crop, tmp_path, encoding):
    header = {"space directions": LPS_DIRECTIONS, "space": "LPS", "encoding": encoding}
    image_path, mask_path = _write_lasc2018_case(tmp_path / "CASE_A", *real_crop, header)
    raw = image_path.read_bytes()
    image_path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=f"failed to read {re.escape(str(image_path))}"):
        load_case(CaseRef("CASE_A", str(image_path), str(mask_path), "lasc2018"))


@pytest.mark.parametrize("content", [b"", b"garbage bytes" * 50])
def test_lasc2018_corrupt_mask_rejected(real_crop, tmp_path, content):
    image_path, mask_path = _write_lasc2018_case(tmp_path / "CASE_A", *real_crop)
    mask_path.write_bytes(content)
    with pytest.raises(DataError, match=f"failed to read {re.escape(str(mask_path))}"):
        load_case(CaseRef("CASE_A", str(image_path), str(mask_path), "lasc2018"))


def test_lasc2018_mask_shape_mismatch_rejected(real_crop, tmp_path):
    image, mask = real_crop
    image_path, mask_path = _write_lasc2018_case(tmp_path / "CASE_A", image, mask)
    _write_nrrd(mask_path, (mask[:, :, :-1] * 255).astype(np.uint8))
    with pytest.raises(DataError, match="image and mask shapes differ"):
        load_case(CaseRef("CASE_A", str(image_path), str(mask_path), "lasc2018"))


def test_lasc2018_2d_image_rejected(tmp_path):
    path = _write_nrrd(
        tmp_path / "CASE_A" / "lgemri.nrrd",
        np.zeros((4, 5), np.uint8),
        {"space dimension": 2, "space directions": np.eye(2)},
    )
    with pytest.raises(DataError, match=re.escape(str(path))):
        load_case(CaseRef("CASE_A", str(path), None, "lasc2018"))
