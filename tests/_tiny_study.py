"""The tiny synthetic recipe and study-writing helpers shared by the bench and report tests."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch


def tiny_recipe(epochs: int = 1, extra: str = "") -> str:
    """A 4-class synthetic task small enough for a run in about a second (``extra``: more YAML lines)."""
    return f"""
seed: 0
dataset: {{name: synthetic, num_train: 240, num_val: 120, num_test: 160, num_classes: 4, bayes_samples: 200,
          modalities: {{fast: {{dim: 4, separation: 6.0, label_noise: 0.4}}, slow: {{dim: 12, separation: 3.5}}}}}}
model:
  encoders: {{"*": {{name: mlp, hidden: [16], out_dim: 8}}}}
  fusion: concat
method: joint
{extra}optim: {{name: sgd, lr: 0.05}}
train: {{epochs: {epochs}, batch_size: 60, device: cpu, tensorboard: false}}
"""


def write_study(folder: Path, text: str, recipe: str) -> Path:
    """``folder/study.yaml`` holding ``text``, beside the recipe it names as ``tiny.yaml``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.yaml").write_text(recipe)
    (folder / "study.yaml").write_text(text)
    return folder / "study.yaml"


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per test (the runs are tiny; more threads only contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
