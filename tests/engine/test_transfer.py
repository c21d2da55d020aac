"""Fine-tuning onto a new label set (Clara's "pretrained model, then your own labels"): every tensor of the body
loads, the output layer starts fresh, and a body that differs is refused (mmar.engine.transfer)."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import DenseNet121, UNet

from conftest import SMALL_CLASSIFICATION, make_seg_mmar, run_mmar
from mmar.errors import MMARError
from mmar.engine.transfer import load_allowing_new_labels, plan_transfer


def shapes(network):
    return {name: tuple(t.shape) for name, t in network.state_dict().items()}


def unet(out_channels, channels=(8, 16, 32), in_channels=1):
    return UNet(3, in_channels, out_channels, channels, (2, 2), num_res_units=2)


def test_a_new_number_of_classes_changes_only_the_output_block_of_a_unet():
    plan = plan_transfer(shapes(unet(2)), shapes(unet(3)), "a.ckpt")
    assert [name for name, _, _ in plan.reinitialise] == [
        "model.2.0.conv.weight", "model.2.0.conv.bias", "model.2.1.conv.unit0.conv.weight", "model.2.1.conv.unit0.conv.bias"]
    # the last block's PReLU weight has no class dimension: it loads
    assert "model.2.0.adn.A.weight" in plan.load and "model.0.conv.unit0.conv.weight" in plan.load


def test_a_new_number_of_labels_changes_only_the_classifier_of_a_densenet():
    plan = plan_transfer(shapes(DenseNet121(spatial_dims=2, in_channels=1, out_channels=15)),
                         shapes(DenseNet121(spatial_dims=2, in_channels=1, out_channels=3)), "nih.ckpt")
    assert plan.reinitialise == (("class_layers.out.weight", (15, 1024), (3, 1024)),
                                 ("class_layers.out.bias", (15,), (3,)))
    assert "class_layers.out" in plan.describe() and "loaded 725 of 727 tensors" in plan.describe()


def test_the_same_network_loads_exactly():
    assert plan_transfer(shapes(unet(3)), shapes(unet(3)), "a.ckpt").exact


@pytest.mark.parametrize("other", [unet(2, channels=(16, 32, 64)), unet(2, in_channels=2)], ids=["wider", "inputs"])
def test_another_body_is_refused_naming_the_checkpoint_and_the_first_layer(other):
    with pytest.raises(MMARError, match=r"a\.ckpt does not fit.*model\.0\.conv\.unit0\.conv\.weight.*only the output layer"):
        plan_transfer(shapes(unet(2)), shapes(other), "a.ckpt")


def test_missing_layers_are_refused():
    source = shapes(unet(2))
    del source["model.0.residual.bias"]
    with pytest.raises(MMARError, match="lacks.*model.0.residual.bias"):
        plan_transfer(source, shapes(unet(2)), "a.ckpt")


def test_load_keeps_the_fresh_output_layer_and_every_body_tensor(tmp_path):
    torch.manual_seed(0)
    trained = unet(2)
    torch.save({"model": trained.state_dict()}, tmp_path / "model.ckpt")
    torch.manual_seed(1)
    target = unet(3)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    lines = []
    load_allowing_new_labels(target, tmp_path / "model.ckpt", lines.append)
    state = target.state_dict()
    assert torch.equal(state["model.0.conv.unit0.conv.weight"], trained.state_dict()["model.0.conv.unit0.conv.weight"])
    assert torch.equal(state["model.2.0.conv.weight"], fresh["model.2.0.conv.weight"])
    assert len(lines) == 1 and "re-initialised the output layer (model.2.0.conv.weight [16, 2, 3, 3, 3] -> [16, 3, 3, 3, 3]" in lines[0]


# --- through the real CLI -------------------------------------------------------------------------------------


def cls_mmar(root, datalist, extra=()):
    from mmar.archive import load_archive
    from mmar.scaffold import init

    init(root, task="classification", datalist=datalist, epochs=1, log=lambda *_: None)
    archive = load_archive(root, [*SMALL_CLASSIFICATION, *extra])
    (root / "config" / "config_train.json").write_text(json.dumps(archive.config, indent=2))
    return root


def test_finetune_a_classifier_onto_another_label_set(tmp_path):
    from mmar.synthetic import write_classification_dataset

    three = write_classification_dataset(tmp_path / "data", cases=12, size=24, seed=5)  # [1, 1, 3]: 5 outputs
    source = cls_mmar(tmp_path / "source", three)
    run_mmar("train", str(source))
    # the user's own labels: the two binary findings only
    datalist = json.loads(three.read_text())
    datalist["label_format"], datalist["label_names"] = [1, 1], datalist["label_names"][:2]
    for key in ("training", "validation"):
        for item in datalist[key]:
            item["label"] = item["label"][:2]
    two = tmp_path / "data" / "two_labels.json"
    two.write_text(json.dumps(datalist))
    target = cls_mmar(tmp_path / "target", two)
    done = run_mmar("train", str(target), "--finetune", "--ckpt", str(source / "models" / "model.ckpt"))
    out = done.stdout + done.stderr
    assert "re-initialised the output layer (class_layers.out.weight [5, " in out and "-> [2, " in out
    assert (target / "models" / "model.ckpt").is_file()


def test_finetune_a_segmentation_model_from_two_classes_to_three(tmp_path, seg_data):
    # a 2-class copy of the data (foreground merged), trained; then the user's 3-class labels
    binary = tmp_path / "binary"
    shutil.copytree(seg_data.parent, binary)
    for path in (binary / "labelsTr").glob("*.nii.gz"):
        image = nib.load(str(path))
        nib.save(nib.Nifti1Image((np.asarray(image.dataobj) > 0).astype(np.uint8), image.affine), str(path))
    source = make_seg_mmar(tmp_path / "source", binary / seg_data.name, epochs=1)
    assert json.loads((source / "config" / "config_train.json").read_text())["num_classes"] == 2
    run_mmar("train", str(source))
    target = make_seg_mmar(tmp_path / "target", seg_data, epochs=1)
    done = run_mmar("train", str(target), "--finetune", "--ckpt", str(source / "models" / "model.ckpt"))
    assert "re-initialised the output layer" in done.stdout + done.stderr
    assert (target / "models" / "model.ckpt").is_file()


def test_finetune_from_another_network_is_refused_before_training(tmp_path, seg_data):
    from mmar.synthetic import write_classification_dataset

    source = cls_mmar(tmp_path / "source", write_classification_dataset(tmp_path / "cls", cases=8, size=24, seed=2))
    run_mmar("train", str(source))
    target = make_seg_mmar(tmp_path / "target", seg_data, epochs=1)
    done = run_mmar("train", str(target), "--finetune", "--ckpt", str(source / "models" / "model.ckpt"), check=False)
    assert done.returncode != 0
    err = done.stdout + done.stderr
    assert "does not fit the configured network" in err and "Traceback" not in err
    assert not (target / "models" / "model.ckpt").exists()
