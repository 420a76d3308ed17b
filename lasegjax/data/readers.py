"""Finding LA cases in a data folder and loading them as `Volume`s.

Four on-disk layouts are accepted:

- `lascarqs`: LAScarQS 2022 Task 2, one folder per case (e.g. `train_data/train_1/`) containing
  `enhanced.nii.gz` (LGE image) and `atriumSegImgMO.nii.gz` (LA mask).
- `msd`: Medical Segmentation Decathlon Task02_Heart, `imagesTr/la_NNN.nii.gz` with the mask
  under the same name in `labelsTr/`.
- `la_h5`: the preprocessed LASC2018 HDF5 files, `<case>/mri_norm2.h5` with datasets `image`
  and `label`.
- `lasc2018`: the raw 2018 Atrial Segmentation Challenge release, one folder per case
  (e.g. `Training Set/<case>/`) containing `lgemri.nrrd` (LGE image) and `laendo.nrrd`
  (LA cavity mask, 255 = LA). Other files in the folder, such as `lawall.nrrd`, are ignored.

Uncompressed `.nii` files are accepted wherever `.nii.gz` is named. Case folders may sit up
to `MAX_SEARCH_DEPTH` folder levels below the data root.
"""

import dataclasses
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from lasegjax.data import volume_io
from lasegjax.data.volume import Volume
from lasegjax.errors import DataError

LAYOUTS = ("lascarqs", "msd", "la_h5", "lasc2018")

# root/train_data/train_1/ is at depth 2, and one more level allows a wrapper folder such
# as an unzipped archive. A limit keeps auto-detection fast on a large or wrongly chosen root.
MAX_SEARCH_DEPTH = 3

LASCARQS_IMAGE_NAMES = ("enhanced.nii.gz", "enhanced.nii")
LASCARQS_MASK_NAMES = ("atriumSegImgMO.nii.gz", "atriumSegImgMO.nii")
MSD_IMAGE_DIR = "imagesTr"
MSD_LABEL_DIR = "labelsTr"
MSD_IMAGE_PATTERN = re.compile(r"^(la_\d+)\.nii(\.gz)?$")
LA_H5_NAME = "mri_norm2.h5"
LASC2018_IMAGE_NAME = "lgemri.nrrd"
LASC2018_MASK_NAME = "laendo.nrrd"

# The preprocessed HDF5 files store no spacing. The LASC2018 challenge gives the voxel
# size of its volumes as 0.625 x 0.625 x 0.625 mm.
LA_H5_SPACING_MM = (0.625, 0.625, 0.625)
# NOTE: used only for LASC2018 NRRD files whose header has no geometry fields. Whether the
# raw release carries them was not checked on the original files, so this is the challenge's
# stated voxel size, not a value read from the data.
LASC2018_SPACING_MM = LA_H5_SPACING_MM

# Image and mask affines that differ by more than this (mm, or unitless for the rotation
# part) are reported, because the mask may then belong to another grid.
AFFINE_TOLERANCE = 1e-3

_EXPECTED_FILES = {
    "lascarqs": "<case>/enhanced.nii.gz with <case>/atriumSegImgMO.nii.gz (LAScarQS 2022)",
    "msd": "imagesTr/la_NNN.nii.gz with labelsTr/la_NNN.nii.gz (MSD Task02_Heart)",
    "la_h5": f"<case>/{LA_H5_NAME} (LA HDF5)",
    "lasc2018": f"<case>/{LASC2018_IMAGE_NAME} with <case>/{LASC2018_MASK_NAME} (LASC2018 NRRD)",
}


@dataclasses.dataclass(frozen=True)
class CaseRef:
    """Location of one case on disk, before any pixel data is read.

    Attributes:
      case_id: Name of the case: the case folder for `lascarqs` and `la_h5`, the file
        name without extension (e.g. `la_003`) for `msd`.
      image_path: File containing the image.
      mask_path: File containing the mask, or None for an unlabelled case. For `la_h5` it is
        the image file, which stores both.
      layout: One of `LAYOUTS`.
    """

    case_id: str
    image_path: str
    mask_path: str | None
    layout: str


