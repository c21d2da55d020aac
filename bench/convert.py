"""Benchmark: convert the same real DICOM series with mmar, dcm2niix and dicom2nifti in one run.

    .venv/bin/python bench/convert.py [--data ../shared/data/dicom] [--repeats 5]

Every tool converts the whole folder (all series) to gzipped NIfTI in a fresh output folder, run as the
user would run it (a subprocess, interpreter start-up and imports included). Prints the median wall time
of the repeats per tool, and the ratios mmar/dcm2niix (target <= 1.5) and mmar/dicom2nifti (target < 1).
It also prints mmar's in-process time (imports already paid) to show how much of the total is start-up.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tool_commands(data: Path, out: Path) -> dict[str, list[str]]:
    return {
        "mmar": [str(BIN / "mmar"), "convert", "-q", "-d", str(data), "-o", str(out)],
        "dcm2niix": [str(BIN / "dcm2niix") if (BIN / "dcm2niix").exists() else "dcm2niix",
                     "-z", "y", "-b", "n", "-o", str(out), str(data)],
        # -S: also convert the single-slice series, as the other two do
        "dicom2nifti": [str(BIN / "dicom2nifti"), "-S", str(data), str(out)],
    }


def time_tool(name: str, data: Path, repeats: int) -> tuple[list[float], int]:
    times, outputs = [], 0
    for _ in range(repeats):
        out = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        command = tool_commands(data, out)[name]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        outputs = len(list(out.glob("*.nii*")))
        shutil.rmtree(out, ignore_errors=True)
        if done.returncode not in (0, 1):  # mmar exits 1 when some series failed; still a timing
            raise SystemExit(f"{name} failed ({done.returncode}): {done.stderr[-2000:]}")
    return times, outputs


def time_in_process(data: Path, repeats: int) -> float:
    import contextlib
    import io

    from mmar.convert.cli import main

    times = []
    for _ in range(repeats + 1):  # the first run pays the imports
        out = Path(tempfile.mkdtemp(prefix="bench-mmar-inproc-"))
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            main(["-q", "-d", str(data), "-o", str(out)])
        times.append(time.perf_counter() - start)
        shutil.rmtree(out, ignore_errors=True)
    return statistics.median(times[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "dicom")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"no data at {args.data}")
    files = [p for p in args.data.rglob("*.dcm")]
    print(f"data: {args.data} ({len(files)} DICOM files, {sum(p.stat().st_size for p in files) / 2**20:.1f} MiB)")
    medians = {}
    for name in ("dcm2niix", "mmar", "dicom2nifti"):
        times, outputs = time_tool(name, args.data, args.repeats)
        medians[name] = statistics.median(times)
        print(f"{name:<12} median {medians[name] * 1000:8.1f} ms   (min {min(times) * 1000:.1f}, "
              f"max {max(times) * 1000:.1f}, n={len(times)}, {outputs} NIfTI files)")
    warm = time_in_process(args.data, args.repeats)
    print(f"{'mmar warm':<12} median {warm * 1000:8.1f} ms   (in-process, imports excluded)")
    print(f"ratio mmar / dcm2niix     {medians['mmar'] / medians['dcm2niix']:.2f}x  (target <= 1.5x)")
    print(f"ratio mmar / dicom2nifti  {medians['mmar'] / medians['dicom2nifti']:.2f}x  (target < 1x)")
    print(f"ratio mmar warm / dcm2niix {warm / medians['dcm2niix']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
