"""Uni-modal and joint baselines on avdigits and avmnist-fsdd (the table in docs/research/datasets.md).

For each dataset and seed: an image-only and an audio-only model (the registry's ``mlp`` encoder
+ a linear head), and a joint model (``mlp`` encoders + ``concat`` fusion trained with
``modbal.methods.Joint``). Each is trained with Adam, the epoch with the best validation accuracy
is evaluated on test. For the joint model the test accuracy of each mono-modal Shapley output
(``model(inputs, shapley="features").mono``) is reported too: how much the fused model learned
from each modality. Prints a Markdown table (mean ± std over seeds) and the build time / cache size.

    python benchmarks/dataset_baselines.py [--fsdd ../shared/data/fsdd/recordings] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modbal import DATASETS, ENCODERS
from modbal.build import build_model
from modbal.methods import Joint

ENCODER = {"name": "mlp", "hidden": [256], "out_dim": 64, "dropout": 0.2}


class Unimodal(nn.Module):
    def __init__(self, modality: str, shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.modality = modality
        spec = dict(ENCODER)
        self.encoder = ENCODERS.create(spec.pop("name"), input_shape=shape, **spec)
        self.head = nn.Linear(self.encoder.out_shape[0], num_classes)

    def forward(self, inputs):
        return self.head(self.encoder(inputs[self.modality]))


def batches(ds, batch_size: int, generator: torch.Generator | None = None):
    n = len(ds)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i: i + batch_size]
        yield {m: x[idx] for m, x in ds.inputs.items()}, ds.labels[idx]


@torch.no_grad()
def evaluate(model, ds, joint: bool) -> dict[str, float]:
    model.eval()
    hits, mono_hits, n = 0, {}, 0
    for inputs, y in batches(ds, 512):
        if joint:
            out = model(inputs, shapley="features")
            hits += int((out.logits.argmax(1) == y).sum())
            for m, o in out.mono_dict().items():
                mono_hits[m] = mono_hits.get(m, 0) + int((o.argmax(1) == y).sum())
        else:
            hits += int((model(inputs).argmax(1) == y).sum())
        n += len(y)
    result = {"acc": hits / n}
    result.update({f"mono_acc/{m}": h / n for m, h in mono_hits.items()})
    return result


def train(model, splits, joint: bool, epochs: int, seed: int, lr: float = 1e-3) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    method = Joint()
    best_val, best = -1.0, None
    for _ in range(epochs):
        model.train()
        for inputs, y in batches(splits.train, 64, g):
            loss = method.loss(model, inputs, y) if joint else nn.functional.cross_entropy(model(inputs), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        val = evaluate(model, splits.val, joint)["acc"]
        if val > best_val:
            best_val, best = val, evaluate(model, splits.test, joint)
    return best


def run(name: str, splits, seeds, epochs: int) -> dict[str, list[float]]:
    rows: dict[str, list[float]] = {}
    shapes, c = splits.input_shapes, len(splits.class_names)
    for seed in seeds:
        for m in splits.modalities:
            torch.manual_seed(seed)
            rows.setdefault(f"{m} only", []).append(
                train(Unimodal(m, shapes[m], c), splits, False, epochs, seed)["acc"])
        torch.manual_seed(seed)
        model = build_model(shapes, c, {m: dict(ENCODER) for m in splits.modalities}, {"name": "concat"})
        result = train(model, splits, True, epochs, seed)
        rows.setdefault("joint", []).append(result["acc"])
        for m in splits.modalities:
            rows.setdefault(f"joint: mono-modal {m}", []).append(result[f"mono_acc/{m}"])
        print(name, seed, {k: round(v[-1], 4) for k, v in rows.items()}, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdd", default=str(Path(__file__).resolve().parents[2] / "shared/data/fsdd/recordings"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--json", default=None, help="also write the raw numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    datasets = {"avdigits": {}}
    if Path(args.fsdd).is_dir():
        datasets["avmnist-fsdd"] = {"root": args.fsdd}
    else:
        print(f"skipping avmnist-fsdd: {args.fsdd} not found")
    results, builds = {}, {}
    for name, kwargs in datasets.items():
        t = time.perf_counter()
        splits = DATASETS.create(name, cache_dir=args.cache_dir, **kwargs)
        load_s = time.perf_counter() - t
        builds[name] = {"build_seconds": splits.info["build_seconds"], "load_seconds": round(load_s, 2),
                        "cache_mb": round(Path(splits.info["cache_file"]).stat().st_size / 2 ** 20, 1),
                        "pca_components": splits.info["image"]["pca_components"],
                        "sizes": splits.info["num_samples"]}
        results[name] = run(name, splits, args.seeds, args.epochs)

    names = list(results)
    print(f"\n| model (test accuracy %, {len(args.seeds)} seeds, mean ± std) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for row in results[names[0]]:
        cells = [f"{100 * np.mean(results[n][row]):.1f} ± {100 * np.std(results[n][row]):.1f}" for n in names]
        print(f"| {row} | " + " | ".join(cells) + " |")
    print("\nbuild:", json.dumps(builds))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "builds": builds}, indent=1))


if __name__ == "__main__":
    main()