def detect_layout(root: str | Path) -> str:
    """Return the layout of the cases under `root`, one of `LAYOUTS`."""
    root = _check_root(root)
    return _single_layout(root, _find_cases(root))


def list_cases(root: str | Path, layout: str = "auto") -> list[CaseRef]:
    """List the cases under `root`, sorted by case id in natural order (train_2 < train_10).

    Args:
      root: Data folder.
      layout: One of `LAYOUTS`, or "auto" to detect it.
    """
    if layout != "auto" and layout not in LAYOUTS:
        raise _unknown_layout_error(layout)
    root = _check_root(root)
    found = _find_cases(root)
    if layout == "auto":
        layout = _single_layout(root, found)

    cases = found.get(layout, [])
    if not cases:
        raise _no_cases_error(root, (layout,))
    _check_unique_ids(root, cases)
    return sorted(cases, key=lambda ref: _natural_key(ref.case_id))


def load_case(ref: CaseRef) -> Volume:
    """Read a case's image and mask and check that they form a valid pair."""
    if ref.layout not in LAYOUTS:
        raise _unknown_layout_error(ref.layout)

    if ref.layout == "la_h5":
        image, mask = volume_io.read_h5_case(ref.image_path)
        affine = np.diag([*LA_H5_SPACING_MM, 1.0])
    elif ref.layout == "lasc2018":
        image, affine = volume_io.read_nrrd_image(ref.image_path, LASC2018_SPACING_MM)
        mask = None if ref.mask_path is None else volume_io.read_nrrd_mask(ref.mask_path)
        if mask is not None:
            _warn_if_grids_differ(ref, affine, volume_io.read_nrrd_affine(ref.mask_path))
    else:
        image, affine = volume_io.read_nifti_image(ref.image_path)
        mask = None if ref.mask_path is None else volume_io.read_nifti_mask(ref.mask_path)
        if mask is not None:
            _warn_if_grids_differ(ref, affine, volume_io.read_nifti_affine(ref.mask_path))

    if mask is not None and mask.shape != image.shape:
        raise DataError(
            f"image and mask shapes differ: {ref.image_path} has shape {image.shape} but "
            f"{ref.mask_path} has shape {mask.shape}. Resample the mask onto the image grid "
            "or remove the case."
        )
    return Volume(
        case_id=ref.case_id,
        image=image,
        mask=mask,
        affine=affine,
        image_path=ref.image_path,
        mask_path=ref.mask_path,
    )


def _warn_if_grids_differ(ref: CaseRef, image_affine: np.ndarray, mask_affine) -> None:
    # Image and mask arrays of the same shape are paired voxel by voxel. A different mask
    # affine is often only a header written without geometry, so it is reported rather than
    # rejected or resampled.
    if mask_affine is None or np.allclose(mask_affine, image_affine, atol=AFFINE_TOLERANCE):
        return
    logging.warning(
        "%s: the mask %s has another voxel-to-world affine than the image %s (axis codes "
        "%s vs %s, voxel sizes %s vs %s mm). The mask is used voxel by voxel on the image "
        "grid; check that both files come from the same volume.",
        ref.case_id,
        ref.mask_path,
        ref.image_path,
        "".join(nib.aff2axcodes(mask_affine)),
        "".join(nib.aff2axcodes(image_affine)),
        _format_spacing(mask_affine),
        _format_spacing(image_affine),
    )


def _format_spacing(affine: np.ndarray) -> str:
    return " x ".join(f"{s:.4g}" for s in np.linalg.norm(affine[:3, :3], axis=0))


def _check_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        layouts = "; ".join(_EXPECTED_FILES.values())
        raise DataError(
            f"data root not found: {root}. Set --config.data.root to a folder with one of "
            f"these layouts: {layouts}."
        )
    return root


def _single_layout(root: Path, found: dict[str, list[CaseRef]]) -> str:
    if not found:
        raise _no_cases_error(root, LAYOUTS)
    if len(found) > 1:
        names = ", ".join(sorted(found))
        raise DataError(
            f"{root} contains cases in more than one layout ({names}). Point "
            "--config.data.root at a folder with one layout or set the layout explicitly."
        )
    return next(iter(found))


