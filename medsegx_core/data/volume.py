"""A 3D image with its full geometry, and exact conversions between voxel indices, RAS and LPS.

Geometry is stored once, in RAS (Slicer's convention): the centre of voxel ``(i, j, k) = (0, 0, 0)`` and the unit
directions of the i, j, k axes. Everything else is derived, so it cannot drift out of step:

    IJKToRAS = [ direction_ras @ diag(spacing) | origin_ras ]
    IJKToLPS = diag(-1, -1, 1, 1) @ IJKToRAS          (ITK, NRRD and DICOM work in LPS)

The array is numpy ``(k, j, i)`` (SimpleITK and ``slicer.util.arrayFromVolume`` order); index triples called
``ijk`` are in ITK order ``(i, j, k)``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from ..errors import GeometryError

#: RAS <-> LPS is a sign flip of the first two axes, its own inverse.
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
_LPS_FROM_RAS_4 = np.diag([-1.0, -1.0, 1.0, 1.0])


def apply_affine(matrix: np.ndarray, points) -> np.ndarray:
    """Apply a 4x4 affine to points ``(N, 3)`` or one point ``(3,)``; keeps the input's shape."""
    pts = np.asarray(points, dtype=float)
    flat = pts.reshape(-1, 3)
    out = flat @ matrix[:3, :3].T + matrix[:3, 3]
    return out.reshape(pts.shape)


def ras_to_lps(points) -> np.ndarray:
    return np.asarray(points, dtype=float) * np.array([-1.0, -1.0, 1.0])


lps_to_ras = ras_to_lps  # the flip is an involution; the second name says which way the caller means


