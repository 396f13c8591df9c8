"""Every error a user can cause, in one place. The `lewm` command prints any of them as one line
(`lewm CMD: error: ...`) with exit code 2; the Python API raises them as they are.

    UserError        anything the user got wrong: a flag, a path, a missing package
    DataError        an HDF5 data set that is unusable (the message names the file and the column)
    ConfigError      a config value out of range (`field` is the dotted name, "train.val_frac")
    CheckpointError  a checkpoint that is missing, truncated, edited or of another format version
    ConvertError     a reference checkpoint that does not fit our model (lewm/convert.py)
    WorkerError      an episode failed in a collection worker (lewm/data/collect.py)
"""
from __future__ import annotations

import importlib


class UserError(Exception):
    """Raised for anything the user got wrong; printed as one line, exit code 2."""


class DataError(ValueError):
    """A data set the user gave is unusable; the message names the file and the column."""


class ConfigError(ValueError):
    """A config value out of range (or of the wrong type). `field` is the dotted name
    ("train.val_frac"); the `lewm` command prints the message as one line with exit code 2."""

    def __init__(self, field: str, message: str):
        super().__init__(message if field in message else f"{field}: {message}")
        self.field, self.message = field, message


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """The checkpoint path, or one of the files a checkpoint must hold, does not exist."""


class ConvertError(UserError, ValueError):
    """A reference checkpoint that does not fit; the message names the file and what does not fit."""


class WorkerError(UserError):
    """An episode failed in a collection worker (or in-process); the message carries its error."""


# what the command line turns into one line and exit code 2
USER_ERRORS = (UserError, DataError, ConfigError, FileNotFoundError)


def require(module: str, extra: str, feature: str, package: str | None = None):
    """Import an optional dependency, or raise one UserError naming the extra that installs it:
    require("imageio_ffmpeg", "video", "writing MP4")."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pkg = package or module.split(".")[0].replace("_", "-")
        raise UserError(f"{feature} needs the package '{pkg}', which is not installed ({e}); "
                        f"install it with: pip install 'lewm[{extra}]' (or pip install -e '.[{extra}]' "
                        "in a clone)") from None
