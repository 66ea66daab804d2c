"""The dataset protocol: samples are ``({modality: tensor}, label)`` pairs, splits come together."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .io import DatasetFormatError


class TensorMultimodalDataset(Dataset):
    """An in-memory multimodal dataset: one tensor per modality, first axis = samples.

    Attributes:
        modalities: modality names in order. class_names: one name per class.
        input_shapes: per-modality shape of one sample.
    """

    def __init__(self, inputs: Mapping[str, Tensor], labels: Tensor, class_names: Sequence[str]) -> None:
        if labels.dim() != 1:
            raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
        for m, x in inputs.items():
            if x.shape[0] != labels.shape[0]:
                raise ValueError(f"modality {m!r} has {x.shape[0]} samples but there are {labels.shape[0]} labels")
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(class_names):
            raise ValueError(f"labels must lie in [0, {len(class_names)}), "
                             f"got [{int(labels.min())}, {int(labels.max())}]")
        self.inputs = dict(inputs)
        self.labels = labels.long()
        self.class_names = tuple(class_names)
        self.modalities = tuple(inputs)
        self.input_shapes = {m: tuple(x.shape[1:]) for m, x in self.inputs.items()}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[dict[str, Tensor], Tensor]:
        return {m: x[index] for m, x in self.inputs.items()}, self.labels[index]

    def subset(self, indices: Tensor | Sequence[int]) -> "TensorMultimodalDataset":
        index = torch.as_tensor(indices, dtype=torch.long)
        return TensorMultimodalDataset({m: x[index] for m, x in self.inputs.items()},
                                       self.labels[index], self.class_names)


@dataclass
class DatasetSplits:
    """Train/validation/test splits of one dataset and what describes it.

    ``val`` may be None when the source has no validation split; the runner then carves one from
    ``train`` with a seeded permutation. ``info`` holds anything else worth recording
    (source, build parameters, ground truth such as Bayes accuracies).
    """

    name: str
    train: Any
    test: Any
    val: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.train.modalities)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.train.class_names)

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.train.input_shapes)

    def check(self) -> None:
        """Raise :class:`DatasetFormatError` (naming the source) when a split holds no samples or a
        split's per-sample input shapes differ from train's. Datasets that pad each batch
        (a ``collate_fn``) only need the last axis, the feature size, to agree."""
        source = self.info.get("source") or self.name
        parts = {"train": self.train, "val": self.val, "test": self.test}
        for name, part in parts.items():
            if part is not None and len(part) == 0:
                raise DatasetFormatError(source, f"the {name} split holds no samples")
        reference = self.input_shapes
        for name, part in parts.items():
            shapes = getattr(part, "input_shapes", None)
            if name == "train" or shapes is None:
                continue
            padded = getattr(part, "collate_fn", None) is not None
            for m, shape in reference.items():
                other = shapes.get(m)
                if other is None:
                    raise DatasetFormatError(source, f"the {name} split has no modality {m!r} (train has "
                                                     f"{', '.join(reference)})")
                same = (len(other) == len(shape) and tuple(other)[-1:] == tuple(shape)[-1:] if padded
                        else tuple(other) == tuple(shape))
                if not same:
                    what = "feature size" if padded else "shape per sample"
                    raise DatasetFormatError(source, f"modality {m!r} has {what} {tuple(other)} in the {name} "
                                                     f"split but {tuple(shape)} in train; every split must agree")
