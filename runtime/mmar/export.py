"""`mmar export`: the trained checkpoint as deployable graphs, each checked against PyTorch.

Clara's export.sh wrote a frozen graph and a TensorRT-optimized one; today's equivalents are:

    models/model.ts     TorchScript (scripted; traced where scripting fails)
    models/model.onnx   ONNX (torch.export-based exporter), dynamic batch axis, and for segmentation
                        dynamic spatial axes where the network allows; onnx.checker-checked
    models/model.trt    a serialized TensorRT engine built from the ONNX graph (only with `tensorrt` + CUDA)
    models/export.json  what was exported, from which checkpoint, input shape, precision, and each format's
                        max abs difference against the PyTorch model on the same inputs

Every format is written to a temp file, loaded back through the same predictor `mmar validate --model`
uses, and run on the same inputs as the PyTorch model: once at the export shape and once at a second
shape (batch 2, and for dynamic spatial axes a longer last axis) that proves the dynamic axes work. A
difference over the tolerance fails the whole export with the figures, and no file is renamed into
place: `models/` holds either the previous export or the complete new one, with export.json describing it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io as _io
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from mmar.archive import Archive
from mmar.engine import checkpoint
from mmar.errors import MMARError
from mmar.io import SPACE_ERRNOS, atomic_path, atomic_write, file_sha256, space_error
from mmar.tasks import get_task
from mmar.predict import EXPORT_JSON, default_checkpoint, load_file, load_network, tensorrt_unavailable

FORMATS = {"torchscript": "model.ts", "onnx": "model.onnx", "tensorrt": "model.trt"}
KIND_OF = {"torchscript": "ts", "onnx": "onnx", "tensorrt": "trt"}
DEFAULT_FORMATS = ("torchscript", "onnx", "tensorrt")
OPSET = 18
PRECISIONS = ("fp32", "fp16")
# Max abs difference allowed against PyTorch fp32, as a fraction of max(1, max |PyTorch output|):
# fp32 graphs differ from eager by reordered float sums (~1e-6 seen); fp16 engines by half-precision rounding.
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}


# ---- arguments ---------------------------------------------------------------------------------------


def parse_formats(text: str | Sequence[str]) -> list[str]:
    items = [f.strip().lower() for f in (text.split(",") if isinstance(text, str) else text) if f.strip()]
    aliases = {"ts": "torchscript", "trt": "tensorrt"}
    items = [aliases.get(item, item) for item in items]
    unknown = [item for item in items if item not in FORMATS]
    if unknown or not items:
        raise MMARError(f"--formats {text!r}: choose from {', '.join(FORMATS)} (comma-separated)")
    return list(dict.fromkeys(items))


def parse_input_shape(text: str) -> list[int]:
    try:
        shape = [int(part) for part in text.replace("x", ",").split(",") if part.strip()]
    except ValueError:
        shape = []
    if len(shape) not in (4, 5) or any(d < 1 for d in shape):
        raise MMARError(f"--input-shape {text!r}: expected N,C,H,W or N,C,H,W,D positive integers, e.g. 1,1,96,96,96")
    return shape


CHANNEL_KEYS = ("in_channels", "n_input_channels")


def default_input_shape(archive: Archive) -> list[int]:
    """[1, network in_channels, *spatial_size] from the config: the shape the model was trained on."""
    config = archive.config
    parser = archive.parser()
    source = archive.describe("spatial_size")
    if "spatial_size" not in config:
        raise MMARError(f"{source} is not set: give the export shape with --input-shape N,C,H,W[,D]")
    get_task(archive.task).check_config(config)  # one number per spatial axis of the network, before a shape is made of it
    spatial = parser.get_parsed_content("spatial_size")
    network = config.get("network")
    # MONAI's networks name it in_channels (UNet, DenseNet, ...) or n_input_channels (ResNet)
    key = next((k for k in CHANNEL_KEYS if isinstance(network, dict) and k in network), None)
    if key is None:
        raise MMARError(f"{archive.describe('network#in_channels')} is not set: give --input-shape N,C,H,W[,D]")
    channels = parser.get_parsed_content(f"network#{key}")
    try:
        shape = [1, int(channels), *(int(s) for s in spatial)]
    except (TypeError, ValueError):
        raise MMARError(f"{source} = {spatial!r} / in_channels = {channels!r}: not integers") from None
    return shape


def max_batch_of(archive: Archive, shape: Sequence[int]) -> int:
    """The largest batch the sliding window hands the model: validate#inferer#sw_batch_size (or the shape's)."""
    inferer = archive.config.get("validate", {}).get("inferer", {})
    batch = int(shape[0])
    if isinstance(inferer, dict) and "sw_batch_size" in inferer:
        try:
            batch = max(batch, int(archive.parser().get_parsed_content("validate#inferer#sw_batch_size")))
        except (TypeError, ValueError):
            pass
    return batch


