"""The training loader streams all epochs through one iterator (engine/data.py `EpochBatches`)."""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch
from monai.data import DistributedSampler
from torch.utils.data import BatchSampler, Dataset

from mmar.engine.data import EpochBatches, make_loader


def _per_epoch_batches(dataset, batch_size, epochs, rank=0, replicas=1, seed=7):
    """What a DataLoader over the sampler gave, epoch by epoch, with MONAI's set_epoch(engine.state.epoch)."""
    sampler = DistributedSampler(dataset, even_divisible=True, num_replicas=replicas, rank=rank, shuffle=True,
                                 seed=seed)
    out = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        out += list(BatchSampler(sampler, batch_size, drop_last=False))
    return out


def _stream(dataset, batch_size, epochs, first_epoch=1, rank=0, replicas=1, seed=7):
    sampler = DistributedSampler(dataset, even_divisible=True, num_replicas=replicas, rank=rank, shuffle=True,
                                 seed=seed)
    return EpochBatches(sampler, batch_size, epochs, first_epoch=first_epoch)


def test_the_stream_holds_exactly_the_per_epoch_batches():
    data = list(range(11))  # 11 cases, batch 4: 3 batches an epoch, the last one of 3
    stream = _stream(data, 4, epochs=5)
    assert stream.batches_per_epoch == 3 and len(stream) == 15
    batches = list(stream)
    assert batches == _per_epoch_batches(data, 4, range(1, 6))
    assert [len(b) for b in batches[:3]] == [4, 4, 3]
    # each epoch is a permutation of its own
    epochs = [sorted(sum(batches[i:i + 3], [])) for i in range(0, 15, 3)]
    assert all(e == list(range(11)) for e in epochs)
    assert batches[:3] != batches[3:6]


def test_a_resumed_stream_starts_after_the_saved_epoch():
    data = list(range(10))
    resumed = _stream(data, 4, epochs=5, first_epoch=4)
    assert len(resumed) == 2 * 3
    assert list(resumed) == _per_epoch_batches(data, 4, range(4, 6))
    assert len(_stream(data, 4, epochs=5, first_epoch=6)) == 0


def test_ranks_stream_their_shards_of_every_epoch():
    data = list(range(9))
    ranks = [list(_stream(data, 2, epochs=3, rank=r, replicas=2)) for r in (0, 1)]
    assert ranks[0] == _per_epoch_batches(data, 2, range(1, 4), rank=0, replicas=2)
    per_epoch = 3  # 9 cases padded to 10, 5 per rank, batch 2
    for e in range(3):
        cases = sum(ranks[0][e * per_epoch:(e + 1) * per_epoch] + ranks[1][e * per_epoch:(e + 1) * per_epoch], [])
        assert set(cases) == set(range(9)) and len(cases) == 10


class _CountingDataset(Dataset):
    """Each fetch leaves a file behind: the test sees what the workers prepared, and when."""

    def __init__(self, folder, size):
        self.folder, self.size = folder, size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        (self.folder / f"{os.getpid()}-{time.monotonic_ns()}-{index}").touch()
        return {"image": torch.full((1, 2), float(index))}


def test_workers_prepare_the_next_epoch_while_the_main_process_is_busy(tmp_path):
    """The reason for the stream: after an epoch's last batch, the workers go on with the next epoch's first
    batches while the main process validates (here: sleeps), instead of waiting to be asked."""
    folder = tmp_path / "fetched"
    folder.mkdir()
    dataset = _CountingDataset(folder, 8)
    stream = _stream(list(range(8)), 2, epochs=3)
    loader = make_loader(dataset, batch_sampler=stream, num_workers=2)
    iterator = iter(loader)
    first_epoch = [next(iterator)["image"][:, 0, 0].tolist() for _ in range(stream.batches_per_epoch)]
    assert sorted(sum(first_epoch, [])) == [float(i) for i in range(8)]
    deadline = time.time() + 20
    while time.time() < deadline and len(list(folder.iterdir())) <= 8:
        time.sleep(0.05)
    assert len(list(folder.iterdir())) > 8, "the workers did not start on the next epoch"
    rest = [batch["image"][:, 0, 0].tolist() for batch in iterator]
    assert len(rest) == 2 * stream.batches_per_epoch  # epochs 2 and 3, then the stream ends
    expected = _per_epoch_batches(list(range(8)), 2, range(1, 4))
    assert first_epoch + rest == [[float(i) for i in b] for b in expected]


