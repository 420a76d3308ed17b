"""Synthetic LGE-MRI-like left-atrium phantoms, the default dataset when no real data exist.

Each case is an atrium-like cavity (a randomly deformed ellipsoid with an appendage and four
pulmonary veins) inside a bright, patchy wall. Around it lie a ventricle-like blob, two
aorta-like tubes, bright fat-like blobs, dark lung-like regions and textured tissue. A
smooth multiplicative bias field and Rician noise cover the whole volume. The ventricle and aortas carry blood of
the same brightness as the atrium, and the wall and fat are brighter, so an intensity
threshold alone does not segment the atrium. The mask is the cavity, the appendage and the
first few mm of each vein.

Geometry is set in mm, so a different voxel size gives the same anatomy at another
resolution. The written affine is diagonal, so voxel axes are the RAS+ world axes. In
those axes the veins leave towards -y (posterior) and the ventricle lies towards +y and -z.
Only numpy is used to generate the arrays.
"""

import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from lasegjax.errors import ConfigError, DataError

# Bump when the generated arrays change, so that an old phantom folder is not reused.
PHANTOM_VERSION = 1
MANIFEST_NAME = "phantom.json"
IMAGE_NAME = "enhanced.nii.gz"
MASK_NAME = "atriumSegImgMO.nii.gz"

# NIfTI code 1 (scanner-based anatomical coordinates) in both qform and sform, so that
# viewers such as ITK-SNAP and 3D Slicer place image and mask on the same grid.
_XFORM_CODE_SCANNER = 1

# Width in mm of the linear intensity ramp at each structure's border. It mimics the
# partial-volume blur of a voxel about 1 mm wide.
_EDGE_RAMP_MM = 1.0


def write_phantom_dataset(
    root: str | Path,
    num_cases: int = 8,
    shape: tuple[int, int, int] = (96, 96, 24),
    spacing: tuple[float, float, float] = (1.25, 1.25, 2.5),
    seed: int = 0,
) -> Path:
    """Write phantom cases in the LAScarQS layout and return the folder to use as data root.

    Files go to `root/train_data/train_{i}/enhanced.nii.gz` (float32 image) and
    `atriumSegImgMO.nii.gz` (uint8 {0, 1} mask), for i = 1 ... num_cases. A manifest,
    `root/phantom.json`, records the parameters. A second call with the same parameters
    writes only the files that are missing, and a call with other parameters raises
    DataError. Case i depends only on (seed, i), and each file is written to a temporary
    name and then renamed, so an interrupted run can be completed by calling again.

    Args:
      root: Output folder. It must be empty, missing, or a phantom folder written with the
        same parameters.
      num_cases: Number of cases.
      shape: Array shape (X, Y, Z) of each volume.
      spacing: Voxel size in mm along X, Y and Z.
      seed: Non-negative integer seed.
    """
    root = Path(root)
    params = _phantom_params(num_cases, shape, spacing, seed)
    _claim_folder(root, params)

    affine = phantom_affine(params["shape"], params["spacing"])
    for index in range(1, num_cases + 1):
        case_dir = root / "train_data" / f"train_{index}"
        image_path = case_dir / IMAGE_NAME
        mask_path = case_dir / MASK_NAME
        if image_path.is_file() and mask_path.is_file():
            continue
        rng = np.random.default_rng([seed, index])
        image, mask = make_phantom_case(params["shape"], params["spacing"], rng)
        case_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(image_path, _nifti_gz_bytes(image, affine))
        _write_atomic(mask_path, _nifti_gz_bytes(mask, affine))
    return root


