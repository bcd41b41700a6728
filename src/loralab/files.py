"""Files written whole or not at all: beside the target under a temporary name, synced, renamed over it, and the
folder synced, so that a crash or a full disk leaves the old file (or none), never a part of the new one."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def write_atomically(target: Path, write: Callable[[str], object]) -> None:
    """`write(temporary_path)` writes the file's content; it then replaces `target`. A failed write leaves no
    temporary file behind and `target` as it was."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # some writers create 0600 files; give the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)  # gone already once renamed
    sync_folder(target.parent)


def write_text_atomically(target: Path, text: str) -> None:
    write_atomically(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def sync_folder(folder: Path) -> None:
    """A rename is durable once its folder is synced."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    """Sync a folder's files and the folder itself (before renaming it into place)."""
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    sync_folder(folder)


def replace_folder(tmp: Path, target: Path) -> None:
    """Put the finished folder `tmp` in place of `target` (a folder or a file), synced, so `target` is never
    half-written."""
    sync_tree(tmp)
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    os.replace(tmp, target)
    sync_folder(target.parent)


def write_folder_atomically(target: Path, write: Callable[[Path], object]) -> None:
    """`write(temporary_folder)` fills the folder; it then replaces `target`. A failed write leaves no temporary
    folder behind and `target` as it was."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        replace_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
