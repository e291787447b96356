"""Exceptions raised by the engine. Every message names the file or case and the problem."""

from __future__ import annotations


class MRNError(Exception):
    """Base class of all engine errors (the CLI prints these without a traceback)."""


class InputDataError(MRNError, ValueError):
    """A user-supplied file or folder is missing, unreadable or inconsistent."""


class ConfigError(MRNError, ValueError):
    """A configuration value or preset is invalid."""


class WeightsError(MRNError, ValueError):
    """A weights/checkpoint file is missing, truncated or belongs to another model."""


class MRNWarning(UserWarning):
    """Warnings about suspicious but usable input (e.g. duplicated cases)."""
