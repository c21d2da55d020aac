"""Model checkpoints and resumable training state, always written atomically.

`model.ckpt` / `model_final.ckpt` hold {"model": state_dict, ...metadata}; MONAI bundle and Clara
checkpoints ({"model": ...}, {"net": ...} or a bare state_dict) load too.
`train_state.pt` holds everything a killed run needs to go on: model, optimizer, scheduler, AMP scaler,
the ignite engine state (epoch, iteration), the best key metric so far and the history of epoch summaries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmar.errors import MMARError
from mmar.io import atomic_path

MODEL_FILE = "model.ckpt"
FINAL_FILE = "model_final.ckpt"
STATE_FILE = "train_state.pt"


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DistributedDataParallel / torch.compile wrappers."""
    network = getattr(network, "module", network)
    return getattr(network, "_orig_mod", network)


def save_model(path: Path, network: torch.nn.Module, **metadata: Any) -> None:
    state = {key: value.detach().cpu() for key, value in unwrap(network).state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"model": state, **metadata}, tmp)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MMARError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated zip, pickle garbage, not a torch file...
        raise MMARError(f"checkpoint {path} is unreadable (corrupt or not a PyTorch checkpoint): {error}") from None
    if not isinstance(data, dict):
        raise MMARError(f"checkpoint {path}: expected a dict of weights, got {type(data).__name__}")
    return data


def model_weights(data: dict[str, Any], path: Path | str) -> dict[str, torch.Tensor]:
    for key in ("model", "net", "network", "state_dict"):
        if isinstance(data.get(key), dict):
            return data[key]
    if data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return data
    raise MMARError(f"checkpoint {path}: no model weights found (keys: {', '.join(map(str, data))})")


def load_weights(network: torch.nn.Module, path: str | Path) -> dict[str, Any]:
    """Load a checkpoint's weights into `network`; a mismatch names the checkpoint and the layers."""
    data = read_checkpoint(path)
    weights = model_weights(data, path)
    weights = {k.removeprefix("module."): v for k, v in weights.items()}
    try:
        unwrap(network).load_state_dict(weights, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0:3]
        raise MMARError(
            f"checkpoint {path} does not fit the configured network: {' '.join(first)} "
            "(was it trained with another network config?)"
        ) from None
    return data


def save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    data = read_checkpoint(path)
    if "trainer" not in data or "model" not in data:
        raise MMARError(f"{path}: not an mmar training state (delete it to start training from scratch)")
    return data
