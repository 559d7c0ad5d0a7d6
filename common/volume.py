"""The in-memory volume every tool passes around: a 3D array plus its voxel-to-world affine.

Convention: ``affine`` maps voxel indices (i, j, k) to world millimetres in MONAI/NIfTI **RAS+**
(x to the patient's Right, y Anterior, z Superior). DICOM's LPS is converted on load. Spacing,
origin and direction are derived from the affine, so they cannot disagree with it.
"""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np

from common.errors import InputError

# Largest |cosine| between two axes of an affine (and |norm - 1| of a direction) accepted as orthogonal.
# Rounding of real scanner geometry stays far below it: float32 sform rows in NIfTI ~4e-7, DICOM
# ImageOrientationPatient decimal strings at 4 decimals ~2e-4 (common.dicom applies the same 1e-3 to them),
# while a shear of 1e-3 moves the far edge of a 512-voxel axis by half a voxel.
ORTHOGONALITY_TOL = 1e-3


@dataclasses.dataclass
class Volume:
    array: np.ndarray  # (X, Y, Z), float32 unless stated
    affine: np.ndarray  # (4, 4) voxel index -> RAS mm

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise InputError(None, f"affine must be 4x4, got {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the array axes."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def origin(self) -> tuple[float, float, float]:
        """World position (RAS mm) of voxel (0, 0, 0)."""
        return tuple(float(v) for v in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit world directions of the array axes."""
        return self.affine[:3, :3] / np.asarray(self.spacing)

    @property
    def orientation(self) -> str:
        """Axis codes such as ``"RAS"`` or ``"LPS"`` (the nearest anatomical direction per axis)."""
        return "".join(nib.orientations.aff2axcodes(self.affine))

    @classmethod
    def from_spacing(cls, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=None) -> Volume:
        """A RAS-aligned volume with the given spacing; origin defaults to centring it at 0."""
        spacing = np.asarray(spacing, dtype=np.float64)
        affine = np.diag([*spacing, 1.0])
        if origin is None:
            origin = -(np.asarray(array.shape[:3]) - 1) / 2.0 * spacing
        affine[:3, 3] = origin
        return cls(array, affine)

    def with_array(self, array: np.ndarray) -> Volume:
        """Same geometry, new voxels (shape must match)."""
        if tuple(array.shape) != self.shape:
            raise InputError(None, f"shape {tuple(array.shape)} does not match volume shape {self.shape}")
        return Volume(array, self.affine.copy())

    def to_canonical(self) -> Volume:
        """Reorient (flip/permute only, no resampling) so array axes run R, A, S."""
        img = nib.as_closest_canonical(nib.Nifti1Image(self.array, self.affine))
        return Volume(np.asarray(img.dataobj), img.affine)

    def validate(self, source: str | None = None, allow_nan: bool = False) -> Volume:
        """Raise :class:`InputError` (naming ``source``) for a non-3D array, NaNs or bad spacing."""
        if self.array.ndim != 3:
            raise InputError(source, f"expected a 3D volume, got an array of shape {tuple(self.array.shape)}")
        if min(self.array.shape) < 1:
            raise InputError(source, f"empty volume of shape {tuple(self.array.shape)}")
        spacing = np.linalg.norm(self.affine[:3, :3], axis=0)
        if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise InputError(source, f"voxel spacing must be positive and finite, got {tuple(spacing)}")
        if not np.all(np.isfinite(self.affine)):
            raise InputError(source, "affine contains NaN or infinity")
        cosines = np.abs(self.direction.T @ self.direction - np.eye(3)).max()
        if not cosines <= ORTHOGONALITY_TOL:
            raise InputError(
                source,
                f"affine axes are not orthogonal (|cos| between axes up to {cosines:.3g}, tolerance "
                f"{ORTHOGONALITY_TOL:g}): a sheared or rank-deficient affine; resample to an orthogonal grid",
            )
        if (
            not allow_nan
            and np.issubdtype(self.array.dtype, np.floating)
            and not np.all(np.isfinite(self.array))
        ):
            n = int(np.size(self.array) - np.count_nonzero(np.isfinite(self.array)))
            raise InputError(source, f"volume contains {n} NaN/infinite voxels")
        return self