def _summary_run(tmp_path, monkeypatch, epochs: int, interval: float, step_s: float = 0.0) -> list[int]:
    """Epochs after which `training_curves.png` was drawn, in a run of `epochs` epochs."""
    from ignite.engine import Engine

    from mmar.engine import handlers

    drawn: list[int] = []
    monkeypatch.setattr(handlers, "write_curves", lambda path, history, key: drawn.append(history[-1]["epoch"]))
    monkeypatch.setattr(handlers, "CURVES_INTERVAL_S", interval)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    trainer = Engine(lambda engine, batch: (time.sleep(step_s), {"loss": torch.tensor(1.0)})[1])
    handlers.EpochSummary(handlers.Progress(None), optimizer, None, tmp_path, log=lambda *a: None).attach(trainer)
    trainer.run([torch.zeros(1, 1)] * 2, max_epochs=epochs)
    return drawn


def test_training_curves_are_drawn_after_the_last_epoch_and_at_most_every_interval(tmp_path, monkeypatch):
    assert _summary_run(tmp_path, monkeypatch, epochs=5, interval=3600) == [5]
    assert _summary_run(tmp_path, monkeypatch, epochs=5, interval=0) == [1, 2, 3, 4, 5]
    # epochs of at least 0.1 s (two 50 ms steps), drawn 0.25 s apart: some epochs before the last are
    # drawn (0.8 s in all), not every one (that would take epochs 2.5x longer than their sleeps)
    drawn = _summary_run(tmp_path, monkeypatch, epochs=8, interval=0.25, step_s=0.05)
    assert drawn[-1] == 8 and 2 <= len(drawn) < 8


class ParentDeathSignal(torch.utils.data.Dataset):
    """Each item: the signal Linux sends the loader worker that reads it when its parent dies."""

    def __len__(self):
        return 2

    def __getitem__(self, index):
        import ctypes

        signum = ctypes.c_int(0)
        ctypes.CDLL(None).prctl(2, ctypes.byref(signum), 0, 0, 0)  # PR_GET_PDEATHSIG
        return torch.tensor([signum.value, torch.utils.data.get_worker_info().id])


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_loader_workers_die_with_the_process_they_serve():
    """A training process killed hard (torchrun stopping a rank) must not leave its loader workers behind."""
    import signal

    from mmar.engine.data import make_loader

    loader = make_loader(ParentDeathSignal(), num_workers=2, batch_size=1)
    items = [batch[0] for batch in loader]
    assert sorted(int(worker) for _, worker in items) == [0, 1]  # both workers answered
    assert all(int(signum) == signal.SIGKILL for signum, _ in items)


def test_a_last_batch_of_one_is_left_out_when_asked_and_every_case_is_seen_over_the_epochs():
    data = list(range(9))  # batch 4: 4, 4 and a batch of one
    stream = _stream(data, 4, epochs=6)
    lone = EpochBatches(stream.sampler, 4, 6, drop_small=True)
    assert lone.dropped_per_epoch == 1 and lone.batches_per_epoch == 2 and len(lone) == 12
    batches = list(lone)
    assert [len(b) for b in batches] == [4] * 12
    assert batches == [b for b in _per_epoch_batches(data, 4, range(1, 7)) if len(b) > 1]
    assert set(sum(batches, [])) == set(data)  # a different case is left out each epoch
    # nothing is left out where the last batch holds half a batch or more, nor with batches of one
    assert not EpochBatches(_stream(list(range(10)), 4, 1).sampler, 4, 1, drop_small=True).dropped_per_epoch
    assert not EpochBatches(_stream(data, 1, 1).sampler, 1, 1, drop_small=True).dropped_per_epoch
    assert not stream.dropped_per_epoch and stream.batches_per_epoch == 3


@pytest.mark.parametrize("cases, size, dropped", [
    (546, 32, 2),  # BreastMNIST: 17 batches of 32 and a scrap of 2
    (600, 32, 0),  # the NIH sample: 18 of 32 and 24, kept
    (33, 32, 1), (47, 32, 15), (48, 32, 0), (64, 32, 0),
    (7, 8, 0),  # shorter than one batch: never cut
    (5, 2, 1), (6, 4, 0), (9, 4, 1),
])
def test_a_last_batch_under_half_a_batch_is_left_out(cases, size, dropped):
    batches = EpochBatches(_stream(list(range(cases)), size, 1).sampler, size, 2, drop_small=True)
    assert batches.dropped_per_epoch == dropped
    listed = list(batches)
    assert len(listed) == len(batches) == 2 * batches.batches_per_epoch
    assert sum(len(b) for b in listed) == 2 * (cases - dropped)
    assert not EpochBatches(_stream(list(range(cases)), size, 1).sampler, size, 2).dropped_per_epoch
