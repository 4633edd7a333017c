"""A study's training examples: the data section's benchmarks, as the trainer's records.

Why here, in the data layer: the trial and the data-parallel training processes both need them, and the
launcher must not reach back into the trial for them (that was an import cycle). One list per process,
reused by every trial of the same data section.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.data.registry import load_benchmark

if TYPE_CHECKING:
    from harness.spec import DataSpec
    from unisd_components.trainer import TrainingExample

__all__ = ["load_train_examples"]

_TRAIN_EXAMPLES: dict[tuple, list] = {}


def load_train_examples(data: DataSpec) -> list[TrainingExample]:
    """The data section's training examples as the trainer's records (one list per process, reused)."""
    key = (tuple(data.train), data.train_size, data.split_seed, data.data_dir)
    if key not in _TRAIN_EXAMPLES:
        examples = []
        for name in data.train:
            for ex in load_benchmark(
                name,
                "train",
                data_dir=data.data_dir,
                limit=data.train_size,
                seed=data.split_seed,
            ):
                examples.append(ex.to_training_example())
        _TRAIN_EXAMPLES.clear()
        _TRAIN_EXAMPLES[key] = examples
    return _TRAIN_EXAMPLES[key]
