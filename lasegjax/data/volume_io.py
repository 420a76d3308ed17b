"""Reading one image or mask array from a NIfTI, NRRD or HDF5 file, with input checks.

Arrays are returned on the file's own voxel grid, in the file's axis order and without any
resampling or reorientation. The 4x4 voxel-to-world affine that comes with an image maps
voxel indices to RAS+ millimetres, as in NIfTI, so predictions can be written back onto the
same grid.

Input rules, shared by every reader:

- images: any integer or floating-point type, read as float32 with NIfTI `scl_slope` and
  `scl_inter` applied. A NaN or inf voxel rejects the file (`check_finite`): the pipeline's
  percentile clipping and z-scoring cannot handle them, and guessing a fill value would hide
  a broken export.
- shape: 3D, or 4D and 5D with trailing axes of size 1, which are dropped (`squeeze_to_3d`).
- masks: background 0 and a single left-atrium value such as 1 or 255 (`binarize_mask`).
  Masks with several foreground labels are rejected.

Every failure raises `DataError` with a one-line message that names the file and the next step,
so a bad case in a large dataset can be found and fixed without a traceback.
"""

import logging
import zlib
from pathlib import Path

import h5py
import nibabel as nib
import nrrd
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from lasegjax.errors import DataError

# The exceptions that nibabel, gzip and zlib raise for empty, truncated or corrupt files.
# gzip.BadGzipFile (a failed CRC check) and FileNotFoundError are subclasses of OSError.
_NIFTI_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error)

# pynrrd 1.1 raises NRRDError for most malformed files, but ValueError for a truncated gzip
# payload, KeyError for an unknown `type` field and StopIteration for an empty file.
_NRRD_READ_ERRORS = (
    nrrd.NRRDError,
    OSError,
    EOFError,
    zlib.error,
    ValueError,
    KeyError,
    StopIteration,
)

