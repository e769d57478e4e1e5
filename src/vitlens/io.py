"""Atomic file writes: write to a temporary name in the same folder, then rename."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import VitlensError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: str | os.PathLike) -> None:
    """Give a temporary file or directory the permissions a normal create would (mkstemp uses 0600/0700)."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~_umask())


def check_output_dir(path: str | os.PathLike, what: str = "output directory", create: bool = True) -> Path:
    """Refuse, before any work is done, an output directory that cannot be used.

    With ``create`` the directory is made and a probe file written in it; without, ``path`` must not be
    a file and its nearest existing ancestor must be a writable directory.
    """
    if not os.fspath(path).strip():
        raise VitlensError(f"{what} is empty; give a folder name")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise VitlensError(f"{what} {path} exists and is not a directory")
    if not create:
        base = path.absolute()
        while not base.exists() and base != base.parent:
            base = base.parent
        if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
            raise VitlensError(f"{what} {path} cannot be created: {base} is not a writable directory")
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".vitlens-probe.", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise VitlensError(f"{what} {path} cannot be written ({e.strerror or e})") from e
    return path


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Refuse, before any work is done, an output file path that is a directory or cannot be written."""
    if not os.fspath(path).strip():
        raise VitlensError(f"{what} is empty; give a file name")
    path = Path(path)
    if path.is_dir():
        raise VitlensError(f"{what} {path} is a directory; give a file name")
    check_output_dir(path.parent, what=f"{what} {path}: folder")
    return path


def _claim_tmp(path: Path) -> tuple[int, str]:
    """An open, locked temporary file beside ``path``: ``.NAME.tmp``, or a random name while another writer
    holds that one.

    A writer killed mid-write (even ``kill -9``) leaves ``.NAME.tmp`` behind unlocked; the next writer of
    ``path`` takes it over, so stale temporaries do not pile up.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    for _ in range(3):
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another live writer of the same file
            os.close(fd)
            break
        try:
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:  # not renamed away by the writer we waited on
                os.ftruncate(fd, 0)
                return fd, str(tmp)
        except FileNotFoundError:
            pass
        os.close(fd)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    return fd, name


def is_results_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a ``vitlens evaluate --out`` results file (JSON with ``results`` and ``model``)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and isinstance(data.get("results"), dict) and "model" in data


def is_html_page(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like an HTML page (what ``vitlens report`` writes)."""
    try:
        with open(path, "rb") as f:
            return f.read(64).lstrip().lower().startswith((b"<!doctype html", b"<html"))
    except OSError:
        return False


def check_replaceable(path: str | os.PathLike, what: str, kind: str, looks_like: Callable[[Path], bool]) -> None:
    """Refuse to replace an existing, non-empty file at ``path`` unless it ``looks_like`` an output of ``kind``.

    An output path mistyped onto a model's ``config.json`` or a README is refused, not overwritten.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size > 0 and not looks_like(path):
        raise VitlensError(f"{what} {path} exists and is not {kind}; remove it or give another name")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the result onto ``path``; never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _claim_tmp(path)
    try:
        write(tmp)
        _publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        os.close(fd)  # the lock goes with it, after the rename
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, obj: object) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_npy(path: str | os.PathLike, array) -> Path:
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    return atomic_write(path, write)


def atomic_replace_dir(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Fill a fresh temporary directory, then swap it in place of ``path`` (old content removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        fill(tmp)
        _publish_mode(tmp)
        for f in tmp.iterdir():
            _publish_mode(f)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
