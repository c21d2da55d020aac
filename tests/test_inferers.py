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


class CountingCalls(torch.nn.Module):
    def __init__(self, network):
        super().__init__()
        self.network, self.batches = network, []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.network(x)


@pytest.mark.parametrize("shape, batched", [((12, 10, 8), True), ((16, 16, 16), True), ((20, 10, 8), False)])
def test_a_volume_within_one_window_sends_its_mirrors_as_one_batch(shape, batched):
    from monai.data import MetaTensor

    torch.manual_seed(0)
    x = MetaTensor(torch.randn(1, 1, *shape), affine=torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0])),
                   meta={"filename_or_obj": "case.nii.gz"})
    network = CountingCalls(PositionDependent())
    inferer = SlidingWindowMirrorInferer(roi_size=(16, 16, 16), sw_batch_size=8, overlap=0.25, mode="gaussian")
    assert inferer.fits_one_window(x) == batched
    with torch.no_grad():
        out = inferer(x, network)
    # one network call for the 8 mirrors (8 windows) when the volume fits a window; else one per mirror
    assert network.batches == ([8] if batched else [2] * 8)
    # the same average as one mirror at a time (MirrorEnsembleInferer over the plain sliding window)
    plain_window = SlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=8, overlap=0.25, mode="gaussian")
    with torch.no_grad():
        expected = MirrorEnsembleInferer(plain_window)(x, PositionDependent())
    torch.testing.assert_close(torch.softmax(out.as_tensor(), 1), torch.softmax(expected.as_tensor(), 1),
                               atol=1e-5, rtol=1e-4)
    # the input's metadata reaches the output (validate and infer write NIfTI files with its affine)
    assert isinstance(out, MetaTensor) and out.shape == (1, 3, *shape)
    assert torch.equal(out.affine, x.affine) and out.meta["filename_or_obj"] == "case.nii.gz"


def test_a_batch_of_cases_splits_back_per_case():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8, 8)
    inferer = SlidingWindowMirrorInferer(roi_size=(8, 8, 8), sw_batch_size=4, overlap=0.25)
    with torch.no_grad():
        together = inferer(x, PositionDependent())
        apart = torch.cat([inferer(x[i:i + 1], PositionDependent()) for i in range(2)])
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=1e-4)
