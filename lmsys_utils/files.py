"""Output paths: checked before the work starts, locked while a run uses them, written so that a failure
never leaves a half-written file or destroys one the user did not ask to replace."""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import socket
import stat
import sys
import tempfile
import time
from pathlib import Path

from .data import LABEL_COLUMNS

SUBMISSION_HEADER = ",".join(("id", *LABEL_COLUMNS))
RUN_FILES = ("adapter", "checkpoints", "history.json", "config.json", "oof.csv")  # what a training run writes
LOCK_NAME = ".lock"
TMP_PREFIX = ".tmp-"  # unfinished checkpoint writes (train.save_checkpoint)


class OutputError(ValueError):
    """An output path that cannot or must not be written; the message names it and the fix. Nothing was written."""


class RunLockedError(OutputError):
    """Another run holds the output_dir."""


def check_output_file(path, inputs=(), kind: str | None = "submission") -> Path:
    """Refuse, before any work, an output file that cannot or must not be written.

    Refused: a directory; a path that is one of `inputs` (e.g. predict's --data); an existing non-empty file
    that is not of `kind` (for "submission", its first line must be the submission header; None: any existing
    non-empty file); a location that cannot be written (read-only, no permission, a file in the way).
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory; give a file path such as {path / 'submission.csv'}")
    for source in inputs:
        if source is not None and _same_file(path, source):
            raise OutputError(f"{path} is also an input ({source}); writing there would destroy it. "
                              "Choose another output path.")
    if path.is_file() and path.stat().st_size > 0:
        first = _first_line(path)
        if kind != "submission" or first != SUBMISSION_HEADER:
            what = "a submission" if kind == "submission" else "to be replaced"
            raise OutputError(f"{path} exists and is not {what} (its first line is {first[:60]!r}); choose another "
                              "output path, or move the file away if it may be replaced")
    check_writable(path.parent)
    return path


def check_output_dir(path, resume: bool = False, overwrite: bool = False) -> Path:
    """Refuse, before any work, an output folder that cannot be used.

    Refused: a file where the folder should be; a folder that holds another run (adapter, checkpoints,
    history.json or config.json) unless `resume` (continue it) or `overwrite` (replace it); both flags at once;
    a location that cannot be written.
    """
    path = Path(path)
    if resume and overwrite:
        raise OutputError("resume=true and overwrite=true contradict each other: resume continues the run in "
                          f"{path}, overwrite replaces it; set only one")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path} is a file, but a folder is needed there; choose another output folder")
    found = sorted(p.name for p in path.iterdir() if p.name in RUN_FILES) if path.is_dir() else []
    if found and not (resume or overwrite):
        raise OutputError(f"{path} holds another run ({', '.join(found)}); set resume=true to continue it, "
                          "overwrite=true to replace it, or choose another output_dir")
    check_writable(path)
    return path


def check_writable(folder) -> Path:
    """Refuse a folder that cannot be created or written, by creating (and removing) a file in it or in its
    nearest existing parent: this finds a read-only mount, a full quota's refusal or missing permission the
    same way the real write would."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        if existing == folder:
            raise OutputError(f"{folder} is a file, but a folder is needed there; choose another output folder")
        raise OutputError(f"{existing} is a file, so the folder {folder} cannot be created there")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise OutputError(f"cannot write to {folder} ({e.strerror}); choose a writable location "
                          "(on Kaggle: under /kaggle/working)") from None
    return folder


def _same_file(a: Path, b) -> bool:
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _first_line(path: Path) -> str:
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        return f.readline(4096).rstrip("\r\n")


@contextlib.contextmanager
def atomic_write(path, mode: str = "w", **open_kwargs):
    """Open a temporary file next to `path`; rename it over `path` when the block ends without an error.

    Readers see the old file or the new one, never a half-written one; on any error the temporary file is
    removed and an existing `path` is untouched. The new file gets the usual permissions (0666 less the umask,
    e.g. 0644), not mkstemp's 0600; a replaced file keeps its mode. An OSError that names no file (ENOSPC from a
    write) is raised again naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old_mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else None
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
            break
        except FileExistsError:
            continue
    else:
        raise OutputError(f"cannot find a free temporary name next to {path}")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        if old_mode is not None:
            os.chmod(tmp, old_mode)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


class RunLock:
    """An exclusive lock on an output_dir for the length of one run: `with RunLock(output_dir): ...`.

    A second run into the same folder is refused (RunLockedError naming the pid and host that hold it) instead
    of the two corrupting each other's checkpoints. The lock is fcntl.flock on `output_dir/.lock`: the OS
    releases it when the process ends, however it ends, so a crashed run never leaves a stale lock. Where the
    file system has no locks (some network mounts) a warning says so and the run goes on unlocked.
    """

    def __init__(self, output_dir):
        self.path = Path(output_dir) / LOCK_NAME
        self._file = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process that has not written its id yet"
            f.close()
            raise RunLockedError(f"{self.path.parent} is in use by another run ({holder}); wait for it to end, "
                                 "or give this run another output_dir") from None
        except OSError as e:
            f.close()
            print(f"warning: cannot lock {self.path} ({e.strerror}); make sure no other run writes to "
                  f"{self.path.parent}", file=sys.stderr)
            return self
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            # the file stays: removing it would let a waiting run lock a file that a third run then recreates
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def clean_stale_tmp(ckpt_dir) -> int:
    """Remove the `.tmp-*` leftovers of checkpoint writes that failed (disk full, killed); say how many.

    Call it while holding the run's RunLock: only then can no other live run be writing one.
    """
    ckpt_dir = Path(ckpt_dir)
    stale = sorted(ckpt_dir.glob(f"{TMP_PREFIX}*")) if ckpt_dir.is_dir() else []
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    if stale:
        print(f"removed {len(stale)} unfinished checkpoint write(s) from {ckpt_dir}: "
              f"{', '.join(p.name for p in stale)}", file=sys.stderr)
    return len(stale)
