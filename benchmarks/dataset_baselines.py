"""Uni-modal and joint baselines on avdigits and avmnist-fsdd (the table in docs/research/datasets.md).

For each dataset and seed, three runs of modbal's runner (one grid of the engine behind ``modbal
sweep``, so a killed script resumes where it stopped): an image-only and an audio-only run (the
``unimodal`` method: the network with the other modality's input zeroed) and a joint run (``joint``),
all with the registry's ``mlp`` encoders and ``concat`` fusion, Adam, and the epoch with the best
validation accuracy evaluated on test. For the joint run the test accuracy of each mono-modal
Shapley output is reported too (``mono_acc/<m>``): how much the fused model learned from each
modality. Prints a Markdown table (mean ± std over seeds) and the build time / cache size.

The FSDD recordings are read from ``--fsdd DIR``, else from ``$MODBAL_FSDD``; without either,
avmnist-fsdd is skipped.

    python benchmarks/dataset_baselines.py [--fsdd DIR] [--seeds 0 1 2] [--out runs/dataset_baselines]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from modbal import DATASETS
from modbal.bench.grid import Job, make_executor, run_grid
from modbal.config import resolve

ENCODER = {"name": "mlp", "hidden": [256], "out_dim": 64, "dropout": 0.2}
MODALITIES = ("image", "audio")


def config(dataset: dict[str, Any], method: dict[str, Any], seed: int, epochs: int) -> dict[str, Any]:
    return resolve({
        "seed": seed, "dataset": dataset,
        "model": {"encoders": {"*": dict(ENCODER)}, "fusion": {"name": "concat"}},
        "method": method,
        "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 1e-4},
        "train": {"epochs": epochs, "batch_size": 64, "device": "cpu", "tensorboard": False},
    })


def jobs(name: str, dataset: dict[str, Any], seeds: list[int], epochs: int, out: Path) -> dict[tuple[str, int], Job]:
    """(row, seed) → the run: ``<m> only`` for each modality, ``joint``."""
    methods = {f"{m} only": {"name": "unimodal", "modality": m} for m in MODALITIES}
    methods["joint"] = {"name": "joint"}
    return {(row, seed): Job.of(config(dataset, method, seed, epochs),
                                out / name / f"{row.replace(' ', '-')}-seed{seed}")
            for seed in seeds for row, method in methods.items()}


def table_rows(runs: dict[tuple[str, int], Job], seeds: list[int]) -> dict[str, list[float]]:
    """Test accuracies per row (one per seed), read from the runs' ``summary.json``."""
    tests = {key: json.loads((Path(job.run_dir) / "summary.json").read_text())["test"] for key, job in runs.items()}
    rows = {row: [tests[row, s]["acc"] for s in seeds] for row in (*(f"{m} only" for m in MODALITIES), "joint")}
    rows.update({f"joint: mono-modal {m}": [tests["joint", s][f"mono_acc/{m}"] for s in seeds] for m in MODALITIES})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdd", default=None, help="folder of FSDD recordings (default: $MODBAL_FSDD)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default="runs/dataset_baselines", help="where the runs are written")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (local processes)")
    parser.add_argument("--json", default=None, help="also write the raw numbers here")
    args = parser.parse_args()

    cache = {"cache_dir": args.cache_dir} if args.cache_dir else {}
    datasets = {"avdigits": {"name": "avdigits", **cache}}
    fsdd = args.fsdd or os.environ.get("MODBAL_FSDD")
    if fsdd and Path(fsdd).is_dir():
        datasets["avmnist-fsdd"] = {"name": "avmnist-fsdd", **({"root": args.fsdd} if args.fsdd else {}), **cache}
    else:
        print(f"skipping avmnist-fsdd: {'no --fsdd or $MODBAL_FSDD' if not fsdd else repr(fsdd) + ' not found'}")
    results, builds = {}, {}
    for name, dataset in datasets.items():
        t = time.perf_counter()
        splits = DATASETS.create(**dataset)  # builds the cache the runs read, and tells its cost
        load_s = time.perf_counter() - t
        builds[name] = {"build_seconds": splits.info["build_seconds"], "load_seconds": round(load_s, 2),
                        "cache_mb": round(Path(splits.info["cache_file"]).stat().st_size / 2 ** 20, 1),
                        "pca_components": splits.info["image"]["pca_components"],
                        "sizes": splits.info["num_samples"]}
        runs = jobs(name, dataset, args.seeds, args.epochs, Path(args.out))
        grid = run_grid(list(runs.values()), make_executor("local", jobs=args.jobs), threads=1, name=name,
                        where=Path(args.out) / name)
        if grid.failed:
            raise SystemExit(f"{len(grid.failed)} {name} runs failed: " + "; ".join(
                f"{d}: {e.splitlines()[0]}" for d, e in grid.failed.items()))
        results[name] = table_rows(runs, args.seeds)
        print(name, {k: [round(v, 4) for v in vs] for k, vs in results[name].items()}, flush=True)

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
