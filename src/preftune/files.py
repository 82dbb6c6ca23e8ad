"""Files written atomically: a reader (or `--resume` after a kill) never sees half a file. No torch here, so the
report and audit commands stay quick to start. Whole folders: `checkpoint.write_atomically`."""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

from preftune.errors import UserError


def fsync(path: Path) -> None:
    """Flush a file or folder to disk (a folder: so that a rename in it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush a folder's files, then the folder itself."""
    for f in path.iterdir():
        fsync(f)
    fsync(path)


def write_file_atomically(path: Path, data: bytes | str) -> None:
    """Write a file under a temporary name in its folder, then rename it: a reader (or --resume after a kill)
    never sees half a file, and a failed write leaves the old one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # Created as `open` creates a file (mode 0666 less the umask), not 0600 as mkstemp's: a run folder shared with
    # other users or served by a web server stays readable.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_json(path: str | Path, obj: Any) -> None:
    """`obj` as indented UTF-8 JSON (NaN and infinities as null, so any JSON reader takes it), written atomically:
    a reader never sees half a file, and a failed write leaves the old one. The `--json` and run-folder files
    (eval.json, audit.json) are written here."""
    try:
        write_file_atomically(
            Path(path), json.dumps(_finite(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        )
    except OSError as e:
        raise UserError(f"--json {path}: cannot write ({e.strerror})") from None


def current_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def give_default_modes(folder: Path) -> None:
    """Files 0666 and folders 0777 less the umask, inside `folder`: some writers (safetensors) create their files 0600,
    which a shared run folder or a web server could not read."""
    mask = current_umask()
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
