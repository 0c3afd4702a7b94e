"""gclip's exceptions: each message is one line that says what is wrong and what to do."""

from __future__ import annotations


class GclipError(Exception):
    """Base class: the CLI prints ``gclip: error: <message>`` and exits with code 2."""


class WeightsError(GclipError):
    """A model name, pretrained tag or checkpoint file cannot be used."""


class ImageError(GclipError):
    """An input image cannot be read or decoded."""


class ClassesError(GclipError):
    """A class list is empty, duplicated or unreadable."""


class ConfigError(GclipError):
    """An option has a value that cannot work (unknown method, bad window size, ...)."""


class OutputError(GclipError, OSError):
    """An output cannot be written (the folder is a file or read-only, the disk is full, ...).

    Also an :class:`OSError` (with the original ``errno``), so code that tolerates failed writes keeps doing so.
    """