# ---- the export --------------------------------------------------------------------------------------


def export(
    archive: Archive,
    *,
    ckpt: str | os.PathLike | None = None,
    formats: Sequence[str] = DEFAULT_FORMATS,
    precision: str = "fp32",
    input_shape: Sequence[int] | None = None,
    tolerance: float | None = None,
    log=print,
) -> dict[str, Any]:
    formats = parse_formats(list(formats))
    if precision not in PRECISIONS:
        raise MMARError(f"--precision {precision!r}: choose fp32 or fp16")
    ckpt_path = Path(ckpt) if ckpt else default_checkpoint(archive)
    network = load_network(archive, ckpt_path)
    shape = list(input_shape) if input_shape else default_input_shape(archive)
    dynamic_spatial = archive.task == "segmentation"
    inputs = sample_inputs(shape, dynamic_spatial)
    references = [reference_output(network, x, shape) for x in inputs]
    models_dir = archive.models_dir
    meta = checkpoint_facts(ckpt_path)

    skipped: dict[str, str] = {}
    if "tensorrt" in formats:
        reason = tensorrt_unavailable()
        if reason:
            log(f"tensorrt: skipped: {reason}; the other formats are still written")
            skipped["tensorrt"] = reason
    todo = [f for f in formats if f not in skipped]
    if not todo:
        raise MMARError(f"nothing exported: tensorrt was the only format asked for and {skipped['tensorrt']}")

    results: dict[str, dict[str, Any]] = {}
    # every write below names its own file when the disk is full (`_named`): the temp files are nested, and
    # an error left to them would be named after whichever temp file is unwound first
    with contextlib.ExitStack() as stack:
        tmp: dict[str, Path] = {}
        for name in todo:
            target = models_dir / FORMATS[name]
            tmp[name] = _named(target, stack.enter_context, atomic_path(target))
        onnx_file = tmp.get("onnx")
        if "tensorrt" in todo and onnx_file is None:  # the engine is built from an ONNX graph
            onnx_file = _named(models_dir / ".export.onnx", stack.enter_context, _scratch(models_dir, ".onnx"))
        if "torchscript" in todo:
            results["torchscript"] = _named(models_dir / FORMATS["torchscript"], write_torchscript, network, inputs,
                                            tmp["torchscript"], dynamic_spatial)
        if onnx_file is not None:
            info = _named(models_dir / FORMATS["onnx"] if "onnx" in todo else onnx_file, write_onnx, network, inputs,
                          onnx_file, dynamic_spatial, log)
            if "onnx" in todo:
                results["onnx"] = info
        if "tensorrt" in todo:
            max_batch = max_batch_of(archive, shape)
            results["tensorrt"] = _named(models_dir / FORMATS["tensorrt"], build_tensorrt, onnx_file, tmp["tensorrt"],
                                         precision=precision, input_shape=shape, max_batch=max_batch, log=log)
        for name in todo:
            fmt_precision = precision if name == "tensorrt" else "fp32"
            limit_fraction = tolerance if tolerance is not None else TOLERANCE[fmt_precision]
            check_inputs, check_refs = inputs, references
            if name == "tensorrt":  # spatial axes are fixed in the engine: the export shape at batch 1 and max
                check_inputs, check_refs = _fixed_spatial_checks(network, shape, results[name]["max_batch"])
            elif not results[name].get("dynamic_spatial", False) and len(inputs) > 1:
                check_inputs, check_refs = _fixed_spatial_checks(network, shape, 2)
            diff, scale = parity(tmp[name], KIND_OF[name], check_inputs, check_refs)
            limit = limit_fraction * max(1.0, scale)
            results[name].update({
                "file": FORMATS[name], "precision": fmt_precision, "max_abs_diff": diff, "tolerance": limit,
                "checked_shapes": [list(x.shape) for x in check_inputs], "checkpoint_sha256": meta["sha256"],
                # which checkpoint this file stands for, and the file itself: `mmar validate --model` refuses
                # an export whose checkpoint has changed since (a new training) or a file replaced after export
                "checkpoint": _checkpoint_record(ckpt_path, models_dir),
                "file_sha256": file_sha256(tmp[name]), "bytes": tmp[name].stat().st_size,
            })
            if not diff <= limit:  # also catches NaN
                raise MMARError(
                    f"export {name}: outputs differ from PyTorch by {diff:.3g} (max abs) > tolerance {limit:.3g} "
                    f"on shapes {results[name]['checked_shapes']}; nothing was written to {models_dir}"
                )
            log(f"{name}: {FORMATS[name]} max abs diff {diff:.2e} (tolerance {limit:.1e})")
        report = export_report(archive, meta, shape, precision, results, skipped)
        _named(models_dir / EXPORT_JSON, _write_report, models_dir / EXPORT_JSON, report)
    written = [str(models_dir / FORMATS[name]) for name in todo]
    log(f"exported {', '.join(todo)} -> {models_dir} (report: {models_dir / EXPORT_JSON})")
    stale = older_exports(report, meta["sha256"])
    for name in stale:
        log(f"WARNING: {models_dir / FORMATS[name]} was not re-exported and stays the export of another checkpoint "
            f"(sha256 {report['formats'][name].get('checkpoint_sha256')}, not {meta['sha256']}): `mmar validate "
            f"--model {KIND_OF[name]}` refuses it until `mmar export {archive.root} --formats {name}`")
    return {"command": "export", "formats": todo, "skipped": sorted(skipped), "files": written,
            "input_shape": shape, "precision": precision,
            "max_abs_diff": {name: results[name]["max_abs_diff"] for name in todo}, "stale_formats": stale}


