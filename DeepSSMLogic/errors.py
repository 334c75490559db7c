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
