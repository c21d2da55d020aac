"""One predictor interface over the model formats: a callable `torch.nn.Module` taking a batch tensor
and returning logits, used by validation, inference, export's parity checks and the benchmarks alike.

| kind   | file (default under models/) | runs on                                                     |
| ------ | ---------------------------- | ----------------------------------------------------------- |
| `ckpt` | model.ckpt                   | the network from the config with the checkpoint's weights   |
| `ts`   | model.ts                     | TorchScript (`torch.jit.load`)                              |
| `onnx` | model.onnx                   | ONNX Runtime: CUDAExecutionProvider when present, else CPU  |
| `trt`  | model.trt                    | a serialized TensorRT engine (needs `tensorrt` and a GPU)   |

Every wrapper takes and returns torch tensors on the caller's device, so MONAI's `SlidingWindowInferer`
and `SupervisedEvaluator` use them unchanged. Exported models have a dynamic batch axis; their spatial
axes are dynamic where the network allowed it, else fixed to the exported ROI, which the sliding window
feeds them anyway (the inferer's `roi_size` must then equal the exported spatial size: checked with a clear
error rather than a shape error from deep inside a runtime).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from mmar.archive import Archive
from mmar.engine import checkpoint
from mmar.errors import MMARError
from mmar.io import file_sha256

KINDS = ("ckpt", "ts", "onnx", "trt")
ALIASES = {"torchscript": "ts", "tensorrt": "trt", "checkpoint": "ckpt", "pt": "ckpt"}
FILES = {"ckpt": checkpoint.MODEL_FILE, "ts": "model.ts", "onnx": "model.onnx", "trt": "model.trt"}
EXPORT_JSON = "export.json"
FORMAT_OF = {"ts": "torchscript", "onnx": "onnx", "trt": "tensorrt"}  # kind -> export.json's format name


def normalize_kind(kind: str) -> str:
    kind = ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise MMARError(f"--model {kind}: unknown model format (choose one of {', '.join(KINDS)})")
    return kind


def default_checkpoint(archive: Archive, kind: str = "ckpt") -> Path:
    """The file a model kind reads when `--ckpt` is not given: models/model.<ext>."""
    return archive.models_dir / FILES[normalize_kind(kind)]


def load_network(archive: Archive, ckpt: str | os.PathLike | None = None) -> torch.nn.Module:
    """The configured network with the checkpoint's weights, in eval mode, on the CPU."""
    path = Path(ckpt) if ckpt else default_checkpoint(archive)
    checkpoint.read_checkpoint(path)  # a missing or corrupt file is named before the network is built
    network = archive.parser().get_parsed_content("network")
    checkpoint.load_weights(network, path)
    return network.eval()


def load_predictor(archive: Archive, kind: str = "ckpt", ckpt: str | None = None, device=None, *,
                   allow_stale: bool = False, warn=None) -> torch.nn.Module:
    """The predictor for `--model kind [--ckpt file]`. An exported file that export.json says was made from
    another checkpoint than the one now in its place is refused (`allow_stale` turns that into a warning)."""
    kind = normalize_kind(kind)
    device = torch.device(device) if device is not None else torch.device("cpu")
    warn = warn or (lambda text: print(text, file=sys.stderr, flush=True))
    if kind == "ckpt":
        return load_network(archive, ckpt).to(device)
    path = Path(ckpt) if ckpt else default_checkpoint(archive, kind)
    if kind == "trt" and tensorrt_unavailable():
        raise MMARError(f"--model trt: cannot run a TensorRT engine here: {tensorrt_unavailable()}")
    if not path.is_file():
        hint = "" if ckpt else f" (run `mmar export {archive.root}` first, or give --ckpt)"
        raise MMARError(f"--model {kind}: model file not found: {path}{hint}")
    check = export_check(archive, kind, path)
    if check["status"] == "stale":
        if not allow_stale:
            raise MMARError(check["message"] + " (or add --allow-stale-export to use it anyway)")
        warn(f"WARNING: {check['message']}; used anyway (--allow-stale-export)")
    elif check["status"] == "unverified":
        warn(f"WARNING: {check['message']}")
    predictor = load_file(path, kind, device)
    predictor.export_check = check  # what validate records beside its metrics
    return predictor