def sample_inputs(shape: Sequence[int], dynamic_spatial: bool) -> list[torch.Tensor]:
    """The export shape, and a second one (batch 2; last spatial axis doubled when spatial is dynamic)."""
    generator = torch.Generator().manual_seed(0)
    second = [2, *shape[1:]]
    if dynamic_spatial:
        second[-1] *= 2  # a multiple of the original: valid for every down-sampling factor the network has
    return [torch.randn(*shape, generator=generator), torch.randn(*second, generator=generator)]


def reference_output(network: torch.nn.Module, x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    try:
        with torch.no_grad():
            return _first(network(x))
    except Exception as error:  # noqa: BLE001 - a shape the network rejects, reported with the shape
        raise MMARError(
            f"the network does not accept input shape {list(x.shape)} (export shape {list(shape)}): "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}; give --input-shape"
        ) from None


def parity(path: Path, kind: str, inputs: Sequence[torch.Tensor], references: Sequence[torch.Tensor]):
    """Max abs difference of an exported file's outputs against PyTorch's, and the outputs' max magnitude."""
    device = torch.device("cuda", 0) if kind == "trt" else torch.device("cpu")
    predictor = load_file(path, kind, device)
    diff, scale = 0.0, 0.0
    with torch.no_grad():
        for x, reference in zip(inputs, references):
            try:
                output = _first(predictor(x.to(device))).float().cpu()
            except MMARError:
                raise
            except Exception as error:  # noqa: BLE001 - e.g. a traced graph that baked in the export shape
                raise MMARError(f"export {path.name}: the exported model fails on input shape {list(x.shape)}: "
                                f"{str(error).strip().splitlines()[0] if str(error).strip() else error!r}") from None
            if output.shape != reference.shape:
                raise MMARError(f"export {path.name}: output shape {list(output.shape)} for input {list(x.shape)}, "
                                f"PyTorch gives {list(reference.shape)}")
            diff = max(diff, float((output - reference).abs().max()))
            scale = max(scale, float(reference.abs().max()))
    del predictor
    return diff, scale


def _fixed_spatial_checks(network, shape: Sequence[int], batch: int):
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(*shape, generator=generator)]
    if batch != shape[0]:
        inputs.append(torch.randn(batch, *shape[1:], generator=generator))
    return inputs, [reference_output(network, x, shape) for x in inputs]


# ---- the formats -------------------------------------------------------------------------------------


