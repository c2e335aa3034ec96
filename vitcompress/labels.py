"""Which model class a data folder means: folder names matched to the model's class names or ids.

An ImageFolder's own labels are its sorted folder indices, which mean nothing to a pretrained model: a folder
of ImageNet's "tench" images is class 0 of DeiT only by accident. Each folder is matched to a class index of
the model by, in order: an explicit ``--labels`` mapping file, the model's own class names (its timm
``pretrained_cfg['label_names']``, e.g. the embedded model's Fashion-MNIST names), ImageNet ids and names
(``timm.data.ImageNetInfo``: ``n01440764`` or any synonym of "tench, Tinca tinca") when the model's class
count is an ImageNet subset's, or the index itself for folders named ``0``, ``1``, … (a model that names no
classes: sorted folder order, as ImageFolder, when the counts are equal). A folder that matches
no class is a :class:`DataError` saying what was found and how to fix it, never a silent relabelling.

:func:`display_names` gives the names a bundle shows (``labels.txt``, the ONNX metadata, ``predict``): the
model's own, else an ImageNet subset's class names for a head of its size, else the data's folder names when
they name every class once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from vitcompress.errors import DataError

SHOWN = 5


def normalise(name: str) -> str:
    """Case, spaces and punctuation do not matter: ``T-shirt_top`` matches ``t-shirt/top``."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


@dataclass(frozen=True)
class ClassSpace:
    """The classes a model predicts: how many, what a folder may be called to mean each, and where that came from."""

    count: int
    aliases: Mapping[str, int]
    source: str

    @classmethod
    def of(cls, count: int, class_names: Sequence[str] | None) -> "ClassSpace":
        """The class space of a model with ``count`` outputs and, if known, its class names."""
        if class_names and len(class_names) == count:
            return cls(count, {normalise(n): i for i, n in enumerate(class_names)}, "the model's class names")
        imagenet = _imagenet_aliases(count)
        if imagenet is not None:
            return cls(count, imagenet[1], f"{imagenet[0]} ids and names")
        return cls(count, {}, "none")

    def map_folders(self, folders: Sequence[str], explicit: Mapping[str, int | str] | None = None,
                    where: str = "data") -> dict[str, int]:
        """Class index of each folder name; an unmatched folder or an unusable mapping is a DataError.

        A model that names no classes takes ImageFolder's sorted order when the folder count equals its class
        count (the only convention there is); any other count needs numbered folders or a mapping."""
        explicit = explicit or {}
        numeric = all(f.isdigit() for f in folders)
        if not self.aliases and not explicit and not numeric and len(folders) == self.count:
            return {folder: index for index, folder in enumerate(sorted(folders))}
        mapping: dict[str, int] = {}
        unmatched: list[str] = []
        for folder in folders:
            index = self._index(folder, explicit.get(folder), numeric)
            if index is None:
                unmatched.append(folder)
            else:
                mapping[folder] = index
        if unmatched:
            raise DataError(self._unmatched_message(unmatched, len(folders), where))
        return mapping

    def _index(self, folder: str, wanted: int | str | None, numeric: bool) -> int | None:
        if wanted is not None:
            index = wanted if isinstance(wanted, int) else self.aliases.get(normalise(str(wanted)))
            if index is None or not 0 <= index < self.count:
                raise DataError(f"--labels maps folder {folder!r} to {wanted!r}, which is not one of the model's "
                                f"{self.count} classes (indices 0–{self.count - 1}"
                                + (", or a class name)" if self.aliases else ")"))
            return index
        if normalise(folder) in self.aliases:
            return self.aliases[normalise(folder)]
        if numeric and int(folder) < self.count:
            return int(folder)
        return None

    def _unmatched_message(self, unmatched: list[str], total: int, where: str) -> str:
        shown = ", ".join(repr(f) for f in unmatched[:SHOWN]) + (" …" if len(unmatched) > SHOWN else "")
        if self.aliases:
            example = next(iter(self.aliases))
            known = f"the model's {self.count} classes ({self.source}, e.g. {example!r})"
        else:
            known = f"the model's {self.count} classes (it names none: folders 0–{self.count - 1} or a mapping)"
        return (f"{where}: {len(unmatched)} of {total} class folders match none of {known}: {shown}; rename the "
                "folders or pass --labels FILE (YAML or JSON: folder → class index or name)")


def imagenet_names(count: int) -> list[str] | None:
    """Readable class names of the ImageNet subset with ``count`` classes (``timm.data.ImageNetInfo``): each
    description's first synonym ("tench"), with its WordNet id when two classes share it ("crane (n02012849)");
    None when ``count`` is no ImageNet subset's."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset({"num_classes": count})
    if subset is None:
        return None
    info = ImageNetInfo(subset)
    first = [description.split(",")[0].strip() for description in info.label_descriptions()]
    return [name if first.count(name) == 1 else f"{name} ({wnid})" for name, wnid in zip(first, info.label_names())]


def display_names(count: int, class_names: Sequence[str] | None,
                  folder_names: Mapping[int, str] | None = None) -> list[str] | None:
    """The names of a model's ``count`` classes for people: its own ``class_names``, else ImageNet's (a head of an
    ImageNet subset's size), else the data's ``folder_names`` (class index → folder) when every class has one;
    None when nothing names them (``labels.txt`` then holds the indices)."""
    if class_names and len(class_names) == count:
        return list(class_names)
    names = imagenet_names(count)
    if names is not None:
        return names
    if folder_names and sorted(folder_names) == list(range(count)):
        return [folder_names[i] for i in range(count)]
    return None


def _imagenet_aliases(count: int) -> tuple[str, dict[str, int]] | None:
    """(subset name, alias → index) for an ImageNet subset of ``count`` classes: wnids and every synonym."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset({"num_classes": count})
    if subset is None:
        return None
    info = ImageNetInfo(subset)
    aliases: dict[str, int] = {}
    for index, (wnid, description) in enumerate(zip(info.label_names(), info.label_descriptions())):
        for synonym in description.split(","):
            aliases.setdefault(normalise(synonym), index)
    aliases.update({normalise(wnid): index for index, wnid in enumerate(info.label_names())})
    return subset, aliases


def read_label_mapping(path: Path) -> dict[str, int | str]:
    """A ``--labels`` file: a YAML or JSON mapping of folder name → class index or class name."""
    if not path.is_file():
        raise DataError(f"--labels {path} does not exist")
    try:
        data = (json.loads if path.suffix == ".json" else yaml.safe_load)(path.read_text())
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DataError(f"--labels {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                        f"{str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not all(isinstance(v, (int, str)) and not isinstance(v, bool)
                                             for v in data.values()):
        raise DataError(f"--labels {path}: expected a mapping of folder name → class index or class name")
    return {str(k): v for k, v in data.items()}
