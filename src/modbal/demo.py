"""``modbal demo``: joint training vs AGM on a built-in dataset, a few seeds, table and plot.

Writes ``<out>/<method>-seed<k>/`` run directories (the usual run files), ``<out>/results.md``
and ``results.json`` (test metrics, mean ± std over seeds) and ``<out>/demo.png`` (κ per modality
during AGM training, and validation mono-modal accuracy per epoch for each method).
"""
from __future__ import annotations

import copy
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from .config import ConfigError, builtin_recipes, load_recipe, resolve
from .extras import require
from .registry import DATASETS

MARKER = ".modbal-demo"

# datasets without a built-in recipe of their own name get MLP encoders and concat fusion
GENERIC_SETTINGS: dict[str, Any] = {
    "model": {"encoders": {"*": {"name": "mlp"}}, "fusion": {"name": "concat"}},
    "train": {"epochs": 10, "batch_size": 64, "device": "cpu"},
}


def demo_config(dataset: str, method: str, seed: int, epochs: int | None = None) -> dict[str, Any]:
    """The resolved config of one demo run: the built-in recipe named after the dataset (CPU-sized
    ``synthetic`` and ``avdigits``), else generic settings."""
    if dataset not in DATASETS:
        raise ConfigError(f"demo dataset {dataset!r} is not registered; allowed values: {', '.join(DATASETS.names())}")
    overrides = [f"method={method}", f"seed={seed}"] + ([f"train.epochs={epochs}"] if epochs is not None else [])
    if dataset in builtin_recipes():
        return load_recipe(dataset, overrides)
    return resolve({**copy.deepcopy(GENERIC_SETTINGS), "dataset": {"name": dataset}}, overrides,
                   source=f"demo ({dataset})")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def results_table(summaries: Mapping[str, list[Mapping[str, Any]]]) -> tuple[str, dict[str, Any]]:
    """A markdown table of test metrics (mean ± sample std over seeds) and the same as a dict."""
    modalities = next(iter(summaries.values()))[0]["modalities"]
    columns = [("acc", "accuracy"), ("macro_f1", "macro-F1")] + [(f"mono_acc/{m}", f"mono acc {m}") for m in modalities]
    lines = ["| method | seeds | " + " | ".join(title for _, title in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    data: dict[str, Any] = {}
    for method, runs in summaries.items():
        cells, data[method] = [], {}
        for key, _ in columns:
            mean, std = _mean_std([float(r["test"][key]) for r in runs])
            data[method][key] = {"mean": mean, "std": std, "values": [float(r["test"][key]) for r in runs]}
            cells.append(f"{mean:.4f} ± {std:.4f}")
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", data


def plot_demo(out: Path, run_dirs: Mapping[str, list[Path]], path: Path) -> Path:
    """κ per modality (AGM: per-step values, mean over seeds) and validation mono-modal accuracy
    per epoch (every method, mean over seeds)."""
    matplotlib = require("matplotlib", "the demo's figure")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .train.logging import read_jsonl

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    kappa_ax, mono_ax = axes
    drew_kappa = False
    for method, dirs in run_dirs.items():
        steps = [read_jsonl(d / "steps.jsonl") for d in dirs]
        keys = sorted({k for rows in steps for r in rows for k in r if k.startswith("kappa/")})
        for key in keys:
            series = [np.array([r.get(key, np.nan) for r in rows], dtype=float) for rows in steps]
            length = min(len(s) for s in series)
            mean = np.nanmean(np.stack([s[:length] for s in series]), axis=0)
            kappa_ax.plot(np.arange(1, length + 1), mean, lw=1, label=f"{method}: κ {key.split('/', 1)[1]}")
            drew_kappa = True
        epochs = [read_jsonl(d / "epochs.jsonl") for d in dirs]
        mono_keys = sorted({k for rows in epochs for r in rows for k in r if k.startswith("val/mono_acc/")})
        style = "-" if method != "joint" else "--"
        for key in mono_keys:
            series = [np.array([r.get(key, np.nan) for r in rows], dtype=float) for rows in epochs]
            length = min(len(s) for s in series)
            mean = np.nanmean(np.stack([s[:length] for s in series]), axis=0)
            mono_ax.plot(np.arange(1, length + 1), mean, style, marker="o", ms=3,
                         label=f"{method}: {key.split('/')[-1]}")
    kappa_ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    kappa_ax.set(title="modulation coefficient κ per modality", xlabel="training step", ylabel="κ")
    if drew_kappa:
        kappa_ax.legend(fontsize=8)
    mono_ax.set(title="validation mono-modal (Shapley) accuracy", xlabel="epoch", ylabel="accuracy")
    mono_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ConfigError(f"{str(out)!r} exists and was not written by `modbal demo`; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `modbal demo`; its run directories are replaced on the next demo\n")


def run_demo(dataset: str = "avdigits", seeds: int = 2, epochs: int | None = None, out: str | Path = "runs/demo",
             methods: Sequence[str] = ("joint", "agm"), quiet: bool = False) -> dict[str, Any]:
    """Train each method for ``seeds`` seeds, print the table, write results and the plot."""
    from .train.run import run_experiment

    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    out = Path(out)
    configs = {(m, s): demo_config(dataset, m, s, epochs) for m in methods for s in range(seeds)}
    _prepare_out(out)
    t0 = time.perf_counter()
    summaries: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    run_dirs: dict[str, list[Path]] = {m: [] for m in methods}
    for (method, seed), config in configs.items():
        run_dir = out / f"{method}-seed{seed}"
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a previous demo's output (the folder carries the demo marker)
        t = time.perf_counter()
        summary = run_experiment(config, run_dir, quiet=True)
        summaries[method].append(summary)
        run_dirs[method].append(run_dir)
        if not quiet:
            test = summary["test"]
            print(f"{method:>8} seed {seed}: test acc {test['acc']:.4f}  macro-F1 {test['macro_f1']:.4f}  "
                  + "  ".join(f"mono {m} {test[f'mono_acc/{m}']:.3f}" for m in summary["modalities"])
                  + f"  ({time.perf_counter() - t:.1f}s)", file=sys.stderr, flush=True)
    table, data = results_table(summaries)
    plot = plot_demo(out, run_dirs, out / "demo.png")
    elapsed = time.perf_counter() - t0
    first = summaries[methods[0]][0]
    bayes = first.get("dataset_info", {}).get("bayes_accuracy")
    header = (f"modbal demo: {', '.join(methods)} on {dataset}, {seeds} seed(s) each, "
              f"{first['epochs']} epochs; test split, mean ± std over seeds ({elapsed:.0f}s)\n")
    if isinstance(bayes, Mapping):
        header += "Bayes accuracy (ground truth): " + ", ".join(f"{k} {v:.3f}" for k, v in bayes.items()) + "\n"
    text = header + "\n" + table
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"dataset": dataset, "seeds": seeds, "results": data,
                                                 "elapsed_s": elapsed,
                                                 "runs": {m: [str(d) for d in ds] for m, ds in run_dirs.items()}},
                                                indent=2))
    print(text)
    print(f"run directories: {out}/<method>-seed<k>/   plot: {plot}   table: {out / 'results.md'}")
    return {"results": data, "elapsed_s": elapsed, "plot": str(plot)}
