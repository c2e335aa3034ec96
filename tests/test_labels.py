"""Data folders are labelled with the model's class indices, matched by name or id, never by sorted position."""

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from vitcompress.data import FMNIST_CLASSES, resolve_data
from vitcompress.errors import DataError
from vitcompress.labels import ClassSpace, read_label_mapping

CONFIG = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic",
          "crop_pct": 0.9, "crop_mode": "center"}
IMAGENET = ClassSpace.of(1000, None)


def write_images(root, classes, per_class=2):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40, 30), (i * 40, 100, 200)).save(root / c / f"{i}.png")


def test_imagenet_folders_by_wnid_or_any_synonym():
    folders = ["n01440764", "goldfish", "Great_White_Shark", "Carassius auratus"]
    assert IMAGENET.map_folders(folders) == {"n01440764": 0, "goldfish": 1, "Great_White_Shark": 2,
                                             "Carassius auratus": 1}
    assert IMAGENET.source == "imagenet-1k ids and names"


def test_model_class_names_win_and_punctuation_does_not_matter():
    space = ClassSpace.of(10, list(FMNIST_CLASSES))
    assert space.map_folders(["T-shirt_top", "ankle boot", "Sneaker"]) == {"T-shirt_top": 0, "ankle boot": 9,
                                                                           "Sneaker": 7}


def test_numbered_folders_are_indices_and_unnamed_classes_take_sorted_order_only_at_equal_count():
    assert ClassSpace.of(5, None).map_folders(["0", "3", "4"]) == {"0": 0, "3": 3, "4": 4}
    assert ClassSpace.of(2, None).map_folders(["dog", "cat"]) == {"cat": 0, "dog": 1}


@pytest.mark.parametrize(("space", "folders", "message"), [
    (IMAGENET, ["cats", "dogs", "tench"], r"2 of 3 class folders match none of the model's 1000 classes "
                                          r"\(imagenet-1k ids and names.*'cats', 'dogs'.*--labels FILE"),
    (ClassSpace.of(3, None), ["a", "b"], r"2 of 2 class folders match none of the model's 3 classes \(it names none"),
    (ClassSpace.of(3, None), ["0", "5"], r"1 of 2 .*'5'"),
    (ClassSpace.of(10, list(FMNIST_CLASSES)), ["bag", "hat"], r"1 of 2 .*'hat'"),
])
def test_unmatched_folders_are_one_clear_error(space, folders, message):
    with pytest.raises(DataError, match=message):
        space.map_folders(folders)


def test_explicit_mapping_by_index_or_name(tmp_path):
    path = tmp_path / "labels.yaml"
    path.write_text("cats: 281\ndogs: golden retriever\n")
    assert IMAGENET.map_folders(["cats", "dogs"], read_label_mapping(path)) == {"cats": 281, "dogs": 207}
    for bad in ("cats: 1000\n", "cats: no such class\n"):
        path.write_text(bad)
        with pytest.raises(DataError, match="not one of the model's 1000 classes"):
            IMAGENET.map_folders(["cats"], read_label_mapping(path))


@pytest.mark.parametrize(("name", "text", "message"), [
    ("missing.yaml", None, "does not exist"),
    ("bad.yaml", "a: [1,\n", "not valid YAML"),
    ("bad.json", "{", "not valid JSON"),
    ("list.yaml", "- a\n- b\n", "expected a mapping"),
    ("float.yaml", "a: 1.5\n", "expected a mapping"),
])
def test_bad_mapping_files(tmp_path, name, text, message):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message):
        read_label_mapping(tmp_path / name)


def test_train_and_val_share_one_mapping(tmp_path):
    write_images(tmp_path / "train", ["goldfish", "tench"])
    write_images(tmp_path / "val", ["goldfish"])
    bundle = resolve_data(str(tmp_path), CONFIG, None, IMAGENET)
    assert {label for _, label in bundle.train} == {0, 1}
    assert {label for _, label in bundle.val} == {1}, "goldfish is ImageNet class 1 in both splits"


@pytest.mark.parametrize("only", ["train", "val"])
def test_one_split_without_the_other_is_an_error(tmp_path, only):
    write_images(tmp_path / only, ["tench"])
    with pytest.raises(DataError, match=f"has {only}/ but no"):
        resolve_data(str(tmp_path), CONFIG, None, IMAGENET)


def test_more_folders_than_classes_is_an_error(tmp_path):
    write_images(tmp_path, ["0", "1", "2"])
    with pytest.raises(DataError, match="1 of 3 class folders"):
        resolve_data(str(tmp_path), CONFIG, None, ClassSpace.of(2, None))


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n truncated"])
def test_corrupt_image_is_a_data_error_naming_it(tmp_path, content):
    write_images(tmp_path, ["tench"])
    (tmp_path / "tench" / "broken.png").write_bytes(content)
    bundle = resolve_data(str(tmp_path), CONFIG, None, IMAGENET)
    part = next(p for p in (bundle.train, bundle.val) if any(path.name == "broken.png" for path, _ in p.items))
    with pytest.raises(DataError, match="broken.png cannot be read"):
        list(DataLoader(part, batch_size=8))


def test_display_names_are_the_models_then_imagenets_then_the_folders(tmp_path):
    """A 1000-class head shows ImageNet-1k's names (a shared first synonym gets its WordNet id); a model that
    names no classes, trained on a folder per class, shows the folder names; else nothing."""
    from vitcompress.labels import display_names, imagenet_names

    names = imagenet_names(1000)
    assert names[:3] == ["tench", "goldfish", "great white shark"] and len(set(names)) == 1000
    assert "crane (n02012849)" in names and "crane (n03126707)" in names
    assert display_names(1000, None) == names and display_names(10, FMNIST_CLASSES) == list(FMNIST_CLASSES)
    write_images(tmp_path / "d", ["fox", "cat", "dog"])
    data = resolve_data(str(tmp_path / "d"), CONFIG, None, ClassSpace.of(3, None), holdout_fraction=0.5)
    assert data.folder_names == {0: "cat", 1: "dog", 2: "fox"}
    assert display_names(3, None, data.folder_names) == ["cat", "dog", "fox"]
    assert display_names(4, None, data.folder_names) is None
