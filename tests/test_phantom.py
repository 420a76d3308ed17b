"""Tests for the synthetic phantom dataset in lasegjax.data.phantom."""

import json

import nibabel as nib
import numpy as np
import pytest

from lasegjax.data.phantom import make_phantom_case, write_phantom_dataset
from lasegjax.data.readers import detect_layout, list_cases, load_case
from lasegjax.errors import ConfigError, DataError

NUM_CASES = 3
DEFAULT_SHAPE = (96, 96, 24)
DEFAULT_SPACING = (1.25, 1.25, 2.5)


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("phantom"), num_cases=NUM_CASES)


@pytest.fixture(scope="module")
def volumes(phantom_root):
    return [load_case(ref) for ref in list_cases(phantom_root)]


def _case_files(root, index):
    case_dir = root / "train_data" / f"train_{index}"
    return case_dir / "enhanced.nii.gz", case_dir / "atriumSegImgMO.nii.gz"


def _best_threshold_dice(image, mask):
    best = 0.0
    for threshold in np.quantile(image, np.linspace(0.5, 0.999, 100)):
        predicted = image > threshold
        overlap = np.count_nonzero(predicted & (mask > 0))
        best = max(best, 2 * overlap / (np.count_nonzero(predicted) + np.count_nonzero(mask)))
    return best


def test_write_phantom_dataset_returns_root(tmp_path):
    assert write_phantom_dataset(tmp_path / "out", num_cases=1) == tmp_path / "out"


def test_write_phantom_dataset_image_files_exist(phantom_root):
    assert all(_case_files(phantom_root, i)[0].is_file() for i in range(1, NUM_CASES + 1))


def test_write_phantom_dataset_mask_files_exist(phantom_root):
    assert all(_case_files(phantom_root, i)[1].is_file() for i in range(1, NUM_CASES + 1))


def test_write_phantom_dataset_leaves_no_temporary_files(phantom_root):
    assert [path.name for path in phantom_root.rglob(".*")] == []


def test_write_phantom_dataset_manifest(phantom_root):
    manifest = json.loads((phantom_root / "phantom.json").read_text())
    assert manifest["num_cases"] == NUM_CASES


def test_phantom_detected_as_lascarqs(phantom_root):
    assert detect_layout(phantom_root) == "lascarqs"


def test_phantom_case_ids(phantom_root):
    assert [ref.case_id for ref in list_cases(phantom_root)] == ["train_1", "train_2", "train_3"]


def test_phantom_image_shape(volumes):
    assert all(volume.image.shape == DEFAULT_SHAPE for volume in volumes)


def test_phantom_image_dtype_on_disk(phantom_root):
    image_path, _ = _case_files(phantom_root, 1)
    assert nib.load(image_path).get_data_dtype() == np.float32


def test_phantom_mask_dtype_on_disk(phantom_root):
    _, mask_path = _case_files(phantom_root, 1)
    assert nib.load(mask_path).get_data_dtype() == np.uint8


def test_phantom_mask_values(volumes):
    assert all(set(np.unique(volume.mask).tolist()) == {0, 1} for volume in volumes)


@pytest.mark.parametrize("index", range(NUM_CASES))
def test_phantom_mask_fraction_in_range(volumes, index):
    # A 40-50 mm atrium in a 120 x 120 x 60 mm volume fills 1.8-3.5 % of it (seed 0, cases
    # 1-8 at the default size), so the bounds leave a wide margin.
    assert 0.005 < volumes[index].mask.mean() < 0.15


def test_phantom_masks_differ_between_cases(volumes):
    assert not np.array_equal(volumes[0].mask, volumes[1].mask)


def test_phantom_mask_clear_of_first_and_last_slice(volumes):
    assert all(not volume.mask[:, :, [0, -1]].any() for volume in volumes)


def test_phantom_image_finite(volumes):
    assert all(np.isfinite(volume.image).all() for volume in volumes)


def test_phantom_spacing(volumes):
    assert volumes[0].spacing == DEFAULT_SPACING


@pytest.mark.parametrize("field", ["qform_code", "sform_code"])
def test_phantom_xform_codes(phantom_root, field):
    image_path, _ = _case_files(phantom_root, 1)
    assert int(nib.load(image_path).header[field]) == 1