def load_file(path: str | os.PathLike, kind: str, device=None, **options) -> torch.nn.Module:
    """A predictor for an exported file, with no MMAR around it (export's parity checks, benchmarks)."""
    kind = normalize_kind(kind)
    device = torch.device(device) if device is not None else torch.device("cpu")
    path = Path(path)
    if kind == "ts":
        return TorchScriptPredictor(path, device)
    if kind == "onnx":
        return OnnxPredictor(path, device, **options)
    if kind == "trt":
        return TensorRTPredictor(path, device)
    raise MMARError(f"{path}: a checkpoint needs its MMAR's network config; use load_predictor")


# ---- is an export still the model it stands for? ---------------------------------------------------


def export_check(archive: Archive, kind: str, path: Path) -> dict[str, Any]:
    """Whether the exported `path` still stands for the checkpoint it was exported from.

    models/export.json records, per format, the sha256 of the checkpoint it was made from (and its path).
    A new training or fine-tune rewrites that checkpoint but leaves model.onnx / model.ts as they were:
    their results would then be reported as the model's while they are an older model's. Returns
    {"status": "current" | "stale" | "unverified" | "unrecorded", "message": ..., and the facts}:
    "unrecorded" for a file export.json does not describe (a file given with --ckpt elsewhere),
    "unverified" when the record or the checkpoint it names is missing.
    """
    kind = normalize_kind(kind)
    models = archive.models_dir
    default = models / FILES[kind]
    facts: dict[str, Any] = {"file": str(path)}
    if Path(path).resolve() != default.resolve():
        return {**facts, "status": "unrecorded", "message": f"{path} is not described by {models / EXPORT_JSON}"}
    report_file = models / EXPORT_JSON
    try:
        report = json.loads(report_file.read_text(encoding="utf-8"))
        entry = report["formats"][FORMAT_OF[kind]]
        recorded_sha = entry.get("checkpoint_sha256") or report["checkpoint"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return {**facts, "status": "unverified",
                "message": f"{path}: {report_file} has no record of it, so which checkpoint it was exported from "
                           f"is unknown (re-export with `mmar export {archive.root} --formats {FORMAT_OF[kind]}`)"}
    top = report.get("checkpoint") if isinstance(report.get("checkpoint"), dict) else {}
    source = _checkpoint_in_place(archive, entry.get("checkpoint"),
                                  top.get("path") if top.get("sha256") == recorded_sha else None)
    facts.update({"checkpoint": str(source), "exported_from_sha256": recorded_sha})
    if "file_sha256" in entry and file_sha256(path) != entry["file_sha256"]:
        return {**facts, "status": "stale",
                "message": f"{path} is not the file {report_file} describes (sha256 {file_sha256(path)}, recorded "
                           f"{entry['file_sha256']}): it was replaced after the export. Re-export: "
                           f"`mmar export {archive.root} --ckpt {source} --formats {FORMAT_OF[kind]}`"}
    if not source.is_file():
        return {**facts, "status": "unverified",
                "message": f"{path} was exported from {source} (sha256 {recorded_sha}), which no longer exists: "
                           "cannot check that the export is still that model"}
    current = file_sha256(source)
    facts["checkpoint_sha256"] = current
    if current != recorded_sha:
        return {**facts, "status": "stale",
                "message": f"{path} is stale: it was exported from checkpoint sha256 {recorded_sha}, but {source} "
                           f"is now sha256 {current} (trained or fine-tuned since). Re-export: "
                           f"`mmar export {archive.root} --ckpt {source} --formats {FORMAT_OF[kind]}`"}
    return {**facts, "status": "current", "message": f"{path} matches {source} (sha256 {current})"}


def _checkpoint_in_place(archive: Archive, entry_path: str | None, report_path: str | None) -> Path:
    """The checkpoint an export stands for. The format's own record (relative to models/ when the checkpoint
    was there, so it follows a moved or copied MMAR); else export.json's top-level path, read as the file of
    that name in this models folder when there is one (older records were absolute); else models/model.ckpt."""
    if entry_path:
        path = Path(entry_path)
        return path if path.is_absolute() else archive.models_dir / path
    if report_path:
        local = archive.models_dir / Path(report_path).name
        return local if local.is_file() else Path(report_path)
    return default_checkpoint(archive)


class TorchScriptPredictor(torch.nn.Module):
    def __init__(self, path: Path, device: torch.device):
        super().__init__()
        try:
            self.module = torch.jit.load(str(path), map_location=device).eval()
        except Exception as error:  # noqa: BLE001 - torch raises RuntimeError / ValueError / zip errors
            raise MMARError(f"{path}: not a readable TorchScript model: {_first_line(error)}") from None
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class OnnxPredictor(torch.nn.Module):
    """An ONNX Runtime session behind `forward(tensor) -> tensor`.

    On CUDA with onnxruntime-gpu the input and output stay on the GPU (I/O binding on torch's buffers);
    otherwise plain numpy arrays cross the boundary: on the CPU that costs a copy-free `.numpy()` view,
    measured no slower than binding.
    """

    def __init__(self, path: Path, device: torch.device, *, threads: int | None = None,
                 providers: Sequence[str] | None = None, optimization: str = "all"):
        super().__init__()
        import onnxruntime as ort

        self.device = device
        options = ort.SessionOptions()
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        # the same thread count as torch's, so a comparison of the two is fair and neither oversubscribes
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.log_severity_level = 3
        # ORT's worker threads spin after each run by default; between the sliding window's runs torch
        # blends the windows on the same cores, and spinning threads starve it (measured 3x slower on 2 busy cores: docs/export.md)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        if providers is None:
            wanted = ["CUDAExecutionProvider"] if device.type == "cuda" else []
            providers = [p for p in wanted if p in available] + ["CPUExecutionProvider"]
        provider_options = [{"device_id": device.index or 0} if p == "CUDAExecutionProvider" else {}
                            for p in providers]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=list(providers),
                                                provider_options=provider_options)
        except Exception as error:  # noqa: BLE001 - ORT raises its own exception types
            raise MMARError(f"{path}: not a loadable ONNX model: {_first_line(error)}") from None
        self.path = path
        self.on_gpu = self.session.get_providers()[0] == "CUDAExecutionProvider"
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise MMARError(f"{path}: expected a model with one input, found {len(inputs)}")
        self.input_name = inputs[0].name
        self.input_shape = list(inputs[0].shape)  # ints where fixed, names (or None) where dynamic
        self.output_names = [o.name for o in outputs]

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_fixed_axes(self.path, self.input_shape, tuple(x.shape), skip_batch=True)
        fixed_batch = self.input_shape[0] if isinstance(self.input_shape[0], int) else None
        if fixed_batch and x.shape[0] != fixed_batch:
            return torch.cat([self._run(chunk) for chunk in _chunks(x, fixed_batch)])[: x.shape[0]]
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().contiguous()
        if self.on_gpu and x.is_cuda:
            return self._run_bound(x)
        result = self.session.run(self.output_names[:1], {self.input_name: x.cpu().numpy()})[0]
        return torch.from_numpy(result).to(x.device)

    def _run_bound(self, x: torch.Tensor) -> torch.Tensor:
        # the input is read straight from torch's GPU buffer; the output (shape known only after the run)
        # is copied back through the host, which keeps this path free of version-specific DLPack calls
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", x.device.index or 0, _numpy_float32(), tuple(x.shape), x.data_ptr())
        binding.bind_output(self.output_names[0], "cuda", x.device.index or 0)
        torch.cuda.current_stream(x.device).synchronize()
        self.session.run_with_iobinding(binding)
        return torch.from_numpy(binding.copy_outputs_to_cpu()[0]).to(x.device)


