"""Files and folders are written whole or not at all: a failed write leaves the old one and no temporary."""

import pytest

from loralab.files import write_folder_atomically


def test_a_folder_replaces_the_old_one_only_once_written_whole(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("earlier")

    def fail_halfway(tmp):
        (tmp / "part.bin").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_folder_atomically(target, fail_halfway)
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind
    write_folder_atomically(target, lambda tmp: (tmp / "new.txt").write_text("now"))
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
