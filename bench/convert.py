"""Benchmark: convert the same DICOM folders with mmar, dcm2niix and dicom2nifti in one run.

    .venv/bin/python bench/convert.py [--data DIR ...] [--repeats 5] [--large-files 600] [--epi-files 620]
                                      [--many-files 10000] [--no-dicom2nifti] [--baseline TREE]

Folders: ../shared/data/dicom (real MR series, several codecs), ../shared/data/dicom-qa/In (Siemens
mosaics), and three generated from them (each copy of a series with new Study/Series/SOP Instance UIDs):
- `large`: >= --large-files files, copies of every real series of both, pixels untouched;
- `epi`: >= --epi-files files of ~22 KB, the common case of real scanners: the real EPI mosaics of dicom-qa
  cut into one 2D slice a file (the mosaic's header kept, vendor private tags included; see make_epi);
- `epi_many`: the same, >= --many-files files (time and memory per file must stay flat).

Every tool converts the whole folder (all series) to gzipped NIfTI in a fresh output folder, run as the
user would run it (a subprocess, interpreter start-up and imports included); the tools take turns within
each repeat, so load changes hit all of them alike. Prints per folder the median wall time, CPU time
(user + system, worker processes included) and peak memory (the largest process) per tool, and the ratios
mmar / dcm2niix of all three (goal: wall <= 1.5x on every folder of 100+ files, <= 1.0x on 500+).

mmar's modules are byte-compiled first, as installing a wheel does: with PYTHONDONTWRITEBYTECODE set (as in
this workspace's shell) an editable install would otherwise compile its ~20 modules from source on every
run (~0.03-0.05 s, a third of a small folder's run), which no installed mmar does. `--baseline TREE` also
times the mmar of another source tree (e.g. `git archive COMMIT runtime | tar -x -C TREE`; its `runtime/`
first on PYTHONPATH) as `mmar-base`, taking turns with the others: before/after under the same load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHARED = ROOT.parent / "shared" / "data"
BASELINE: Path | None = None  # --baseline: a source tree whose runtime/ holds the mmar to compare with


def tool_commands(data: Path, out: Path) -> dict[str, list[str]]:
    return {
        "mmar": [str(BIN / "mmar"), "convert", "-q", "-d", str(data), "-o", str(out)],
        "mmar-base": [str(BIN / "mmar"), "convert", "-q", "-d", str(data), "-o", str(out)],  # env: BASELINE
        "dcm2niix": [str(BIN / "dcm2niix") if (BIN / "dcm2niix").exists() else "dcm2niix",
                     "-z", "y", "-b", "n", "-o", str(out), str(data)],
        # -S: also convert the single-slice series, as the other two do
        "dicom2nifti": [str(BIN / "dicom2nifti"), "-S", str(data), str(out)],
    }


def dicom_files(folder: Path) -> list[Path]:
    import pydicom

    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        found.append(path)
    return found


def make_large(sources: list[Path], target: Path, minimum: int) -> int:
    """Copy every DICOM file under `sources` into `target` until it holds >= minimum files; each copy of a
    series gets new UIDs (pydicom), pixel data untouched. Returns the number of files written."""
    import pydicom
    from pydicom.uid import generate_uid

    files = [(source, f) for source in sources if source.is_dir() for f in dicom_files(source)]
    if not files:
        raise SystemExit("no DICOM files to build the large folder from")
    copies = -(-minimum // len(files))
    written = 0
    for copy in range(copies):
        uids: dict[str, str] = {}
        for source, path in files:
            ds = pydicom.dcmread(path)
            for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
                if keyword in ds:
                    old = str(ds.data_element(keyword).value)
                    ds.data_element(keyword).value = uids.setdefault(f"{keyword}:{old}", generate_uid())
            # the same instance stored twice stays one instance (converters drop such copies)
            ds.SOPInstanceUID = uids.setdefault(f"SOP:{ds.SOPInstanceUID}", generate_uid())
            if getattr(ds, "file_meta", None) is not None:
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            # one level of folders: dcm2niix searches 5 levels deep by default
            rel = path.parent.relative_to(source).as_posix().replace("/", "_")
            folder = target / f"copy{copy:02d}_{source.name}_{rel}"
            folder.mkdir(parents=True, exist_ok=True)
            ds.save_as(folder / f"{path.name}", enforce_file_format=False)
            written += 1
    return written


def _mosaic_series(folder: Path) -> list[list[Path]]:
    """The uncompressed Siemens mosaic series under `folder` (real EPI: ImageType MOSAIC), each as its files."""
    import pydicom

    series: dict[str, list[Path]] = {}
    for path in dicom_files(folder):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        compressed = ds.file_meta.TransferSyntaxUID.is_compressed
        if "MOSAIC" in [str(v).upper() for v in ds.get("ImageType", ())] and not compressed:
            series.setdefault(str(ds.SeriesInstanceUID), []).append(path)
    return [sorted(paths) for _uid, paths in sorted(series.items(), key=lambda item: str(item[1][0]))]


def _csa_not_mosaic(raw: bytes) -> bytes:
    """A CSA2 image header with NumberOfImagesInMosaic's values set to 1 (same length, same layout): the
    header of a slice that is not a mosaic, as dcm2niix reads it to decide."""
    import struct

    data = bytearray(raw)
    if data[:4] != b"SV10":
        raise SystemExit("expected a CSA2 image header")
    count = struct.unpack_from("<I", data, 8)[0]
    offset = 16
    for _ in range(count):
        name, _vm, _vr, _syngodt, items, _last = struct.unpack_from("<64si4s3i", data, offset)
        offset += 84
        for _item in range(items):
            size = struct.unpack_from("<4i", data, offset)[1]
            offset += 16
            if name.split(b"\0", 1)[0] == b"NumberOfImagesInMosaic" and size > 0:
                data[offset:offset + size] = b"1".ljust(size, b"\0")
            offset += size + (-size % 4)
    return bytes(data)


def make_epi(source: Path, target: Path, minimum: int) -> int:
    """The common case of real scanners: one file per 2D EPI slice. Each real Siemens mosaic under `source`
    (dicom-qa: 35 or 36 slices of 64x64, 2 volumes per series) is cut into its tiles, one DICOM file per tile
    with the mosaic's own header (vendor private tags and the CSA image header kept, its
    NumberOfImagesInMosaic set to 1; the 74 KB CSA series header dropped, so a file is ~22 KB as on scanners
    that store slices), ImageType without MOSAIC,
    ImagePositionPatient of the tile, new SOP Instance UIDs. Whole series are added, copy after copy (each
    copy new Study/Series/Frame of Reference UIDs), until the folder holds >= minimum files."""
    import numpy as np
    import pydicom
    from pydicom.uid import generate_uid

    sys.path.insert(0, str(ROOT / "runtime"))
    from mmar.convert import mosaic

    series = _mosaic_series(source)
    if not series:
        raise SystemExit(f"no Siemens mosaic series under {source}")
    written, copy = 0, 0
    while written < minimum:
        for files in series:
            if written >= minimum:
                break
            uids = {keyword: generate_uid() for keyword in ("StudyInstanceUID", "SeriesInstanceUID",
                                                            "FrameOfReferenceUID")}
            folder = target / f"epi{copy:02d}_{files[0].parent.name}"
            folder.mkdir(parents=True, exist_ok=True)
            for volume, path in enumerate(files):
                ds = pydicom.dcmread(path)
                tags = mosaic.csa_image_tags(ds)
                count, side, tile_rows, tile_cols = mosaic.mosaic_layout(ds, tags)
                orient = [float(v) for v in ds.ImageOrientationPatient]
                row, col = np.asarray(orient[:3]), np.asarray(orient[3:])
                normal = mosaic.slice_normal(ds, tags, row, col)
                spacing = (float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0]))
                first = mosaic.first_tile_position([float(v) for v in ds.ImagePositionPatient], row, col, spacing,
                                                   int(ds.Rows), int(ds.Columns), tile_rows, tile_cols)
                step = float(ds.get("SpacingBetweenSlices", 0) or ds.SliceThickness)
                pixels = ds.pixel_array
                tiles = mosaic.split_tiles(pixels, count, side).astype(pixels.dtype.newbyteorder("<"))
                for keyword, value in uids.items():
                    setattr(ds, keyword, value)
                ds.ImageType = [v for v in ds.ImageType if str(v).upper() != "MOSAIC"]
                for tag in ((0x0029, 0x1020), (0x0019, 0x100A)):
                    if tag in ds:
                        del ds[tag]
                ds.Rows, ds.Columns = tile_rows, tile_cols
                ds[mosaic.CSA_IMAGE_HEADER].value = _csa_not_mosaic(bytes(ds[mosaic.CSA_IMAGE_HEADER].value))
                for tile in range(count):
                    ds.ImagePositionPatient = [f"{v:.6f}" for v in first + tile * step * normal]
                    ds.InstanceNumber = volume * count + tile + 1
                    ds.SOPInstanceUID = generate_uid()
                    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                    ds.PixelData = np.ascontiguousarray(tiles[tile]).tobytes()
                    ds.save_as(folder / f"IM{volume:02d}{tile:03d}.dcm", enforce_file_format=False)
                    written += 1
        copy += 1
    return written


GNU_TIME = shutil.which("time", path="/usr/bin:/bin")


def run_once(name: str, data: Path) -> tuple[float, float, float, int]:
    """One whole command -> (wall s, CPU s (user + system, worker processes included), peak memory MiB of
    its largest process, NIfTI files written).

    CPU and memory come from GNU time (`/usr/bin/time`): the rusage of a child forked from this (large)
    Python process would keep this process's peak RSS across exec, so a small tool would read as big as
    the benchmark. Without GNU time: from os.wait4, memory then not comparable (printed as such)."""
    out = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    command = tool_commands(data, out)[name]
    with tempfile.TemporaryDirectory(prefix="bench-time-") as tmp:
        report = Path(tmp) / "time"
        if GNU_TIME:
            command = [GNU_TIME, "-q", "-f", "%U %S %M", "-o", str(report), *command]
        with open(Path(tmp) / "stderr", "w+b") as errors:
            start = time.perf_counter()
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, env=tool_env(name))
            _pid, status, usage = os.wait4(process.pid, 0)
            seconds = time.perf_counter() - start
            process.returncode = os.waitstatus_to_exitcode(status)
            errors.seek(0)
            stderr = errors.read().decode(errors="replace")
        if GNU_TIME and report.exists():
            user, system, peak_kib = report.read_text().split()[-3:]
            cpu, memory = float(user) + float(system), float(peak_kib) / 1024
        else:
            cpu, memory = usage.ru_utime + usage.ru_stime, float("nan")
    outputs = len(list(out.rglob("*.nii*")))
    shutil.rmtree(out, ignore_errors=True)
    if process.returncode not in (0, 1):  # mmar exits 1 when some series failed; still a timing
        raise SystemExit(f"{name} failed ({process.returncode}): {stderr[-2000:]}")
    return seconds, cpu, memory, outputs


MEASURES = ("wall", "cpu", "mem")


def tool_env(name: str) -> dict[str, str]:
    env = dict(os.environ)
    if name == "mmar-base" and BASELINE is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(BASELINE / "runtime"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def compile_mmar(trees: list[Path]) -> None:
    """Byte-compile mmar's modules (this checkout's and the baseline's), as installing a wheel does."""
    import compileall

    for tree in trees:
        compileall.compile_dir(tree / "runtime" / "mmar", quiet=1)


