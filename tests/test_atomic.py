"""Artifacts are written whole, readable by others (umask-respecting mode) and synced to disk."""

from __future__ import annotations

import os
import stat

import pytest

from indexcache import atomic


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)], ids=oct)
def test_written_file_has_the_mode_open_would_give(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        atomic.write_json(tmp_path / "p.json", {"a": 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "p.json").stat().st_mode) == mode


def test_file_and_directory_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", record)
    atomic.write_text(tmp_path / "out.txt", "hello")
    assert (tmp_path / "out.txt").read_text() == "hello"
    assert synced[-1] == str(tmp_path)  # the directory entry, after the rename
    assert any(p.startswith(str(tmp_path / ".out.txt.")) for p in synced[:-1])  # the data, before it


def test_replacing_a_symlink_does_not_write_through_it(tmp_path):
    source = tmp_path / "source.json"
    source.write_text("original")
    link = tmp_path / "link.json"
    link.symlink_to(source)
    atomic.write_text(link, "new")
    assert source.read_text() == "original"
    assert not link.is_symlink() and link.read_text() == "new"
    assert listing(tmp_path) == ["link.json", "source.json"]


def listing(folder):
    return sorted(p.name for p in folder.iterdir())
