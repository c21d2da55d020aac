"""Model checkpoints and resumable training state, always written atomically.

`model.ckpt` / `model_final.ckpt` hold {"model": state_dict, ...metadata}; MONAI bundle and Clara
checkpoints ({"model": ...}, {"net": ...} or a bare state_dict) load too.
`train_state.pt` holds everything a killed run needs to go on: model, optimizer, scheduler, AMP scaler,
the ignite engine state (epoch, iteration), the best key metric so far and the history of epoch summaries.

The state is the record a resume trusts: it is written first at the end of an epoch, and `model.ckpt` is
replaced after it, only when the state says so (`progress.model_epoch`: the epoch whose weights model.ckpt
holds). A kill between the two leaves a state that names a newer model.ckpt than the file on disk, and the
state holds those very weights (they are the epoch's), so the next run writes them (`repair_models`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmar.errors import MMARError
from mmar.io import atomic_write

MODEL_FILE = "model.ckpt"
FINAL_FILE = "model_final.ckpt"
STATE_FILE = "train_state.pt"


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DistributedDataParallel / torch.compile wrappers."""
    network = getattr(network, "module", network)
    return getattr(network, "_orig_mod", network)


def save_model(path: Path, network: torch.nn.Module, **metadata: Any) -> None:
    state = {key: value.detach().cpu() for key, value in unwrap(network).state_dict().items()}
    save_weights(path, state, **metadata)


def save_weights(path: Path, weights: dict[str, torch.Tensor], **metadata: Any) -> None:
    _save(path, {"model": weights, **metadata})


def _save(path: Path, data: dict[str, Any]) -> None:
    # through a Python file object: a failed write then surfaces as an OSError (out of space: named by
    # atomic_write) rather than only as torch's `unexpected pos` RuntimeError
    with atomic_write(path, "wb") as handle:
        torch.save(data, handle)


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
    _save(path, state)


def load_state(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    data = read_checkpoint(path)
    if "trainer" not in data or "model" not in data:
        raise MMARError(f"{path}: not an mmar training state (delete it to start training from scratch)")
    return data


def saved_epoch(path: Path) -> int | None:
    """The `epoch` recorded in a model checkpoint; None when it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 - a damaged file is as good as a missing one here
        return None
    epoch = data.get("epoch") if isinstance(data, dict) else None
    return int(epoch) if isinstance(epoch, int) else None


def model_of_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights that are "the model" of a state's epoch: the weight average when train#ema is on."""
    ema = state.get("ema")
    return ema["weights"] if ema else state["model"]


def repair_models(models_dir: Path, state: dict[str, Any], log=print) -> list[str]:
    """Write what a run killed at the end of an epoch had recorded in its state but not yet in the files:
    `model.ckpt` of the state's own epoch and, for a complete run, `model_final.ckpt`. Returns their names."""
    progress = state.get("progress", {})
    epoch = int(state["trainer"]["epoch"])
    meta = dict(state.get("meta", {}))
    written = []
    if progress.get("model_epoch") == epoch and saved_epoch(models_dir / MODEL_FILE) != epoch:
        extra = {}
        if progress.get("key_metric") is not None and progress.get("best_epoch") == epoch:
            extra = {"key_metric": progress["key_metric"], "metric": progress["best_metric"]}
            if progress.get("selection_rule"):
                from mmar.engine.selection import record

                extra["selection"] = record(progress["selection_rule"], progress["key_metric"], epoch,
                                            progress["best_metric"])
        save_weights(models_dir / MODEL_FILE, model_of_state(state), epoch=epoch, **extra, **meta)
        written.append(MODEL_FILE)
    if state.get("complete") and saved_epoch(models_dir / FINAL_FILE) != epoch:
        save_weights(models_dir / FINAL_FILE, model_of_state(state), epoch=epoch, **meta)
        written.append(FINAL_FILE)
    if written:
        log(f"{' and '.join(written)} written from {STATE_FILE} (epoch {epoch}): the previous run was stopped "
            "after recording the epoch and before writing them")
    return written
