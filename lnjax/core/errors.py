"""The package's exception types, at the bottom layer so that every layer can raise them.

Both derive from ``ValueError``: they report bad input (a file, a row, a field; a checkpoint or config that does
not match), never a bug of lnjax.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint, weights file or model config that is missing, damaged or does not match what it is loaded into."""


class DataError(ValueError):
    """Bad input data; the message names file, row and field."""