class TensorRTPredictor(torch.nn.Module):
    """A serialized TensorRT engine (TensorRT >= 10 API), run on torch's current CUDA stream."""

    def __init__(self, path: Path, device: torch.device):
        super().__init__()
        reason = tensorrt_unavailable()
        if reason:
            raise MMARError(f"--model trt: cannot run {path}: {reason}")
        import tensorrt as trt

        self.device = device if device.type == "cuda" else torch.device("cuda", 0)
        self.path = path
        # the logger and runtime must outlive the engine (TensorRT does not keep them alive itself)
        self.logger = trt.Logger(trt.Logger.ERROR)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(self.device):
            self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise MMARError(f"{path}: not a TensorRT engine for this GPU and TensorRT {trt.__version__} "
                                "(engines are specific to both: re-run `mmar export` on this machine)")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == mode)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) != mode)
        self.input_shape = list(self.engine.get_tensor_shape(self.input_name))  # -1 where dynamic
        profile = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.max_batch = int(profile[2][0])
        self.input_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.input_name))
        self.output_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.output_name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [None if d < 0 else int(d) for d in self.input_shape]
        check_fixed_axes(self.path, shape, tuple(x.shape), skip_batch=True)
        source_device = x.device
        x = x.to(self.device)
        outputs = [self._run(chunk) for chunk in _chunks(x, self.max_batch, pad=False)]
        return torch.cat(outputs).to(source_device)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.input_dtype).contiguous()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        output = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.output_dtype,
                             device=self.device)
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, output.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise MMARError(f"{self.path}: TensorRT execution failed for input shape {tuple(x.shape)}")
        return output.float()