# Sign flips that take the world axes of an NRRD `space` to RAS+. Other spaces
# (scanner-xyz, 3D-right-handed, or none) have no anatomical meaning and are used as stored.
_NRRD_SPACE_TO_RAS = {
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "RAS": (1.0, 1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "LAS": (-1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "LPS": (-1.0, -1.0, 1.0),
}

# A floating-point mask whose values all lie this close to integers is read as integer labels
# (0.9999 and 1.0001 are label 1). Any other floating-point mask is taken as interpolated.
LABEL_ROUNDING_TOLERANCE = 0.01

# At most this many distinct labels are listed in the error for a multi-label mask.
_MAX_LABELS_SHOWN = 8

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
    affine = np.asarray(img.affine, dtype=np.float64)
    check_affine(affine, path)
    return image, affine


def read_nifti_affine(path: str | Path) -> np.ndarray:
    """Read the voxel-to-world affine of a NIfTI file from its header alone."""
    return np.asarray(_load_nifti(path).affine, dtype=np.float64)


def read_nifti_mask(path: str | Path) -> np.ndarray:
    """Read a 3D NIfTI mask as uint8 {0, 1} (see `binarize_mask` for the accepted labels)."""
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


def read_nrrd_image(
    path: str | Path, default_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NRRD image as float32, with its geometry converted to a RAS+ affine.

    The array keeps the NRRD axis order (the first axis varies fastest on disk). See
    `nrrd_affine` for how the header geometry becomes an affine. A header without geometry
    gets a diagonal affine of `default_spacing` (mm) and a logged warning.

    Returns:
      The (X, Y, Z) image and its 4x4 voxel-to-world affine.
    """
    data, header = _read_nrrd(path)
    image = squeeze_to_3d(data, path).astype(np.float32)
    check_finite(image, path)
    affine = nrrd_affine(header, path)
    if affine is None:
        _warn_once(
            "nrrd_no_geometry",
            f"{path} has no 'space directions' or 'spacings' field; using voxel size "
            f"{default_spacing} mm. Files without geometry that follow are not reported again.",
        )
        affine = np.diag([*default_spacing, 1.0])
    check_affine(affine, path)
    return image, affine


def read_nrrd_mask(path: str | Path) -> np.ndarray:
    """Read a 3D NRRD mask as uint8 {0, 1} (see `binarize_mask` for the accepted labels)."""
    data, _ = _read_nrrd(path)
    return binarize_mask(squeeze_to_3d(data, path), path)


def read_nrrd_affine(path: str | Path) -> np.ndarray | None:
    """Read the RAS+ affine of an NRRD file from its header alone, or None without geometry."""
    try:
        header = nrrd.read_header(str(path))
    except _NRRD_READ_ERRORS as err:
        raise _read_error(path, err) from err
    return nrrd_affine(header, path)


def nrrd_affine(header: dict, path: str | Path) -> np.ndarray | None:
    """Build the 4x4 voxel-to-world RAS+ affine from a pynrrd header.

    With `space directions`, the direction vector of each spatial axis becomes a column of
    the affine and `space origin` its translation. pynrrd gives one row per axis, with NaN
    rows for non-spatial axes, which are skipped. World spaces such as left-posterior-superior
    (LPS, the DICOM and ITK convention) are converted to RAS+ by negating the first two world
    coordinates. Spaces without anatomical meaning are used as stored. With only per-axis
    `spacings`, the affine is diagonal. Units are taken as millimetres.

    Returns:
      The affine, or None if the header has neither field.
    """
    directions = header.get("space directions")
    if directions is not None:
        directions = np.asarray(directions, dtype=np.float64)
        spatial = directions[np.all(np.isfinite(directions), axis=1)]
        if spatial.shape != (3, 3):
            raise DataError(
                f"{path} has space directions for {spatial.shape[0]} axes in a "
                f"{directions.shape[-1]}D space, but a 3D volume in 3D space is expected. "
                "Save it as a 3D NRRD volume or remove the case."
            )
        origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
        affine = np.eye(4)
        affine[:3, :3] = spatial.T
        affine[:3, 3] = origin[:3]
        flips = _NRRD_SPACE_TO_RAS.get(header.get("space", ""), (1.0, 1.0, 1.0))
        return np.diag([*flips, 1.0]) @ affine

    spacings = header.get("spacings")
    if spacings is not None:
        spacings = np.asarray(spacings, dtype=np.float64)
        spacings = spacings[np.isfinite(spacings)]
        if spacings.shape == (3,):
            return np.diag([*spacings, 1.0])
    return None


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
    """Convert a binary label array to uint8 {0, 1}, with 1 = left atrium.

    Accepted masks contain background 0 and one foreground value, any positive number, so
    {0, 1} and {0, 255} masks both work. A mask with two or more foreground labels, such as
    {0, 1, 2}, or with negative labels raises `DataError`, because which label is the left
    atrium is unknown. Such masks are rejected rather than merged, because a merge would
    silently train on the wrong structure.

    Floating-point masks whose values all lie within `LABEL_ROUNDING_TOLERANCE` of integers
    are rounded first, so 0.9999 and 1.0001 count as 1. Any other floating-point mask is taken
    as resampled with linear interpolation and cut at half its maximum, or at 0.5 when the
    maximum is about 1 or less.
    """
    if mask.dtype == np.bool_:
        return mask.astype(np.uint8)

    if np.issubdtype(mask.dtype, np.floating):
        check_finite(mask, path)
        rounded = np.rint(mask)
        if mask.size and np.abs(mask - rounded).max() > LABEL_ROUNDING_TOLERANCE:
            peak = float(mask.max())
            threshold = 0.5 if peak <= 1.0 + LABEL_ROUNDING_TOLERANCE else peak / 2
            return (mask > threshold).astype(np.uint8)
        mask = rounded

    labels = np.unique(mask)
    foreground = labels[labels != 0]
    if foreground.size > 1 or (foreground.size and foreground[0] < 0):
        label_list = ", ".join(f"{label:g}" for label in labels[:_MAX_LABELS_SHOWN])
        hint = ""
        if labels.size > _MAX_LABELS_SHOWN:
            label_list += f", ... ({labels.size} values)"
            hint = " If the mask was resampled, resample it with nearest-neighbour interpolation."
        raise DataError(
            f"{path} is not a binary mask: it contains the labels {{{label_list}}}, but a "
            "left-atrium mask needs background 0 and one positive label such as 1 or 255. "
            f"Save the left-atrium label alone as a binary mask or remove the case.{hint}"
        )
    return (mask != 0).astype(np.uint8)


def check_affine(affine: np.ndarray, path: str | Path) -> None:
    """Raise DataError unless the affine maps each voxel axis to a distinct, finite direction.

    A zero column (for example in a NIfTI sform written by hand) would make a voxel size 0 mm,
    and two parallel columns make the affine singular.
    """
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    valid = bool(np.all(np.isfinite(affine)) and np.all(spacing > 0))
    if valid:
        # |det| equals the product of the column norms for orthogonal columns and falls to 0
        # as two columns become parallel.
        valid = abs(np.linalg.det(affine[:3, :3])) > 1e-6 * float(np.prod(spacing))
    if not valid:
        sizes = ", ".join(f"{s:g}" for s in spacing)
        raise DataError(
            f"{path} has an invalid voxel-to-world affine (voxel sizes {sizes} mm, matrix "
            f"{np.round(affine[:3, :3], 4).tolist()}): every voxel axis needs a finite, non-zero "
            "size and its own direction. Fix the header geometry (NIfTI qform/sform and pixdim, "
            "or NRRD space directions) or remove the case."
        )


def _load_nifti(path: str | Path) -> nib.Nifti1Image:
    try:
        return nib.load(path)
    except _NIFTI_READ_ERRORS as err:
        raise _read_error(path, err) from err


def _read_nrrd(path: str | Path) -> tuple[np.ndarray, dict]:
    try:
        data, header = nrrd.read(str(path))
    except _NRRD_READ_ERRORS as err:
        raise _read_error(path, err) from err
    return np.asarray(data), header


_warned_keys: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    # A dataset can hold hundreds of files with the same problem, and one line in the log
    # is enough to explain the assumption.
    if key not in _warned_keys:
        _warned_keys.add(key)
        logging.warning(message)


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
