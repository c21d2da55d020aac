"""One predictor interface over the model formats: a callable `torch.nn.Module` taking a batch tensor
and returning logits, used by validation, inference and the benchmarks alike.

`ckpt` is the network from the config with the checkpoint's weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmar.archive import Archive
from mmar.engine import checkpoint
from mmar.errors import MMARError

KINDS = ("ckpt",)


def default_checkpoint(archive: Archive) -> Path:
    return archive.models_dir / checkpoint.MODEL_FILE


def load_predictor(archive: Archive, kind: str = "ckpt", ckpt: str | None = None, device=None) -> torch.nn.Module:
    if kind not in KINDS:
        raise MMARError(f"--model {kind}: unknown model format (choose one of {', '.join(KINDS)})")
    device = device or torch.device("cpu")
    path = Path(ckpt) if ckpt else default_checkpoint(archive)
    network = archive.parser().get_parsed_content("network")
    checkpoint.load_weights(network, path)
    return network.to(device).eval()
