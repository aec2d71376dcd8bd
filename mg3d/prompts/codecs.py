"""Box codecs: how a model family writes a box in the text frame (DESIGN.md §2).

Qwen2.5-VL writes absolute integer pixels of the grid it sees, Qwen2-VL integers normalised to 0–1000. Boxes are
``[x1, y1, x2, y2]`` / ``[x1, y1, z1, x2, y2, z2]`` (x = column, y = row, z = slice index of the model's depth
grid), half-open edges; ``grid_shape`` is ``(x size, y size[, z size])``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mg3d.errors import BoxError, ConfigError

_AXIS_NAMES = ("x", "y", "z")


def _check_ndim(ndim: int) -> int:
    if isinstance(ndim, bool) or ndim not in (2, 3):
        raise ConfigError(f"ndim must be 2 or 3, got {ndim!r}")
    return int(ndim)


def _check_grid(grid_shape: Sequence[int], what: str) -> tuple[int, ...]:
    grid = tuple(grid_shape)
    if len(grid) not in (2, 3):
        raise BoxError(f"{what}: grid_shape {grid!r} must have 2 (x, y) or 3 (x, y, z) sizes")
    for size in grid:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise BoxError(f"{what}: grid_shape {grid!r} must hold positive integers")
    return grid


def _check_values(values: Sequence[float], grid: tuple[int, ...], what: str) -> tuple[float, ...]:
    vals = tuple(float(v) for v in values)
    if len(vals) != 2 * len(grid):
        raise BoxError(
            f"{what}: box {list(values)!r} has {len(vals)} numbers, expected {2 * len(grid)} for grid {grid}"
        )
    if not all(math.isfinite(v) for v in vals):
        raise BoxError(f"{what}: box {list(values)!r} has a non-finite number")
    return vals


def _round_half_up(value: float) -> int:
    # Python's round() is round-half-to-even; half-up keeps encode deterministic and monotonic.
    return math.floor(value + 0.5)


class BoxCodec(ABC):
    """Turns a text-grid box (floats) into the integers a model family writes, and back."""

    name: str

    @abstractmethod
    def encode(self, box: Sequence[float], grid_shape: Sequence[int]) -> tuple[int, ...]:
        """Round to the codec's integers and clip to the grid. Raises BoxError on a malformed box."""

    @abstractmethod
    def decode(self, values: Sequence[float], grid_shape: Sequence[int]) -> tuple[float, ...]:
        """Model numbers (ints, or floats a model wrote) → text-grid units. No clipping, no reordering."""

    @abstractmethod
    def step(self, grid_shape: Sequence[int]) -> tuple[float, ...]:
        """Text-grid units per integer step, per axis (x, y[, z]): the round trip is exact up to half of it."""

    @abstractmethod
    def describe(self, ndim: int) -> str:
        """One prompt sentence that tells the model what the numbers mean."""

    def _validate_box(
        self, box: Sequence[float], grid_shape: Sequence[int]
    ) -> tuple[tuple[int, ...], tuple[float, ...]]:
        grid = _check_grid(grid_shape, f"{self.name} codec")
        vals = _check_values(box, grid, f"{self.name} codec")
        n = len(grid)
        for axis in range(n):
            if vals[axis] > vals[axis + n]:
                raise BoxError(
                    f"{self.name} codec: box {list(box)!r} is inverted on axis {_AXIS_NAMES[axis]} "
                    f"({vals[axis]} > {vals[axis + n]})"
                )
        return grid, vals


@dataclass(frozen=True)
class AbsolutePixelCodec(BoxCodec):
    """Qwen2.5-VL: absolute integer pixels (and slice indices) of the grid the model sees."""

    name: str = "qwen2.5-vl"

    def encode(self, box: Sequence[float], grid_shape: Sequence[int]) -> tuple[int, ...]:
        grid, vals = self._validate_box(box, grid_shape)
        n = len(grid)
        return tuple(min(max(_round_half_up(v), 0), grid[i % n]) for i, v in enumerate(vals))

    def decode(self, values: Sequence[float], grid_shape: Sequence[int]) -> tuple[float, ...]:
        grid = _check_grid(grid_shape, f"{self.name} codec")
        return _check_values(values, grid, f"{self.name} codec")

    def step(self, grid_shape: Sequence[int]) -> tuple[float, ...]:
        return tuple(1.0 for _ in _check_grid(grid_shape, f"{self.name} codec"))

    def describe(self, ndim: int) -> str:
        if ndim == 2:
            return (
                "Coordinates are integer pixel positions in the image as shown: x counts columns from the left "
                "edge, y counts rows from the top edge, and x2, y2 lie one past the region's last column and row."
            )
        return (
            "Coordinates are integers: x counts pixel columns from the left edge, y counts pixel rows from the top "
            "edge, z is the slice index, and x2, y2, z2 lie one past the region's last column, row and slice."
        )


@dataclass(frozen=True)
class NormalizedCodec(BoxCodec):
    """Qwen2-VL: integers from 0 to ``scale`` (1000), proportional to the grid size on each axis."""

    scale: int = 1000
    name: str = "qwen2-vl"

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, int) or self.scale <= 0:
            raise ConfigError(f"NormalizedCodec scale must be a positive integer, got {self.scale!r}")

    def encode(self, box: Sequence[float], grid_shape: Sequence[int]) -> tuple[int, ...]:
        grid, vals = self._validate_box(box, grid_shape)
        n = len(grid)
        return tuple(
            min(max(_round_half_up(v / grid[i % n] * self.scale), 0), self.scale) for i, v in enumerate(vals)
        )

    def decode(self, values: Sequence[float], grid_shape: Sequence[int]) -> tuple[float, ...]:
        grid = _check_grid(grid_shape, f"{self.name} codec")
        vals = _check_values(values, grid, f"{self.name} codec")
        n = len(grid)
        return tuple(v * grid[i % n] / self.scale for i, v in enumerate(vals))

    def step(self, grid_shape: Sequence[int]) -> tuple[float, ...]:
        return tuple(size / self.scale for size in _check_grid(grid_shape, f"{self.name} codec"))

    def describe(self, ndim: int) -> str:
        axes = (
            "x across the image width and y down its height"
            if ndim == 2
            else ("x across the image width, y down its height and z through the slices")
        )
        return f"Coordinates are integers from 0 to {self.scale}: {axes}, scaled so that {self.scale} is the far edge."


_CODECS: dict[str, Callable[[], BoxCodec]] = {
    "qwen2.5-vl": AbsolutePixelCodec,
    "qwen2_5_vl": AbsolutePixelCodec,  # the Hugging Face config's model_type
    "qwen2-vl": NormalizedCodec,
    "qwen2_vl": NormalizedCodec,
}


def get_codec(name: str) -> BoxCodec:
    """Codec by model family: ``"qwen2.5-vl"`` (absolute pixels) or ``"qwen2-vl"`` (0–1000); HF model_types work too."""
    factory = _CODECS.get(str(name).strip().lower())
    if factory is None:
        raise ConfigError(f"unknown box codec {name!r}; known: {sorted(_CODECS)}")
    return factory()
