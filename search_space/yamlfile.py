"""Reading a YAML file safely, with one-line errors that name the file (and the line, for syntax errors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


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