def bench_folder(data: Path, tools: list[str], repeats: int) -> dict[str, dict[str, float]]:
    """Median wall s, CPU s and peak MiB per tool over `repeats` rounds, the tools alternating in each."""
    files = [p for p in data.rglob("*") if p.is_file()]
    print(f"\n{data} ({len(files)} files, {sum(p.stat().st_size for p in files) / 2**20:.1f} MiB)", flush=True)
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in tools}
    outputs: dict[str, int] = {}
    for _ in range(repeats):  # alternate: one run of every tool per repeat
        for name in tools:
            *measures, outputs[name] = run_once(name, data)
            runs[name].append(tuple(measures))
    medians = {name: {m: statistics.median(r[i] for r in runs[name]) for i, m in enumerate(MEASURES)} for name in tools}
    for name in tools:
        walls = [r[0] for r in runs[name]]
        med = medians[name]
        print(f"  {name:<12} wall {med['wall']:7.2f} s (min {min(walls):.2f}, max {max(walls):.2f})  "
              f"cpu {med['cpu']:7.2f} s  peak {med['mem']:6.0f} MiB  "
              f"{med['wall'] / len(files) * 1000:6.2f} ms/file  n={len(walls)}  {outputs[name]} NIfTI files")
    ratios = {m: medians["mmar"][m] / medians["dcm2niix"][m] for m in MEASURES}
    print(f"  mmar / dcm2niix: wall {ratios['wall']:.2f}x  cpu {ratios['cpu']:.2f}x  memory {ratios['mem']:.2f}x", flush=True)
    if "mmar-base" in medians:
        base = {m: medians["mmar-base"][m] / medians["dcm2niix"][m] for m in MEASURES}
        print(f"  mmar-base / dcm2niix: wall {base['wall']:.2f}x  cpu {base['cpu']:.2f}x  memory {base['mem']:.2f}x; "
              f"mmar / mmar-base: wall {medians['mmar']['wall'] / medians['mmar-base']['wall']:.2f}x", flush=True)
    return medians


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, nargs="*", help="folders to convert (default: the shared ones + generated)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--large-files", type=int, default=600,
                        help="files in the generated folder of copies of every real series (0: none)")
    parser.add_argument("--epi-files", type=int, default=620,
                        help="files in the generated EPI folder, one 2D slice a file (0: none)")
    parser.add_argument("--many-files", type=int, default=10000,
                        help="files in the generated folder of many small EPI slices (0: none)")
    parser.add_argument("--no-dicom2nifti", action="store_true", help="time only mmar and dcm2niix")
    parser.add_argument("--baseline", type=Path, help="also time the mmar of this source tree (its runtime/) "
                        "as mmar-base, alternating with the others")
    args = parser.parse_args()
    global BASELINE
    BASELINE = args.baseline.resolve() if args.baseline else None
    tools = ["dcm2niix", "mmar"] + (["mmar-base"] if BASELINE else []) + ([] if args.no_dicom2nifti else ["dicom2nifti"])
    compile_mmar([ROOT] + ([BASELINE] if BASELINE else []))
    folders = list(args.data or [p for p in (SHARED / "dicom", SHARED / "dicom-qa" / "In") if p.is_dir()])
    scratch = None
    if not args.data:
        scratch = Path(tempfile.mkdtemp(prefix="bench-convert-"))
        shared = list(folders)
        if args.large_files:
            count = make_large(shared, scratch / "large", args.large_files)
            print(f"generated {count} files (copies of every real series, new UIDs) in {scratch / 'large'}")
            folders.append(scratch / "large")
        qa = SHARED / "dicom-qa" / "In"
        for name, minimum in (("epi", args.epi_files), ("epi_many", args.many_files)):
            if minimum and qa.is_dir():
                count = make_epi(qa, scratch / name, minimum)
                print(f"generated {count} files (real EPI mosaics cut into one slice a file, new UIDs) in {scratch / name}")
                folders.append(scratch / name)
    if not folders:
        raise SystemExit("no data: pass --data")
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} CPUs")
    table = []
    try:
        for folder in folders:
            medians = bench_folder(folder, tools, args.repeats)
            table.append((folder, sum(1 for p in folder.rglob("*") if p.is_file()), medians))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nload average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"\nmedians of {args.repeats} alternating runs, whole commands (start-up included); "
          "peak memory: the largest process")
    print("| folder | files | dcm2niix wall s | mmar wall s | wall ratio | dcm2niix CPU s | mmar CPU s | CPU ratio | "
          "dcm2niix MiB | mmar MiB | memory ratio | mmar ms/file |")
    print("| --- " * 12 + "|")
    for folder, files, medians in table:
        d, m = medians["dcm2niix"], medians["mmar"]
        print(f"| {folder.name} | {files} | {d['wall']:.2f} | {m['wall']:.2f} | {m['wall'] / d['wall']:.2f}x | "
              f"{d['cpu']:.2f} | {m['cpu']:.2f} | {m['cpu'] / d['cpu']:.2f}x | {d['mem']:.0f} | {m['mem']:.0f} | "
              f"{m['mem'] / d['mem']:.2f}x | {m['wall'] / files * 1000:.2f} |")
    if BASELINE is not None:
        print(f"\nmmar-base ({BASELINE}), the same runs:")
        print("| folder | mmar-base wall s | wall ratio to dcm2niix | mmar-base CPU s | CPU ratio | mmar / mmar-base wall |")
        print("| --- " * 6 + "|")
        for folder, files, medians in table:
            d, m, b = medians["dcm2niix"], medians["mmar"], medians["mmar-base"]
            print(f"| {folder.name} | {b['wall']:.2f} | {b['wall'] / d['wall']:.2f}x | {b['cpu']:.2f} | "
                  f"{b['cpu'] / d['cpu']:.2f}x | {m['wall'] / b['wall']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
