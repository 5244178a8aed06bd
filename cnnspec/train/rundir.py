"""A training run's output directory: created with clear errors, locked by one trainer at a
time, refused when it already holds a run (unless resuming or overwriting), and cleared of the
temporary files an interrupted save leaves behind."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK = ".lock"
RUN_FILES = ("last.npz", "best.npz", "metrics.jsonl", "metrics.csv")
# Written by train --tensorboard; an --overwrite run must not mix its events with the old ones.
RUN_DIRS = ("tensorboard",)
# What save_checkpoint and the metrics rewrite leave behind when killed mid-write.
TMP_PATTERNS = (".last.npz.*.tmp", ".best.npz.*.tmp", "metrics.jsonl.tmp", "metrics.csv.tmp")


class RunDirError(Exception):
    """The output directory cannot be used; the message is meant for the user."""


def os_error_text(e: OSError) -> str:
    """`No space left on device`, not `[Errno 28] No space left on device: '/x/.y.tmp'`."""
    return e.strerror or str(e)


def check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse, before any work, an --out that is not a directory, or one that holds a run
    that neither --resume nor --overwrite was asked for."""
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == out else f"is under {parent}, which is a file"
            raise RunDirError(f"{out}: the output directory {where}; choose another --out")
        if parent.exists():
            break
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other; give one")
    present = [name for name in RUN_FILES if (out / name).exists()]
    if present and not (resume or overwrite):
        raise RunDirError(
            f"{out} already holds a training run ({', '.join(present)}); continue it with "
            "--resume, start it afresh with --overwrite, or choose another --out"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_lock(path: Path) -> tuple[int | None, str]:
    try:
        pid_text, _, host = path.read_text().partition("\n")
        return int(pid_text), host.strip()
    except (OSError, ValueError):
        return None, ""


@contextlib.contextmanager
def locked_run_dir(
    out: Path, resume: bool, overwrite: bool, say: Callable[[str], None]
) -> Iterator[None]:
    """Create ``out``, hold its lock file (our pid) for the run, and tidy what a killed run
    left: its stale lock (taken over, with a message) and its unfinished temporary files."""
    check_run_dir(out, resume, overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _acquire(out / LOCK, say)
    except OSError as e:
        raise RunDirError(f"{out}: cannot write the run there ({os_error_text(e)})") from None
    try:
        removed = 0
        for pattern in TMP_PATTERNS:
            for tmp in out.glob(pattern):
                with contextlib.suppress(OSError):
                    tmp.unlink()
                    removed += 1
        if removed:
            say(f"removed {removed} unfinished file(s) that an interrupted save left in {out}")
        if overwrite:
            for name in (*RUN_FILES, *RUN_DIRS):
                path = out / name
                try:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
                except FileNotFoundError:
                    pass
                except OSError as e:
                    raise RunDirError(
                        f"{path}: cannot remove the earlier run's {name} for --overwrite "
                        f"({os_error_text(e)})"
                    ) from None
        yield
    finally:
        if _read_lock(out / LOCK)[0] == os.getpid():  # ours still: not another trainer's
            with contextlib.suppress(OSError):
                (out / LOCK).unlink()


def _acquire(lock: Path, say: Callable[[str], None]) -> None:
    host = socket.gethostname()
    # Written aside, then hard-linked into place: the lock appears whole or not at all.
    mine = lock.with_name(f"{LOCK}.{os.getpid()}.tmp")
    mine.write_text(f"{os.getpid()}\n{host}\n")
    try:
        for _ in range(3):  # a race with another trainer taking over the same stale lock
            try:
                os.link(mine, lock)
                return
            except FileExistsError:
                pid, owner = _read_lock(lock)
            if pid is not None and owner == host and not _pid_alive(pid):
                say(f"taking over the lock of an earlier trainer (pid {pid}) that is gone")
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                continue
            who = f"pid {pid}" if pid is not None else "an unknown process"
            if owner and owner != host:
                who += f" on {owner}"
            raise RunDirError(
                f"{lock.parent} is in use by another trainer ({who}); wait for it to finish, "
                f"choose another --out, or delete {lock} if that trainer is gone"
            )
        raise OSError(errno.EEXIST, "the lock file keeps reappearing")
    finally:
        with contextlib.suppress(OSError):
            mine.unlink()
