"""model.ckpt under Clara's `best` rule changes only when the key metric improves (best starts at -inf);
model_final.ckpt always.
The verdict (`judge`, recorded by the state) comes before the write (`save`, after the state)."""

from types import SimpleNamespace

import torch

from mmar.engine.handlers import BestModelSaver, Progress


def _validated(evaluator, epoch, metric):
    if metric is not None:
        evaluator.state.epoch, evaluator.state.metrics = epoch, {"val_mean_dice": metric}


def test_model_ckpt_only_on_improvement(tmp_path):
    network = torch.nn.Linear(2, 1)
    progress = Progress("val_mean_dice", rule="best")  # Clara's rule (the others: test_model_selection.py)
    evaluator = SimpleNamespace(state=SimpleNamespace(epoch=0, metrics={}))
    saver = BestModelSaver(progress, evaluator, network, tmp_path, {}, log=lambda *_: None)
    path = tmp_path / "model.ckpt"
    saved_epochs = []
    for epoch, metric in enumerate([-5.0, -7.0, 0.3, 0.2, 0.3, 0.9, None], start=1):
        with torch.no_grad():
            network.weight.fill_(epoch)
        _validated(evaluator, epoch, metric)
        saver(SimpleNamespace(state=SimpleNamespace(epoch=epoch)))
        if path.exists():
            saved_epochs.append(torch.load(path, weights_only=False)["epoch"])
    # a negative first metric still beats the initial -inf; ties and drops do not replace the best
    assert saved_epochs == [1, 1, 3, 3, 3, 6, 6]
    best = torch.load(path, weights_only=False)
    assert best["metric"] == 0.9 and float(best["model"]["weight"][0, 0]) == 6
    assert progress.best_metric == 0.9 and progress.best_epoch == 6 and progress.model_epoch == 6


def test_the_verdict_is_recorded_before_model_ckpt_is_written(tmp_path):
    network = torch.nn.Linear(2, 1)
    progress = Progress("val_mean_dice", rule="best")  # Clara's rule (the others: test_model_selection.py)
    evaluator = SimpleNamespace(state=SimpleNamespace(epoch=0, metrics={}))
    saver = BestModelSaver(progress, evaluator, network, tmp_path, {}, log=lambda *_: None)
    engine = SimpleNamespace(state=SimpleNamespace(epoch=1))
    _validated(evaluator, 1, 0.5)
    saver.judge(engine)
    # what the state records between the two steps: model.ckpt is due for epoch 1, not written yet
    assert progress.state_dict()["model_epoch"] == 1 and progress.state_dict()["best_metric"] == 0.5
    assert not (tmp_path / "model.ckpt").exists()
    saver.save(engine)
    assert torch.load(tmp_path / "model.ckpt", weights_only=False)["epoch"] == 1
    # an epoch that does not improve records nothing new and writes nothing
    engine.state.epoch = 2
    _validated(evaluator, 2, 0.4)
    saver.judge(engine)
    saver.save(engine)
    assert progress.model_epoch == 1 and torch.load(tmp_path / "model.ckpt", weights_only=False)["epoch"] == 1


def test_without_validation_model_ckpt_is_the_latest_epoch(tmp_path):
    progress = Progress(None)
    saver = BestModelSaver(progress, None, torch.nn.Linear(2, 1), tmp_path, {}, log=lambda *_: None)
    for epoch in (1, 2):
        saver(SimpleNamespace(state=SimpleNamespace(epoch=epoch)))
    assert progress.model_epoch == 2 and torch.load(tmp_path / "model.ckpt", weights_only=False)["epoch"] == 2
