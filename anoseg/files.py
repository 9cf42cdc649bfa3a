"""Writing files so that a reader (or a crash) never sees half of one: the one atomic-write helper."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

#: rw-r--r--: mkstemp makes owner-only files; run and model folders are meant to be shared.
FILE_MODE = 0o644


def write_atomic(path: str | Path, write: Callable[[BinaryIO], Any] | Callable[[str], Any], *,
                 by_name: bool = False) -> Path:
    """Write `path` through a temporary file in its folder, then rename it into place.

    `write(fh)` gets the open binary file; with `by_name`, `write(tmp_path)` gets the temporary
    file's name instead (for writers that open the file themselves: safetensors, torch.save,
    pandas). The folder is created; on any error the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        if by_name:
            os.close(fd)
            write(tmp)
        else:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda fh: fh.write(text.encode()))


def write_json_atomic(path: str | Path, payload: Any, indent: int | None = 2) -> Path:
    """JSON with numpy / torch scalars as numbers, NaN and infinities as null, anything else as text."""
    text = json.dumps(_finite(payload), indent=indent, default=_json_default, allow_nan=False)
    return write_text_atomic(path, text + "\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return _finite(value.item())
    return str(value)


def _finite(value: Any) -> Any:
    """NaN / inf -> None, recursively (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
