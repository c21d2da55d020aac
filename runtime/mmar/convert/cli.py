"""`mmar convert` / `nvmidl-dataconvert`: flags, fan-out over processes, summary and exit code."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mmar.errors import MMARError

INPUT_SUFFIXES = (".dcm", ".nii", ".nii.gz", ".mha", ".mhd")
OUTPUT_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd")
# below this much input, starting worker processes costs more than it saves
PARALLEL_MIN_BYTES = 32 * 2**20


def build_parser(prog: str = "mmar convert") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert DICOM series (or NIfTI / MHA images) under a folder to NIfTI or MHA, "
        "optionally resampled to a new voxel size.",
    )
    parser.add_argument("-d", "--input", required=True, type=Path, help="input folder (searched recursively)")
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    parser.add_argument("-r", "--resolution", nargs="+", type=float, metavar="MM",
                        help="output voxel size in mm: one value (isotropic) or three (x y z); default: keep")
    parser.add_argument("-s", "--input-ext", default=".dcm", choices=INPUT_SUFFIXES, help="input format (default .dcm)")
    parser.add_argument("-e", "--output-ext", default=".nii.gz", choices=OUTPUT_SUFFIXES,
                        help="output format (default .nii.gz)")
    parser.add_argument("-f", "--force", action="store_true", help="overwrite existing outputs")
    parser.add_argument("-l", "--label", action="store_true",
                        help="inputs are label masks: nearest-neighbour resampling, integer output")
    parser.add_argument("-j", "--jobs", type=int, default=0,
                        help="worker processes (default: one per core when the input is large enough)")
    parser.add_argument("-b", "--bids", action="store_true",
                        help="DICOM: also write a BIDS JSON sidecar (and .bval/.bvec for diffusion), "
                        "as dcm2niix -b y does")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar, only problems and the summary")
    return parser


def plan_jobs(args) -> tuple[list, list, int]:
    """Discover the inputs -> (jobs, skipped/failed discovery items, ignored non-DICOM file count)."""
    from mmar.convert import discover, write
    from mmar.convert.jobs import Job

    root = args.input.resolve()
    if not root.is_dir():
        raise MMARError(f"-d {args.input}: not a folder")
    files = discover.list_files(root, args.input_ext, output=args.output)
    out = args.output
    if args.input_ext != ".dcm":
        if not files:
            raise MMARError(f"-d {args.input}: no {args.input_ext} files found")
        names = [write.image_name(f, root) for f in files]
        jobs = [Job(str(f.relative_to(root)), out / f"{n}{args.output_ext}", source=f) for f, n in zip(files, names)]
        return jobs, [], 0
    if not files:
        raise MMARError(f"-d {args.input}: the folder is empty")
    series, skipped, ignored = discover.scan_dicom(root, files)
    if not series and not skipped:
        raise MMARError(f"-d {args.input}: no DICOM files found ({ignored} other file(s) ignored"
                        f"{discover.image_suffix_hint(files)})")
    names = write.dicom_names(series, root.name)
    jobs = [Job(s.label, out / f"{n}{args.output_ext}", series=s, notes=list(s.notes)) for s, n in zip(series, names)]
    return jobs, skipped, ignored


def _workers(args, jobs) -> int:
    if args.jobs > 0:
        return min(args.jobs, max(len(jobs), 1))
    size = 0
    for job in jobs:
        paths = {s.path for s in job.series.slices} if job.series is not None else {job.source}
        size += sum(p.stat().st_size for p in paths)
    if len(jobs) < 2 or size < PARALLEL_MIN_BYTES:
        return 1
    return min(len(jobs), _cores())


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def execute(jobs, options, workers: int, progress: bool):
    """Run the jobs (in a process pool when workers > 1); yield results as they finish."""
    from mmar.convert.jobs import run_job

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), unit="series", file=sys.stderr, disable=None, leave=False)
    try:
        if workers <= 1:
            for job in jobs:
                yield run_job(job, options)
                bar and bar.update()
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        if any(not s.raw for job in jobs if job.series is not None for s in job.series.slices[:1]):
            from mmar.convert.header import import_pydicom

            import_pydicom()  # compressed pixels: imported once here, not again in every forked worker

        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        context = multiprocessing.get_context(method)
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            # the biggest series first, so one long series does not finish alone at the end
            ordered = sorted(jobs, key=lambda j: -(len(j.series.slices) if j.series is not None else 1))
            for future in as_completed([pool.submit(run_job, job, options) for job in ordered]):
                yield future.result()
                bar and bar.update()
    finally:
        if bar is not None:
            bar.close()


def convert(argv: list[str] | None, prog: str) -> int:
    args = build_parser(prog).parse_args(argv)
    from mmar.convert.jobs import Options, spacing_of

    try:
        spacing = spacing_of(args.resolution)
    except ValueError as error:
        raise MMARError(str(error)) from None
    options = Options(spacing, args.label, args.force, args.bids)
    jobs, skipped, ignored = plan_jobs(args)
    workers = _workers(args, jobs)
    results = list(execute(jobs, options, workers, progress=not args.quiet))
    return summarize(results, skipped, ignored, args.quiet)


def summarize(results, skipped, ignored: int, quiet: bool = False) -> int:
    converted = [r for r in results if r.status == "converted"]
    exists = [r for r in results if r.status == "skipped"]
    failed = [r for r in results if r.status == "failed"]
    problems = []  # (is a failure, line): what makes the exit code 1, in the order printed
    for result in sorted(results, key=lambda r: r.label):
        if result.status == "converted":
            size = "x".join(map(str, result.shape))
            if not quiet:
                print(f"converted  {result.label} -> {result.target} ({size})")
            for message in result.messages:
                print(f"  warning: {message}")
        else:
            print(f"{result.status:<9}  {result.label}: {'; '.join(result.messages)}")
            problems.append((result.status == "failed", f"{result.label}: {'; '.join(result.messages)}"))
    for item in skipped:
        print(f"{'failed' if item.failed else 'skipped':<9}  {item.what}: {item.reason}")
        if item.failed:
            problems.append((True, f"{item.what}: {item.reason}"))
    bad_input = [s for s in skipped if s.failed]
    not_image = [s for s in skipped if not s.failed]
    n_failed = len(failed) + len(bad_input)
    print(f"summary: {len(converted)} converted, {len(exists) + len(not_image)} skipped, "
          f"{n_failed} failed" + (f" ({ignored} non-DICOM file(s) ignored)" if ignored else ""))
    # the first failure (else the first output left alone): the step's reason, in the result and as the
    # last `error:` line, so `mmar run` and the MMARJob say why without the log
    first = next((line for is_failure, line in problems if is_failure), None) or next(
        (line for _, line in problems), None)
    if first is not None:
        what = f"{n_failed} failed, the first: " if n_failed else ""
        print(f"error: {what}{first}", file=sys.stderr)
    from mmar.report import write_result

    write_result({"command": "convert", "converted": len(converted), "skipped": len(exists) + len(not_image),
                  "failed": n_failed, **({"first_error": first} if first is not None else {})})
    # an output left alone because it exists is not what was asked for either: non-zero exit
    return 1 if failed or bad_input or exists else 0


def _one_blas_thread() -> None:
    """numpy's OpenBLAS starts a thread pool (one thread a core) when numpy is imported: measured here 0.04 s
    of CPU and 0.07-0.1 s of wall on a 2-core machine, a third of a small folder's whole run. The converter's
    linear algebra is 3x3 (directions, a tilt fit), so one thread loses nothing. Only before numpy is
    loaded (later it has no effect), and a value the user set is kept."""
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `nvmidl-dataconvert` and (through mmar.commands.convert) of `mmar convert`.

    Catches MMARError itself, so the console script prints `error: ...` and exits 1 like `mmar` does.
    """
    _one_blas_thread()
    prog = "mmar convert"
    if argv is None:
        if sys.argv and "dataconvert" in Path(sys.argv[0]).name:
            prog = "nvmidl-dataconvert"
        argv = sys.argv[1:]
    try:
        return convert(list(argv), prog)
    except MMARError as error:
        print(f"error: {error}", file=sys.stderr)
        _report_failure(str(error))
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        _report_failure("interrupted", "SIGINT")
        return 130


def _report_failure(line: str, signal_name: str | None = None) -> None:
    """The failure as the step's result (termination message), so the operator and `mmar run` show this line
    whatever the log ends with."""
    from mmar.report import write_failure

    try:
        write_failure("convert", line, signal_name)
    except OSError:
        pass  # nowhere to report: the error line above is still printed


if __name__ == "__main__":
    sys.exit(main())
