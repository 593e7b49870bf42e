"""One exception hierarchy for everything a user can get wrong.

The command line turns a :class:`FreetumorError` into a one-line message and its exit code; anything
else is a bug and keeps its traceback. Exit codes (README, "Exit codes"):

- 0 success; 1 an internal error (a bug: the traceback is printed);
- 2 a usage or configuration error (an unknown option or key, a value out of range);
- 3 bad input (a missing, unreadable or malformed file; geometry; labels; an organ too small);
- 4 the environment (the hub unreachable, the output folder in use or not writable, too little memory);
- 5 a batch finished, but some of its cases failed;
- 130 interrupted (finished outputs are kept).
"""

from __future__ import annotations

EXIT_USAGE, EXIT_INPUT, EXIT_ENVIRONMENT, EXIT_PARTIAL, EXIT_INTERRUPTED = 2, 3, 4, 5, 130


class FreetumorError(Exception):
    """Base class: a problem with the user's input, configuration or environment.

    Args:
        message: what is wrong, in one sentence.
        hint: what to do about it (optional), appended after the message.
    """

    exit_code = EXIT_ENVIRONMENT

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def __reduce__(self) -> tuple[object, ...]:  # keeps the hint across processes (a worker's error)
        return _rebuild, (type(self), self.message, self.hint)


def _rebuild(cls: type[FreetumorError], message: str, hint: str | None) -> FreetumorError:
    return cls(message, hint=hint)


class InputError(FreetumorError):
    """A missing, unreadable or malformed input file."""

    exit_code = EXIT_INPUT


class GeometryError(InputError):
    """Image and labels disagree on shape or affine, or a volume is not 3D."""


class LabelError(InputError):
    """Label values outside the scheme, or the requested organ is absent."""


class OrganTooSmallError(FreetumorError):
    """The organ cannot hold a tumor of the requested size."""

    exit_code = EXIT_INPUT


class ConfigError(FreetumorError):
    """An unknown configuration key, a wrong type or an invalid value."""

    exit_code = EXIT_USAGE


class OutputExistsError(FreetumorError):
    """An output file exists and ``--overwrite`` was not given."""


class OutputBusyError(FreetumorError):
    """Another run is writing into the same output folder."""


class OutputError(FreetumorError):
    """An output cannot be written: the disk is full, the place read-only, a name too long."""
