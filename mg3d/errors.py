"""Errors raised by mg3d.

Every message names the thing that is wrong (file, line, record id, box) and the problem, so a user
with a million-row manifest can find and fix the one bad item. All derive from :class:`Mg3dError`, and
also from ``ValueError`` so that generic callers that already catch ``ValueError`` keep working.
"""

from __future__ import annotations


class Mg3dError(ValueError):
    """Base class of every error mg3d raises on purpose."""


class BoxError(Mg3dError):
    """A box is malformed: wrong length, non-finite, inverted, or in the wrong frame."""


class DataError(Mg3dError):
    """An input file, manifest line or record is missing, unreadable or inconsistent."""


class SourceError(DataError):
    """A bad input item. ``kind`` is a short stable code used to count skips in ``summary.json``."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


class ConfigError(Mg3dError):
    """A configuration value is invalid or inconsistent with another one."""


class ParseError(Mg3dError):
    """A model completion could not be parsed (only raised by the explicit `*_or_raise` helpers)."""


class BundleError(Mg3dError):
    """A MONAI bundle is incomplete, tampered with, or of the wrong shape."""
