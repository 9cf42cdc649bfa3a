"""User-facing errors: raised for bad input, printed by the CLI without a traceback."""
from __future__ import annotations


class AnosegError(Exception):
    """Base class of every error caused by user input (config, data, weights)."""


class ConfigError(AnosegError, ValueError):
    """A configuration field is missing, unknown or out of range."""


class DataError(AnosegError):
    """The dataset on disk is missing files, unreadable or not in the MVTec AD layout."""


class WeightsError(AnosegError):
    """Backbone weights cannot be found, downloaded or loaded."""


class NotFittedError(AnosegError):
    """A head is asked to score (or export) before it was fitted or given a fitted state."""