def phantom_affine(shape: tuple[int, ...], spacing: tuple[float, ...]) -> np.ndarray:
    """Return the diagonal voxel-to-world affine with the volume centre at world (0, 0, 0)."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * np.asarray(spacing)
    return affine


def make_phantom_case(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one phantom case from `rng`.

    Returns:
      The float32 image and the uint8 {0, 1} LA mask, both of shape `shape`. Before bias,
      gain and noise, tissue is near 0.2, blood near 0.55 and the patchy wall near 0.85.
    """
    points = _grid_points(shape, spacing)
    fov = np.asarray(shape) * np.asarray(spacing)

    image = _background(points, rng)
    _paint_fat(image, points, fov, rng)

    atrium = _atrium(points, fov, rng)
    _paint_ventricle(image, points, atrium, rng)
    _paint_aortas(image, points, atrium, rng)

    # The wall is a shell of the blood region (cavity, appendage, whole veins), painted
    # before the blood so that only its outer part stays visible.
    blood_value = rng.uniform(0.5, 0.6)
    wall_value = blood_value + rng.uniform(0.25, 0.4) + 0.25 * _smooth_field(points, rng, 8, 10, 25)
    thickness = rng.uniform(2.0, 3.0)
    _paint(image, atrium["blood_sd"] - thickness, wall_value)
    blood_texture = 1.0 + 0.04 * _smooth_field(points, rng, 4, 15, 40)
    _paint(image, atrium["blood_sd"], blood_value * blood_texture)

    bias = np.exp(rng.uniform(0.15, 0.3) * _smooth_field(points, rng, 6, 150, 400))
    image *= bias * rng.uniform(0.8, 1.25)
    image = _add_rician_noise(image, rng.uniform(0.03, 0.06), rng)
    return image.astype(np.float32), atrium["mask"].astype(np.uint8)


def _phantom_params(num_cases, shape, spacing, seed) -> dict:
    if isinstance(num_cases, bool) or not isinstance(num_cases, int) or num_cases < 1:
        raise ConfigError(f"invalid phantom num_cases {num_cases!r}. Use an integer >= 1.")
    if len(shape) != 3 or any(int(size) != size or size < 1 for size in shape):
        raise ConfigError(f"invalid phantom shape {shape!r}. Use three positive integers.")
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ConfigError(
            f"invalid phantom spacing {spacing!r}. Use three positive voxel sizes in mm."
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"invalid phantom seed {seed!r}. Use an integer >= 0.")
    return {
        "version": PHANTOM_VERSION,
        "num_cases": num_cases,
        "shape": [int(size) for size in shape],
        "spacing": [float(s) for s in spacing],
        "seed": seed,
    }