def test_phantom_mask_affine_matches_image(phantom_root):
    image_path, mask_path = _case_files(phantom_root, 1)
    np.testing.assert_array_equal(nib.load(mask_path).affine, nib.load(image_path).affine)


def test_phantom_not_segmented_by_threshold(volumes):
    # Aorta and ventricle blood match the atrium's blood, and wall and fat are brighter,
    # so no global threshold should come close to the mask.
    assert max(_best_threshold_dice(v.image, v.mask) for v in volumes) < 0.7


def test_phantom_same_seed_same_bytes(phantom_root, tmp_path):
    # Case 1 depends only on (seed, 1), so a one-case dataset repeats it byte for byte.
    other_root = write_phantom_dataset(tmp_path / "again", num_cases=1)
    image_path, _ = _case_files(phantom_root, 1)
    assert _case_files(other_root, 1)[0].read_bytes() == image_path.read_bytes()


def test_phantom_same_seed_same_mask_bytes(phantom_root, tmp_path):
    other_root = write_phantom_dataset(tmp_path / "again", num_cases=1)
    _, mask_path = _case_files(phantom_root, 1)
    assert _case_files(other_root, 1)[1].read_bytes() == mask_path.read_bytes()


def test_make_phantom_case_deterministic():
    first, _ = make_phantom_case((32, 32, 8), DEFAULT_SPACING, np.random.default_rng([5, 1]))
    second, _ = make_phantom_case((32, 32, 8), DEFAULT_SPACING, np.random.default_rng([5, 1]))
    np.testing.assert_array_equal(first, second)


def test_phantom_other_seed_other_image(phantom_root, tmp_path):
    other_root = write_phantom_dataset(tmp_path / "seed1", num_cases=1, seed=1)
    other = load_case(list_cases(other_root)[0])
    reference = load_case(list_cases(phantom_root)[0])
    assert not np.array_equal(other.image, reference.image)


def test_phantom_custom_shape_and_spacing(tmp_path):
    root = write_phantom_dataset(
        tmp_path / "small", num_cases=1, shape=(40, 36, 12), spacing=(2, 2, 4)
    )
    volume = load_case(list_cases(root)[0])
    assert (volume.image.shape, volume.spacing) == ((40, 36, 12), (2.0, 2.0, 4.0))


def test_write_phantom_dataset_rerun_keeps_files(phantom_root):
    image_path, _ = _case_files(phantom_root, 2)
    before = image_path.stat().st_mtime_ns
    write_phantom_dataset(phantom_root, num_cases=NUM_CASES)
    assert image_path.stat().st_mtime_ns == before


def test_write_phantom_dataset_rerun_restores_missing_file(tmp_path):
    root = write_phantom_dataset(tmp_path / "out", num_cases=1)
    image_path, _ = _case_files(root, 1)
    original = image_path.read_bytes()
    image_path.unlink()
    write_phantom_dataset(root, num_cases=1)
    assert image_path.read_bytes() == original


def test_write_phantom_dataset_other_params_raise(tmp_path):
    root = write_phantom_dataset(tmp_path / "out", num_cases=1)
    with pytest.raises(DataError, match="other parameters.*Pick an empty folder"):
        write_phantom_dataset(root, num_cases=1, seed=7)


def test_write_phantom_dataset_nonempty_folder_raises(tmp_path):
    (tmp_path / "notes.txt").write_text("user data")
    with pytest.raises(DataError, match="is not an empty folder and contains no phantom.json"):
        write_phantom_dataset(tmp_path, num_cases=1)


def test_write_phantom_dataset_corrupt_manifest_raises(tmp_path):
    (tmp_path / "phantom.json").write_text("{not json")
    with pytest.raises(DataError, match="failed to read the phantom manifest"):
        write_phantom_dataset(tmp_path, num_cases=1)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_cases": 0}, "invalid phantom num_cases 0"),
        ({"shape": (32, 32)}, r"invalid phantom shape \(32, 32\)"),
        ({"shape": (32, 32, 0)}, r"invalid phantom shape \(32, 32, 0\)"),
        ({"spacing": (1.0, -1.0, 2.0)}, r"invalid phantom spacing \(1\.0, -1\.0, 2\.0\)"),
        ({"seed": -1}, "invalid phantom seed -1"),
    ],
)
def test_write_phantom_dataset_invalid_params_raise(tmp_path, kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        write_phantom_dataset(tmp_path, **kwargs)
