"""PyTorch datasets over the readers' examples, batched through the shared ``collate``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from model.data.examples import NERExample, REExample
from model.data.images import ImageStore
from model.preprocessing import EncodedText, Preprocessor, augment
from model.tasks import task_spec

Example = NERExample | REExample


def encode_example(preprocessor: Preprocessor, example: Example) -> EncodedText:
    if isinstance(example, REExample):
        return preprocessor.text.encode_relation(example.words, example.head, example.tail)
    return preprocessor.text.encode(example.words)


def label_ids(example: Example, index: dict[str, int], num_words: int) -> list[int] | int:
    """Gold label ids (``index`` maps label names to ids): one per kept word (NER), or the relation's id (RE)."""
    if isinstance(example, REExample):
        return index[example.relation]
    return [index[tag] for tag in example.tags[:num_words]]


@dataclass
class Item:
    number: int
    text: EncodedText
    label: list[int] | int
    pixels: np.ndarray | None
    augmented: np.ndarray | None
    # Distillation: the teachers' soft targets ((words, tags) for NER, (relations,) for RE), the
    # example's weight in the distillation loss, and whether it has gold labels at all.
    soft_target: torch.Tensor | None = None
    soft_target_weight: float = 1.0
    has_gold: bool = True


# Separate random streams per (seed, epoch, item): the draw that drops a picture must not shift
# the augmented view's crop.
_AUGMENT_STREAM = ()
_DROPOUT_STREAM = (1,)


class IMMDataset(Dataset):
    """Texts are encoded once; images are decoded when an item is read (and augmented for SW).

    ``augment_seed`` makes the random choices reproducible: item i of epoch e always gets the
    same crop, and the same decision about its picture, which ``--resume`` relies on.

    ``image_dropout`` (modality dropout): the probability that an item is served without its
    picture in an epoch (drawn per seed, epoch and item), so that the model also learns to answer
    the text alone, as it must for the many tweets that come without one. A dropped picture is
    not decoded, and the item is a text-only one in every respect (no augmented view either).

    ``soft_targets`` (distillation, ``model.distillation``): one target tensor per example, served
    with it; ``soft_target_weights`` their weights in the distillation loss (default 1);
    ``has_gold`` False for unlabelled examples (no gold loss: their ``labels`` are empty).
    """

    def __init__(
        self,
        examples: Sequence[Example],
        preprocessor: Preprocessor,
        labels: Sequence[str],
        images: ImageStore,
        *,
        with_augmented_view: bool = False,
        augment_seed: int = 0,
        image_dropout: float = 0.0,
        soft_targets: Sequence[torch.Tensor] | None = None,
        soft_target_weights: Sequence[float] | None = None,
        has_gold: Sequence[bool] | None = None,
    ):
        if not 0.0 <= image_dropout < 1.0:
            raise ValueError(f"image_dropout must be in [0, 1), not {image_dropout}")
        for name, values in (("soft_targets", soft_targets), ("soft_target_weights", soft_target_weights),
                             ("has_gold", has_gold)):  # fmt: skip
            if values is not None and len(values) != len(examples):
                raise ValueError(f"{name} holds {len(values)} entries for {len(examples)} examples")
        self.soft_targets = soft_targets
        self.soft_target_weights = soft_target_weights
        self.has_gold = has_gold
        self.examples = list(examples)
        self.preprocessor = preprocessor
        self.images = images
        self.with_augmented_view = with_augmented_view
        self.augment_seed = augment_seed
        self.image_dropout = image_dropout
        self.epoch = 0
        self.texts = [encode_example(preprocessor, example) for example in self.examples]
        index = {label: number for number, label in enumerate(labels)}
        self.labels = [label_ids(e, index, t.num_words) for e, t in zip(self.examples, self.texts)]

    def __len__(self) -> int:
        return len(self.examples)

    def _rng(self, number: int, stream: tuple[int, ...]) -> np.random.Generator:
        return np.random.default_rng((self.augment_seed, self.epoch, number, *stream))

    def drops_picture(self, number: int) -> bool:
        """Whether item ``number`` goes without its picture in the current epoch (``image_dropout``)."""
        return self.image_dropout > 0 and self._rng(number, _DROPOUT_STREAM).random() < self.image_dropout

    def __getitem__(self, number: int) -> Item:
        image_id = None if self.drops_picture(number) else self.examples[number].image_id
        picture = self.images.load(image_id)
        pixels = augmented = None
        if picture is not None:
            pixels = self.preprocessor.image.to_array(picture)
            if self.with_augmented_view:
                augmented = self.preprocessor.image.to_array(
                    augment(picture, self._rng(number, _AUGMENT_STREAM))
                )
        return Item(
            number,
            self.texts[number],
            self.labels[number],
            pixels,
            augmented,
            soft_target=None if self.soft_targets is None else self.soft_targets[number],
            soft_target_weight=1.0
            if self.soft_target_weights is None
            else float(self.soft_target_weights[number]),
            has_gold=True if self.has_gold is None else bool(self.has_gold[number]),
        )


