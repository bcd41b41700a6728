"""Where a run writes, and what may ever be deleted: a run's folder is `output_dir/name`, always strictly inside
`output_dir`, and `train.overwrite` empties only a folder that loralab itself made for a run (it holds MARKER).

A lock beside the folder (`output_dir/.name.lock`, held with flock) keeps a second process out while a run
trains; the kernel drops it when its holder dies, so a killed run's lock is simply taken over.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from loralab.errors import LoralabError

MARKER = ".loralab-run"  # written into every run folder loralab creates


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
    if not folder.exists():
        return
    if folder.is_symlink() or not folder.is_dir() or not is_run_folder(folder):
        raise LoralabError("train.overwrite only replaces a folder that loralab made for a run, and this one is "
                           f"not (it has no {MARKER} file)", file=str(folder),
                           fix="choose another name, or move the folder away yourself")
    for entry in folder.iterdir():
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
        self.path = folder.parent / f".{folder.name}.lock"
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "another process"
            os.close(fd)
            raise LoralabError(f"another loralab process (pid {holder}) is training into this run folder",
                               file=str(self.path.parent / self.path.name[1:-5]),
                               fix="wait for it to finish, stop it, or choose another name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing releases the flock; the file stays (unlinking it would race a newcomer)
            self.fd = None
