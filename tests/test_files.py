"""files.py: folder locks, atomic writes, stale temp cleanup, folder swaps, on real files in tmp_path."""
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from novelgpt import files
from configurator import UserError
from novelgpt.files import FolderLock, atomic_torch_save, atomic_write_bytes, remove_stale_temps, swap_in_folder

ROOT = Path(__file__).resolve().parent.parent


def test_one_writer_many_readers(tmp_path):
    folder = tmp_path / "run"
    with FolderLock(folder, "training", create=True):
        with pytest.raises(UserError, match=rf"run is in use by training \(PID {os.getpid()}\); wait"):
            FolderLock(folder, "training").acquire()
        with pytest.raises(UserError, match="in use by training"):
            FolderLock(folder, "evaluate", shared=True).acquire()
    with FolderLock(folder, "training", shared=True), FolderLock(folder, "evaluate", shared=True):
        with pytest.raises(UserError, match=rf"in use by training \(PID {os.getpid()}\), evaluate"):
            FolderLock(folder, "prepare.py").acquire()
    with FolderLock(folder, "prepare.py"):  # free again once the readers are done
        assert (folder / files.LOCK_NAME).read_text() == f"{os.getpid()} exclusive prepare.py\n"
    with pytest.raises(UserError, match="does not exist"):
        FolderLock(tmp_path / "missing", "training").acquire()


HOLDER = """
import sys, time
from novelgpt.files import FolderLock
lock = FolderLock(sys.argv[1], "training").acquire()
print("locked", flush=True)
time.sleep(60)
"""


@pytest.mark.slow
def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    """A process, not this one, holds the lock and is killed -9: the kernel drops its flock."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(UserError, match=rf"in use by training \(PID {holder.pid}\)"):
            FolderLock(tmp_path, "training").acquire()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    with FolderLock(tmp_path, "training"):
        assert (tmp_path / files.LOCK_NAME).read_text() == f"{os.getpid()} exclusive training\n"


def test_swapped_folder_keeps_its_lock(tmp_path, monkeypatch):
    target, new = tmp_path / "n", tmp_path / ".tmp-n-1"
    target.mkdir()
    (target / "meta.json").write_text("old")
    new.mkdir()
    (new / "meta.json").write_text("new")
    for exchange in (True, False):
        if not exchange:  # no renameat2 (not Linux): two renames, the old content set aside as .old-n-<pid>
            monkeypatch.setattr(files.ctypes, "CDLL", lambda *a, **k: object())
        with FolderLock(new, "prepare.py"), FolderLock(target, "prepare.py"):
            previous = swap_in_folder(new, target)
            with pytest.raises(UserError, match="in use by prepare.py"):
                FolderLock(target, "training", shared=True).acquire()
        assert (previous / "meta.json").read_text() == ("old" if exchange else "new")
        assert (target / "meta.json").read_text() == ("new" if exchange else "old")
        if not exchange:
            assert previous.name == f".old-n-{os.getpid()}"
        previous.rename(new)


def test_atomic_writes(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"w": torch.arange(5)}, path)
    assert torch.load(path, weights_only=True)["w"].tolist() == [0, 1, 2, 3, 4]
    atomic_write_bytes(tmp_path / "a.json", b"{}")
    assert (tmp_path / "a.json").read_bytes() == b"{}"
    assert files.temp_path(path) == tmp_path / f".ckpt.pt.{os.getpid()}.tmp"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "ckpt.pt"]
    with pytest.raises(UserError, match="cannot write"):
        atomic_write_bytes(tmp_path / "no-such-folder" / "x", b"1")


def test_disk_full_keeps_the_previous_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"w": torch.zeros(10)}, path)
    before = path.read_bytes()
    # A file-size limit makes writes fail as a full disk does (EFBIG instead of ENOSPC).
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, old_limit[1]))
    try:
        with pytest.raises(UserError, match=r"cannot write .*ckpt.pt: File too large; the previous ckpt.pt is kept"):
            atomic_torch_save({"w": torch.zeros(100_000)}, path)
        with pytest.raises(UserError, match="the previous ckpt.pt is kept"):
            atomic_write_bytes(path, b"x" * 200_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_remove_stale_temps(tmp_path, dead_pid):
    dead, alive = dead_pid, os.getppid()
    for name in (f".tmp-x-{dead}", f".old-y-{dead}", f".old-z-{dead}", f".tmp-w-{alive}", f".tmp-v-{dead}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.bin").write_bytes(b"12")
    (tmp_path / "z").mkdir()  # z exists: its .old- copy is stale; y is missing: its .old- copy is put back
    for name in (f".ckpt.pt.{dead}.tmp", f".ckpt.pt.{alive}.tmp", f"cache-index.{dead}.tmp.npz", f"notes.{dead}.tmp"):
        (tmp_path / name).write_bytes(b"1")
    with FolderLock(tmp_path / f".tmp-v-{dead}", "prepare.py"):  # still locked: in use, whatever its PID says
        removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f".tmp-x-{dead}", f".old-y-{dead}", f".old-z-{dead}",
                                                      f".ckpt.pt.{dead}.tmp", f"cache-index.{dead}.tmp.npz"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
        f".tmp-w-{alive}", f".tmp-v-{dead}", f".ckpt.pt.{alive}.tmp", f"notes.{dead}.tmp", "y", "z"])
    assert (tmp_path / "y" / "train.bin").read_bytes() == b"12" and not any((tmp_path / "z").iterdir())