def write_torchscript(network: torch.nn.Module, inputs: Sequence[torch.Tensor], path: Path,
                      dynamic_spatial: bool) -> dict[str, Any]:
    """Scripted when the network scripts (shape-independent control flow kept), else traced."""
    started = time.perf_counter()
    method = "script"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = torch.jit.script(network)
        except Exception:  # noqa: BLE001 - networks with Python-only constructs do not script
            method = "trace"
            with torch.no_grad():
                module = torch.jit.trace(network, inputs[0], check_trace=False)
    module = torch.jit.freeze(module.eval()) if method == "script" else module
    # serialized in memory, then written by Python: torch.jit.save to a file name aborts the whole process
    # (std::terminate from its zip writer's destructor, exit 134) when the disk fills up, where a write()
    # from Python raises an OSError that names the file (`_writing`) and leaves no temp file
    buffer = _io.BytesIO()
    torch.jit.save(module, buffer)
    with open(path, "wb") as handle:
        handle.write(buffer.getbuffer())
        handle.flush()
        os.fsync(handle.fileno())
    return {"method": f"torch.jit.{method}", "dynamic_spatial": dynamic_spatial, "seconds": round(time.perf_counter() - started, 2)}


def write_onnx(network: torch.nn.Module, inputs: Sequence[torch.Tensor], path: Path, dynamic_spatial: bool,
               log=print) -> dict[str, Any]:
    """ONNX through torch.export (PyTorch's maintained exporter), weights inside the one file.

    The batch axis is always dynamic; spatial axes too when asked and the network allows it: when the
    graph cannot be exported with them, or the exported graph does not run at the second shape, the
    export is repeated with fixed spatial axes (the sliding window feeds fixed-size windows anyway).
    """
    import onnx

    started = time.perf_counter()
    attempts = [True, False] if dynamic_spatial else [False]
    failure = ""
    for spatial in attempts:
        try:
            _onnx_export(network, inputs[0], path, spatial)
            onnx.checker.check_model(str(path))
            if spatial:  # the dynamic axes must really work, not only be declared
                load_file(path, "onnx")(inputs[1])
        except MMARError:
            raise
        except Exception as error:  # noqa: BLE001 - exporter and runtime errors vary by network
            if space_error(error) is not None:  # a full disk, not the network: named by the caller (`_writing`)
                raise
            failure = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if spatial:
                log(f"onnx: dynamic spatial axes not possible ({failure[:200]}); exporting with fixed spatial axes")
                continue
            raise MMARError(f"export onnx: the network could not be exported to ONNX: {failure}") from None
        model = onnx.load(str(path), load_external_data=False)
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        return {
            "opset": opset,
            "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
            "input_name": model.graph.input[0].name,
            "input_dims": dims,  # names are dynamic axes, numbers fixed ones
            "dynamic_batch": isinstance(dims[0], str),
            "dynamic_spatial": all(isinstance(d, str) for d in dims[2:]),
            "fallback_reason": failure[:300] if failure else None,
            "seconds": round(time.perf_counter() - started, 2),
        }
    raise AssertionError("unreachable")


