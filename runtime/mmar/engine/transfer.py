"""Start a training from another model's weights when the label set differs (Clara's "pretrained model, then
your own labels").

A checkpoint trained on 15 findings and a config for 3 differ only in the output layer: every other tensor
has the same name and shape. `plan_transfer` compares the two state dicts and says what to load and what to
leave at the network's fresh initialisation; it accepts a difference only in the network's last modules (its
head, in the order the network registers them) and refuses a body that does not match, since loading a
network half-way would train from a model that is neither pretrained nor fresh.

Pure over shapes: the decision needs no tensors, so it is tested without torch models where that is simpler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from mmar.errors import MMARError


@dataclass(frozen=True)
class TransferPlan:
    """What a start from another model does: `load` the tensors whose name and shape match, `reinitialise`
    (name, checkpoint shape, network shape) the head's tensors whose shape differs."""

    load: tuple[str, ...]
    reinitialise: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = field(default=())

    @property
    def exact(self) -> bool:
        return not self.reinitialise

    def describe(self) -> str:
        changed = ", ".join(f"{name} {list(old)} -> {list(new)}" for name, old, new in self.reinitialise)
        total = len(self.load) + len(self.reinitialise)
        return (f"new label set: re-initialised the output layer ({changed}); "
                f"loaded {len(self.load)} of {total} tensors")


def plan_transfer(checkpoint_shapes: Mapping[str, Sequence[int]], network_shapes: Mapping[str, Sequence[int]],
                  source: str) -> TransferPlan:
    """The plan to load a checkpoint (`checkpoint_shapes`: name -> shape) into a network (`network_shapes`, in
    the network's own order). Raises MMARError naming `source` when the body does not match."""
    missing = [name for name in network_shapes if name not in checkpoint_shapes]
    unexpected = [name for name in checkpoint_shapes if name not in network_shapes]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"the network has {len(missing)} tensor(s) the checkpoint lacks (first: {missing[0]})")
        if unexpected:
            parts.append(f"the checkpoint has {len(unexpected)} the network lacks (first: {unexpected[0]})")
        raise MMARError(f"checkpoint {source} does not fit the configured network: {'; '.join(parts)} "
                        "(was it trained with another network config?)")
    differing = [(name, tuple(checkpoint_shapes[name]), tuple(network_shapes[name]))
                 for name in network_shapes if tuple(checkpoint_shapes[name]) != tuple(network_shapes[name])]
    if not differing:
        return TransferPlan(load=tuple(network_shapes))
    # the head: every tensor from the first differing one to the end of the network. A new label set changes
    # the output layer's channel count there and nowhere else: each differing dimension goes from one count K
    # to one other count K', and the head's weights (2 or more dimensions) all differ; a matching weight after
    # the first difference (a wider body, other input channels) is another network. The head's matching
    # vectors (an activation's or a norm's parameters, e.g. the PReLU of UNet's last block) load as they are.
    names = list(network_shapes)
    first = names.index(differing[0][0])
    pairs = set()
    for name, old, new in differing:
        if len(old) != len(new):
            pairs.add(None)
        pairs.update((a, b) for a, b in zip(old, new) if a != b)
    reinitialised = {name for name, _, _ in differing}
    kept_weights = [name for name in names[first:] if name not in reinitialised and len(network_shapes[name]) >= 2]
    if len(pairs) != 1 or None in pairs or kept_weights:
        name, old, new = differing[0]
        raise MMARError(
            f"checkpoint {source} does not fit the configured network: {name} is {list(old)} in the checkpoint "
            f"and {list(new)} in the network; only the output layer may differ (another number of labels or "
            "classes), the body must be the same network (was it trained with another network config?)")
    return TransferPlan(load=tuple(name for name in names if name not in reinitialised),
                        reinitialise=tuple(differing))


def load_allowing_new_labels(network: Any, path: str | Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Load a checkpoint's weights into `network` as `checkpoint.load_weights` does, except that an output
    layer of another size (another label set) is left at its fresh initialisation, said in one log line."""
    import torch

    from mmar.engine import checkpoint

    data = checkpoint.read_checkpoint(path)
    weights = {k.removeprefix("module."): v for k, v in checkpoint.model_weights(data, path).items()}
    target = checkpoint.unwrap(network)
    own = target.state_dict()
    plan = plan_transfer({k: tuple(v.shape) for k, v in weights.items() if isinstance(v, torch.Tensor)},
                         {k: tuple(v.shape) for k, v in own.items()}, str(path))
    if plan.exact:
        target.load_state_dict(weights, strict=True)
        return data
    merged = dict(own)
    merged.update({name: weights[name] for name in plan.load})
    target.load_state_dict(merged, strict=True)
    log(plan.describe())
    return data
