"""Reading one image or mask array from a NIfTI or HDF5 file, with input checks.

Every failure raises `DataError` with a one-line message that names the file and the next step,
so a bad case in a large dataset can be found and fixed without a traceback.
"""

import zlib
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from lasegjax.errors import DataError

# The exceptions that nibabel, gzip and zlib raise for empty, truncated or corrupt files.
# gzip.BadGzipFile (a failed CRC check) and FileNotFoundError are subclasses of OSError.
_NIFTI_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error)

H5_IMAGE_DATASET = "image"
H5_LABEL_DATASET = "label"


def read_nifti_image(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI image as float32 with scl_slope/scl_inter applied.

    Returns:
      The (X, Y, Z) image and the file's 4x4 voxel-to-world affine.
    """
    img = _load_nifti(path)
    _check_nifti_shape(img, path)
    try:
        data = img.get_fdata(dtype=np.float32)
    except _NIFTI_READ_ERRORS as err:
        raise _read_error(path, err) from err
    image = squeeze_to_3d(data, path)
    check_finite(image, path)
    return image, np.asarray(img.affine, dtype=np.float64)


def read_nifti_mask(path: str | Path) -> np.ndarray:
    """Read a 3D NIfTI mask as uint8 {0, 1} (see `binarize_mask` for the threshold)."""
    img = _load_nifti(path)
    _check_nifti_shape(img, path)
    try:
        # dataobj keeps the on-disk dtype (uint8 stays uint8) unless the header sets a
        # scale factor, in which case nibabel returns the scaled floating-point values.
        data = np.asanyarray(img.dataobj)
    except _NIFTI_READ_ERRORS as err:
        raise _read_error(path, err) from err
    return binarize_mask(squeeze_to_3d(data, path), path)


def read_h5_case(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read the `image` and `label` datasets of an LA HDF5 file.

    Returns:
      The float32 (X, Y, Z) image and the uint8 {0, 1} mask of the same shape.
    """
    try:
        with h5py.File(path, "r") as h5_file:
            arrays = {}
            for name in (H5_IMAGE_DATASET, H5_LABEL_DATASET):
                dataset = h5_file.get(name)
                if not isinstance(dataset, h5py.Dataset):
                    found = ", ".join(sorted(h5_file.keys())) or "nothing"
                    raise DataError(
                        f"{path} has no dataset '{name}' (found: {found}). LA HDF5 files "
                        f"need datasets '{H5_IMAGE_DATASET}' and '{H5_LABEL_DATASET}'. "
                        "Fix the file or remove the case."
                    )
                arrays[name] = dataset[()]
    except OSError as err:
        raise _read_error(path, err) from err

    image = squeeze_to_3d(np.asarray(arrays[H5_IMAGE_DATASET]), path).astype(np.float32)
    check_finite(image, path)
    mask = binarize_mask(squeeze_to_3d(np.asarray(arrays[H5_LABEL_DATASET]), path), path)
    return image, mask


def squeeze_to_3d(array: np.ndarray, path: str | Path) -> np.ndarray:
    """Drop trailing axes of size 1 (a 4D file with one frame) and require 3 axes."""
    shape = array.shape
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise _not_3d_error(path, shape)
    return array


def check_finite(array: np.ndarray, path: str | Path) -> None:
    """Raise DataError if the array contains NaN or inf voxels."""
    num_bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if num_bad:
        raise DataError(
            f"{path} contains {num_bad} NaN or inf voxels. Fix the file or remove the case."
        )


def binarize_mask(mask: np.ndarray, path: str | Path) -> np.ndarray:
    """Convert a label array to uint8 {0, 1}, with 1 = left atrium.

    The rule is label = mask > 0, so {0, 1} and {0, 255} masks both work. A floating-point
    mask whose maximum is at most 1 is cut at 0.5 instead, because masks that were
    resampled with linear interpolation carry noise such as 1e-6 in the background.
    """
    threshold = 0.0
    if np.issubdtype(mask.dtype, np.floating):
        check_finite(mask, path)
        if mask.size and mask.max() <= 1.0:
            threshold = 0.5
    return (mask > threshold).astype(np.uint8)


def _load_nifti(path: str | Path) -> nib.Nifti1Image:
    try:
        return nib.load(path)
    except _NIFTI_READ_ERRORS as err:
        raise _read_error(path, err) from err


def _check_nifti_shape(img: nib.Nifti1Image, path: str | Path) -> None:
    # Checked on the header so that a true 4D series is rejected before its data is read.
    shape = tuple(img.shape)
    trimmed = list(shape)
    while len(trimmed) > 3 and trimmed[-1] == 1:
        trimmed.pop()
    if len(trimmed) != 3:
        raise _not_3d_error(path, shape)


def _not_3d_error(path: str | Path, shape: tuple[int, ...]) -> DataError:
    return DataError(
        f"expected a 3D volume (X, Y, Z) in {path}, got shape {shape}. "
        "Save it as a single 3D volume or remove the case."
    )


def _read_error(path: str | Path, err: Exception) -> DataError:
    # nibabel messages can span several lines, but the CLI prints each error as one line.
    reason = " ".join(str(err).split()) or "no details"
    return DataError(
        f"failed to read {path} ({type(err).__name__}: {reason}). The file may be empty, "
        "truncated or in another format. Replace it or remove the case."
    )
