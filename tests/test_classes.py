"""Class mapping: the shipped ImageNet index, matching by name, mapping files, restricted predictions."""

from pathlib import Path

import pytest
import torch
import torchvision
from timm.data import ImageNetInfo

from lib.core.errors import UserError
from lib.core.params import BackboneParams
from lib.models.backbones import load_backbone
from lib.models.classes import ClassMap, OutputNames, imagenet_classes, map_by_file, map_by_names, resolve_class_map

TOY = OutputNames("toy world", ("a", "b", "c"))


def test_the_shipped_index_agrees_with_torchvision_and_timm() -> None:
    index, info = imagenet_classes(), ImageNetInfo()
    assert index.names == tuple(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"])
    assert index.ids == tuple(info.index_to_label_name(i) for i in range(1000))
    assert index.lemmas[281] == ("tabby", "tabby cat") and index.ids[281] == "n02123045"


def test_classes_match_by_wordnet_id_name_or_lemma_ignoring_case_and_separators() -> None:
    names = ["n01440764", "Great_White-shark", "tabby cat", "espresso"]
    mapped = map_by_names(names, imagenet_classes())
    assert mapped.outputs == (0, 2, 281, 967) and mapped.n_outputs == 1000 and mapped.how == "by name (ImageNet-1k)"
    # torchvision names the two "cardigan" outputs "Cardigan" (the corgi) and "cardigan" (the sweater): case decides
    assert map_by_names(["Cardigan", "cardigan"], imagenet_classes()).outputs == (264, 474)


def test_unmapped_ambiguous_and_shared_classes_are_listed_with_the_fix() -> None:
    with pytest.raises(UserError) as caught:
        map_by_names(["tabby", "unicorn", "dragon", "crane", "tabby_cat"], imagenet_classes())
    message = str(caught.value)
    assert message.startswith("backbone.class_map: cannot map the dataset's classes onto the backbone's outputs")
    assert "2 of 5 dataset classes name no ImageNet-1k output: unicorn, dragon" in message
    # "crane" is the name of output 517 and a lemma of 134 ("crane bird" in torchvision): the name wins
    assert "'crane'" not in message
    assert "tabby, tabby_cat -> output 281" in message
    assert "backbone.class_map to a CSV 'dataset_class,backbone_index'" in message and "backbone.new_head: true" in message
    with pytest.raises(UserError, match=r"'panda' \(lemma of outputs 387 lesser panda \(n02509815\), 388 giant panda \(n02510455\)\)"):
        map_by_names(["panda"], imagenet_classes())


def test_a_mapping_file_covers_every_class_with_its_own_output(tmp_path: Path) -> None:
    path = tmp_path / "map.csv"
    path.write_text("dataset_class,backbone_index\nb,7\na, 3\n\n")
    assert map_by_file(path, ["a", "b"], 10) == ClassMap((3, 7), 10, f"from {path}")
    cases = {
        "dataset_class,index\na,1\n": "the header must be 'dataset_class,backbone_index'",
        "dataset_class,backbone_index\na,1\n": "1 dataset classes are not mapped: b",
        "dataset_class,backbone_index\na,1\nb,10\n": "line 3: expected 'dataset_class,backbone_index' with an index in [0, 10)",
        "dataset_class,backbone_index\na,1\na,2\nb,3\n": "line 3: 'a' is mapped twice",
        "dataset_class,backbone_index\na,1\nb,1\n": "a, b -> output 1",
        "dataset_class,backbone_index\na,1\nb,2\nz,3\n": "not dataset classes: z (the classes are a, b)",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(UserError, match="backbone.class_map") as caught:
            map_by_file(path, ["a", "b"], 10)
        assert message in str(caught.value)
    with pytest.raises(UserError, match="class map file not found"):
        map_by_file(tmp_path / "absent.csv", ["a"], 10)


def test_resolution_by_name_file_or_new_head(tmp_path: Path) -> None:
    common = {"class_map": None, "new_head": False, "arch": "toy:cnn"}
    assert resolve_class_map(["c", "a"], "toy", TOY, 3, **common).outputs == (2, 0)
    assert resolve_class_map(["unknown"], "imagefolder", TOY, 3, **{**common, "new_head": True}) is None
    (tmp_path / "map.csv").write_text("dataset_class,backbone_index\nunknown,1\n")
    assert resolve_class_map(["unknown"], "imagefolder", None, 3, **{**common, "class_map": str(tmp_path / "map.csv")}).outputs == (1,)
    with pytest.raises(UserError) as caught:  # a toy model on other data: which params to set
        resolve_class_map(["a"], "imagefolder", TOY, 3, **common)
    assert str(caught.value).startswith("backbone.arch: 'toy:cnn' — backbone toy:cnn is a toy-world model")
    assert "set backbone.arch and backbone.weights to a real backbone" in str(caught.value)
    with pytest.raises(UserError, match="have no known class names.*backbone.class_map"):
        resolve_class_map(["a"], "imagefolder", None, 3, **common)
    with pytest.raises(ValueError, match="set class_map .* or new_head: true .*, not both"):
        BackboneParams(class_map="map.csv", new_head=True)


def test_predictions_restricted_to_the_mapped_outputs() -> None:
    mapping = ClassMap((4, 0, 2), 5, "test")
    logits = torch.tensor([[0.0, 1.0, 0.0, 9.0, 2.0], [3.0, 0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 5.0, 0.0, 1.0]])
    assert mapping.predict(logits).tolist() == [0, 1, 2]  # argmax over outputs 4, 0, 2
    assert mapping.top1(logits).tolist() == [-1, 1, 2]  # row 0: unmapped output 3 wins
    assert mapping.output_of(torch.tensor([2, 0])).tolist() == [2, 4]
    assert ClassMap.from_attrs(mapping.to_attrs()) == mapping
    with pytest.raises(ValueError, match=r"logits must be \(B, 5\)"):
        mapping.predict(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="distinct indices"):
        ClassMap((1, 1), 5, "test")


def test_loaded_backbones_know_what_their_outputs_mean() -> None:
    assert load_backbone("torchvision:resnet18", None).output_names is imagenet_classes()
    assert load_backbone("toy:cnn", None).output_names.names[:2] == ("desert_star", "sea_star")
    assert load_backbone("toy:cnn", None, num_classes=3).output_names is None
    assert load_backbone("torchvision:resnet18", None, num_classes=3).output_names is None
