"""One exception hierarchy for everything a user can get wrong.

The command line turns a :class:`FreetumorError` into a one-line message and a non-zero exit code;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FreetumorError(Exception):
    """Base class: a problem with the user's input, configuration or environment.

    Args:
        message: what is wrong, in one sentence.
        hint: what to do about it (optional), appended after the message.
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class InputError(FreetumorError):
    """A missing, unreadable or malformed input file."""

    exit_code = 2


class GeometryError(InputError):
    """Image and labels disagree on shape or affine, or a volume is not 3D."""


class LabelError(InputError):
    """Label values outside the scheme, or the requested organ is absent."""


class OrganTooSmallError(FreetumorError):
    """The organ cannot hold a tumor of the requested size."""


class ConfigError(FreetumorError):
    """An unknown configuration key, a wrong type or an invalid value."""

    exit_code = 2


class OutputExistsError(FreetumorError):
    """An output file exists and ``--overwrite`` was not given."""
