"""What `amp: true` means on the device at hand.

- A GPU with native bfloat16 (compute capability 8.0 and up: A100, H100, L4, ...): bf16 autocast through
  MONAI's engines (`amp_kwargs`), with NO gradient scaler. bfloat16 has float32's range, so scaling is not
  needed, nor `GradScaler.step`'s read of its inf check back to the host every step. (Not a speed choice:
  on an H200 the default recipe's step costs the same in fp16 + scaler, bf16 and float32, about 15 ms,
  `bench/train_step.py`; it is bound by issuing kernels.)
- An older GPU (V100, T4): fp16 autocast + gradient scaling, MONAI's default.
- A CPU with AVX512-BF16 or AMX: bf16 autocast around the network (MONAI's engines only autocast on
  "cuda"); a training step of the default 3D UNet is about 1.75x faster (bench/train.py, docs/speed.md).
  On a CPU without them bf16 is emulated and slower, so it is used only where oneDNN reports native
  support.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch

DISABLE_ENV = "MMAR_CPU_AMP"  # "0": keep float32 on the CPU even when the config asks for amp
CUDA_DTYPE_ENV = "MMAR_CUDA_AMP_DTYPE"  # "float16": fp16 + gradient scaling even where bf16 is native


class Precision(NamedTuple):
    network: torch.nn.Module  # what the engine runs (the network, or a CPU autocast wrapper sharing its weights)
    cuda_amp: bool  # MONAI engines' `amp` flag
    amp_kwargs: dict[str, Any]  # MONAI engines' `amp_kwargs`: torch.autocast("cuda", **amp_kwargs)
    grad_scaler: bool  # whether the trainer keeps MONAI's GradScaler (fp16 only)
    name: str


def cuda_bf16_supported(device: torch.device) -> bool:
    if os.environ.get(CUDA_DTYPE_ENV, "").lower() in ("float16", "fp16", "half"):
        return False
    try:
        return torch.cuda.get_device_capability(device)[0] >= 8
    except (AssertionError, RuntimeError):  # no CUDA in this build / no such device
        return False


def cpu_bf16_supported() -> bool:
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an older or a non-oneDNN build
        return False


class Autocast(torch.nn.Module):
    """Runs the wrapped network's forward pass under autocast on `device_type` and returns float32 outputs.

    The wrapper shares the network's parameters (kept in float32); checkpoints are written from the
    network itself, so their keys do not change. MONAI's engines autocast on CUDA themselves (`amp_kwargs`);
    this is for the CPU and for code that runs a network outside an engine (bench/infer.py).
    """

    def __init__(self, module: torch.nn.Module, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.module(*args, **kwargs)
        return _to_float(out)


class CPUAutocast(Autocast):
    """bf16 autocast on the CPU (MONAI's engines only autocast on "cuda")."""

    def __init__(self, module: torch.nn.Module):
        super().__init__(module, "cpu", torch.bfloat16)


def _to_float(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (list, tuple)):
        return type(out)(_to_float(o) for o in out)
    if isinstance(out, dict):
        return {k: _to_float(v) for k, v in out.items()}
    return out


def for_device(network: torch.nn.Module, device: torch.device, amp: bool) -> Precision:
    """How to run `network` on `device` when the config's `amp` is `amp`."""
    if not amp:
        return Precision(network, False, {}, False, "float32")
    if device.type == "cuda":
        if cuda_bf16_supported(device):
            return Precision(network, True, {"dtype": torch.bfloat16}, False, "bf16 autocast (CUDA)")
        return Precision(network, True, {"dtype": torch.float16}, True, "fp16 autocast + gradient scaling (CUDA)")
    if device.type == "cpu" and cpu_bf16_supported():
        return Precision(CPUAutocast(network), False, {}, False, "bf16 autocast (CPU)")
    return Precision(network, False, {}, False, "float32 (this CPU has no native bfloat16)")


def without_grad_scaler(trainer) -> None:
    """Replace the GradScaler MONAI's trainer creates for any `amp` by a disabled one (a pass-through).

    MONAI's `SupervisedTrainer` autocasts only when it has a scaler, so the scaler cannot simply be removed.
    """
    trainer.scaler = torch.amp.GradScaler("cuda", enabled=False)
