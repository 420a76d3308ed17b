"""Tests for layout detection, case listing and case loading in lasegjax.data.readers."""

import gzip
import re
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from lasegjax.data.readers import CaseRef, detect_layout, list_cases, load_case
from lasegjax.errors import DataError

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
REAL_H5 = REAL_DATA / "LASC2018_UA-MT_h5"
REAL_LASCARQS = REAL_DATA / "LASC2018_lascarqs_layout"
SPACING_AFFINE = np.diag([0.8, 0.8, 2.0, 1.0])


def _require(folder: Path) -> Path:
    if not folder.is_dir():
        pytest.skip(f"real data folder {folder} is missing; the test needs it next to the repo")
    return folder


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = SPACING_AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _image(shape=(6, 5, 4), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _mask(shape=(6, 5, 4)) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[2:4, 1:3, 1:3] = 1
    return mask


def _write_lascarqs_case(folder: Path, image=None, mask=None) -> tuple[Path, Path]:
    image_path = _write_nifti(folder / "enhanced.nii.gz", _image() if image is None else image)
    mask_path = _write_nifti(folder / "atriumSegImgMO.nii.gz", _mask() if mask is None else mask)
    return image_path, mask_path


def _write_h5_case(folder: Path, datasets: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mri_norm2.h5"
    with h5py.File(path, "w") as h5_file:
        for name, value in datasets.items():
            h5_file.create_dataset(name, data=value)
    return path


def _write_msd(root: Path) -> Path:
    for index in (10, 3, 4):
        _write_nifti(root / "imagesTr" / f"la_{index:03d}.nii.gz", _image(seed=index))
        _write_nifti(root / "labelsTr" / f"la_{index:03d}.nii.gz", _mask())
    # macOS resource-fork files that the MSD archive contains and readers must skip.
    (root / "imagesTr" / "._la_003.nii.gz").write_bytes(b"\x00\x05\x16\x07 junk")
    (root / "labelsTr" / "._la_003.nii.gz").write_bytes(b"\x00\x05\x16\x07 junk")
    return root


def _lascarqs_ref(image_path: Path, mask_path: Path | None) -> CaseRef:
    return CaseRef(
        case_id=image_path.parent.name,
        image_path=str(image_path),
        mask_path=None if mask_path is None else str(mask_path),
        layout="lascarqs",
    )


# Layout detection.


def test_detect_layout_real_h5():
    assert detect_layout(_require(REAL_H5)) == "la_h5"


def test_detect_layout_real_lascarqs():
    assert detect_layout(_require(REAL_LASCARQS)) == "lascarqs"


def test_detect_layout_msd(tmp_path):
    assert detect_layout(_write_msd(tmp_path / "Task02_Heart")) == "msd"


def test_detect_layout_msd_one_level_down(tmp_path):
    _write_msd(tmp_path / "Task02_Heart")
    assert detect_layout(tmp_path) == "msd"


def test_detect_layout_lascarqs_cases_directly_under_root(tmp_path):
    _write_lascarqs_case(tmp_path / "train_1")
    assert detect_layout(tmp_path) == "lascarqs"


def test_detect_layout_lascarqs_uncompressed_nii(tmp_path):
    _write_nifti(tmp_path / "train_1" / "enhanced.nii", _image())
    _write_nifti(tmp_path / "train_1" / "atriumSegImgMO.nii", _mask())
    assert detect_layout(tmp_path) == "lascarqs"


def test_detect_layout_below_depth_limit(tmp_path):
    _write_lascarqs_case(tmp_path / "a" / "b" / "c" / "train_1")
    with pytest.raises(DataError, match="no cases found"):
        detect_layout(tmp_path)


def test_detect_layout_mixed_layouts_raises(tmp_path):
    _write_lascarqs_case(tmp_path / "train_data" / "train_1")
    _write_h5_case(tmp_path / "h5" / "case_a", {"image": _image(), "label": _mask()})
    with pytest.raises(DataError, match=r"more than one layout \(la_h5, lascarqs\)"):
        detect_layout(tmp_path)


# Case listing.


def test_list_cases_real_h5_count():
    assert len(list_cases(_require(REAL_H5))) == 17


def test_list_cases_real_h5_layout():
    refs = list_cases(_require(REAL_H5))
    assert {ref.layout for ref in refs} == {"la_h5"}


def test_list_cases_real_h5_mask_path_is_image_file():
    ref = list_cases(_require(REAL_H5))[0]
    assert ref.mask_path == ref.image_path


def test_list_cases_real_lascarqs_ids():
    refs = list_cases(_require(REAL_LASCARQS))
    assert [ref.case_id for ref in refs] == [f"train_{i}" for i in range(1, 7)]


def test_list_cases_real_lascarqs_mask_names():
    refs = list_cases(_require(REAL_LASCARQS))
    assert all(Path(ref.mask_path).name == "atriumSegImgMO.nii.gz" for ref in refs)


def test_list_cases_natural_order(tmp_path):
    for name in ("train_10", "train_2", "train_1"):
        _write_lascarqs_case(tmp_path / "train_data" / name)
    refs = list_cases(tmp_path)
    assert [ref.case_id for ref in refs] == ["train_1", "train_2", "train_10"]


def test_list_cases_msd_ids_skip_macos_junk(tmp_path):
    refs = list_cases(_write_msd(tmp_path))
    assert [ref.case_id for ref in refs] == ["la_003", "la_004", "la_010"]


def test_list_cases_msd_label_paths(tmp_path):
    refs = list_cases(_write_msd(tmp_path), layout="msd")
    assert refs[0].mask_path == str(tmp_path / "labelsTr" / "la_003.nii.gz")


def test_list_cases_lascarqs_without_mask(tmp_path):
    _write_nifti(tmp_path / "test_1" / "enhanced.nii.gz", _image())
    assert list_cases(tmp_path)[0].mask_path is None


def test_list_cases_skips_hidden_temporary_files(tmp_path):
    _write_lascarqs_case(tmp_path / "train_1")
    (tmp_path / "train_2").mkdir()
    (tmp_path / "train_2" / ".enhanced.nii.gz.123.tmp").write_bytes(b"partial")
    assert [ref.case_id for ref in list_cases(tmp_path)] == ["train_1"]


def test_list_cases_explicit_layout_among_mixed(tmp_path):
    _write_lascarqs_case(tmp_path / "train_data" / "train_1")
    _write_h5_case(tmp_path / "h5" / "case_a", {"image": _image(), "label": _mask()})
    assert [ref.case_id for ref in list_cases(tmp_path, layout="la_h5")] == ["case_a"]


def test_list_cases_missing_root_raises(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(DataError, match=f"data root not found: {re.escape(str(missing))}"):
        list_cases(missing)


def test_list_cases_missing_root_names_config_key(tmp_path):
    with pytest.raises(DataError, match=r"Set --config\.data\.root"):
        list_cases(tmp_path / "no_such_folder")


def test_list_cases_root_is_file_raises(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("x")
    with pytest.raises(DataError, match=f"data root not found: {re.escape(str(path))}"):
        list_cases(path)


def test_list_cases_empty_folder_raises(tmp_path):
    with pytest.raises(DataError, match=f"no cases found in {re.escape(str(tmp_path))}"):
        list_cases(tmp_path)


def test_list_cases_empty_folder_names_expected_files(tmp_path):
    with pytest.raises(DataError, match=r"enhanced\.nii\.gz.*la_NNN\.nii\.gz.*mri_norm2\.h5"):
        list_cases(tmp_path)


def test_list_cases_explicit_layout_without_cases_raises(tmp_path):
    _write_lascarqs_case(tmp_path / "train_1")
    with pytest.raises(DataError, match=r"no cases found .*Expected <case>/mri_norm2\.h5"):
        list_cases(tmp_path, layout="la_h5")


def test_list_cases_unknown_layout_raises(tmp_path):
    with pytest.raises(DataError, match="unknown data layout 'nrrd'"):
        list_cases(tmp_path, layout="nrrd")


def test_list_cases_duplicate_case_ids_raise(tmp_path):
    _write_lascarqs_case(tmp_path / "site_a" / "train_1")
    _write_lascarqs_case(tmp_path / "site_b" / "train_1")
    with pytest.raises(DataError, match="case id 'train_1' occurs twice"):
        list_cases(tmp_path)


# Loading real files.


@pytest.fixture(scope="module")
def real_h5_volume():
    refs = list_cases(_require(REAL_H5))
    return load_case(next(ref for ref in refs if ref.case_id == "06SR5RBREL16DQ6M8LWS"))


@pytest.fixture(scope="module")
def real_lascarqs_volume():
    return load_case(list_cases(_require(REAL_LASCARQS))[0])


def test_load_case_real_h5_shape(real_h5_volume):
    assert real_h5_volume.image.shape == (183, 140, 88)


def test_load_case_real_h5_image_dtype(real_h5_volume):
    assert real_h5_volume.image.dtype == np.float32


def test_load_case_real_h5_mask_dtype(real_h5_volume):
    assert real_h5_volume.mask.dtype == np.uint8


def test_load_case_real_h5_mask_values(real_h5_volume):
    assert set(np.unique(real_h5_volume.mask).tolist()) == {0, 1}


def test_load_case_real_h5_mask_shape(real_h5_volume):
    assert real_h5_volume.mask.shape == real_h5_volume.image.shape


def test_load_case_real_h5_affine(real_h5_volume):
    np.testing.assert_array_equal(real_h5_volume.affine, np.diag([0.625, 0.625, 0.625, 1.0]))


def test_load_case_real_lascarqs_shape(real_lascarqs_volume):
    assert real_lascarqs_volume.image.shape == (183, 140, 88)


def test_load_case_real_lascarqs_image_dtype(real_lascarqs_volume):
    assert real_lascarqs_volume.image.dtype == np.float32


def test_load_case_real_lascarqs_mask_dtype(real_lascarqs_volume):
    assert real_lascarqs_volume.mask.dtype == np.uint8


def test_load_case_real_lascarqs_mask_values(real_lascarqs_volume):
    assert set(np.unique(real_lascarqs_volume.mask).tolist()) == {0, 1}


def test_load_case_real_lascarqs_spacing(real_lascarqs_volume):
    assert real_lascarqs_volume.spacing == (0.625, 0.625, 0.625)


def test_load_case_real_lascarqs_affine(real_lascarqs_volume):
    np.testing.assert_allclose(real_lascarqs_volume.affine, np.diag([0.625, 0.625, 0.625, 1.0]))


def test_load_case_real_lascarqs_image_matches_h5(real_lascarqs_volume, real_h5_volume):
    # train_1 of the LAScarQS copy was written from case 06SR5RBREL16DQ6M8LWS unchanged.
    np.testing.assert_array_equal(real_lascarqs_volume.image, real_h5_volume.image)


def test_load_case_real_lascarqs_mask_matches_h5(real_lascarqs_volume, real_h5_volume):
    np.testing.assert_array_equal(real_lascarqs_volume.mask, real_h5_volume.mask)


# Loading files written here.


def test_load_case_msd_shape(tmp_path):
    volume = load_case(list_cases(_write_msd(tmp_path))[0])
    assert volume.image.shape == (6, 5, 4)


def test_load_case_msd_image_values(tmp_path):
    volume = load_case(list_cases(_write_msd(tmp_path))[0])
    np.testing.assert_array_equal(volume.image, _image(seed=3))


def test_load_case_msd_mask_values(tmp_path):
    volume = load_case(list_cases(_write_msd(tmp_path))[0])
    np.testing.assert_array_equal(volume.mask, _mask())


def test_load_case_msd_affine(tmp_path):
    volume = load_case(list_cases(_write_msd(tmp_path))[0])
    np.testing.assert_allclose(volume.affine, SPACING_AFFINE)


def test_load_case_keeps_paths(tmp_path):
    image_path, mask_path = _write_lascarqs_case(tmp_path / "train_1")
    volume = load_case(_lascarqs_ref(image_path, mask_path))
    assert (volume.image_path, volume.mask_path) == (str(image_path), str(mask_path))


def test_load_case_without_mask(tmp_path):
    image_path = _write_nifti(tmp_path / "test_1" / "enhanced.nii.gz", _image())
    assert load_case(_lascarqs_ref(image_path, None)).mask is None


def test_load_case_applies_scale_slope(tmp_path):
    img = nib.Nifti1Image(np.full((4, 4, 3), 10, dtype=np.int16), SPACING_AFFINE)
    img.header.set_slope_inter(0.5, 1.0)
    image_path = tmp_path / "train_1" / "enhanced.nii.gz"
    image_path.parent.mkdir()
    nib.save(img, image_path)
    volume = load_case(_lascarqs_ref(image_path, None))
    np.testing.assert_allclose(volume.image, 6.0)


def test_load_case_mask_0_255(tmp_path):
    image_path, mask_path = _write_lascarqs_case(tmp_path / "train_1", mask=_mask() * 255)
    volume = load_case(_lascarqs_ref(image_path, mask_path))
    np.testing.assert_array_equal(volume.mask, _mask())


def test_load_case_float_mask_interpolated(tmp_path):
    noisy = _mask().astype(np.float32) * 0.9999 + 1e-6
    image_path, mask_path = _write_lascarqs_case(tmp_path / "train_1", mask=noisy)
    volume = load_case(_lascarqs_ref(image_path, mask_path))
    np.testing.assert_array_equal(volume.mask, _mask())


def test_load_case_float_mask_0_255(tmp_path):
    scaled = _mask().astype(np.float32) * 255.0
    image_path, mask_path = _write_lascarqs_case(tmp_path / "train_1", mask=scaled)
    volume = load_case(_lascarqs_ref(image_path, mask_path))
    np.testing.assert_array_equal(volume.mask, _mask())


def test_load_case_squeezes_single_frame_4d(tmp_path):
    image = _image()[..., None]
    image_path, mask_path = _write_lascarqs_case(tmp_path / "train_1", image=image)
    volume = load_case(_lascarqs_ref(image_path, mask_path))
    assert volume.image.shape == (6, 5, 4)


def test_load_case_h5_float64_image(tmp_path):
    path = _write_h5_case(
        tmp_path / "case_a", {"image": _image().astype(np.float64), "label": _mask()}
    )
    volume = load_case(CaseRef("case_a", str(path), str(path), "la_h5"))
    assert volume.image.dtype == np.float32


# Errors raised while loading.


def test_load_case_shape_mismatch_names_both_files(tmp_path):
    image_path, mask_path = _write_lascarqs_case(tmp_path / "train_1", mask=_mask((6, 5, 3)))
    pattern = f"{re.escape(str(image_path))} has shape \\(6, 5, 4\\) but {re.escape(str(mask_path))} has shape \\(6, 5, 3\\)"
    with pytest.raises(DataError, match=pattern):
        load_case(_lascarqs_ref(image_path, mask_path))


def test_load_case_true_4d_raises(tmp_path):
    image_path, mask_path = _write_lascarqs_case(
        tmp_path / "train_1", image=np.zeros((6, 5, 4, 2), np.float32)
    )
    with pytest.raises(
        DataError, match=f"3D volume .* in {re.escape(str(image_path))}, got shape \\(6, 5, 4, 2\\)"
    ):
        load_case(_lascarqs_ref(image_path, mask_path))


def test_load_case_2d_raises(tmp_path):
    image_path = _write_nifti(
        tmp_path / "train_1" / "enhanced.nii.gz", np.zeros((6, 5), np.float32)
    )
    with pytest.raises(DataError, match=r"got shape \(6, 5\)"):
        load_case(_lascarqs_ref(image_path, None))


def test_load_case_nan_image_raises(tmp_path):
    image = _image()
    image[0, 0, :3] = np.nan
    image[1, 1, 1] = np.inf
    image_path, mask_path = _write_lascarqs_case(tmp_path / "train_1", image=image)
    with pytest.raises(
        DataError, match=f"{re.escape(str(image_path))} contains 4 NaN or inf voxels"
    ):
        load_case(_lascarqs_ref(image_path, mask_path))


def test_load_case_nan_message_says_what_to_do(tmp_path):
    image = _image()
    image[0, 0, 0] = np.nan
    image_path, mask_path = _write_lascarqs_case(tmp_path / "train_1", image=image)
    with pytest.raises(DataError, match="Fix the file or remove the case"):
        load_case(_lascarqs_ref(image_path, mask_path))


def test_load_case_empty_file_raises(tmp_path):
    image_path, mask_path = _write_lascarqs_case(tmp_path / "train_1")
    image_path.write_bytes(b"")
    with pytest.raises(DataError, match=f"failed to read {re.escape(str(image_path))}"):
        load_case(_lascarqs_ref(image_path, mask_path))


def test_load_case_truncated_gzip_raises(tmp_path):
    image_path, mask_path = _write_lascarqs_case(tmp_path / "train_1", image=_image((40, 40, 20)))
    raw = image_path.read_bytes()
    image_path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=f"failed to read {re.escape(str(image_path))}"):
        load_case(_lascarqs_ref(image_path, mask_path))


def test_load_case_truncated_gzip_keeps_cause(tmp_path):
    image_path, mask_path = _write_lascarqs_case(tmp_path / "train_1", image=_image((40, 40, 20)))
    raw = image_path.read_bytes()
    image_path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError) as info:
        load_case(_lascarqs_ref(image_path, mask_path))
    assert isinstance(info.value.__cause__, EOFError)


def test_load_case_gzip_of_non_nifti_raises(tmp_path):
    image_path, mask_path = _write_lascarqs_case(tmp_path / "train_1")
    image_path.write_bytes(gzip.compress(b"not a nifti header" * 30))
    with pytest.raises(DataError, match=f"failed to read {re.escape(str(image_path))}"):
        load_case(_lascarqs_ref(image_path, mask_path))


def test_load_case_corrupt_mask_raises(tmp_path):
    image_path, mask_path = _write_lascarqs_case(tmp_path / "train_1")
    mask_path.write_bytes(b"plain text, not gzip")
    with pytest.raises(DataError, match=f"failed to read {re.escape(str(mask_path))}"):
        load_case(_lascarqs_ref(image_path, mask_path))


def test_load_case_missing_file_raises(tmp_path):
    image_path = tmp_path / "train_1" / "enhanced.nii.gz"
    with pytest.raises(DataError, match=f"failed to read {re.escape(str(image_path))}"):
        load_case(_lascarqs_ref(image_path, None))


def test_load_case_h5_missing_label_raises(tmp_path):
    path = _write_h5_case(tmp_path / "case_a", {"image": _image()})
    with pytest.raises(DataError, match=f"{re.escape(str(path))} has no dataset 'label'"):
        load_case(CaseRef("case_a", str(path), str(path), "la_h5"))


def test_load_case_h5_missing_image_raises(tmp_path):
    path = _write_h5_case(tmp_path / "case_a", {"label": _mask()})
    with pytest.raises(DataError, match=f"{re.escape(str(path))} has no dataset 'image'"):
        load_case(CaseRef("case_a", str(path), str(path), "la_h5"))


def test_load_case_h5_corrupt_file_raises(tmp_path):
    path = tmp_path / "case_a" / "mri_norm2.h5"
    path.parent.mkdir()
    path.write_bytes(b"not an hdf5 file" * 10)
    with pytest.raises(DataError, match=f"failed to read {re.escape(str(path))}"):
        load_case(CaseRef("case_a", str(path), str(path), "la_h5"))


def test_load_case_h5_shape_mismatch_raises(tmp_path):
    path = _write_h5_case(tmp_path / "case_a", {"image": _image(), "label": _mask((6, 5, 3))})
    with pytest.raises(DataError, match="image and mask shapes differ"):
        load_case(CaseRef("case_a", str(path), str(path), "la_h5"))


def test_load_case_h5_nan_image_raises(tmp_path):
    image = _image()
    image[2, 2, 2] = np.nan
    path = _write_h5_case(tmp_path / "case_a", {"image": image, "label": _mask()})
    with pytest.raises(DataError, match="contains 1 NaN or inf voxels"):
        load_case(CaseRef("case_a", str(path), str(path), "la_h5"))


def test_load_case_unknown_layout_raises(tmp_path):
    with pytest.raises(DataError, match="unknown data layout 'dicom'"):
        load_case(CaseRef("case_a", str(tmp_path / "a"), None, "dicom"))
