"""One run per output: an exclusive lock file that names its holder, shared by ``caption`` and ``pretrain``.

``pretrain`` locks its run folder (``OUTPUT/.lock``), ``caption`` its caption file (``captions.jsonl.lock`` beside it,
:meth:`RunLock.beside`); a second process started on the same output fails at once with one line naming the lock file
and the holder's pid, instead of both writing into the same files.

The lock is an exclusive ``flock`` on the file, which the kernel releases when its holder dies, however it dies (so a
recycled pid never makes a stale lock look alive); the file names the holder (``pid host``). A lock file left by a
process that is gone (``kill -9``, a crashed node) is taken over with a note on stderr. :meth:`RunLock.release` (or
leaving the ``with`` block) removes the file. Within one process the lock is re-entrant: acquiring a lock this
process already holds (the command line takes the caption lock before loading a model, then the library function
takes it again) nests, and only the outermost release removes the file.

Only the standard library: importing this module pulls in no framework.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .errors import Med3DInsightError

__all__ = ["RunLock", "RunLockError", "RunLockedError"]


class RunLockError(Med3DInsightError):
    """A lock file that cannot be created or locked (an unwritable folder, a file system without locks)."""


class RunLockedError(RunLockError):
    """Another live process holds the lock: it is writing the same output."""


_HELD: Dict[str, Tuple[int, int, int]] = {}  # lock path -> (fd, depth, pid) of the locks this process holds


class RunLock:
    """An exclusive lock file ``folder/name`` (default ``folder/.lock``: one pretraining run per run folder).

    Args:
        folder: the folder of the lock file (created if missing).
        name: the lock file's name.
        what: what the lock guards, for the messages (default ``"the run folder FOLDER"``).
        option: the option that chooses the output, named in the fix (default ``-o/--output``).
        tidy: on release, remove again the folders that :meth:`acquire` created, if they are empty then (a failed
            run leaves nothing behind).

    Raises (from :meth:`acquire`):
        RunLockedError: another live process holds the lock; the message names ``what``, the holder's pid and host,
            and the lock file.
        RunLockError: the folder cannot be written or its file system does not support locks.
    """

    def __init__(self, folder, name: str = ".lock", *, what: Optional[str] = None, option: str = "-o/--output",
                 tidy: bool = False):
        self.folder = Path(folder)
        self.path = self.folder / name
        self.what = what or f"the run folder {self.folder}"
        self.option = option
        self.tidy = tidy
        self._fd: Optional[int] = None
        self._created: List[Path] = []

    @classmethod
    def beside(cls, path, *, what: Optional[str] = None, option: str = "-o/--output") -> "RunLock":
        """The lock of one output file ``path``: ``<path>.lock`` in its folder, with ``tidy`` on.

        Args:
            path: the output file (a caption ``.jsonl``, ...).
            what: what the lock guards, for the messages (default ``"the output PATH"``).
            option: the option that chooses ``path``.
        """
        path = Path(path)
        return cls(path.parent, f"{path.name}.lock", what=what or f"the output {path}", option=option, tidy=True)

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> "RunLock":
        import fcntl

        if self._fd is not None:
            return self
        key = os.path.abspath(self.path)
        if key in _HELD and _HELD[key][2] == os.getpid():  # this process holds it already (an outer caller): nest
            fd, depth, pid = _HELD[key]
            _HELD[key] = (fd, depth + 1, pid)
            self._fd = fd
            return self
        me = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(100):  # retried only when the file or its folder was removed between two steps
            try:
                self._make_folder()
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the folder went between mkdir and open (a tidy lock released): again
                continue
            except OSError as e:
                self._remove_created()
                raise self._unwritable(e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLockedError(self._busy(holder)) from None
            except OSError as e:
                os.close(fd)
                self._remove_created()
                raise RunLockError(f"cannot lock {self.path} ({e.strerror or e}): the file system of the output "
                                   f"folder does not support locks; choose another {self.option}") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # its holder removed it after we opened it: lock the new file instead
                os.close(fd)
                continue
            holder = _read_holder(fd)
            if holder:
                print(f"note: taking over the stale lock {self.path} left by process {holder[0]} on {holder[1]}, "
                      f"which no longer runs there", file=sys.stderr)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{me}\n".encode(), 0)
            os.fsync(fd)
            self._fd = fd
            _HELD[key] = (fd, 1, os.getpid())
            return self
        raise RunLockedError(f"{self.what} is being locked and unlocked by other processes ({self.path}); retry "
                             f"later")

    def _make_folder(self) -> None:
        missing = []
        folder = self.folder
        while not folder.exists() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        self.folder.mkdir(parents=True, exist_ok=True)
        self._created += [f for f in missing if f not in self._created]

    def _remove_created(self) -> None:
        if self.tidy:
            for folder in sorted(self._created, key=lambda f: len(f.parts), reverse=True):  # deepest first
                try:
                    folder.rmdir()
                except OSError:  # not empty (the run wrote there), or gone: leave it and its parents
                    break
        self._created = []

    def _unwritable(self, e: OSError) -> RunLockError:
        return RunLockError(f"cannot write to the output folder {self.folder} ({e.strerror or e}); choose another "
                            f"{self.option}")

    def _busy(self, holder) -> str:
        who = f"process {holder[0]} on {holder[1]}" if holder else "another process"
        return (f"{self.what} is in use by {who} ({self.path}); wait for that run to end or stop it, or choose "
                f"another {self.option}")

    def release(self) -> None:
        if self._fd is None:
            return
        key = os.path.abspath(self.path)
        fd, depth, pid = _HELD.get(key, (self._fd, 1, os.getpid()))
        self._fd = None
        if depth > 1:  # an outer holder in this process keeps it
            _HELD[key] = (fd, depth - 1, pid)
            return
        _HELD.pop(key, None)
        try:
            os.unlink(self.path)  # while still holding the flock: the next process locks a fresh file
        except OSError:
            pass
        os.close(fd)
        self._remove_created()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int):
    """(pid, host) written in a lock file, or ``None`` (empty or unreadable)."""
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").split()
        return int(text[0]), (text[1] if len(text) > 1 else "?")
    except (OSError, ValueError, IndexError):
        return None
