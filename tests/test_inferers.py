"""Test-time mirroring (`mmar.inferers.MirrorEnsembleInferer`): flips undone, probabilities averaged."""

import pytest
import torch
from monai.bundle import ConfigParser
from monai.inferers import SimpleInferer, SlidingWindowInferer

from mmar.inferers import MirrorEnsembleInferer, SlidingWindowMirrorInferer, mirror_axes_sets
from mmar.tasks.segmentation import default_configs


class PositionDependent(torch.nn.Module):
    """Not flip-equivariant: the logits depend on where a voxel is, so a wrong un-flip shows."""

    def forward(self, x):
        ramp = torch.linspace(0, 1, x.shape[2]).view(1, 1, -1, 1, 1)
        return torch.cat([x, x * ramp, -x + ramp], dim=1)


def test_views_are_every_subset_of_the_axes_identity_first():
    views = mirror_axes_sets([0, 1, 2])
    assert views[0] == () and len(views) == 8 and len(set(views)) == 8
    assert mirror_axes_sets([]) == [()]


def test_average_of_the_unflipped_softmaxes():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 6, 5, 4)
    network = PositionDependent()
    out = MirrorEnsembleInferer(SimpleInferer(), spatial_axes=[0, 1, 2])(x, network)
    expected = torch.zeros(2, 3, 6, 5, 4)
    for view in mirror_axes_sets([0, 1, 2]):
        dims = [a + 2 for a in view]
        flipped = torch.flip(x, dims) if dims else x
        logits = network(flipped)
        expected += torch.softmax(torch.flip(logits, dims) if dims else logits, dim=1)
    expected /= 8
    # the result is log-probabilities: a downstream softmax gives the averaged probabilities back
    torch.testing.assert_close(torch.softmax(out, dim=1), expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(expected, torch.softmax(network(x), dim=1), atol=1e-3)  # mirroring did matter


def test_no_axes_is_the_plain_prediction():
    x = torch.randn(1, 1, 4, 4, 4)
    network = PositionDependent()
    out = MirrorEnsembleInferer(SimpleInferer(), spatial_axes=[])(x, network)
    torch.testing.assert_close(torch.softmax(out, 1), torch.softmax(network(x), 1), atol=1e-6, rtol=1e-5)


def test_sigmoid_outputs_average_probabilities():
    x = torch.randn(1, 1, 4, 4, 4)
    network = PositionDependent()
    out = MirrorEnsembleInferer(SimpleInferer(), spatial_axes=[0], sigmoid=True)(x, network)
    expected = (torch.sigmoid(network(x)) + torch.sigmoid(torch.flip(network(torch.flip(x, [2])), [2]))) / 2
    torch.testing.assert_close(torch.sigmoid(out), expected, atol=1e-5, rtol=1e-4)


def test_axes_beyond_the_input_are_an_error():
    with pytest.raises(ValueError, match="spatial axes"):
        MirrorEnsembleInferer(SimpleInferer(), spatial_axes=[0, 1, 2])(torch.zeros(1, 1, 4, 4), PositionDependent())


def test_the_default_validation_config_builds_a_mirrored_sliding_window():
    train, validation = default_configs(num_classes=3, in_channels=1, spatial_size=[16, 16, 16], num_training=10)
    from mmar.archive import set_by_path

    merged = {**train, **validation}  # what `mmar validate` reads
    set_by_path(merged, "validate#inferer#sw_batch_size", 2)  # the plain window's key, on the mirrored one
    parser = ConfigParser(merged)
    inferer = parser.get_parsed_content("validate#inferer")
    assert isinstance(inferer, SlidingWindowMirrorInferer) and len(inferer.views) == 8
    assert inferer.sw_batch_size == 2
    # training validates every epoch to rank epochs: one plain pass
    plain = ConfigParser(train).get_parsed_content("validate#inferer")
    assert isinstance(plain, SlidingWindowInferer) and not isinstance(plain, SlidingWindowMirrorInferer)
    torch.manual_seed(0)
    network = torch.nn.Conv3d(1, 3, 3, padding=1)
    x = torch.randn(1, 1, 20, 18, 16)
    with torch.no_grad():
        out = inferer(x, network)
        # the same as wrapping the plain sliding window
        wrapped = MirrorEnsembleInferer(plain, spatial_axes=[0, 1, 2])(x, network)
    assert out.shape == (1, 3, 20, 18, 16)
    torch.testing.assert_close(out, wrapped, atol=1e-5, rtol=1e-5)