def _find_cases(root: Path) -> dict[str, list[CaseRef]]:
    """Walk `root` once and collect the cases of every layout that has any."""
    found: dict[str, list[CaseRef]] = {}
    for folder, file_names in _walk(root):
        for ref in _cases_in_folder(folder, file_names):
            found.setdefault(ref.layout, []).append(ref)
    return found


def _walk(root: Path) -> Iterator[tuple[Path, set[str]]]:
    # Symlinked case folders are common in shared data trees, so links are followed. The
    # depth limit keeps a link cycle from looping. Names starting with "." (including the
    # "._*" files that macOS leaves on copied volumes) are skipped.
    for dir_path, dir_names, file_names in os.walk(root, followlinks=True):
        depth = len(Path(dir_path).relative_to(root).parts)
        if depth < MAX_SEARCH_DEPTH:
            dir_names[:] = [name for name in dir_names if not name.startswith(".")]
        else:
            dir_names[:] = []
        yield Path(dir_path), {name for name in file_names if not name.startswith(".")}


def _cases_in_folder(folder: Path, file_names: set[str]) -> Iterator[CaseRef]:
    image_name = _first_present(LASCARQS_IMAGE_NAMES, file_names)
    if image_name is not None:
        mask_name = _first_present(LASCARQS_MASK_NAMES, file_names)
        yield CaseRef(
            case_id=folder.name,
            image_path=str(folder / image_name),
            mask_path=None if mask_name is None else str(folder / mask_name),
            layout="lascarqs",
        )

    if LASC2018_IMAGE_NAME in file_names:
        yield CaseRef(
            case_id=folder.name,
            image_path=str(folder / LASC2018_IMAGE_NAME),
            mask_path=(
                str(folder / LASC2018_MASK_NAME) if LASC2018_MASK_NAME in file_names else None
            ),
            layout="lasc2018",
        )

    if LA_H5_NAME in file_names:
        path = str(folder / LA_H5_NAME)
        yield CaseRef(case_id=folder.name, image_path=path, mask_path=path, layout="la_h5")

    if folder.name == MSD_IMAGE_DIR:
        label_dir = folder.parent / MSD_LABEL_DIR
        for name in file_names:
            match = MSD_IMAGE_PATTERN.match(name)
            if match is None:
                continue
            case_id = match.group(1)
            label_names = (name, f"{case_id}.nii.gz", f"{case_id}.nii")
            label_path = next(
                (label_dir / n for n in label_names if (label_dir / n).is_file()), None
            )
            yield CaseRef(
                case_id=case_id,
                image_path=str(folder / name),
                mask_path=None if label_path is None else str(label_path),
                layout="msd",
            )


def _first_present(names: tuple[str, ...], file_names: set[str]) -> str | None:
    return next((name for name in names if name in file_names), None)


def _check_unique_ids(root: Path, cases: list[CaseRef]) -> None:
    seen: dict[str, CaseRef] = {}
    for ref in cases:
        other = seen.setdefault(ref.case_id, ref)
        if other is not ref:
            raise DataError(
                f"case id '{ref.case_id}' occurs twice under {root}: {other.image_path} and "
                f"{ref.image_path}. Rename one case folder or point --config.data.root at "
                "a folder that holds only one of them."
            )


def _natural_key(text: str) -> list[int | str]:
    # re.split with a capturing group alternates text and digit runs, starting with text,
    # so two keys never compare an int with a str at the same position.
    parts = re.split(r"(\d+)", text)
    return [int(part) if i % 2 else part.lower() for i, part in enumerate(parts)]


def _no_cases_error(root: Path, layouts: tuple[str, ...]) -> DataError:
    expected = "; ".join(_EXPECTED_FILES[layout] for layout in layouts)
    return DataError(
        f"no cases found in {root}. Expected {expected}, at most {MAX_SEARCH_DEPTH} folder "
        "levels below it. Point --config.data.root at a folder that holds such cases."
    )


def _unknown_layout_error(layout: str) -> DataError:
    return DataError(f"unknown data layout '{layout}'. Use one of: auto, {', '.join(LAYOUTS)}.")
