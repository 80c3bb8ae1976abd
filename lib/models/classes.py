"""A backbone keeps its own class space; the dataset's classes map onto its outputs.

A ClassMap gives, for dataset class i, the backbone output `outputs[i]`. It is resolved once, by
the features stage (:func:`resolve_class_map`), and recorded in the logits store's attributes
(:func:`read_class_map` reads it back), so every later user (acc_backbone, the backbone's
prediction in explanations, CAMs of the true class) applies the same mapping:
- by name: a dataset class matches an output by its ImageNet WordNet id ("n02123045"), its
  torchvision category name ("tabby"), then a WordNet lemma ("tabby cat"), ignoring case, "_" and
  "-"; the toy world's classes match the toy backbones' outputs (an identity mapping);
- by file (`backbone.class_map`): a CSV with the header `dataset_class,backbone_index`;
- none (`backbone.new_head: true`): the dataset's classes get a new head (SALF-CBM's final
  layer) and nothing that needs the backbone's own class scores is computed.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lib.core.errors import UserError

__all__ = [
    "CLASS_MAP_ATTR",
    "ClassMap",
    "OutputNames",
    "class_words",
    "imagenet_classes",
    "map_by_file",
    "map_by_names",
    "read_class_map",
    "resolve_class_map",
]

IMAGENET_INDEX = Path(__file__).with_name("imagenet1k_classes.tsv")
CLASS_MAP_ATTR = "class_map"  # attribute of the logits store: ClassMap.to_attrs(), or None with backbone.new_head
CLASS_MAP_FIX = (
    "name the class folders by the backbone's class names or ImageNet WordNet ids, or set backbone.class_map to a CSV "
    "'dataset_class,backbone_index' (one row per dataset class), or set backbone.new_head: true to explain the backbone's "
    "features with a new head on the dataset's classes (a different model: no acc_backbone, no CAM baselines)"
)


@dataclass(frozen=True)
class OutputNames:
    """What each output of a backbone means: output i is names[i] (also ids[i], lemmas[i] when given)."""

    space: str  # e.g. "ImageNet-1k", "toy world"
    names: tuple[str, ...]
    ids: tuple[str, ...] = ()
    lemmas: tuple[tuple[str, ...], ...] = ()


@cache
def imagenet_classes() -> OutputNames:
    """The ImageNet-1k class index shipped in imagenet1k_classes.tsv (standard output order)."""
    rows = [line.split("\t") for line in IMAGENET_INDEX.read_text().splitlines() if not line.startswith("#")][1:]
    if [int(r[0]) for r in rows] != list(range(1000)):
        raise ValueError(f"{IMAGENET_INDEX} must list outputs 0..999 in order")
    return OutputNames(
        "ImageNet-1k", tuple(r[2] for r in rows), tuple(r[1] for r in rows), tuple(tuple(s.strip() for s in r[3].split(",")) for r in rows)
    )


def class_words(classes: Sequence[str]) -> list[str]:
    """The dataset's class names as text encoders should read them: an ImageNet WordNet id
    ("n01440764", an ImageNet folder name) becomes its category name from imagenet1k_classes.tsv
    ("tench"); other names are read with "_" as a space ("desert_star" -> "desert star")."""
    index = imagenet_classes()
    names = dict(zip(index.ids, index.names, strict=True))
    return [names.get(name, name.replace("_", " ")) for name in classes]


def _key(name: str) -> str:
    """Matching key: case, "_" and "-" and repeated spaces ignored."""
    return " ".join(re.sub(r"[_\-]", " ", name).casefold().split())


@dataclass(frozen=True)
class ClassMap:
    """Dataset class i is backbone output `outputs[i]` (distinct indices in [0, n_outputs))."""

    outputs: tuple[int, ...]
    n_outputs: int
    how: str  # how it was made, for people: "by name (ImageNet-1k)", "from classes.csv"

    def __post_init__(self) -> None:
        if len(set(self.outputs)) != len(self.outputs) or not all(0 <= o < self.n_outputs for o in self.outputs):
            raise ValueError(f"outputs must be distinct indices in [0, {self.n_outputs}), got {list(self.outputs)}")

    def to_attrs(self) -> dict[str, Any]:
        return {"outputs": list(self.outputs), "n_outputs": self.n_outputs, "how": self.how}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> ClassMap:
        return cls(tuple(int(o) for o in attrs["outputs"]), int(attrs["n_outputs"]), str(attrs["how"]))

    def _index(self, logits: Tensor) -> Tensor:
        if logits.ndim != 2 or logits.shape[1] != self.n_outputs:
            raise ValueError(f"logits must be (B, {self.n_outputs}), got {tuple(logits.shape)}")
        return torch.tensor(self.outputs, device=logits.device)

    def predict(self, logits: Tensor) -> Tensor:
        """(B,) dataset class of the backbone's prediction among the mapped outputs (argmax restricted to them)."""
        return logits.index_select(1, self._index(logits)).argmax(dim=1)

    def top1(self, logits: Tensor) -> Tensor:
        """(B,) dataset class of the unrestricted argmax over all outputs; -1 where it is an unmapped output."""
        lookup = torch.full((self.n_outputs,), -1, dtype=torch.long, device=logits.device)
        lookup[self._index(logits)] = torch.arange(len(self.outputs), device=logits.device)
        return lookup[logits.argmax(dim=1)]

    def output_of(self, classes: Tensor) -> Tensor:
        """Backbone outputs of dataset class indices (any shape)."""
        return torch.tensor(self.outputs, device=classes.device)[classes.long()]


def _fields(names: OutputNames) -> list[tuple[str, list[tuple[str, ...]], dict[str, list[int]]]]:
    """Per field, in matching order: (field, each output's texts, matching key -> outputs)."""
    fields = [("WordNet id", [(i,) for i in names.ids]), ("name", [(n,) for n in names.names]), ("lemma", list(names.lemmas))]
    indexed = []
    for field, values in fields:
        table: dict[str, list[int]] = {}
        for output, texts in enumerate(values):
            for key in dict.fromkeys(_key(t) for t in texts):
                table.setdefault(key, []).append(output)
        indexed.append((field, values, table))
    return indexed


def _lookup(name: str, fields: list[tuple[str, list[tuple[str, ...]], dict[str, list[int]]]]) -> tuple[list[int], str]:
    """(candidate outputs, the field that matched) for one dataset class: the first field with any match."""
    for field, values, table in fields:
        found = table.get(_key(name), [])
        exact = [i for i in found if name.replace("_", " ") in values[i]]  # case breaks ties: "Cardigan" (corgi) vs "cardigan"
        if found:
            return (exact if len(found) > 1 and len(exact) == 1 else found), field
    return [], ""


def map_by_names(classes: Sequence[str], names: OutputNames) -> ClassMap:
    """Map each dataset class onto the output whose WordNet id, name or lemma it is (module doc);
    UserError listing the classes with no output or several, and classes that share an output."""
    unmapped, ambiguous, outputs = [], [], []
    fields = _fields(names)
    for name in classes:
        found, field = _lookup(name, fields)
        if not found:
            unmapped.append(name)
        elif len(found) > 1:
            choices = ", ".join(f"{i} {names.names[i]}" + (f" ({names.ids[i]})" if names.ids else "") for i in found)
            ambiguous.append(f"{name!r} ({field} of outputs {choices})")
        outputs.append(found[0] if found else -1)
    problems = []
    if unmapped:
        problems.append(f"{len(unmapped)} of {len(classes)} dataset classes name no {names.space} output: {', '.join(unmapped)}")
    if ambiguous:
        problems.append(f"ambiguous class names (use the WordNet id or backbone.class_map): {'; '.join(ambiguous)}")
    _check_shared(classes, outputs, problems)
    if problems:
        message = f"cannot map the dataset's classes onto the backbone's outputs: {'; '.join(problems)}"
        raise UserError(message, key="backbone.class_map", fix=CLASS_MAP_FIX)
    return ClassMap(tuple(outputs), len(names.names), f"by name ({names.space})")


def _check_shared(classes: Sequence[str], outputs: Sequence[int], problems: list[str]) -> None:
    by_output: dict[int, list[str]] = {}
    for name, output in zip(classes, outputs):
        if output >= 0:
            by_output.setdefault(output, []).append(name)
    shared = [f"{', '.join(group)} -> output {output}" for output, group in by_output.items() if len(group) > 1]
    if shared:
        problems.append(f"dataset classes share a backbone output (each class needs its own): {'; '.join(shared)}")


