"""An exponential moving average (EMA) of the network's weights: the model that is validated and saved.

`train#ema: {"decay": 0.99}` keeps, beside the trained network, a copy whose weights follow it after every
optimizer step: ema = decay_n * ema + (1 - decay_n) * weights, with decay_n = min(decay, (1 + n) / (10 + n))
after n updates, the warm-up of timm's and YOLO's model EMA, so that the copy follows the fast early
progress instead of dragging the random initial weights along for hundreds of steps. The per-epoch
validation runs on the copy, `model.ckpt` and `model_final.ckpt` hold it; the trained network, the optimizer
and the copy go into `train_state.pt`, so a resumed run averages on exactly as an unbroken one.

Why: with the learning rate still high, the weights after any one step are a noisy sample around where
training is heading; their average is closer. On hippocampus (docs/speed.md, round 6) the averaged weights
reached validation Dice 0.85 one or two epochs earlier (two seeds) and were about 0.01 above the trained
weights in epochs 8 to 10, with the training itself unchanged.

Written here rather than taken from torch or ignite: `torch.optim.swa_utils.AveragedModel` keeps its update
count as a tensor and, on every update, either tests it on the GPU (`device="cuda"`) or copies it there
(`n_averaged.to(device)`, a blocking copy): a synchronisation of the GPU stream per step; ignite's
`EMAHandler` updates parameter by parameter (about a hundred kernel launches per step for the default UNet,
whose GPU step is bound by launching kernels). Here one `torch._foreach_lerp_` updates every floating-point
tensor (parameters and buffers, e.g. batch-norm statistics) in one go, and the count is a Python int.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from ignite.engine import Events

from mmar.archive import switch_section
from mmar.engine.checkpoint import unwrap

WARMUP_OFFSET = 10  # decay_n = (1 + n) / (WARMUP_OFFSET + n) until it reaches the configured decay


def ema_decay(section: dict[str, Any] | None) -> float | None:
    """The configured decay, or None when the section is absent, null or `{"decay": 0}` (no averaging)."""
    return switch_section(section, "train#ema", "decay", example=0.99, fits=lambda v: 0 <= v < 1, bounds="[0, 1)")


def decay_at(decay: float, updates: int) -> float:
    """The averaging weight of the old copy at update number `updates` (0-based), after the warm-up."""
    return min(decay, (1 + updates) / (WARMUP_OFFSET + updates))


class WeightAverage:
    """The averaged copy of `network` (built from its current weights: after a fine-tuning start is loaded)."""

    def __init__(self, network: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        source = unwrap(network)
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(source).eval().requires_grad_(False)
        self._source = source
        self._pairs = self._tensor_pairs()

    def _tensor_pairs(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
        """(copy, source) pairs matched by state_dict key: the floating-point ones, averaged, and the others
        (e.g. batch norm's num_batches_tracked), copied."""
        theirs = self._source.state_dict(keep_vars=True)
        pairs = [(mine.detach(), theirs[key].detach()) for key, mine in self.module.state_dict(keep_vars=True).items()]
        return [p for p in pairs if p[0].is_floating_point()], [p for p in pairs if not p[0].is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        averaged, copied = self._pairs
        if averaged:
            mine, theirs = zip(*averaged)
            torch._foreach_lerp_(list(mine), list(theirs), 1.0 - decay_at(self.decay, self.updates))
        for mine, theirs in copied:
            mine.copy_(theirs)
        self.updates += 1

    def attach(self, trainer) -> None:
        """Update after every iteration of an ignite engine (the optimizer has stepped by then)."""
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _engine: self.update())

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "weights": self.module.state_dict()}

    def restart(self) -> None:
        """Start averaging afresh from the network's current weights (a resumed run that had no average)."""
        self.module.load_state_dict(self._source.state_dict())
        self.updates = 0

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])
