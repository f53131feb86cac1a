"""The one error type of the data package, in a module of its own so every reader can raise it."""

from __future__ import annotations


class DataError(ValueError):
    """Data that cannot be read as asked (bad layout, or unusable samples with strict=True)."""
