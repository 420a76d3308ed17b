"""Exceptions raised on invalid user input.

Each message names the file, key or value at fault and states what to do next, so the command
line can print it as a single line without a traceback.
"""


class LasegError(Exception):
    """Base class for errors caused by user input rather than by a bug."""


class DataError(LasegError, ValueError):
    """A data folder, image or mask is missing, unreadable or inconsistent."""


class ConfigError(LasegError, ValueError):
    """A configuration value is invalid or inconsistent with the data or checkpoint."""


class CheckpointError(LasegError, ValueError):
    """A checkpoint is missing, corrupt or does not match the model."""
