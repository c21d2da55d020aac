"""Atomic writes: every result file is written to a temp file beside it, then renamed over the target.

A crash, a kill or an exception mid-write therefore never leaves a truncated checkpoint, metrics file or
prediction behind, and never destroys the previous good version. A write that fails for want of space
names the file (`no space left on device writing FILE`) instead of the writer's internals.

The temp name carries the writer's PID (`.model.ckpt.<pid>.<random>.tmp.ckpt`): a process killed with
SIGKILL cannot remove its temp file, and the PID is what tells the next run that the writer is dead
(`remove_stale_temp_files`).

A stop signal (`mmar.stop`) that lands inside the writer (a second SIGTERM during `torch.save`) leaves the
target as it was and goes on up as the stop it is, not as the writer's complaint about its broken stream.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from mmar.errors import MMARError
from mmar.stop import stop_in_chain

# out of space (ENOSPC), over a quota (EDQUOT), over the process's file size limit (EFBIG, RLIMIT_FSIZE)
SPACE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file size limit exceeded"}
TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[^.]+\.tmp(\..+)?$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in the target's folder; rename it onto `path` only if the block succeeds.

    For libraries that want a file name rather than a file object (torch.save, nibabel, SimpleITK, onnx).
    The temp name keeps the target's suffixes (e.g. `.nii.gz`) so writers that pick a format by suffix work.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes) or ".tmp"
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=f".tmp{suffix}",
                                        dir=target.parent)
    except OSError as error:
        raise _write_error(target, error) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
        except Exception as error:  # noqa: BLE001 - only a full disk and a stop are renamed; the rest goes on up
            stop = stop_in_chain(error)
            if stop is not None:  # a stop signal landed in the writer's callback (torch.save): it is the stop's
                raise stop from None
            space = space_error(error)
            if space is None:
                raise
            raise _write_error(target, space) from None
        # mkstemp creates 0600; results (checkpoints, exported models, metrics) are meant to be read by
        # others too (a serving container running as another user), so give them the umask's usual mode
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def space_error(error: BaseException | None) -> OSError | None:
    """The out-of-space OSError in `error`'s chain: torch.save, for one, reports a failed write as
    `RuntimeError: unexpected pos 925504 vs 925396` with the OSError only as its context."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in SPACE_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None


def _write_error(target: Path, error: OSError) -> BaseException:
    if error.errno in SPACE_ERRNOS:
        return MMARError(f"{SPACE_ERRNOS[error.errno]} writing {target} (the previous {target.name}, if any, "
                         "is kept; free some space and run the command again)")
    return error


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temp file for writing; it replaces `path` only when the block exits without an exception.

    The data reach the disk (fsync) before the rename, so that even a power cut leaves the old file or
    the whole new one."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Atomically write `data` as indented JSON."""
    with atomic_write(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=False, default=_json_default)
        handle.write("\n")


def _json_default(value: Any) -> Any:
    # numpy / torch scalars and paths appear in metrics and reports
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's content (what `mmar validate` records of the model it measured, and what the
    quality gate compares: a content check, where an mtime misses a replacement within one tick or a
    `mv` back of an older file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temp_writer_pid(name: str) -> int | None:
    """The PID in an `atomic_path` temp file name, or None for any other name."""
    match = TEMP_NAME.match(name)
    return int(match["pid"]) if match else None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files under `folder` left by writers that died (SIGKILL, OOM kill, power cut).

    Call it holding the MMAR's lock (`mmar.lock`), before this process writes anything: no other writer
    can then be at work, so a temp file whose writer is dead, or whose PID is this process's own (a
    restarted container numbers its processes alike), is left over. A live PID that is not ours is left
    alone: it may be another process's on another machine that shares the folder.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    removed = []
    for directory, _folders, files in os.walk(root):
        for name in files:
            pid = temp_writer_pid(name)
            if pid is None or (pid != os.getpid() and process_alive(pid)):
                continue
            path = Path(directory) / name
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed
