"""model.ckpt changes only when the key metric improves (best starts at -inf); model_final.ckpt always."""

from types import SimpleNamespace

import torch

from mmar.engine.handlers import BestModelSaver, Progress


def test_model_ckpt_only_on_improvement(tmp_path):
    network = torch.nn.Linear(2, 1)
    progress = Progress("val_mean_dice")
    evaluator = SimpleNamespace(state=SimpleNamespace(epoch=0, metrics={}))
    saver = BestModelSaver(progress, evaluator, network, tmp_path, {}, log=lambda *_: None)
    path = tmp_path / "model.ckpt"
    saved_epochs = []
    for epoch, metric in enumerate([-5.0, -7.0, 0.3, 0.2, 0.3, 0.9, None], start=1):
        with torch.no_grad():
            network.weight.fill_(epoch)
        if metric is not None:
            evaluator.state.epoch, evaluator.state.metrics = epoch, {"val_mean_dice": metric}
        saver(SimpleNamespace(state=SimpleNamespace(epoch=epoch)))
        if path.exists():
            saved_epochs.append(torch.load(path, weights_only=False)["epoch"])
    # a negative first metric still beats the initial -inf; ties and drops do not replace the best
    assert saved_epochs == [1, 1, 3, 3, 3, 6, 6]
    best = torch.load(path, weights_only=False)
    assert best["metric"] == 0.9 and float(best["model"]["weight"][0, 0]) == 6
    assert progress.best_metric == 0.9 and progress.best_epoch == 6
