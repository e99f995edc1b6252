"""Exceptions the engine raises on purpose.

`InputError` carries a one-line message meant for the user (CLI stderr, Slicer dialog);
anything else that escapes the engine is a bug.
"""


class InputError(Exception):
    """Bad input the user can fix: wrong file, empty mask, unusable prior, missing device."""


class Cancelled(Exception):
    """The progress callback returned False."""
