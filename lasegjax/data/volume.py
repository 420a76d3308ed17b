"""The in-memory form of one 3D case, shared by every reader."""

import dataclasses

import numpy as np


@dataclasses.dataclass
class Volume:
    """One 3D LGE-MRI case as read from disk.

    Attributes:
      case_id: Name of the case, unique within its dataset (a folder or file stem).
      image: float32 array of shape (X, Y, Z) in the file's voxel order.
      mask: uint8 array of the image's shape with values {0, 1} (1 = left atrium), or None
        for an unlabelled case.
      affine: 4x4 voxel-to-world matrix (RAS+ mm, as nibabel defines it).
      image_path: File the image was read from; errors and outputs refer to it.
      mask_path: File the mask was read from, or None.
    """

    case_id: str
    image: np.ndarray
    mask: np.ndarray | None
    affine: np.ndarray
    image_path: str
    mask_path: str | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis, from the affine's column norms."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))
