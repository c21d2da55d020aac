"""One command at a time writes an MMAR: an fcntl lock on `models/.mmar.lock`.

`mmar train`, `validate`, `infer` and `export` take it (`mmar_lock`) as soon as their own argparse parser has
read their arguments, before they read anything else: the MMAR is then the folder the command will work on,
however its options were written (abbreviated, `--opt=value`, a new flag before MMAR_DIR). A second
command on the same MMAR is refused with the holder's PID, host and command, instead of both writing
`models/` or `eval/` and the last writer winning. The kernel releases the lock when the holder dies,
however it dies (SIGKILL, OOM kill, node loss of an NFS client after its lease), so there is never a
stale lock to delete by hand. A POSIX (fcntl) record lock rather than flock: it works across NFS clients,
and a fork (a data-loader worker) does not inherit it.

Data-parallel training: every rank runs the command, and only rank 0 writes `models/`, so only rank 0
takes the lock. `mmar train --gpus N` takes it in the launching process and hands it down: the ranks it
starts find `MMAR_LOCK_HOLDER` naming that process as the holder recorded in the lock file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from mmar.errors import MMARError

LOCK_FILE = ".mmar.lock"
HOLDER_VARIABLE = "MMAR_LOCK_HOLDER"  # set for the processes a lock holder starts (torchrun's ranks)


def lock_path(mmar_dir: str | os.PathLike) -> Path:
    return Path(mmar_dir) / "models" / LOCK_FILE


def takes_part(env: dict[str, str] | None = None) -> bool:
    """Whether this process must hold the lock: any process but a torchrun rank other than 0."""
    env = os.environ if env is None else env
    return int(env.get("RANK", "0") or 0) == 0


@contextlib.contextmanager
def hold(mmar_dir: str | os.PathLike, command: str, log=print) -> Iterator[Path | None]:
    """Hold the MMAR's lock for the block; MMARError naming the holder when another process has it.

    Yields the lock file, or None where this process needs no lock (a rank other than 0) or where the
    folder cannot hold one (read-only: then nothing can be written there either)."""
    if not takes_part():
        yield None
        return
    path = lock_path(mmar_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            log(f"note: no lock on {path.parent} ({error.strerror}): another command on this MMAR would not be refused")
            yield None
            return
        raise
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = read_holder(path)
            if _handed_down(holder):
                yield path  # held for us by the `--gpus N` process that started this rank
                return
            raise MMARError(busy_message(Path(mmar_dir), holder, command)) from None
        _record_holder(fd, command)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # no record of a holder that is gone
            os.environ.pop(HOLDER_VARIABLE, None)
    finally:
        os.close(fd)  # releases the lock (closing any descriptor of the file would: this is the only one)


@contextlib.contextmanager
def mmar_lock(mmar_dir: str | os.PathLike, command: str, log=None) -> Iterator[Path | None]:
    """`hold` for a command about to work on `mmar_dir` (`command`: its name and argv, recorded for whoever is
    refused), and the temp files of writers that died removed under it. A folder that is not an MMAR (no
    config/) is not locked: the command reports that itself."""
    folder = Path(mmar_dir)
    if not (folder / "config").is_dir():
        yield None
        return
    from mmar.io import remove_stale_temp_files

    log = log or (lambda text: print(text, flush=True))
    with hold(folder, command, log) as held:
        if held is not None:
            for sub in ("models", "eval"):
                for path in remove_stale_temp_files(folder / sub):
                    log(f"removed {path}: a temp file of a run that was killed while writing")
        yield held


def busy_message(mmar_dir: Path, holder: dict, command: str) -> str:
    who = (f"`mmar {holder.get('command', '?')}` (PID {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
           f"started {holder.get('started', '?')})" if holder else "another process (it has not recorded itself yet)")
    name = command.split()[0] if command else "?"
    return (f"{mmar_dir} is in use by {who}: `mmar {name}` would write the same models/ and eval/. "
            f"Wait for it to end (or stop it), then run `mmar {name}` again (lock: {lock_path(mmar_dir)})")


def read_holder(path: Path, attempts: int = 5) -> dict:
    """The holder's record; the holder writes it just after taking the lock, so an empty file is retried."""
    for attempt in range(attempts):
        try:
            text = path.read_text(encoding="utf-8")
            return json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:
            pass  # caught mid-write
        except OSError:
            return {}
        time.sleep(0.05 * (attempt + 1))
    return {}


def _record_holder(fd: int, command: str) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    # the processes this one starts (torchrun's ranks) know the lock is held for them
    os.environ[HOLDER_VARIABLE] = f"{record['host']}:{record['pid']}"


def _handed_down(holder: dict) -> bool:
    handed = os.environ.get(HOLDER_VARIABLE)
    return bool(handed) and bool(holder) and handed == f"{holder.get('host')}:{holder.get('pid')}"
