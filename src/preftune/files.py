"""Files written atomically: a reader (or `--resume` after a kill) never sees half a file. No torch here, so the
report and audit commands stay quick to start. Whole folders: `checkpoint.write_atomically`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_file_atomically(path: Path, data: bytes | str) -> None:
    """Write a file under a temporary name in its folder, then rename it: a reader (or --resume after a kill)
    never sees half a file, and a failed write leaves the old one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
