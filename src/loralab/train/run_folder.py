"""Where a run writes, and what may ever be deleted: a run's folder is `output_dir/name`, always strictly inside
`output_dir`, and `train.overwrite` empties only a folder that loralab itself made for a run (it holds MARKER).

A lock inside the folder (LOCK, held with flock) keeps a second process out while a run trains; the kernel drops
it when its holder dies, so a killed run's lock is simply taken over.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

from loralab.errors import LoralabError

MARKER = ".loralab-run"  # written into every run folder loralab creates
LOCK = ".lock"


def run_files(folder: Path) -> list[Path]:
    """What a run folder holds, its lock aside."""
    return [p for p in folder.iterdir() if p.name != LOCK] if folder.is_dir() else []


def check_run_name(name: str, file: str | None = None) -> None:
    """A run name is one plain folder name: no separators, not '.', '..' or empty."""
    if not name or name.strip() != name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise LoralabError(f"{name!r} is not a usable run name", file=file, field="name",
                           fix="use a plain folder name such as my-run (no '/', not '.' or '..'); put the "
                               "parent folder in output_dir")


def run_folder(output_dir: str | Path, name: str) -> Path:
    """The run's folder, resolved; refused if it would land outside output_dir, on it, or on the current folder
    or one of its parents (through a symbolic link, say)."""
    check_run_name(name)
    root = Path(output_dir).resolve()
    folder = (root / name).resolve()
    if folder == root or root not in folder.parents:
        raise LoralabError(f"the run folder {folder} is not inside output_dir {root}", field="name",
                           fix="use a plain run name; a run folder that is a symbolic link must point inside "
                               "output_dir")
    here = Path.cwd().resolve()
    if folder == here or folder in here.parents:
        raise LoralabError(f"the run folder {folder} is the current folder or holds it", field="name",
                           fix="choose another name or output_dir")
    return folder


def is_run_folder(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def empty_run_folder(folder: Path) -> None:
    """Delete what a run folder holds (train.overwrite); anything that is not a loralab run is refused."""
    if not folder.exists() or (not folder.is_symlink() and (folder / LOCK).is_file() and not run_files(folder)):
        return  # nothing there yet but this run's own lock
    if folder.is_symlink() or not folder.is_dir() or not is_run_folder(folder):
        raise LoralabError("train.overwrite only replaces a folder that loralab made for a run, and this one is "
                           f"not (it has no {MARKER} file)", file=str(folder),
                           fix="choose another name, or move the folder away yourself")
    for entry in run_files(folder):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def mark_run_folder(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("a loralab run folder: train.overwrite may replace it\n", encoding="utf-8")


class RunLock:
    """`with RunLock(folder):` — refuse at once if another live process trains into `folder`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / LOCK
        self.fd: int | None = None
        self.made_folder = False

    def __enter__(self) -> RunLock:
        if self.folder.exists() and not self.folder.is_dir():
            raise LoralabError("the run folder's path is a file", file=str(self.folder), fix="choose another name")
        self.made_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "another process"
            os.close(fd)
            raise LoralabError(f"another loralab process (pid {holder}) is training into this run folder",
                               file=str(self.folder), fix="wait for it to finish, stop it, or choose another name"
                               ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        if self.made_folder and not run_files(self.folder):  # a run that never started leaves no trace
            self.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.folder.rmdir()
        os.close(self.fd)  # releases the flock
        self.fd = None
