"""Voxel-axis reorientation to RAS+ and back (the `canonical` preprocessing profile).

The published SegVol weights were trained on arrays in whatever voxel order the files were stored in, so the
same anatomy stored with flipped or permuted axes gives a different model input and a different mask. The
canonical profile removes that dependence: before preprocessing it permutes and flips the voxel axes so that
i points Right, j Anterior and k Superior (RAS+, the order ../shared/data/ct/totalseg_ct.nii.gz is stored in),
and maps every result back with the exact inverse. Only permutations and flips are used (no resampling), so the
round trip is lossless; an oblique direction is snapped to the nearest axis permutation.

Arrays are numpy ``(k, j, i)``; points are ``(i, j, k)`` voxel coordinates (float), as in ``prompts.py``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AxisReorientation:
    """Maps a stored voxel grid onto a working grid by an axis permutation and flips.

    ``source_axis[r]`` is the stored ijk axis that becomes working ijk axis ``r``; ``flipped[r]`` says whether it
    runs backwards. ``stored_shape_ijk`` is the stored grid's size along i, j, k.
    """

    source_axis: tuple[int, int, int]
    flipped: tuple[bool, bool, bool]
    stored_shape_ijk: tuple[int, int, int]

    @classmethod
    def identity(cls, stored_shape_ijk) -> "AxisReorientation":
        return cls((0, 1, 2), (False, False, False), tuple(int(n) for n in stored_shape_ijk))

    @classmethod
    def to_ras(cls, direction_ras: np.ndarray, stored_shape_ijk) -> "AxisReorientation":
        """The permutation and flips that make the voxel axes point R, A, S (closest for oblique grids)."""
        direction = np.asarray(direction_ras, dtype=np.float64)
        # Choose the permutation that keeps most of the direction on the diagonal; argmax per row can pick
        # the same stored axis twice on 45-degree grids, the search over the six permutations cannot.
        best = max(itertools.permutations(range(3)),
                   key=lambda perm: sum(abs(direction[r, perm[r]]) for r in range(3)))
        flipped = tuple(bool(direction[r, best[r]] < 0) for r in range(3))
        return cls(tuple(int(a) for a in best), flipped, tuple(int(n) for n in stored_shape_ijk))

    @classmethod
    def to_radiological(cls, direction_ras: np.ndarray, stored_shape_ijk) -> "AxisReorientation":
        """Axes pointing L, P, S: axial slices (k) shown as radiologists read them and as 2D models were trained
        on them (rows anterior -> posterior, columns patient right -> left); RAS+ with i and j reversed."""
        ras = cls.to_ras(direction_ras, stored_shape_ijk)
        return cls(ras.source_axis, (not ras.flipped[0], not ras.flipped[1], ras.flipped[2]), ras.stored_shape_ijk)

    @property
    def is_identity(self) -> bool:
        return self.source_axis == (0, 1, 2) and not any(self.flipped)

    # Arrays are (k, j, i): ijk axis a is array axis 2 - a.
    def _array_permutation(self) -> tuple[int, int, int]:
        return tuple(2 - self.source_axis[2 - array_axis] for array_axis in range(3))

    def _flipped_array_axes(self) -> tuple[int, ...]:
        return tuple(2 - r for r in range(3) if self.flipped[r])

    def array_to_working(self, stored: np.ndarray) -> np.ndarray:
        """A view of a stored (k, j, i) array in working order (no copy)."""
        view = np.transpose(stored, self._array_permutation())
        axes = self._flipped_array_axes()
        return np.flip(view, axes) if axes else view

    def array_to_stored(self, working: np.ndarray) -> np.ndarray:
        """A view of a working (k, j, i) array in stored order: the exact inverse of ``array_to_working``."""
        axes = self._flipped_array_axes()
        view = np.flip(working, axes) if axes else working
        return np.transpose(view, np.argsort(self._array_permutation()))

    def working_spacing(self, spacing_ijk) -> tuple[float, float, float]:
        """The stored grid's spacing (along i, j, k) along the working axes i, j, k."""
        return tuple(float(spacing_ijk[self.source_axis[r]]) for r in range(3))

    def points_to_working(self, points_ijk: np.ndarray) -> np.ndarray:
        """Stored (i, j, k) voxel coordinates (N, 3), float, to working ones."""
        points = np.asarray(points_ijk, dtype=np.float64).reshape(-1, 3)
        out = points[:, list(self.source_axis)].copy()
        for r in range(3):
            if self.flipped[r]:
                out[:, r] = (self.stored_shape_ijk[self.source_axis[r]] - 1) - out[:, r]
        return out
