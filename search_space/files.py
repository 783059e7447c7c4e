"""Files every package writes or reads the same way: atomic writes, YAML read safely with one-line errors, and the
cache folder that shared latency tables and supernets live in."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import yaml

_UMASK = os.umask(0)
os.umask(_UMASK)

HOME_VARIABLE = "SHUFFLENAS_HOME"  # where shared latency tables and supernets live, as TORCH_HOME is for torch


def cache_home() -> Path:
    """$SHUFFLENAS_HOME, else $XDG_CACHE_HOME/shufflenas, else ~/.cache/shufflenas (never inside site-packages)."""
    if os.environ.get(HOME_VARIABLE):
        return Path(os.environ[HOME_VARIABLE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "shufflenas"


def atomic_write(path: str | Path, write: Callable[[IO], Any], mode: str = "w") -> None:
    """Write through `write(file)` to a temporary file beside `path`, flushed to disk, then renamed over `path`.

    A crash leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, newline="" if "b" not in mode else None) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_yaml(path: str | Path, error: type[ValueError], what: str) -> Any:
    """`yaml.safe_load` of `path` (nothing in the file is executed).

    Args:
        path: the file.
        error: the exception type to raise (e.g. SpaceError, ConfigError).
        what: what the file is, for the message ("space file", "experiment file").

    Raises:
        error: the file cannot be read, or is not valid YAML.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark is not None else ""
        raise error(f"{path}:{where} not valid YAML ({getattr(e, 'problem', None) or e})") from None
