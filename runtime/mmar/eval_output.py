"""Where `mmar validate` and `mmar infer` put their results, so that no result is lost or mixed with another.

Two rules:

* **A name per image.** Predictions are named after the image's path relative to the data root (the base
  of the datalist's relative paths), as `mmar convert` names its outputs: `case_a/imaging.nii.gz` and
  `case_b/imaging.nii.gz` (the KiTS layout) give `case_a/imaging_seg.nii.gz` and `case_b/imaging_seg.nii.gz`,
  never one file for two images. `case_names` is the pure function that decides.

* **A run's results appear as one set.** A run writes into a staging folder inside the output folder
  (same file system, so moving in is a rename) and moves its results in only when all of them are complete
  (`Staging`). A run that fails part-way leaves the previous results exactly as they were.

What each command owns in the shared output folder (by default `eval/`): `validate` owns `metrics.json`
and the task's per-case files (`cases.csv`, `overlays/`) and replaces them as a set: the old set's files
that the new set does not have are removed with it, `metrics.json` is taken away first and put back
last, so a reader never finds one run's `metrics.json` beside another run's `cases.csv`. `infer` owns
`predictions/` (`PREDICTIONS_DIR`: one file per image at the image's relative name, so an image under a
data folder named `overlays/` is `predictions/overlays/scan_seg.nii.gz`, never inside validate's set) and
classification's `predictions.csv`, and only the files it writes there: each replaces the file of the same
name, predictions of other images from earlier runs are kept. The two namespaces are fixed names, so neither
command can touch the other's files, whatever the images are called.

A swap killed half-way (SIGKILL, power loss) leaves the old set in `.mmar-previous-*`; the next validate or
infer on the folder puts it back (`remove_abandoned`), so `eval/` again holds one whole set.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from mmar.errors import MMARError

STAGING_PREFIX = ".mmar-staging-"
_CREATED: set[Path] = set()  # staging folders of this process (alive by definition)
PREVIOUS_PREFIX = ".mmar-previous-"
# in a .mmar-previous-* folder: the swap's entries (JSON), renamed to MOVED_FILE once every old entry is in it
SET_FILE, MOVED_FILE = ".set", ".set-moved"
# infer's folder in the output folder: validate's set never holds an entry of this name
PREDICTIONS_DIR = "predictions"
# suffixes stripped from an image's name before the prediction's postfix and extension are added
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".png", ".jpg", ".jpeg", ".tif", ".tiff",
                  ".dcm", ".npy", ".npz")


# ---- names -------------------------------------------------------------------------------------------


def strip_image_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def case_names(images: Sequence[str], root: str | os.PathLike) -> dict[str, str]:
    """Each distinct image file -> a distinct relative name (posix, no image suffix) for its outputs.

    The name is the image's path relative to `root` (the data root). Images outside it (absolute paths
    elsewhere) are named relative to the deepest folder holding all of them, so a flat list of outside
    files gives bare file names. Where two files would still get one name (`a.nii` beside `a.nii.gz`, or an
    outside file landing on an inside one's name), the later one keeps its suffix, then gets `_2`, `_3`...:
    never one name for two files. The same file listed twice keeps one name (it is one prediction).
    """
    root_path = os.path.normpath(os.path.abspath(os.fspath(root)))
    sources = list(dict.fromkeys(os.path.normpath(os.path.abspath(str(image))) for image in images))
    inside = {s for s in sources if _is_under(s, root_path)}
    outside = [s for s in sources if s not in inside]
    outside_base = os.path.commonpath([os.path.dirname(s) for s in outside]) if outside else ""
    relative = {s: os.path.relpath(s, root_path if s in inside else outside_base) for s in sources}
    names: dict[str, str] = {}
    taken: set[str] = set()
    for source in sources:
        rel = relative[source].replace(os.sep, "/")
        candidates = [strip_image_suffix(rel), rel]
        name = next((c for c in candidates if c not in taken), None)
        counter = 2
        while name is None:
            name = f"{candidates[0]}_{counter}" if f"{candidates[0]}_{counter}" not in taken else None
            counter += 1
        names[source] = name
        taken.add(name)
    return names


def name_of(names: dict[str, str], image: str) -> str:
    """The name `case_names` gave `image` (a file not in the list, e.g. renamed by a transform: its stem)."""
    key = os.path.normpath(os.path.abspath(str(image)))
    return names.get(key) or strip_image_suffix(os.path.basename(key))


def short_names(names: Sequence[str]) -> list[str]:
    """The fewest trailing path parts that still tell the names apart, joined by '_' (for flat file names:
    overlays). ['imagesTr/a', 'imagesTr/b'] -> ['a', 'b']; ['case_a/imaging', 'case_b/imaging'] ->
    ['case_a_imaging', 'case_b_imaging']."""
    parts = [name.split("/") for name in names]
    depth = max((len(p) for p in parts), default=1)
    for k in range(1, depth + 1):
        short = ["_".join(p[-k:]) for p in parts]
        if len(set(short)) == len(set(names)):
            return short
    return ["_".join(p) for p in parts]


def _is_under(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root and path != root
    except ValueError:  # different drives
        return False


# ---- staging -----------------------------------------------------------------------------------------


class Staging:
    """A staging folder inside `target` for one run's results, moved into `target` by `replace_set` or
    `merge`; removed (with whatever it holds) when the `with` block ends, whether the run succeeded or not.

    Folders left by runs of this host that died (SIGKILL, power loss) are removed when the next run starts;
    those of other hosts sharing the volume, or of live processes, are left alone.
    """

    def __init__(self, target: str | os.PathLike, command: str):
        self.target = Path(target)
        self.command = command
        self.path: Path | None = None

    def __enter__(self) -> "Staging":
        try:
            self.target.mkdir(parents=True, exist_ok=True)
            remove_abandoned(self.target)
            self.path = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{self.command}-{_owner()}-", dir=self.target))
        except OSError as error:
            raise MMARError(f"cannot write results to {self.target}: {error.strerror or error}") from None
        _CREATED.add(self.path)
        return self

    def __exit__(self, *exc) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            _CREATED.discard(self.path)

    def replace_set(self, owned: Iterable[str], last: str) -> list[Path]:
        """Make `target`'s entries named in `owned` (and `last`) exactly the staged ones.

        `last` (metrics.json) marks a complete set: it is moved away first and moved in last. The old
        entries go to a sibling folder that is deleted once the new set is in place; should the process die
        within these few renames, the old files are still in `target/.mmar-previous-*` and `target` has no
        `last`, which says that its set is incomplete. That folder records the swap's entries and whether all
        the old ones had been moved into it (SET_FILE, renamed MOVED_FILE), which is what the next run needs
        to put the old set back exactly (`remove_abandoned`).
        """
        assert self.path is not None
        names = [name for name in dict.fromkeys(owned) if name != last]
        if PREDICTIONS_DIR in (last, *names):
            raise ValueError(f"{PREDICTIONS_DIR!r} is infer's: a validation set may not own it")
        try:
            previous = Path(tempfile.mkdtemp(prefix=f"{PREVIOUS_PREFIX}{self.command}-{_owner()}-", dir=self.target))
        except OSError as error:
            raise MMARError(f"cannot write results to {self.target}: {error.strerror or error}") from None
        _CREATED.add(previous)
        manifest = _write_manifest(previous, last, names)
        moved: list[Path] = []
        try:
            for name in [last, *names]:
                if os.path.lexists(self.target / name):
                    _rename(self.target / name, previous / name)
            if manifest is not None:  # every old entry is in `previous`: what is in `target` now is new
                _rename(manifest, previous / MOVED_FILE)
            for name in [*names, last]:
                if os.path.lexists(self.path / name):
                    _rename(self.path / name, self.target / name)
                    moved.append(self.target / name)
        except BaseException:  # also a stop signal (SIGTERM) arriving between two renames
            _restore(previous, self.target, [last, *names], moved)
            _CREATED.discard(previous)
            raise
        shutil.rmtree(previous, ignore_errors=True)  # should this fail, the next run removes what is left
        _CREATED.discard(previous)
        return moved

    def merge(self) -> list[Path]:
        """Move every staged file to the same relative path in `target`, replacing a file of that name."""
        assert self.path is not None
        files = sorted(p for p in self.path.rglob("*") if p.is_file() or p.is_symlink())
        moved = []
        for file in files:
            destination = self.target / file.relative_to(self.path)
            if destination.is_dir() and not destination.is_symlink():
                raise MMARError(f"cannot write {destination}: a folder of that name is in the way")
            try:
                destination.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise MMARError(f"cannot create {destination.parent}: {error.strerror or error}") from None
            _rename(file, destination)
            moved.append(destination)
        return moved


def remove_abandoned(target: Path, log=None) -> list[Path]:
    """What dead processes of this host left in `target`: staging folders (a crashed run's half-written
    results) are removed; a `.mmar-previous-*` folder (a validation killed while swapping its set in) has
    its old set put back when the new one is incomplete, and is then removed. Returns the folders handled."""
    removed = []
    say = log or (lambda text: print(text, file=sys.stderr, flush=True))
    for prefix in (PREVIOUS_PREFIX, STAGING_PREFIX):  # the old set back first, then the new one's leftovers
        for entry in sorted(Path(target).glob(f"{prefix}*")):
            if not _abandoned(entry, prefix):
                continue
            if prefix == PREVIOUS_PREFIX:
                restored = _recover_previous(entry, Path(target))
                if restored:
                    say(f"restored {', '.join(restored)} in {target}: the previous results, as they were before a "
                        f"run that was killed while replacing them ({entry.name})")
            shutil.rmtree(entry, ignore_errors=True)
            if not os.path.lexists(entry):
                removed.append(entry)
    return removed


def _abandoned(entry: Path, prefix: str) -> bool:
    owner = _parse_owner(entry.name[len(prefix):])
    if owner is None or owner[0] != _host() or entry in _CREATED or not entry.is_dir():
        return False
    # our own PID on a folder this process did not make: a restarted container numbers its processes alike
    return owner[1] == os.getpid() or not _alive(owner[1])


def _write_manifest(previous: Path, last: str, names: Sequence[str]) -> Path | None:
    """The swap's entries, in `previous`; None where it cannot be written (a full disk: the swap itself only
    renames, so it goes on, and a leftover is then recovered by its contents alone)."""
    path = previous / SET_FILE
    try:
        path.write_text(json.dumps({"last": last, "names": list(names)}), encoding="utf-8")
    except OSError:
        path.unlink(missing_ok=True)
        return None
    return path


def _recover_previous(previous: Path, target: Path) -> list[str]:
    """Put back the old set a killed swap left in `previous` (see `Staging.replace_set`) unless the new set
    is complete in `target`. Returns the names put back. Best effort: what cannot be moved stays where it is."""
    phase, manifest = None, None
    for name in (MOVED_FILE, SET_FILE):
        try:
            manifest = json.loads((previous / name).read_text(encoding="utf-8"))
            phase = name
            break
        except (OSError, ValueError):
            continue
    stored = sorted(p.name for p in previous.iterdir() if p.name not in (SET_FILE, MOVED_FILE))
    if isinstance(manifest, dict) and isinstance(manifest.get("last"), str) and isinstance(manifest.get("names"), list):
        last, names = manifest["last"], [n for n in manifest["names"] if isinstance(n, str) and "/" not in n]
        if phase == MOVED_FILE:
            if os.path.lexists(target / last):
                return []  # the new set is whole (killed before its old set was deleted)
            # some of the new set is in `target`, all of the old one in `previous`: the new entries go
            for name in [*names, last]:
                if not _remove_entry(target / name):
                    return []
        # SET_FILE: still moving the old set away, nothing new in `target` yet: the moved entries go back
        return [name for name in stored if name in (last, *names) and _put_back(previous / name, target / name)]
    # no record (an older version's folder, or a disk too full for it): what `target` lacks goes back
    return [name for name in stored if not os.path.lexists(target / name) and _put_back(previous / name, target / name)]


def _remove_entry(path: Path) -> bool:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()
    except OSError:
        return False
    return True


def _put_back(source: Path, target: Path) -> bool:
    if os.path.lexists(target) and not _remove_entry(target):
        return False
    try:
        os.replace(source, target)
    except OSError:
        return False
    return True


def _host() -> str:
    return socket.gethostname().replace("-", "_")


def _owner() -> str:
    # host and pid: a staging folder is abandoned only if its process is gone, which only its host can tell
    return f"{_host()}-{os.getpid()}"


def _parse_owner(rest: str) -> tuple[str, int] | None:
    # "<command>-<host>-<pid>-<random>" (mkdtemp's random part has no '-')
    parts = rest.split("-")
    if len(parts) < 4 or not parts[-2].isdigit():
        return None
    return parts[-3], int(parts[-2])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _rename(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
    except OSError as error:
        raise MMARError(f"cannot move {source} to {target}: {error.strerror or error}") from None


def _restore(previous: Path, target: Path, names: Sequence[str], moved: Sequence[Path]) -> None:
    """Undo a swap that failed half-way: the new entries out, the old ones back (best effort)."""
    if os.path.lexists(previous / MOVED_FILE):  # should this stop half-way, the next run puts back what is left
        try:
            os.replace(previous / MOVED_FILE, previous / SET_FILE)
        except OSError:
            pass
    for path in moved:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    for name in names:
        if os.path.lexists(previous / name) and not os.path.lexists(target / name):
            try:
                os.replace(previous / name, target / name)
            except OSError:
                return  # the old files stay in `previous`, which is then kept
    shutil.rmtree(previous, ignore_errors=True)
