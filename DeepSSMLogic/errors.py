"""The project's exception hierarchy. Messages are written for the person who must act on them."""

from __future__ import annotations

from collections.abc import Iterable


class DeepSSMError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(DeepSSMError):
    """A file, array or parameter given by the user is not what was expected."""


class ValidationError(InputError):
    """Several problems found in one validation pass; ``problems`` lists each one."""

    def __init__(self, title: str, problems: Iterable[str]):
        self.title = title
        self.problems = list(problems)
        body = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{title} ({len(self.problems)} problem(s)):\n{body}")


class BundleError(DeepSSMError):
    """A model bundle is missing files, tampered with, or from an unsupported schema."""


class CancelledError(DeepSSMError):
    """A long operation was cancelled through its ``CancelToken``."""


class OutputExistsError(DeepSSMError):
    """An output location holds something this command did not write; it is left untouched.

    ``path`` is the location, ``found`` says what is there (for the message).
    """

    def __init__(self, path: object, found: str, advice: str):
        self.path = path
        self.found = found
        super().__init__(f"{path}: {found}; {advice}")


class OutputPathError(DeepSSMError):
    """An output location cannot be written at all (its parent is a file, no permission, ...)."""


class DiskFullError(DeepSSMError):
    """Not enough free space for a write, found before it (an estimate) or during it (ENOSPC).

    ``path`` is what was (to be) written, ``needed`` and ``free`` are bytes (``needed`` None when
    the write failed before its size was known).
    """

    def __init__(self, path: object, needed: int | None, free: int | None, detail: str = ""):
        self.path, self.needed, self.free = path, needed, free
        need = "" if needed is None else f"needs about {format_bytes(needed)}, "
        have = "free space unknown" if free is None else f"{format_bytes(free)} free"
        super().__init__(
            f"{path}: not enough disk space ({need}{have}){detail}; free some space or choose "
            "another output location (the work done so far is kept where it can be resumed)"
        )


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: a size for people."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


class IntensityRangeWarning(UserWarning):
    """An image's intensities lie far outside the range the model was trained on."""
