"""The default segmentation recipe's data-fitted values (pure functions of the data's shapes and size)."""

from monai.bundle import ConfigParser

from mmar.tasks.segmentation import default_configs, default_epochs, patch_size


def test_patch_size_is_the_median_shape_rounded_up_to_the_poolings():
    # hippocampus: median 35x50x36 -> nnU-Net's own 40x56x40, not 48x64x48 (mostly padding)
    assert patch_size([(35, 50, 36), (34, 49, 35), (36, 51, 37)]) == [40, 56, 40]
    assert patch_size([(512, 512, 120)] * 3) == [96, 96, 96]  # CT: capped patches
    assert patch_size([(3, 4, 5)]) == [8, 8, 8]  # never below one pooling step


def test_default_epochs_is_a_step_budget_within_bounds():
    assert default_epochs(167) == 42  # hippocampus: 84 steps an epoch
    assert default_epochs(4) == 300  # tiny data: capped
    assert default_epochs(100_000) == 10  # huge data: at least 10 epochs


def test_default_recipe_builds_with_monai():
    train, validation = default_configs(num_classes=3, in_channels=2, spatial_size=[40, 56, 40], num_training=167)
    assert train["epochs"] == 42
    parser = ConfigParser(train)
    network = parser.get_parsed_content("network")
    assert network.in_channels == 2 and network.out_channels == 3
    optimizer = parser.get_parsed_content("train#optimizer")
    assert optimizer.param_groups[0]["lr"] == train["learning_rate"]
    assert optimizer.defaults["fused"] is True  # one kernel a step, on a CPU as on a GPU
    assert validation["validate"]["key_metric"] == train["validate"]["key_metric"] == "val_mean_dice"


def test_per_class_dice_takes_tensors_as_the_evaluator_leaves_them():
    import math

    import torch

    from mmar.tasks.segmentation import per_class_dice

    # MeanDice's details: [cases, classes], a tensor on the evaluator's device (a GPU there: copied first)
    details = torch.tensor([[0.8, float("nan")], [0.6, 0.5]], requires_grad=True)
    anterior, posterior = per_class_dice(details)
    assert math.isclose(anterior, 0.7, rel_tol=1e-6) and math.isclose(posterior, 0.5)  # NaN (class absent) skipped


def test_loader_workers_auto_is_2_on_a_cpu_and_up_to_4_per_gpu_process():
    import pytest

    from mmar.engine.data import loader_workers
    from mmar.errors import MMARError

    where = "train#num_workers"
    assert default_configs(num_classes=3, in_channels=1, spatial_size=[8, 8, 8])[0]["train"]["num_workers"] == "auto"
    assert loader_workers("auto", "cpu", where=where, cpu_count=64) == 2
    assert loader_workers("auto", "cuda", where=where, cpu_count=16, local_processes=1) == 4
    assert loader_workers("auto", "cuda", where=where, cpu_count=16, local_processes=8) == 2  # 2 cores a GPU
    assert loader_workers("auto", "cuda", where=where, cpu_count=4, local_processes=1) == 2
    assert loader_workers(0, "cuda", where=where) == 0 and loader_workers(6, "cpu", where=where) == 6
    for bad in ("four", -1, 2.5, True, None):
        with pytest.raises(MMARError, match=r"config: train#num_workers must be .* got"):
            loader_workers(bad, "cpu", where=where)


def test_training_batches_are_plain_tensors_and_validation_keeps_metadata(seg_mmar):
    """MetaTensor metadata costs a GPU step time (pickled from the workers, __torch_function__ on every op)."""
    import torch
    from monai.data import MetaTensor, list_data_collate

    from mmar.archive import load_archive
    from mmar.engine.workflow import build_dataset, keys_of, section_items

    archive = load_archive(seg_mmar)
    parser, keys = archive.parser(), list(keys_of(archive.config))
    train = build_dataset(parser, "train", section_items(archive, "train")[:2], keys=keys, with_augmentation=True)
    batch = list_data_collate([train[0], train[1]])
    for key in keys:
        assert type(batch[key]) is torch.Tensor, key
    assert batch[keys[0]].shape[1:] == (1, *archive.config["spatial_size"])
    validation = build_dataset(parser, "validate", section_items(archive, "validate")[:1], keys=keys,
                               with_augmentation=False)
    assert isinstance(validation[0][keys[0]], MetaTensor)  # affine etc. are needed to write predictions