def tensorrt_unavailable() -> str | None:
    """Why a TensorRT engine cannot be built or run here, or None when it can."""
    try:
        import tensorrt as trt
    except ImportError:
        return "the `tensorrt` Python package is not installed (pip install tensorrt, on a machine with a CUDA GPU)"
    except Exception as error:  # noqa: BLE001 - a broken install raises OSError from its shared libraries
        return f"the `tensorrt` package does not load: {_first_line(error)}"
    if not torch.cuda.is_available():
        return f"no CUDA GPU is available to torch (TensorRT {trt.__version__} needs one)"
    if int(trt.__version__.split(".")[0]) < 10:
        return f"TensorRT {trt.__version__} is too old (10 or newer is needed)"
    return None


def check_fixed_axes(path, model_shape: Sequence, shape: tuple[int, ...], *, skip_batch: bool) -> None:
    """A fixed axis of an exported model must match the input: say so plainly when it does not."""
    if len(model_shape) != len(shape):
        raise MMARError(f"{path}: the model takes {len(model_shape)}-D input, got shape {list(shape)}")
    for axis, (want, got) in enumerate(zip(model_shape, shape)):
        if axis == 0 and skip_batch:
            continue
        if isinstance(want, int) and want > 0 and want != got:
            raise MMARError(
                f"{path}: the model was exported for input shape {list(model_shape)} (fixed axis {axis} = {want}) "
                f"but got {list(shape)}: set the inferer's roi_size to the exported spatial size, or re-export "
                "with --input-shape"
            )


def _chunks(x: torch.Tensor, size: int, pad: bool = True):
    for start in range(0, x.shape[0], size):
        chunk = x[start:start + size]
        if pad and chunk.shape[0] < size:  # a fixed batch axis: pad the last chunk, drop the padding after
            chunk = torch.cat([chunk, chunk.new_zeros((size - chunk.shape[0], *chunk.shape[1:]))])
        yield chunk


def _numpy_float32():
    import numpy as np

    return np.float32


def _torch_dtype(trt, dtype) -> torch.dtype:
    return {trt.float32: torch.float32, trt.float16: torch.float16}.get(dtype, torch.float32)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
