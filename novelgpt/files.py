"""Safe file handling shared by the scripts: folder locks, atomic writes, and cleanup after killed runs.

    with FolderLock(out_dir, "training"):                    # one writer per folder; a second one is refused
        atomic_torch_save(state, out_dir / "ckpt.pt")         # the previous ckpt.pt stays until the new one is whole

A lock is fcntl.flock on `<folder>/.lock`, which holds the holders' PIDs for the error message. The kernel
drops a flock when its process dies, so the lock of a killed run is simply taken over. Temporary names
carry the writer's PID (`.<name>.<pid>.tmp`, `.tmp-<name>-<pid>/`) so that two processes never share one,
and `remove_stale_temps` can tell which ones a dead process left behind.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable

from configurator import UserError

LOCK_NAME = ".lock"
# `.tmp-<name>-<pid>` / `.old-<name>-<pid>` folders (prepare.py) and `.<name>.<pid>.tmp` files (atomic writes;
# also `cache-<name>.<pid>.tmp.<ext>`, which derived caches next to a dataset use).
STALE_FOLDER = re.compile(r"^\.(tmp|old)-(.+)-(\d+)$")
STALE_FILE = re.compile(r"^(?:\..+|cache-.+)\.(\d+)\.tmp(?:\.[A-Za-z0-9]+)?$")
RENAME_EXCHANGE = 2  # renameat2 flag (Linux >= 3.15): swap two paths in one step
AT_FDCWD = -100


# the longest name a folder or file we write may have: the usual file-system limit (255 bytes) less the room
# that the temporary names around it add (`.tmp-<name>-<pid>`, `.<name>.<pid>.tmp`)
MAX_NAME_BYTES = 255 - 32


def check_path_names(path: str | Path, option: str) -> Path:
    """Refuse, in one line, a path that the file system would refuse: a NUL byte, or a part too long."""
    text = str(path)
    if "\x00" in text:
        raise UserError(f"{option} holds a NUL byte, which no file name can; give a plain path")
    for part in Path(text).parts:
        size = len(os.fsencode(part))
        if size > MAX_NAME_BYTES:
            raise UserError(f"{option}: the name {part[:40]}... is {size} bytes long; file systems take at most 255 "
                            f"(and the temporary names beside it need room): use a name of at most {MAX_NAME_BYTES} bytes")
    return Path(text)


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (one of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """An advisory lock on a folder: exclusive for a writer, shared for readers (several may read at once).

    A holder that conflicts raises a one-line UserError naming the holders' PIDs; nobody waits."""

    def __init__(self, folder: str | Path, purpose: str, shared: bool = False, create: bool = False):
        self.folder, self.purpose, self.shared, self.create = Path(folder), purpose, shared, create
        self.fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def acquire(self) -> "FolderLock":
        """Take the lock (creating the folder first when `create`)."""
        for _ in range(50):  # the folder can be swapped between open and flock (prepare.py replaces datasets)
            fd = self._open()
            if fd is None:
                continue
            if fd < 0:  # a reader of a folder nobody can write: no writer to keep out, so no lock is needed
                return self
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                holders = read_holders(fd)
                for _ in range(20):  # the holder may have locked but not yet written its PID
                    if holders != "another process":
                        break
                    time.sleep(0.01)
                    holders = read_holders(fd)
                os.close(fd)
                raise UserError(f"{self.folder} is in use by {holders}; wait for it to finish or stop it, "
                                f"then run again") from None
            if self._still_the_folders(fd):
                self.fd = fd
                self._record_holder()
                return self
            os.close(fd)
        raise UserError(f"{self.folder} keeps being replaced by another process; run again when it has finished")

    def _open(self) -> int | None:
        """The lock file's descriptor; None when the folder vanished for a moment (being swapped)."""
        try:
            if self.create:
                self.folder.mkdir(parents=True, exist_ok=True)
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if self.shared else 0)
            return os.open(self.path, flags, 0o644)
        except FileNotFoundError:
            if self.create:
                return None
            raise UserError(f"{self.folder} does not exist") from None
        except OSError as e:
            if self.shared and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                return self._open_read_only()
            raise UserError(f"cannot lock {self.folder} ({e.strerror or e}); is it a folder you can write to?") \
                from None

    def _open_read_only(self) -> int:
        """A reader's lock in a folder it cannot write: the existing lock file opened for reading (flock works on
        it, so a writer that can write there is still kept out), or -1 when there is none (then nobody can
        create one, so no writer can take the folder: prepare.py locks before it replaces a dataset)."""
        try:
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return -1
        except OSError as e:
            raise UserError(f"cannot read {self.folder} ({e.strerror or e})") from None

    def _still_the_folders(self, fd: int) -> bool:
        """Whether the file we locked is still the folder's lock file (not one swapped away meanwhile)."""
        try:
            now, held = os.stat(self.path), os.fstat(fd)
        except FileNotFoundError:
            return False
        return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)

    def _record_holder(self) -> None:
        """Write our PID: an exclusive holder replaces the file, a shared one appends a line (O_APPEND)."""
        line = f"{os.getpid()} {'shared' if self.shared else 'exclusive'} {self.purpose}\n".encode()
        try:
            if not self.shared:
                os.pwrite(self.fd, line, 0)  # then cut what is left of the previous holder's line
                os.ftruncate(self.fd, len(line))
            else:
                os.write(self.fd, line)
        except OSError:
            pass  # the PID only improves the message another process prints; the lock itself holds

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays, so nobody can lock a stale copy of it
            self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_holders(fd: int) -> str:
    """'training (PID 123)' for the live processes named in a lock file.

    An exclusive holder rewrites the file and shared holders append to it, so shared lines, when there
    are any, are newer than the exclusive line: its holder had let go before they could lock."""
    try:
        text = os.pread(fd, 65536, 0).decode("utf-8", "replace")
    except OSError:
        text = ""
    entries = [line.split(" ", 2) for line in text.splitlines()]
    entries = [e for e in entries if len(e) == 3 and e[0].isdigit()]
    if any(mode == "shared" for _, mode, _ in entries):
        entries = [e for e in entries if e[1] == "shared"]
    holders: dict[str, list[str]] = {}
    for pid, _, purpose in entries:
        if pid_alive(int(pid)) and pid not in holders.setdefault(purpose, []):
            holders[purpose].append(pid)
    named = [f"{purpose} (PID {', '.join(pids)})" for purpose, pids in holders.items() if pids]
    return ", ".join(named) or "another process"


