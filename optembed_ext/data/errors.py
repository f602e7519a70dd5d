"""Error types of the data loaders.

Every problem with the user's input (a missing or unreadable raw file, a file with no usable row,
a malformed row under ``strict=True``, a corrupt cache that cannot be rebuilt) is raised as a
subclass of :class:`DataError`, with a one-line message naming the file and what to do. Errors
outside that family coming out of ``preprocess``/``load_dataset`` are bugs.

* :class:`DataFormatError` (also a ``ValueError``): the content of a raw file cannot be used --
  no usable rows, wrong separator, a header without the expected columns, a compressed file that
  cannot be decompressed. ``stats`` holds the line counts gathered before the failure (or ``None``).
* :class:`MalformedRowError` (a ``DataFormatError``): ``strict=True`` and a malformed row;
  ``file``, ``line`` (1-based, counting a header line), ``column`` (1-based or ``None``) and
  ``reason`` name it.
* :class:`DataFileNotFoundError` (also a ``FileNotFoundError``): a raw file is missing.
* :class:`DataUsageError` (also a ``ValueError``): the arguments name no usable data (an unknown
  dataset name, no ``data_dir``).
* :class:`CacheError` (also a ``ValueError``): a cache folder is corrupt or unusable.
"""
from __future__ import annotations

from typing import Any

__all__ = ["DataError", "DataFormatError", "MalformedRowError", "DataFileNotFoundError", "DataUsageError",
           "CacheError"]


class DataError(Exception):
    """Base class of the errors raised for bad input data (raw files or caches)."""


class DataFormatError(DataError, ValueError):
    """A raw file's content cannot be used. ``stats``: the line counts read so far, or ``None``."""

    def __init__(self, message: str, *, file=None, stats: dict[str, Any] | None = None):
        super().__init__(message)
        self.file = None if file is None else str(file)
        self.stats = stats


class MalformedRowError(DataFormatError):
    """A malformed row with ``strict=True``: ``file``, ``line``, ``column`` (1-based or None), ``reason``."""

    def __init__(self, message: str, *, file=None, line: int | None = None, column: int | None = None,
                 reason: str = "", stats: dict[str, Any] | None = None):
        super().__init__(message, file=file, stats=stats)
        self.line = line
        self.column = column
        self.reason = reason


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A raw data file or folder does not exist."""


class DataUsageError(DataError, ValueError):
    """The arguments name no usable data: an unknown dataset name, a missing ``data_dir``."""


class CacheError(DataError, ValueError):
    """A preprocessing cache folder is corrupt, stale or cannot be written."""
