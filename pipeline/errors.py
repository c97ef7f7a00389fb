"""The project's own error classes share one base, so the CLI can tell a user's problem from a bug.

The CLI turns :class:`Asym3dError` (and nothing else) into a one-line message naming the file and the reason; any
other exception is a bug in asym3d or a library and keeps its traceback.
"""
from __future__ import annotations


class Asym3dError(Exception):
    """A problem with the user's input, data, settings or environment; the message is one line naming the cause."""


class ConfigError(Asym3dError, ValueError):
    """A setting that cannot work (a non-finite number, a size too small, a device that does not exist). Also a
    ValueError, which is what a library caller passing a bad value expects."""
