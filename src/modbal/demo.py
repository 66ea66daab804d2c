"""``modbal demo``: joint training vs AGM on a built-in dataset, a few seeds, table and plot.

Writes ``<out>/<method>-seed<k>/`` run directories (the usual run files), ``<out>/results.md``
and ``results.json`` (test metrics, mean ± std over seeds), ``<out>/demo.<format>`` (validation
accuracy and loss per epoch, fused and per modality) and, through ``modbal report``'s writer, the
report of these runs: ``report.md``, ``report.html`` and every figure in ``figures/`` (coefficients
``coef/<m>``, accuracy per seed, confusion matrices). A method ``unimodal:<m>`` trains on modality m
alone; its runs are the dashed uni-modal reference lines of the curves.
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
from .registry import DATASETS

MARKER = ".modbal-demo"
FORMATS = ("png", "svg", "pdf")  # modbal.report.plots.FORMATS (matplotlib is imported only to draw)

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
    name, _, modality = method.partition(":")
    overrides = [f"method={name}"] + ([f"method.modality={modality}"] if modality else [])
    overrides += [f"seed={seed}"] + ([f"train.epochs={epochs}"] if epochs is not None else [])
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


def plot_demo(run_dirs: Mapping[str, list[Path]], out: Path, title: str, fmt: str = "png") -> Path:
    """``out/demo.<fmt>`` (the training curves of :func:`modbal.report.plots.training_curves`) and the
    report of the runs (:func:`modbal.report.write_report`: report.md, report.html, figures/)."""
    from .report import load_run, write_report
    from .report.plots import save, training_curves

    runs = {method: [load_run(d) for d in dirs] for method, dirs in run_dirs.items()}
    write_report([r for rs in runs.values() for r in rs], out, title=title, fmt=fmt)
    fig = training_curves(runs, title)
    if fig is None:
        raise ConfigError(f"the demo's runs in {str(out)!r} logged no validation metrics to plot")
    return save(fig, out / f"demo.{fmt}")


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ConfigError(f"{str(out)!r} exists and was not written by `modbal demo`; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `modbal demo`; its run directories are replaced on the next demo\n")


def run_demo(dataset: str = "avdigits", seeds: int = 2, epochs: int | None = None, out: str | Path = "runs/demo",
             methods: Sequence[str] = ("joint", "agm"), quiet: bool = False, fmt: str = "png") -> dict[str, Any]:
    """Train each method for ``seeds`` seeds, print the table, write results, the figures (``fmt``:
    png, svg or pdf) and the report."""
    from .train.run import run_experiment

    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    if fmt not in FORMATS:
        raise ConfigError(f"unknown figure format {fmt!r}; allowed values: {', '.join(FORMATS)}")
    out = Path(out)
    configs = {(m, s): demo_config(dataset, m, s, epochs) for m in methods for s in range(seeds)}
    _prepare_out(out)
    t0 = time.perf_counter()
    summaries: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    run_dirs: dict[str, list[Path]] = {m: [] for m in methods}
    for (method, seed), config in configs.items():
        run_dir = out / f"{method.replace(':', '-')}-seed{seed}"
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
    first = summaries[methods[0]][0]
    title = f"modbal demo: {', '.join(methods)} on {dataset}, {seeds} seed(s) each, {first['epochs']} epochs"
    plot = plot_demo(run_dirs, out, title, fmt)
    elapsed = time.perf_counter() - t0
    bayes = first.get("dataset_info", {}).get("bayes_accuracy")
    header = f"{title}; test split, mean ± std over seeds ({elapsed:.0f}s)\n"
    if isinstance(bayes, Mapping):
        header += "Bayes accuracy (ground truth): " + ", ".join(f"{k} {v:.3f}" for k, v in bayes.items()) + "\n"
    text = header + "\n" + table
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"dataset": dataset, "seeds": seeds, "results": data,
                                                 "elapsed_s": elapsed,
                                                 "runs": {m: [str(d) for d in ds] for m, ds in run_dirs.items()}},
                                                indent=2))
    print(text)
    print(f"run directories: {out}/<method>-seed<k>/   plot: {plot}   table: {out / 'results.md'}   "
          f"report: {out / 'report.html'}")
    return {"results": data, "elapsed_s": elapsed, "plot": str(plot)}