@dataclass
class Volume:
    """Voxels ``(k, j, i)`` plus spacing (mm along i, j, k), RAS origin and RAS axis directions."""

    array: np.ndarray
    spacing: tuple
    origin_ras: np.ndarray
    direction_ras: np.ndarray
    modality: Optional[str] = None
    source: Optional[str] = None

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise GeometryError(f"a volume needs a 3D (k, j, i) array, got shape {self.array.shape}")
        spacing = np.asarray(self.spacing, dtype=float).reshape(-1)
        if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise GeometryError(f"spacing must be 3 positive numbers (mm along i, j, k), got {self.spacing}")
        self.spacing = tuple(float(s) for s in spacing)
        self.origin_ras = np.asarray(self.origin_ras, dtype=float).reshape(3).copy()
        if not np.all(np.isfinite(self.origin_ras)):
            raise GeometryError(f"origin must be finite, got {self.origin_ras.tolist()}")
        direction = np.asarray(self.direction_ras, dtype=float).reshape(3, 3).copy()
        # Slicer, ITK and DICOM all assume orthonormal axes; a sheared affine would make RAS<->voxel ambiguous.
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            raise GeometryError(f"axis directions must be orthonormal (no shear), got {direction.round(5).tolist()}")
        self.direction_ras = direction

    # ---- derived geometry -------------------------------------------------------------------------------------
    @property
    def shape_ijk(self) -> tuple:
        """Number of voxels along i, j, k (the reverse of ``array.shape``)."""
        return tuple(int(n) for n in self.array.shape[::-1])

    @property
    def ijk_to_ras(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = self.direction_ras * np.asarray(self.spacing)
        m[:3, 3] = self.origin_ras
        return m

    @property
    def ras_to_ijk(self) -> np.ndarray:
        return np.linalg.inv(self.ijk_to_ras)

    @property
    def ijk_to_lps(self) -> np.ndarray:
        return _LPS_FROM_RAS_4 @ self.ijk_to_ras

    @property
    def lps_to_ijk(self) -> np.ndarray:
        return np.linalg.inv(self.ijk_to_lps)

    @property
    def origin_lps(self) -> np.ndarray:
        return LPS_FROM_RAS @ self.origin_ras

    @property
    def direction_lps(self) -> np.ndarray:
        return LPS_FROM_RAS @ self.direction_ras

    # ---- point conversions (float, unrounded; (N, 3) or (3,)) -------------------------------------------------
    def ijk_to_ras_points(self, points) -> np.ndarray:
        return apply_affine(self.ijk_to_ras, points)

    def ras_to_ijk_points(self, points) -> np.ndarray:
        return apply_affine(self.ras_to_ijk, points)

    def ijk_to_lps_points(self, points) -> np.ndarray:
        return apply_affine(self.ijk_to_lps, points)

    def lps_to_ijk_points(self, points) -> np.ndarray:
        return apply_affine(self.lps_to_ijk, points)

    def ijk_corners(self) -> np.ndarray:
        """The 8 outer corners of the voxel grid (voxel edges, not centres) as continuous ijk, ``(8, 3)``."""
        hi = np.asarray(self.shape_ijk, dtype=float) - 0.5
        return np.array([[x, y, z] for x in (-0.5, hi[0]) for y in (-0.5, hi[1]) for z in (-0.5, hi[2])])

    def ras_bounds(self) -> np.ndarray:
        """``(2, 3)`` min and max RAS mm of the space the voxels cover (what Slicer shows as the volume's bounds)."""
        corners = self.ijk_to_ras_points(self.ijk_corners())
        return np.stack([corners.min(axis=0), corners.max(axis=0)])

    def describe_ras_bounds(self) -> str:
        lo, hi = self.ras_bounds()
        return "RAS bounds " + ", ".join(f"{axis} [{a:.1f}, {b:.1f}]" for axis, a, b in zip("RAS", lo, hi)) + " mm"

    def contains_ijk(self, points_ijk) -> np.ndarray:
        """Whether continuous ijk points fall inside the voxel grid (within half a voxel of a voxel centre)."""
        pts = np.asarray(points_ijk, dtype=float).reshape(-1, 3)
        upper = np.asarray(self.shape_ijk, dtype=float) - 0.5
        eps = 1e-6  # a point exactly on the outer edge (e.g. a box corner) is inside despite rounding
        return np.all((pts >= -0.5 - eps) & (pts <= upper + eps), axis=1)

    # ---- same grid, new content -------------------------------------------------------------------------------
    def with_array(self, array: np.ndarray) -> "Volume":
        """A volume on the same grid holding ``array`` (a mask, a labelmap, a preprocessed image).

        Geometry, modality and source are kept: only the voxels change."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise GeometryError(f"array shape {array.shape} does not match the volume's (k, j, i) shape "
                                f"{self.array.shape}")
        return replace(self, array=array)

    def slab(self, first: int, stop: int) -> "Volume":
        """The slices ``first <= k < stop`` as a volume of their own, at their place in space (a view: no copy)."""
        if not 0 <= first < stop <= self.array.shape[0]:
            raise GeometryError(f"slices {first}..{stop - 1} are not within the volume's 0..{self.array.shape[0] - 1}")
        origin = apply_affine(self.ijk_to_ras, [(0.0, 0.0, float(first))])[0]
        return replace(self, array=self.array[first:stop], origin_ras=origin)

    def grid_difference(self, other: "Volume", tol: float = 1e-4) -> Optional[str]:
        """``None`` when both volumes share a voxel grid, else a short description of the first difference.

        ``tol`` is in mm for origin and spacing and unitless for directions.
        """
        if self.shape_ijk != other.shape_ijk:
            return f"size {other.shape_ijk} differs from {self.shape_ijk}"
        if not np.allclose(other.spacing, self.spacing, atol=tol, rtol=0):
            return f"spacing {np.round(other.spacing, 5).tolist()} differs from {np.round(self.spacing, 5).tolist()}"
        if not np.allclose(other.origin_ras, self.origin_ras, atol=tol, rtol=0):
            return (f"origin (RAS) {np.round(other.origin_ras, 4).tolist()} differs from "
                    f"{np.round(self.origin_ras, 4).tolist()}")
        if not np.allclose(other.direction_ras, self.direction_ras, atol=tol, rtol=0):
            return (f"axis directions (RAS) {np.round(other.direction_ras, 4).tolist()} differ from "
                    f"{np.round(self.direction_ras, 4).tolist()}")
        return None

    def same_grid(self, other: "Volume", tol: float = 1e-4) -> bool:
        return self.grid_difference(other, tol) is None

    # ---- SimpleITK bridge (LPS) -------------------------------------------------------------------------------
    @classmethod
    def from_sitk(cls, image, modality: Optional[str] = None, source: Optional[str] = None) -> "Volume":
        import SimpleITK as sitk

        if image.GetDimension() != 3:
            raise GeometryError(f"a volume needs a 3D image, got {image.GetDimension()}D")
        direction_lps = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)  # columns = axes
        return cls(array=sitk.GetArrayFromImage(image),
                   spacing=tuple(image.GetSpacing()),
                   origin_ras=LPS_FROM_RAS @ np.asarray(image.GetOrigin(), dtype=float),
                   direction_ras=LPS_FROM_RAS @ direction_lps,
                   modality=modality, source=source)

    def to_sitk(self, array: Optional[np.ndarray] = None):
        """A SimpleITK image of ``array`` (default: this volume's) with this volume's geometry in LPS."""
        import SimpleITK as sitk

        data = self.array if array is None else np.asarray(array)
        if data.shape != self.array.shape:
            raise GeometryError(f"array shape {data.shape} does not match the volume's {self.array.shape}")
        image = sitk.GetImageFromArray(np.ascontiguousarray(data))
        image.SetSpacing(self.spacing)
        image.SetOrigin(tuple(float(v) for v in self.origin_lps))
        image.SetDirection(tuple(float(v) for v in self.direction_lps.ravel()))
        return image

    def __repr__(self) -> str:  # the array itself is never useful in a repr
        return (f"Volume(shape_ijk={self.shape_ijk}, dtype={self.array.dtype}, spacing={self.spacing}, "
                f"origin_ras={np.round(self.origin_ras, 3).tolist()}, modality={self.modality!r}, "
                f"source={self.source!r})")