def _onnx_export(network: torch.nn.Module, x: torch.Tensor, path: Path, dynamic_spatial: bool) -> None:
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=4096)}
    if dynamic_spatial:
        # AUTO lets torch.export find each axis' constraints (e.g. divisible by the poolings) itself
        dims.update({axis: torch.export.Dim.AUTO for axis in range(2, x.dim())})
    # the exporter logs that torchvision's ops are not registered when torchvision is absent: not news here
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(_io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            _dynamo_export(network, x, path, dims)
        finally:
            registration.setLevel(level)


def _dynamo_export(network, x, path, dims) -> None:
    torch.onnx.export(
        network, (x,), str(path), input_names=["image"], output_names=["logits"], opset_version=OPSET,
        dynamo=True, external_data=False, dynamic_shapes=(dims,), verbose=False,
    )


def build_tensorrt(onnx_path: Path, path: Path, *, precision: str, input_shape: Sequence[int], max_batch: int,
                   log=print) -> dict[str, Any]:
    """A TensorRT engine from the ONNX graph: batch 1..max_batch, spatial axes fixed to the export shape."""
    import tensorrt as trt

    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch: the only mode TensorRT 10 has
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise MMARError(f"export tensorrt: TensorRT cannot parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 4 << 30)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 matmuls would lose 3 digits
    profile = builder.create_optimization_profile()
    rest = tuple(int(d) for d in input_shape[1:])
    name = network.get_input(0).name
    profile.set_shape(name, (1, *rest), (max_batch, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    log(f"tensorrt: building a {precision} engine for batch 1..{max_batch} x {list(rest)} (takes a minute)")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise MMARError("export tensorrt: TensorRT could not build an engine (see its messages above)")
    with open(path, "wb") as handle:
        handle.write(memoryview(serialized))
    return {
        "tensorrt": trt.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "max_batch": max_batch,
        "dynamic_spatial": False,
        "note": "an engine runs only on the GPU model and TensorRT version it was built with",
        "seconds": round(time.perf_counter() - started, 2),
    }


# ---- the report --------------------------------------------------------------------------------------


def checkpoint_facts(path: Path) -> dict[str, Any]:
    data = checkpoint.read_checkpoint(path)
    facts = {"path": str(path), "sha256": file_sha256(path)}
    for key in ("epoch", "key_metric", "metric"):
        if key in data and isinstance(data[key], (int, float, str)):
            facts[key] = data[key]
    return facts


def export_report(archive: Archive, meta: dict[str, Any], shape, precision: str, results: dict[str, Any],
                  skipped: dict[str, str]) -> dict[str, Any]:
    formats: dict[str, Any] = {}
    previous = _previous_report(archive.models_dir / EXPORT_JSON)
    for name, entry in previous.get("formats", {}).items():
        # formats not re-exported this time stay described while their file is still there
        if name in FORMATS and name not in results and (archive.models_dir / FORMATS[name]).is_file() \
                and isinstance(entry, dict) and "file" in entry:
            formats[name] = entry
    formats.update(results)
    for name, reason in skipped.items():
        formats.setdefault(name, {"skipped": reason})
    network = archive.config.get("network", {})
    return {
        "task": archive.task,
        "network": network.get("_target_") if isinstance(network, dict) else None,
        "checkpoint": meta,
        "input_shape": list(shape),
        "precision": precision,
        "tolerance_rule": "max abs diff <= fraction x max(1, max |PyTorch output|); fraction "
                          + ", ".join(f"{k} {v:g}" for k, v in TOLERANCE.items()),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "formats": formats,
    }


def _checkpoint_record(path: Path, models_dir: Path) -> str:
    """Relative to models/ when the checkpoint is there, so that the record follows a moved or copied MMAR."""
    try:
        return Path(path).resolve().relative_to(Path(models_dir).resolve()).as_posix()
    except ValueError:
        return str(Path(path).resolve())


def older_exports(report: dict[str, Any], sha256: str) -> list[str]:
    """Formats export.json still describes (their file is there) that were exported from another checkpoint."""
    return sorted(name for name, entry in report.get("formats", {}).items() if isinstance(entry, dict)
                  and "file" in entry and entry.get("checkpoint_sha256") not in (None, sha256))


def _previous_report(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _named(target: Path, write, *args, **kwargs):
    """`write(*args, **kwargs)`; a failure for want of space (ENOSPC, EDQUOT, EFBIG anywhere in the error's
    chain: the ONNX exporter and torch wrap it) becomes one error naming `target`.

    The error leaves here without its chain, raised outside the handler: the enclosing temp files
    (`mmar.io.atomic_path`) rename a space error they find in a chain after their own file, which here is
    another one, and an exception raised inside a handler (or a context manager's exit) is chained to it."""
    try:
        return write(*args, **kwargs)
    except MMARError as error:
        failure = error
    except Exception as error:  # noqa: BLE001 - only a full disk is renamed; everything else goes on up
        space = space_error(error)
        if space is None:
            raise
        failure = MMARError(f"{SPACE_ERRNOS[space.errno]} writing {target} (nothing was exported: the previous "
                            f"export in {target.parent}, if any, is kept as it was; free some space and run the "
                            "command again)")
    failure.__cause__ = failure.__context__ = None
    failure.__suppress_context__ = True
    raise failure


def _write_report(path: Path, report: dict[str, Any]) -> None:
    with atomic_write(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
        handle.write("\n")


@contextlib.contextmanager
def _scratch(folder: Path, suffix: str):
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".export.", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def _first(output):
    """Networks that return a tuple/list/dict (deep supervision, aux heads): the first output is the model's."""
    if isinstance(output, (tuple, list)):
        return output[0]
    if isinstance(output, dict):
        return next(iter(output.values()))
    return output
