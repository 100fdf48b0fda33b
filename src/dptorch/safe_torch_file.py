"""Torch files written atomically and read without unpickling code.

Used by :mod:`dptorch.checkpoint`: what is saved is checked to be readable by
``torch.load(weights_only=True)``, written with a temp-file + fsync + ``os.replace`` dance,
and read back with ``weights_only=True`` only.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dptorch.errors import DPTypeError, DPValueError

__all__ = ["atomic_save", "check_weights_only", "load_weights_only"]

# Leaves that torch.load(weights_only=True) reads back.
_LEAVES = (type(None), bool, int, float, complex, str, bytes, Tensor, torch.Size, torch.dtype)


def check_weights_only(value: Any, where: str) -> None:
    """Refuse any part of ``value`` that ``torch.load(weights_only=True)`` could not read.

    Checked before writing, so that no file is written that could not be loaded.

    Raises:
        DPTypeError: a part of ``value`` is not a tensor, number, string, dtype, size, or a
            list/tuple/set/dict of them; ``where`` names the whole.
    """
    if isinstance(value, Mapping):
        for key, item in value.items():
            check_weights_only(key, f"{where} key {key!r}")
            check_weights_only(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple | set) and not isinstance(value, torch.Size):
        for index, item in enumerate(value):
            check_weights_only(item, f"{where}[{index}]")
    elif not isinstance(value, _LEAVES):
        raise DPTypeError(
            f"{where} is a {type(value).__name__}, which torch.load(weights_only=True) cannot "
            "read back. Checkpoints hold only tensors, numbers, strings and lists/tuples/"
            "dicts of them; convert it (e.g. to a float or a tensor) before saving."
        )


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` so that a crash leaves the old file or the new one.

    The data goes to a temporary file in the same directory, is flushed and fsynced, then
    renamed over ``path`` (``os.replace`` is atomic within a filesystem); on any error the
    temporary file is removed and the error re-raised.
    """
    directory = path.parent if str(path.parent) else Path(".")
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename has still happened
    finally:
        os.close(handle)


def load_weights_only(path: Path, map_location: str | torch.device | None) -> Any:
    """``torch.load(path, weights_only=True)``; what it refuses becomes a DPValueError.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DPValueError: the file is unreadable or holds anything but tensors and plain
            containers (a pickled object could run code when loaded).
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:
        raise DPValueError(
            f"{str(path)!r} could not be read with torch.load(weights_only=True), which "
            f"refuses anything but tensors and plain containers: {error}. Only resume from "
            "checkpoints written by dptorch's save_checkpoint."
        ) from error
