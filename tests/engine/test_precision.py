"""`amp: true` on a CPU: bf16 autocast where the CPU has native bf16, float32 elsewhere."""

import torch

from mmar.engine import precision


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 1))


def test_without_amp_the_network_is_untouched():
    net = _net()
    assert precision.for_device(net, torch.device("cpu"), False) == (net, False, {}, False, "float32")
    assert precision.for_device(net, torch.device("cuda"), False) == (net, False, {}, False, "float32")


def test_cuda_with_native_bf16_autocasts_bf16_without_a_grad_scaler(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
    net = _net()
    chosen = precision.for_device(net, torch.device("cuda"), True)
    assert chosen.network is net and chosen.cuda_amp and not chosen.grad_scaler
    assert chosen.amp_kwargs == {"dtype": torch.bfloat16} and "bf16" in chosen.name


def test_older_gpus_and_the_env_switch_get_fp16_with_gradient_scaling(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # a V100
    chosen = precision.for_device(_net(), torch.device("cuda"), True)
    assert chosen.cuda_amp and chosen.grad_scaler and chosen.amp_kwargs == {"dtype": torch.float16}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setenv(precision.CUDA_DTYPE_ENV, "float16")
    assert precision.for_device(_net(), torch.device("cuda"), True).grad_scaler


def test_without_grad_scaler_passes_the_step_through():
    class Trainer:
        scaler = None

    trainer = Trainer()
    precision.without_grad_scaler(trainer)
    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    before = net[0].weight.detach().clone()
    loss = net(torch.randn(1, 1, 4, 4, 4)).square().mean()
    assert trainer.scaler.scale(loss) is loss  # no scaling: the loss itself
    loss.backward()
    trainer.scaler.step(optimizer)
    trainer.scaler.update()
    assert not torch.equal(before, net[0].weight)
    assert trainer.scaler.state_dict() == {}


def test_cpu_without_native_bf16_stays_float32(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: False)
    net = _net()
    wrapped, cuda_amp, _, _, name = precision.for_device(net, torch.device("cpu"), True)
    assert wrapped is net and not cuda_amp and "float32" in name


def test_env_switch_turns_cpu_bf16_off(monkeypatch):
    monkeypatch.setenv(precision.DISABLE_ENV, "0")
    assert precision.cpu_bf16_supported() is False


def test_cpu_autocast_trains_the_wrapped_parameters_in_float32(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: True)
    net = _net()
    keys = list(net.state_dict())
    wrapped, cuda_amp, _, _, name = precision.for_device(net, torch.device("cpu"), True)
    assert isinstance(wrapped, precision.CPUAutocast) and not cuda_amp and "bf16" in name
    x = torch.randn(2, 1, 8, 8, 8)
    out = wrapped(x)
    assert out.dtype == torch.float32 and out.shape == (2, 2, 8, 8, 8)
    # close to the float32 forward pass (bf16 keeps ~3 significant digits)
    torch.testing.assert_close(out, net(x), atol=0.05, rtol=0.05)
    before = net[0].weight.detach().clone()
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    out.square().mean().backward()
    optimizer.step()
    assert net[0].weight.dtype == torch.float32 and not torch.equal(before, net[0].weight)
    assert list(net.state_dict()) == keys  # checkpoints are written from `net`: same keys as without amp


def test_outputs_in_containers_come_back_as_float32():
    class Two(torch.nn.Module):
        def forward(self, x):
            return {"a": x @ x.T, "b": [x @ x.T, torch.ones(1, dtype=torch.long)]}

    out = precision.CPUAutocast(Two())(torch.randn(3, 3))
    assert out["a"].dtype == torch.float32 and out["b"][0].dtype == torch.float32
    assert out["b"][1].dtype == torch.long