class Collator:
    """Items to a batch of tensors: the shared ``collate`` plus labels, augmented views and teacher vectors.

    With distillation targets: ``soft_targets`` (B, W, T) padded like ``word_mask`` with
    ``soft_target_mask`` (B, W), the words that have a target (a student that keeps more words than
    its teachers did has none for the extra ones) for NER, (B, R) for RE; ``soft_target_weight``
    (B,) and ``has_gold`` (B,).
    """

    def __init__(self, preprocessor: Preprocessor, task: str, teacher: dict[str, torch.Tensor] | None = None):
        self.preprocessor = preprocessor
        self.labels_per_word = task_spec(task).labels_per_word
        self.teacher = teacher

    def __call__(self, items: list[Item]) -> dict[str, torch.Tensor]:
        arrays = self.preprocessor.collate([i.text for i in items], [i.pixels for i in items])
        batch = {name: torch.from_numpy(array) for name, array in arrays.items()}
        batch["example_index"] = torch.tensor([i.number for i in items])
        if self.labels_per_word:
            labels = torch.zeros(batch["word_index"].shape, dtype=torch.long)
            for row, item in enumerate(items):
                labels[row, : len(item.label)] = torch.tensor(item.label, dtype=torch.long)
        else:
            labels = torch.tensor([i.label for i in items], dtype=torch.long)
        batch["labels"] = labels
        if any(i.soft_target is not None for i in items):
            batch.update(self._soft_targets(items, batch["word_index"].shape[1]))
        if self.teacher is not None and any(i.augmented is not None for i in items):
            # The augmented views of the examples with a picture, in the order of pixel_values.
            augmented = np.stack([i.augmented for i in items if i.pixels is not None])
            batch["augmented_pixel_values"] = torch.from_numpy(augmented)
            index = batch["example_index"]
            batch["teacher_text"] = self.teacher["text"][index]
            batch["teacher_image"] = self.teacher["image"][index]
        return batch

    def _soft_targets(self, items: list[Item], num_words: int) -> dict[str, torch.Tensor]:
        if any(i.soft_target is None for i in items):
            raise ValueError("a batch mixes examples with and without soft targets")
        if not self.labels_per_word:
            return {
                "soft_targets": torch.stack([i.soft_target for i in items]).float(),
                "soft_target_weight": torch.tensor(
                    [i.soft_target_weight for i in items], dtype=torch.float32
                ),
                "has_gold": torch.tensor([i.has_gold for i in items]),
            }
        num_tags = items[0].soft_target.shape[-1]
        targets = torch.zeros(len(items), num_words, num_tags)
        mask = torch.zeros(len(items), num_words, dtype=torch.bool)
        for row, item in enumerate(items):
            words = min(len(item.soft_target), item.text.num_words)
            targets[row, :words] = item.soft_target[:words]
            mask[row, :words] = True
        return {
            "soft_targets": targets,
            "soft_target_mask": mask,
            "soft_target_weight": torch.tensor([i.soft_target_weight for i in items], dtype=torch.float32),
            "has_gold": torch.tensor([i.has_gold for i in items]),
        }
