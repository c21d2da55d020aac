"""The exponential moving average of the weights (train#ema): the arithmetic, its state, its config."""

import pytest
import torch

from conftest import run_mmar
from mmar.engine.weight_average import WeightAverage, decay_at, ema_decay
from mmar.errors import MMARError


def _network(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3), torch.nn.BatchNorm3d(4), torch.nn.Conv3d(4, 2, 1))


def _step(network: torch.nn.Module, optimizer, seed: int) -> None:
    torch.manual_seed(seed)
    network.train()
    optimizer.zero_grad()
    network(torch.randn(2, 1, 6, 6, 6)).square().mean().backward()
    optimizer.step()


def test_the_decay_warms_up_then_stays_at_the_configured_value():
    assert decay_at(0.99, 0) == pytest.approx(0.1)  # the first update mostly takes the new weights
    values = [decay_at(0.99, n) for n in range(2000)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[100] == pytest.approx(101 / 110) and values[-1] == 0.99
    assert decay_at(0.5, 0) == pytest.approx(0.1) and decay_at(0.5, 50) == 0.5


def test_each_update_is_the_moving_average_of_every_floating_point_tensor():
    network = _network()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    average = WeightAverage(network, 0.9)
    expected = {k: v.detach().clone() for k, v in network.state_dict().items()}
    for n in range(30):
        _step(network, optimizer, seed=n)
        average.update()
        decay = decay_at(0.9, n)
        for key, value in network.state_dict().items():
            if value.is_floating_point():  # parameters and batch-norm statistics are averaged
                expected[key] = decay * expected[key] + (1 - decay) * value
            else:  # the batch counter follows the network
                expected[key] = value.clone()
    assert average.updates == 30
    mine = average.module.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(mine[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert int(mine["1.num_batches_tracked"]) == 30
    # the average is a separate model: it differs from the trained weights and takes no gradients
    assert not torch.equal(mine["0.weight"], network.state_dict()["0.weight"])
    assert not any(p.requires_grad for p in average.module.parameters())


def test_a_restored_average_goes_on_exactly_as_an_unbroken_one():
    network = _network()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    unbroken = WeightAverage(network, 0.95)
    for n in range(12):
        _step(network, optimizer, seed=n)
        unbroken.update()
    saved = unbroken.state_dict()
    resumed = WeightAverage(network, 0.95)  # a new process: a fresh copy of the (restored) network
    resumed.load_state_dict(saved)
    assert resumed.updates == 12
    for n in range(12, 20):
        _step(network, optimizer, seed=n)
        unbroken.update()
        resumed.update()
    for key, value in unbroken.module.state_dict().items():
        torch.testing.assert_close(resumed.module.state_dict()[key], value, msg=key)


def test_restart_averages_from_the_current_weights():
    network = _network()
    average = WeightAverage(network, 0.99)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(1.0)
    average.updates = 7
    average.restart()
    assert average.updates == 0
    for key, value in network.state_dict().items():
        torch.testing.assert_close(average.module.state_dict()[key], value, msg=key)


@pytest.mark.parametrize("section", [None, False, {"decay": 0}, {"decay": 0.0}])
def test_no_averaging(section):
    assert ema_decay(section) is None


def test_the_configured_decay():
    assert ema_decay({"decay": 0.99}) == 0.99


@pytest.mark.parametrize("section, message", [
    ({"decay": 1.0}, "train#ema#decay must be a number in [0, 1)"),
    ({"decay": -0.1}, "train#ema#decay"),
    ({"decay": "0.99"}, "train#ema#decay"),
    ({"decay": True}, "train#ema#decay"),
    ({}, "train#ema#decay"),
    ({"decay": 0.99, "momentum": 0.1}, "unknown key(s) momentum"),
    (0.99, "train#ema must be an object"),
])
def test_a_bad_section_is_named(section, message):
    with pytest.raises(MMARError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        ema_decay(section)


def test_a_bad_decay_stops_mmar_train_with_the_field_named(seg_mmar):
    result = run_mmar("train", str(seg_mmar), "--set", "train#ema#decay=1.5", "epochs=1", check=False)
    assert result.returncode != 0
    assert "train#ema#decay must be a number in [0, 1)" in result.stderr
    assert not (seg_mmar / "models" / "model.ckpt").exists()