def map_by_file(path: str | Path, classes: Sequence[str], n_outputs: int) -> ClassMap:
    """Read a CSV `dataset_class,backbone_index` covering every dataset class; UserError naming what is wrong."""
    path = Path(path)
    error = {"key": "backbone.class_map", "value": str(path)}
    if not path.is_file():
        raise UserError(f"{path}: class map file not found", fix="write the CSV 'dataset_class,backbone_index' or fix the path", **error)
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    header = [cell.strip() for cell in rows[0]] if rows else []
    if header != ["dataset_class", "backbone_index"]:
        raise UserError(f"{path}: the header must be 'dataset_class,backbone_index', got {','.join(header)!r}", **error)
    mapping: dict[str, int] = {}
    problems = []
    for line, row in enumerate(rows[1:], start=2):
        cells = [cell.strip() for cell in row]
        if not any(cells):
            continue
        index = int(cells[1]) if len(cells) == 2 and re.fullmatch(r"\d+", cells[1]) else -1
        if not 0 <= index < n_outputs:
            problems.append(f"line {line}: expected 'dataset_class,backbone_index' with an index in [0, {n_outputs}), got {row!r}")
        elif cells[0] in mapping:
            problems.append(f"line {line}: {cells[0]!r} is mapped twice")
        else:
            mapping[cells[0]] = index
    unknown = sorted(set(mapping) - set(classes))
    if unknown:
        problems.append(f"not dataset classes: {', '.join(unknown)} (the classes are {', '.join(classes)})")
    unmapped = [name for name in classes if name not in mapping]
    if unmapped:
        problems.append(f"{len(unmapped)} dataset classes are not mapped: {', '.join(unmapped)}")
    outputs = [mapping.get(name, -1) for name in classes]
    _check_shared(classes, outputs, problems)
    if problems:
        fix = "map every dataset class to its own backbone output, or set backbone.new_head: true"
        raise UserError(f"{path}: " + "; ".join(problems), fix=fix, **error)
    return ClassMap(tuple(outputs), n_outputs, f"from {path}")


def resolve_class_map(
    classes: Sequence[str],
    data_kind: str,
    output_names: OutputNames | None,
    n_outputs: int,
    *,
    class_map: str | None,
    new_head: bool,
    arch: str,
) -> ClassMap | None:
    """The features stage's mapping of the dataset's classes onto a backbone's `n_outputs` outputs
    (module doc): None with new_head; UserError when they cannot be mapped, saying which params to set."""
    if new_head:
        return None
    if class_map is not None:
        return map_by_file(class_map, classes, n_outputs)
    if output_names is not None and output_names.space == "toy world" and data_kind != "toy":
        raise UserError(
            f"backbone {arch} is a toy-world model: its {n_outputs} outputs are the toy classes ({', '.join(output_names.names)}), "
            f"and this is {data_kind} data",
            key="backbone.arch",
            value=arch,
            fix="set backbone.arch and backbone.weights to a real backbone (e.g. arch: torchvision:resnet50, weights: "
            "IMAGENET1K_V2@/path/to/resnet50.pth, or a local checkpoint), or backbone.class_map / backbone.new_head: true",
        )
    if output_names is None:
        raise UserError(
            f"the {n_outputs} outputs of backbone {arch} have no known class names, so the dataset's classes cannot be matched by name",
            key="backbone.class_map",
            fix="set backbone.class_map to a CSV 'dataset_class,backbone_index', or backbone.new_head: true",
        )
    return map_by_names(classes, output_names)


def read_class_map(attrs: Mapping[str, Any], store: str | Path) -> ClassMap | None:
    """The ClassMap recorded in the logits store's attributes (None: backbone.new_head)."""
    if CLASS_MAP_ATTR not in attrs:
        raise UserError(f"{store} has no class mapping (written by an older features stage)", fix="rerun the features stage")
    value = attrs[CLASS_MAP_ATTR]
    return None if value is None else ClassMap.from_attrs(value)
