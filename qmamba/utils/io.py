"""Small file helpers with clear errors: atomic writes (temp file beside the target + rename, so a
reader never sees half a file) and reads of user-given text and JSON files that fail with one
`QMambaError` line instead of a traceback."""

from __future__ import annotations

import hashlib

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import QMambaError


def atomic_write_text(path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically, creating missing parent folders."""
    path = Path(path)
    if path.is_dir():
        raise QMambaError(f"cannot write {path}: it is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise QMambaError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())          # mkstemp makes 0600; a plain open() would not
        os.replace(tmp, path)
    except OSError as e:                            # disk full, target became a folder, ...
        Path(tmp).unlink(missing_ok=True)
        raise QMambaError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def umask() -> int:
    """The process's umask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output(path, flag: str, folder: bool = False, force: bool = False) -> Path:
    """Before any long work: QMambaError unless `path` can be written as an output (a file, or
    with `folder` a folder that must not exist unless `force`). Missing parent folders are fine
    (the writers create them) when the nearest existing one is a folder we can create files in;
    that is tried for real (a probe file, removed at once), since permission bits say nothing
    to root and nothing about read-only mounts. Leaves nothing behind."""
    path = Path(path).expanduser()
    name = f"{flag} {path}"
    if path.exists() or path.is_symlink():
        if folder and not path.is_dir():
            raise QMambaError(f"{name} is a file, not a folder")
        if folder and not force:
            raise QMambaError(f"output folder {path} already exists (pass --force to replace it)")
        if not folder and path.is_dir():
            raise QMambaError(f"{name} is a folder; give a file name")
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise QMambaError(f"cannot write {name}: {parent} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".qmamba-write-test-", dir=parent)
    except OSError as e:
        raise QMambaError(f"cannot write {name}: cannot create files in {parent} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)
    return path


def _finite(obj: Any) -> Any:
    """Non-finite floats as the strings "Infinity", "-Infinity", "NaN" (strict JSON has none)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def atomic_write_json(path, obj: Any) -> Path:
    """Write `obj` as strict, indented JSON to `path` atomically."""
    return atomic_write_text(path, json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n")


def read_text(path, what: str = "text file") -> str:
    """The whole file decoded as UTF-8 (a leading BOM is dropped). Missing files, folders and
    bytes that are not UTF-8 raise QMambaError naming `what` and the path."""
    path = Path(path)
    if not path.exists():
        raise QMambaError(f"{what} {path} does not exist")
    if path.is_dir():
        raise QMambaError(f"{what} {path} is a folder, not a file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise QMambaError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise QMambaError(f"{what} {path} is not UTF-8 text (invalid byte at offset {e.start})") from None


def read_json(path, what: str = "JSON file") -> dict:
    """A JSON object from `path` (bare Infinity/NaN accepted, as transformers 4.x writes them)."""
    text = read_text(path, what)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise QMambaError(f"{what} {path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(obj, dict):
        raise QMambaError(f"{what} {path} must hold a JSON object, not {type(obj).__name__}")
    return obj


def sha256_file(path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
