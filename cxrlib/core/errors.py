"""The errors a user meets before any work starts: a parameter file that is invalid, and a
run folder that cannot be used as asked. Both messages name the file or folder and say what to
do; the command line prints them without a traceback."""

from __future__ import annotations


class ParamsError(ValueError):
    """A parameter file is invalid; the message names the file and the key."""


class RunFolderError(ParamsError):
    """A run folder cannot be used as asked: another process writes into it, or files of it
    fail verification; the message names what and says what to do."""
