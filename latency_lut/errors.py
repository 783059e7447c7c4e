"""The errors of the latency table: all are ValueErrors, so the command line reports them in one line."""

from __future__ import annotations


class LutError(ValueError):
    """A latency table, its settings or its use is wrong; the message names the file or the value."""


class CorruptTable(LutError):
    """A table file that cannot be read: not JSON, truncated, or missing or mistyped fields."""


class FingerprintMismatch(LutError):
    """The table was measured on another device or with other settings than those in use.

    Attributes:
        differences: one `field: table X, now Y` string per differing field.
    """

    def __init__(self, message: str, differences: list[str]) -> None:
        super().__init__(message)
        self.differences = differences


class MissingEntry(LutError):
    """An op the prediction needs has not been measured.

    Attributes:
        signature: the missing `OpSignature`.
    """

    def __init__(self, message: str, signature: object) -> None:
        super().__init__(message)
        self.signature = signature
