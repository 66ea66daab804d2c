"""Report figures as PNG bytes (matplotlib, Agg backend; nothing is shown on screen)."""
from __future__ import annotations

import io
import math
from typing import Mapping, Sequence

from ..extras import require

matplotlib = require("matplotlib", "the report's figures")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .tables import GroupKey, RunRecord, group_modalities, group_stats, mean_curve  # noqa: E402

DPI = 90


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _by_dataset_fusion(
    groups: Mapping[GroupKey, Sequence[RunRecord]]
) -> dict[tuple[str, str], dict[str, Sequence[RunRecord]]]:
    out: dict[tuple[str, str], dict[str, Sequence[RunRecord]]] = {}
    for (dataset, fusion, method), runs in groups.items():
        out.setdefault((dataset, fusion), {})[method] = runs
    return out


def training_curves(methods: Mapping[str, Sequence[RunRecord]], title: str) -> bytes | None:
    """Rows: κ_m (epoch mean of steps.jsonl) and validation mono-modal accuracy; columns: modalities;
    one line per method (mean over runs, band = ± std). None when nothing was logged."""
    mods = group_modalities([r for runs in methods.values() for r in runs])
    if not mods:
        return None
    rows = [("kappa/{m}", "steps", "κ"), ("val/mono_acc/{m}", "epochs", "val mono-modal acc")]
    fig, axes = plt.subplots(len(rows), len(mods), figsize=(4.2 * len(mods), 3.0 * len(rows)), squeeze=False)
    drawn = False
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (pattern, source, label) in enumerate(rows):
        for j, m in enumerate(mods):
            ax = axes[i][j]
            for k, (method, runs) in enumerate(methods.items()):
                xs, mean, std = mean_curve(runs, pattern.format(m=m), source)
                if not xs:
                    continue
                drawn = True
                c = colors[k % len(colors)]
                ax.plot(xs, mean, color=c, label=f"{method} (n={len(runs)})", marker="." if len(xs) < 30 else None)
                lo = [a - (b if math.isfinite(b) else 0) for a, b in zip(mean, std)]
                hi = [a + (b if math.isfinite(b) else 0) for a, b in zip(mean, std)]
                ax.fill_between(xs, lo, hi, color=c, alpha=0.2)
            if not ax.lines:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
            ax.set_title(f"{label} — {m}", fontsize=10)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if ax.lines:
                ax.legend(fontsize=8)
            if i == 0 and ax.lines:
                ax.axhline(1.0, color="gray", lw=0.6, ls=":")
    if not drawn:
        plt.close(fig)
        return None
    fig.suptitle(title)
    fig.tight_layout()
    return _png(fig)


def _grouped_bars(ax, labels: Sequence[str], series: Mapping[str, tuple[list[float], list[float]]],
                  scale: float) -> None:
    width = 0.8 / max(len(series), 1)
    for k, (name, (means, stds)) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [m * scale for m in means], width, yerr=[0 if not math.isfinite(s) else s * scale for s in stds],
               label=name, capsize=3)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right")


def accuracy_bars(groups: Mapping[GroupKey, Sequence[RunRecord]]) -> list[tuple[str, bytes]]:
    """Per dataset: test accuracy (%) by fusion (x) and method (bars), error bars = std over seeds."""
    figures = []
    datasets = sorted({k[0] for k in groups})
    for dataset in datasets:
        keys = [k for k in groups if k[0] == dataset]
        fusions = sorted({k[1] for k in keys})
        methods = sorted({k[2] for k in keys})
        series = {}
        for method in methods:
            means, stds = [], []
            for fusion in fusions:
                runs = groups.get((dataset, fusion, method))
                st = group_stats(runs).get("test/acc") if runs else None
                means.append(st.mean if st and st.n else math.nan)
                stds.append(st.std if st and st.n else math.nan)
            series[method] = (means, stds)
        if all(not math.isfinite(v) for m, _ in series.values() for v in m):
            continue
        fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(fusions) * max(1, len(methods)) / 2 + 2), 3.4))
        _grouped_bars(ax, fusions, series, 100.0)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{dataset}: test accuracy by fusion and method")
        ax.legend(fontsize=8)
        figures.append((f"Test accuracy — {dataset}", _png(fig)))
    return figures


def per_modality(groups: Mapping[GroupKey, Sequence[RunRecord]], kind: str) -> list[tuple[str, bytes]]:
    """Per dataset: d_m (``kind="competition"``) or φ_m (``"shapley"``) per group and modality."""
    figures = []
    for dataset in sorted({k[0] for k in groups}):
        keys = [k for k in groups if k[0] == dataset]
        stats = {k: group_stats(groups[k]) for k in keys}
        keys = [k for k in keys if any(s.n for name, s in stats[k].items() if name.startswith(kind + "/"))]
        if not keys:
            continue
        mods = group_modalities([r for k in keys for r in groups[k]])
        labels = [f"{k[1]}/{k[2]}" for k in keys]
        series = {m: ([stats[k][f"{kind}/{m}"].mean for k in keys], [stats[k][f"{kind}/{m}"].std for k in keys])
                  for m in mods}
        fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(keys) * len(mods) + 2), 3.4))
        scale = 1.0 if kind == "competition" else 100.0
        _grouped_bars(ax, labels, series, scale)
        if kind == "competition":
            ax.set_ylabel("competition strength d_m")
            ax.axhline(1.0, color="gray", lw=0.6, ls=":")
            title = f"{dataset}: competition strength (0 = concept kept, 1 = lost)"
        else:
            ax.set_ylabel("Shapley contribution φ_m (acc. %)")
            ax.axhline(0.0, color="gray", lw=0.6)
            title = f"{dataset}: Shapley contributions (SHAPE)"
        ax.set_title(title, fontsize=10)
        ax.legend(title="modality", fontsize=8)
        figures.append((title, _png(fig)))
    return figures


def report_figures(groups: Mapping[GroupKey, Sequence[RunRecord]]) -> list[tuple[str, bytes]]:
    """All report figures as (caption, PNG bytes)."""
    figures = []
    for (dataset, fusion), methods in _by_dataset_fusion(groups).items():
        png = training_curves(methods, f"{dataset} / {fusion}: κ_m and mono-modal accuracy over training")
        if png is not None:
            figures.append((f"Training curves — {dataset} / {fusion}", png))
    figures += accuracy_bars(groups)
    figures += per_modality(groups, "competition")
    figures += per_modality(groups, "shapley")
    return figures
