"""Typed errors. The CLI prints any `EspmedError` as one line and exits non-zero.

Torch-free so that the device runtime can raise and catch them.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class EspmedError(Exception):
    """Base class: a problem with the user's input, files or environment (not a bug)."""


class CheckpointError(EspmedError):
    """A checkpoint is missing, unreadable, tampered with or does not match the model."""


class ModalityError(EspmedError, ValueError):
    """An unknown modality, or one the model has no controller for."""


class PromptError(EspmedError, ValueError):
    """Box prompts that are malformed, do not match the inputs, or go to a model without a box path."""


class ImageReadError(EspmedError):
    """An input image/volume cannot be read or is not a usable image."""


class ArtifactError(EspmedError):
    """An exported artifact is missing, corrupt, mismatched or cannot run here."""


class ExportError(EspmedError):
    """An export failed (including an INT8 accuracy gate that could not be met)."""


class BackendUnavailableError(EspmedError):
    """A backend's library or hardware is not present on this machine."""


class UsageError(EspmedError):
    """Options that cannot go together, or that an input cannot honour (e.g. `--format nifti` for a PNG)."""


class ConfigError(EspmedError):
    """A run config file is missing, unparsable or has invalid values."""


class DatasetSpecError(EspmedError):
    """A dataset table in a config is incomplete or inconsistent."""


class TimeLimitError(EspmedError):
    """`[train] max_minutes` was reached before the step count: the run is saved, not finished."""


class SpoolFull(EspmedError):
    """An instance would break a spool limit or the disk-free floor: refuse it, keep the rest."""


def first_line(exc: BaseException, *, with_type: bool = False) -> str:
    """The first non-blank line of an exception's message, or its type name when it has none.

    Library errors often carry pages of context; one line is what a user should see. With
    `with_type`, the message is prefixed by the exception's type (``ValueError: ...``).
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return f"{type(exc).__name__}: {lines[0]}" if with_type else lines[0]


def require(module: str, extra: str, *, hint: str = "") -> ModuleType:
    """`module`, imported; if it is not installed, a `BackendUnavailableError` naming the pip extra
    that installs it (one line, as the CLI prints it), e.g. ``torch is not installed (pip install
    'espmed[export]')``. `hint` is appended inside the parentheses."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BackendUnavailableError(
            f"{module.split('.')[0]} is not installed (pip install 'espmed[{extra}]'{hint})"
        ) from None