def _claim_folder(root: Path, params: dict) -> None:
    """Check that `root` may receive the phantom, and write the manifest if it is new."""
    manifest = root / MANIFEST_NAME
    if manifest.is_file():
        try:
            existing = json.loads(manifest.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(
                f"failed to read the phantom manifest {manifest} ({err}). Pick an empty "
                "folder for the phantom dataset or delete this one."
            ) from err
        if existing != params:
            raise DataError(
                f"{root} contains a phantom dataset written with other parameters ({existing}, "
                f"requested {params}). Pick an empty folder for the phantom dataset or "
                "delete this one."
            )
        return

    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(
            f"{root} is not an empty folder and contains no {MANIFEST_NAME}, so it is not a "
            "phantom dataset. Pick an empty folder for the phantom dataset."
        )
    root.mkdir(parents=True, exist_ok=True)
    _write_atomic(manifest, (json.dumps(params, indent=2) + "\n").encode())


def _nifti_gz_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=_XFORM_CODE_SCANNER)
    img.set_sform(affine, code=_XFORM_CODE_SCANNER)
    img.header.set_xyzt_units(xyz="mm")
    # mtime=0 keeps the gzip header free of the write time, so equal arrays give equal bytes.
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _write_atomic(path: Path, data: bytes) -> None:
    # The temporary name starts with "." so that the case readers skip it.
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp_path.write_bytes(data)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _grid_points(shape, spacing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the x, y and z world coordinates in mm of the voxel centres.

    The three float32 arrays have shapes (X, 1, 1), (1, Y, 1) and (1, 1, Z), so that
    arithmetic on them broadcasts to the full grid without storing a (X, Y, Z, 3) array.
    """
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return tuple(
        ((grid - (n - 1) / 2) * s).astype(np.float32)
        for grid, n, s in zip(grids, shape, spacing, strict=True)
    )


def _dot(components, vector) -> np.ndarray:
    return components[0] * vector[0] + components[1] * vector[1] + components[2] * vector[2]


def _norm(components) -> np.ndarray:
    return np.sqrt(components[0] ** 2 + components[1] ** 2 + components[2] ** 2)


def _smooth_field(points, rng, num_waves, min_wavelength_mm, max_wavelength_mm) -> np.ndarray:
    """Return a random sum of plane cosine waves, scaled to the range [-1, 1]."""
    directions = rng.normal(size=(num_waves, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavelengths = rng.uniform(min_wavelength_mm, max_wavelength_mm, size=num_waves)
    wave_vectors = (2 * np.pi / wavelengths)[:, None] * directions
    phases = rng.uniform(0, 2 * np.pi, size=num_waves)
    amplitudes = rng.uniform(0.5, 1.0, size=num_waves)

    field = np.zeros(np.broadcast_shapes(*(c.shape for c in points)), dtype=np.float32)
    for vector, phase, amplitude in zip(wave_vectors, phases, amplitudes, strict=True):
        # cos(k.p + phase) is the real part of a product of one complex exponential per
        # axis, which costs one complex multiply per voxel instead of a cosine.
        wave = amplitude * np.exp(1j * (vector[0] * points[0] + phase)).astype(np.complex64)
        wave = wave * np.exp(1j * vector[1] * points[1]).astype(np.complex64)
        wave = wave * np.exp(1j * vector[2] * points[2]).astype(np.complex64)
        field += wave.real
    return field / max(float(np.abs(field).max()), 1e-6)


def _paint(image, signed_distance, value) -> None:
    """Blend `value` into `image` inside a shape given by its signed distance in mm."""
    weight = np.clip(0.5 - signed_distance / _EDGE_RAMP_MM, 0.0, 1.0)
    image *= 1.0 - weight
    image += weight * value


def _random_rotation(rng, max_tilt_deg, max_turn_deg) -> np.ndarray:
    """Return a rotation that tilts about x and y, then turns about z."""
    tilt_x, tilt_y = np.deg2rad(rng.uniform(-max_tilt_deg, max_tilt_deg, size=2))
    turn = np.deg2rad(rng.uniform(-max_turn_deg, max_turn_deg))
    cos_x, sin_x = np.cos(tilt_x), np.sin(tilt_x)
    cos_y, sin_y = np.cos(tilt_y), np.sin(tilt_y)
    cos_z, sin_z = np.cos(turn), np.sin(turn)
    rot_x = np.array([[1, 0, 0], [0, cos_x, -sin_x], [0, sin_x, cos_x]])
    rot_y = np.array([[cos_y, 0, sin_y], [0, 1, 0], [-sin_y, 0, cos_y]])
    rot_z = np.array([[cos_z, -sin_z, 0], [sin_z, cos_z, 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


def _ellipsoid_sd(points, center, semi_axes, rotation=None, deform=None) -> np.ndarray:
    """Return an approximate signed distance in mm to a possibly deformed ellipsoid.

    The distance is measured along the ray from the centre, which is exact on a sphere
    and close enough on the mildly elongated shapes used here. `deform` maps unit
    directions in the ellipsoid frame to a radius factor near 1.
    """
    rotation = np.eye(3) if rotation is None else rotation
    offset = [points[i] - np.float32(center[i]) for i in range(3)]
    # Coordinates in the ellipsoid's own frame, divided by its semi-axes.
    scaled = [_dot(offset, rotation[:, j].astype(np.float32)) / semi_axes[j] for j in range(3)]
    rho = np.maximum(_norm(scaled), 1e-6)
    direction = [component / rho for component in scaled]
    radius_factor = 1.0 if deform is None else deform(direction)
    # Length in mm of the unit ray in the scaled frame, i.e. the undeformed radius.
    ray_mm = _norm([direction[j] * np.float32(semi_axes[j]) for j in range(3)])
    return (rho - radius_factor) * ray_mm


def _segment_sd(points, start, direction, length, radius):
    """Return a tube's signed distance in mm and each point's position along its axis."""
    offset = [points[i] - np.float32(start[i]) for i in range(3)]
    along = _dot(offset, np.asarray(direction, dtype=np.float32))
    clamped = np.clip(along, 0.0, length)
    to_axis = [offset[i] - clamped * np.float32(direction[i]) for i in range(3)]
    return _norm(to_axis) - radius, along


def _random_deform(rng):
    """Return a low-frequency radius factor made of a linear and a quadratic term."""
    linear = rng.normal(scale=0.08, size=3).astype(np.float32)
    quadratic = rng.normal(scale=0.12, size=(3, 3))
    quadratic = (quadratic + quadratic.T) / 2
    quadratic = (quadratic - np.trace(quadratic) / 3 * np.eye(3)).astype(np.float32)

    def deform(direction):
        value = 1.0 + _dot(direction, linear)
        for i in range(3):
            value = value + direction[i] * _dot(direction, quadratic[i])
        return np.clip(value, 0.75, 1.3)

    return deform


def _atrium(points, fov, rng) -> dict:
    """Build the LA and return its blood region's signed distance, its mask and its frame."""
    center = rng.uniform(-0.06, 0.06, size=3) * fov
    semi_axes = np.array([rng.uniform(17, 25), rng.uniform(13, 19), rng.uniform(10, 15)])
    semi_axes = np.minimum(semi_axes, 0.3 * fov)
    rotation = _random_rotation(rng, max_tilt_deg=10, max_turn_deg=25)
    deform = _random_deform(rng)
    cavity_sd = _ellipsoid_sd(points, center, semi_axes, rotation, deform)
    mask = cavity_sd < 0

    # The appendage is a short finger towards -x, +y and belongs to the LA cavity.
    appendage_dir = _unit(rotation @ (np.array([-1.0, 0.8, 0.3]) + rng.normal(scale=0.15, size=3)))
    appendage_start = (
        center + 0.6 * _surface_distance(appendage_dir, semi_axes, rotation, deform) * appendage_dir
    )
    appendage_sd, _ = _segment_sd(
        points, appendage_start, appendage_dir, rng.uniform(14, 22), rng.uniform(4, 6)
    )
    mask |= appendage_sd < 0
    blood_sd = np.minimum(cavity_sd, appendage_sd)

    # Four pulmonary veins, two on each side, leaving towards -y (posterior). Only the
    # first few mm past the cavity surface (the ostium) count as LA.
    for side_x, side_z in ((-1, 0.6), (-1, -0.5), (1, 0.6), (1, -0.5)):
        local = np.array([side_x, -0.8, side_z]) + rng.normal(scale=0.2, size=3)
        vein_dir = _unit(rotation @ local)
        surface = _surface_distance(vein_dir, semi_axes, rotation, deform)
        vein_sd, along = _segment_sd(
            points, center, vein_dir, surface + rng.uniform(15, 30), rng.uniform(3.5, 5.5)
        )
        mask |= (vein_sd < 0) & (along < surface + rng.uniform(3, 6))
        blood_sd = np.minimum(blood_sd, vein_sd)

    return {
        "blood_sd": blood_sd,
        "mask": mask,
        "center": center,
        "semi_axes": semi_axes,
        "rotation": rotation,
    }


def _surface_distance(direction, semi_axes, rotation, deform) -> float:
    """Return the distance in mm from the LA centre to its surface along a world direction."""
    scaled = (rotation.T @ direction) / semi_axes
    unit_scaled = (scaled / np.linalg.norm(scaled)).astype(np.float32)
    return float(deform(list(unit_scaled)) / np.linalg.norm(scaled))


def _unit(vector) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def _background(points, rng) -> np.ndarray:
    """Textured soft tissue with dark lung-like regions."""
    tissue = rng.uniform(0.18, 0.26) + 0.07 * _smooth_field(points, rng, 12, 8, 25)
    lung_field = _smooth_field(points, rng, 5, 60, 120)
    lung_weight = np.clip((lung_field - 0.45) / 0.15, 0.0, 1.0)
    return tissue * (1.0 - lung_weight) + 0.04 * lung_weight


def _paint_fat(image, points, fov, rng) -> None:
    """Paint a few bright fat-like blobs; the atrium painted later covers any overlap."""
    for _ in range(rng.integers(3, 7)):
        center = rng.uniform(-0.45, 0.45, size=3) * fov
        semi_axes = rng.uniform(3, 8, size=3)
        rotation = _random_rotation(rng, max_tilt_deg=90, max_turn_deg=180)
        _paint(image, _ellipsoid_sd(points, center, semi_axes, rotation), rng.uniform(0.7, 0.95))


def _paint_ventricle(image, points, atrium, rng) -> None:
    """Paint a ventricle-like blob, blood inside dark myocardium, towards +y and -z."""
    rotation, semi_a = atrium["rotation"], atrium["semi_axes"]
    blood_axes = np.array([rng.uniform(20, 28), rng.uniform(16, 22), rng.uniform(14, 20)])
    myocardium = rng.uniform(7, 10)
    gap = rng.uniform(3, 8)
    local_offset = np.array(
        [
            rng.uniform(-8, 8),
            semi_a[1] + gap + myocardium + blood_axes[1],
            -(0.5 * semi_a[2] + rng.uniform(5, 12)),
        ]
    )
    center = atrium["center"] + rotation @ local_offset
    blood_sd = _ellipsoid_sd(points, center, blood_axes, rotation, _random_deform(rng))
    _paint(image, blood_sd - myocardium, rng.uniform(0.08, 0.14))
    _paint(image, blood_sd, rng.uniform(0.5, 0.62))


def _paint_aortas(image, points, atrium, rng) -> None:
    """Paint an ascending (+y, upwards) and a descending (-y, full height) aorta-like tube."""
    rotation, semi_a, center = atrium["rotation"], atrium["semi_axes"], atrium["center"]
    tubes = []

    radius = rng.uniform(10, 14)
    start = center + rotation @ np.array(
        [rng.uniform(-4, 8), semi_a[1] + radius + rng.uniform(3, 7), -0.3 * semi_a[2]]
    )
    tubes.append((start, _unit(np.array([*rng.normal(scale=0.15, size=2), 1.0])), 200.0, radius))

    radius = rng.uniform(8, 11)
    start = center + rotation @ np.array(
        [-rng.uniform(0, 0.3) * semi_a[0], -(semi_a[1] + radius + rng.uniform(10, 16)), 0.0]
    )
    direction = _unit(np.array([*rng.normal(scale=0.1, size=2), 1.0]))
    tubes.append((start - 100.0 * direction, direction, 200.0, radius))

    for start, direction, length, radius in tubes:
        sd, _ = _segment_sd(points, start, direction, length, radius)
        _paint(image, sd - 1.5, rng.uniform(0.25, 0.35))
        _paint(image, sd, rng.uniform(0.52, 0.65))


def _add_rician_noise(image, sigma, rng) -> np.ndarray:
    """Return the magnitude of the image plus complex Gaussian noise, as MRI magnitude is."""
    real = image + rng.normal(scale=sigma, size=image.shape)
    imaginary = rng.normal(scale=sigma, size=image.shape)
    return np.sqrt(real * real + imaginary * imaginary)