def temp_path(path: Path) -> Path:
    """This process's temporary name for `path`, in the same folder so that the final rename is atomic."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through a temporary file, then rename it over `path`; on failure the previous file stays."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        kept = f"; the previous {path.name} is kept" if path.exists() else ""
        raise UserError(f"cannot write {path}: {e.strerror or e}{kept}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` in one step: readers see the old file or the new one, never a part."""
    _write_atomically(Path(path), lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save(obj, path) through a temporary file; disk full is a one-line UserError, the old file stays."""
    import torch  # here, not at the top: prepare.py uses this module and should not pay for importing torch

    def write(f: BinaryIO) -> None:
        recorder = _RecordingFile(f)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            # torch turns a failed write (disk full) into "unexpected pos ..."; give the real reason instead
            if recorder.error is not None:
                raise recorder.error from None
            raise

    _write_atomically(Path(path), write)


class _RecordingFile:
    """A file wrapper that remembers the OSError of a failed write, which torch.save would otherwise hide."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def swap_in_folder(new: Path, target: Path) -> Path:
    """Put folder `new` at `target` (which must exist); returns the path that now holds target's old content.

    On Linux one renameat2(RENAME_EXCHANGE) swaps them, so `target` never stops existing (another process
    locking it always finds a folder). Elsewhere: two renames, the old content going to `.old-<name>-<pid>`."""
    libc = ctypes.CDLL(None, use_errno=True)
    exchange = getattr(libc, "renameat2", None)
    if exchange is not None:
        if exchange(AT_FDCWD, os.fsencode(new), AT_FDCWD, os.fsencode(target), RENAME_EXCHANGE) == 0:
            return new
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(target))
    old = target.parent / f".old-{target.name}-{os.getpid()}"
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    return old


def _unlocked(folder: Path) -> bool:
    """Whether nobody holds the lock of a temporary folder (a live writer keeps its own temp folder locked)."""
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporary files and folders that processes which no longer run left in `folder`.

    A `.old-<name>-<pid>` folder whose `<name>` is missing (a run killed between its two renames) is put
    back instead. Returns the paths removed or restored."""
    folder = Path(folder)
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    done = []
    for entry in entries:
        folder_match, file_match = STALE_FOLDER.match(entry.name), STALE_FILE.match(entry.name)
        if folder_match and entry.is_dir() and not entry.is_symlink():
            pid = int(folder_match.group(3))
            if pid == os.getpid() or pid_alive(pid) or not _unlocked(entry):
                continue
            original = folder / folder_match.group(2)
            if folder_match.group(1) == "old" and not original.exists():
                entry.rename(original)
            else:
                shutil.rmtree(entry, ignore_errors=True)
            done.append(entry)
        elif file_match and entry.is_file():
            pid = int(file_match.group(1))
            if pid != os.getpid() and not pid_alive(pid):
                entry.unlink(missing_ok=True)
                done.append(entry)
    return done
