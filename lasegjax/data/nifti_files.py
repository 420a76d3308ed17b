"""NIfTI files named by case, for the predict and evaluate command lines.

A case name is the file name without its `.nii.gz` or `.nii` suffix, so `la_003.nii.gz`
is case `la_003`.
"""

import zlib
from pathlib import Path

import nibabel as nib
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from lasegjax.errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")

# Exceptions that nibabel, gzip and zlib raise for an empty, truncated or corrupt file.
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error)


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def case_name(path: Path) -> str:
    """Return the file name without its .nii.gz or .nii suffix."""
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def list_nifti_files(
    folder: Path, option: str, suffixes: tuple[str, ...] = NIFTI_SUFFIXES, kind: str = "NIfTI"
) -> list[Path]:
    """Return the files directly inside `folder` whose names end in `suffixes`, sorted by name.

    `option` is the command-line option that named the folder, and `kind` names the file
    format, both for the error messages.
    """
    if not folder.exists():
        raise DataError(f"{option} {folder} not found. Pass an existing folder")
    if not folder.is_dir():
        raise DataError(f"{option} {folder} is not a folder. Pass a folder of {kind} files")
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.name.endswith(suffixes) and not p.name.startswith(".")
    )
    if not files:
        raise DataError(
            f"no {kind} files ({', '.join(suffixes)}) in {option} {folder}. Pass a folder that "
            "contains them directly; subfolders are not searched"
        )
    return files


def files_by_case(files: list[Path]) -> dict[str, Path]:
    """Return {case name: file}, raising if two files share a case name."""
    cases: dict[str, Path] = {}
    for path in files:
        name = case_name(path)
        if name in cases:
            raise DataError(
                f"{cases[name]} and {path} have the same case name {name!r}. Remove or rename "
                "one of them"
            )
        cases[name] = path
    return cases


def load_nifti(path: Path) -> nib.Nifti1Image:
    """Open a NIfTI file (its header is read; the voxel data is read on access)."""
    try:
        return nib.load(path)
    except _READ_ERRORS as err:
        reason = " ".join(str(err).split()) or "no details"
        raise DataError(
            f"failed to read {path} ({type(err).__name__}: {reason}). The file may be empty, "
            "truncated or not NIfTI. Replace it or remove it from the folder"
        ) from err
