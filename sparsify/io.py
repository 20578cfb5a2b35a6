"""Atomic file writes: every file sparsify writes goes through here, so a failed write never costs the old file.

A write goes to a temporary file in the target's folder (same file system, so the final
``os.replace`` is atomic), is flushed and fsync'ed, and only then renamed over the target; the
folder is fsync'ed after the rename so the new name survives a crash. When anything fails — a
full disk, a file-size limit, an exception in the code producing the bytes — the temporary file
is removed and the previous file at the target path is left exactly as it was.

New files get the permissions an ordinary ``open(path, "w")`` would give (``0o666`` less the
umask); a file that is replaced keeps its permission bits.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> write_text_atomically(folder / "notes.txt", "hello\\n")
    >>> (folder / "notes.txt").read_text()
    'hello\\n'
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import shutil
import stat
from typing import Iterator

__all__ = ["atomic_paths", "write_bytes_atomically", "write_text_atomically"]


def write_bytes_atomically(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: either the whole new content or the old file.

    Example:
        >>> write_bytes_atomically("picture.png", png_bytes)       # doctest: +SKIP
    """
    with atomic_paths(path) as (temporary,):
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)


def write_text_atomically(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` (encoded) atomically.

    Example:
        >>> write_text_atomically("strategy.json", '{"format_version": 1}\\n')   # doctest: +SKIP
    """
    write_bytes_atomically(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike[str]) -> Iterator[tuple[pathlib.Path, ...]]:
    """Temporary paths to write ``paths`` through; they replace the targets when the block succeeds.

    For writers that want a file name (``onnx.save_model``, a library's ``save(path)``), and for
    files that belong together (a model and its external data): the temporary files live in one
    hidden folder next to the first target and keep the targets' base names, so references
    between them (an ONNX model naming ``model.onnx.data``) stay right. All targets must be in
    the same folder. On success each file is fsync'ed and renamed over its target in the given
    order (each rename is atomic; a pair is not replaced as one). On an exception nothing is
    renamed, the temporary folder is removed and the exception propagates.

    Example:
        >>> with atomic_paths("model.onnx") as (temporary,):          # doctest: +SKIP
        ...     onnx.save_model(model, str(temporary))
    """
    if not paths:
        raise ValueError("atomic_paths needs at least one path")
    targets = [pathlib.Path(os.fspath(path)) for path in paths]
    folder = targets[0].parent
    for target in targets:
        if target.parent != folder:
            raise ValueError(f"atomic_paths: {target} is not in {folder}; files written together share a folder")
        if target.is_dir():
            raise IsADirectoryError(f"{target} is a folder; give a file path")
    staging = _make_staging_folder(folder, targets[0].name)
    temporaries = tuple(staging / target.name for target in targets)
    try:
        yield temporaries
        for temporary, target in zip(temporaries, targets):
            if not temporary.exists():
                raise FileNotFoundError(f"nothing was written for {target} (expected {temporary})")
            _sync_file(temporary)
            _copy_mode(target, temporary)
        for temporary, target in zip(temporaries, targets):
            os.replace(temporary, target)
        _sync_folder(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _make_staging_folder(folder: pathlib.Path, name: str) -> pathlib.Path:
    while True:
        staging = folder / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            staging.mkdir()
            return staging
        except FileExistsError:
            continue


def _sync_file(path: pathlib.Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _sync_folder(folder: pathlib.Path) -> None:
    """fsync the folder so the rename is durable (not possible on every platform: best effort)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _copy_mode(target: pathlib.Path, temporary: pathlib.Path) -> None:
    """A replaced file keeps its permission bits; a new one keeps what ``os.open(..., 0o666)`` gave it."""
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        return
    os.chmod(temporary, mode)
