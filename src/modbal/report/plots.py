"""The figures of ``modbal report`` and ``modbal demo`` (matplotlib, Agg backend; nothing is shown).

Every figure function returns a :class:`matplotlib.figure.Figure` (None, or no entry, when there is
nothing to draw), so a figure can be inspected or restyled before :func:`render` or :func:`save`
writes it as PNG, SVG or PDF:

- :func:`training_curves`: validation accuracy and loss per epoch, of the fused output and of each
  modality's mono-modal output, one line per method, and the ``unimodal`` runs' best validation
  value per modality as a dashed reference line;
- :func:`coefficient_curves`: each method's per-modality coefficient ``coef/<m>`` per step;
- :func:`seed_dots`: test accuracy of every seed, with the mean and its 95% t-interval;
- :func:`confusion_matrices`: the test confusion matrix of each group, summed over seeds and
  row-normalised;
- :func:`per_modality`: competition strength d_m or Shapley contributions φ_m per group.
"""
from __future__ import annotations

import io
import math
import re
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..extras import require

matplotlib = require("matplotlib", "the report's figures")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .tables import GroupKey, RunRecord, group_modalities, group_stats, mean_curve, mean_std  # noqa: E402

DPI = 90
#: file formats a figure is written in
FORMATS = ("png", "svg", "pdf")
UNIMODAL = "unimodal"
REFERENCE_COLORS = ("0.2", "0.5", "0.7", "0.35", "0.6")
COEF_PREFIX = "coef/"


# -- writing -----------------------------------------------------------------------------------
def render(fig: Figure, fmt: str = "png") -> bytes:
    """``fig`` as PNG, SVG or PDF bytes (the figure stays open: :func:`close` it when done)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown figure format {fmt!r}; allowed values: {', '.join(FORMATS)}")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=DPI, bbox_inches="tight", metadata=_metadata(fmt))
    return buf.getvalue()


def _metadata(fmt: str) -> dict[str, Any]:
    # no creation date in PDFs and SVGs: the same runs give the same files
    return {"png": {}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}[fmt]


def save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` in the format its suffix names (.png, .svg, .pdf) and close it."""
    path = Path(path)
    data = render(fig, path.suffix.lstrip(".").lower())
    close(fig)
    path.write_bytes(data)
    return path


def close(fig: Figure) -> None:
    plt.close(fig)


def slug(text: str) -> str:
    """A file name from a caption: lower case, runs of other characters as one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:80] or "figure"


# -- what the runs hold ------------------------------------------------------------------------
def unimodal_modality(run: RunRecord) -> str | None:
    """The modality a ``unimodal`` run trains on; None for runs of other methods."""
    if run.method != UNIMODAL:
        return None
    for spec in (run.config.get("method"), run.summary.get("method_config")):
        if isinstance(spec, Mapping) and spec.get("modality"):
            return str(spec["modality"])
    return None


def unimodal_references(runs: Sequence[RunRecord], metric: str) -> dict[str, tuple[float, int]]:
    """Per modality: the mean best-epoch validation ``metric`` (``acc``, ``loss``) of the complete
    ``unimodal`` runs of that modality, and their number."""
    values: dict[str, list[Any]] = {}
    for run in runs:
        m = unimodal_modality(run)
        if m is not None and run.complete:
            values.setdefault(m, []).append((run.summary.get("val") or {}).get(metric))
    out = {}
    for m, vals in values.items():
        st = mean_std(vals)
        if st.n:
            out[m] = (st.mean, st.n)
    return out


def step_curve(runs: Sequence[RunRecord], key: str) -> tuple[list[int], list[float], list[float]]:
    """Training steps, mean and std over the runs that logged ``key`` at each step of steps.jsonl."""
    values: dict[int, list[float]] = {}
    for run in runs:
        for row in run.steps:
            v = row.get(key)
            if isinstance(row.get("step"), int) and isinstance(v, (int, float)) and math.isfinite(v):
                values.setdefault(int(row["step"]), []).append(float(v))
    xs = sorted(values)
    stats = [mean_std(values[x]) for x in xs]
    return xs, [s.mean for s in stats], [s.std for s in stats]


def coefficient_of(method: str) -> Any:
    """The registered method's :class:`~modbal.methods.base.Coefficient` (None when it has none or
    is not registered here)."""
    from ..registry import METHODS

    try:
        return getattr(METHODS.get(method), "coefficient", None)
    except (KeyError, ValueError):
        return None


def test_confusion(run: RunRecord) -> list[list[int]] | None:
    """The run's ``summary.json`` ``test_confusion`` when it is a square matrix of counts, else None."""
    cm = run.summary.get("test_confusion")
    if not isinstance(cm, list) or not cm or not all(isinstance(row, list) and len(row) == len(cm) for row in cm):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for row in cm for v in row):
        return None
    return cm


def group_confusion(runs: Sequence[RunRecord]) -> tuple[list[list[int]], list[str], int] | None:
    """The complete runs' test confusion matrices summed (those of the first run's size), the class
    names and the number of runs summed; None when no run holds one."""
    total: list[list[int]] | None = None
    names: list[str] = []
    n = 0
    for run in runs:
        cm = test_confusion(run) if run.complete else None
        if cm is None or (total is not None and len(cm) != len(total)):
            continue
        if total is None:
            total = [[0] * len(cm) for _ in cm]
            given = run.summary.get("class_names")
            names = [str(c) for c in given] if isinstance(given, list) and len(given) == len(cm) else \
                [str(i) for i in range(len(cm))]
        total = [[a + b for a, b in zip(ra, rb)] for ra, rb in zip(total, cm)]
        n += 1
    return None if total is None else (total, names, n)


def _by_dataset_fusion(
    groups: Mapping[GroupKey, Sequence[RunRecord]]
) -> dict[tuple[str, str], dict[str, Sequence[RunRecord]]]:
    out: dict[tuple[str, str], dict[str, Sequence[RunRecord]]] = {}
    for (dataset, fusion, method), runs in groups.items():
        out.setdefault((dataset, fusion), {})[method] = runs
    return out


def _band(ax, xs, mean, std, color, label, marker=None) -> None:
    ax.plot(xs, mean, color=color, label=label, marker=marker, ms=4)
    lo = [a - (b if math.isfinite(b) else 0) for a, b in zip(mean, std)]
    hi = [a + (b if math.isfinite(b) else 0) for a, b in zip(mean, std)]
    ax.fill_between(xs, lo, hi, color=color, alpha=0.2, lw=0)


# -- the figures -------------------------------------------------------------------------------
CURVE_ROWS = (("acc", "accuracy"), ("loss", "loss"))


def training_curves(methods: Mapping[str, Sequence[RunRecord]], title: str = "") -> Figure | None:
    """Rows: validation accuracy and loss per epoch; columns: the fused output, then each modality's
    mono-modal (Shapley) output; one line per method (mean over its runs, band = ± std). The
    ``unimodal`` runs among ``methods`` are not drawn as lines: their best validation value per
    modality is a dashed line in that modality's panels and in the fused panels. None when nothing
    was logged."""
    runs_all = [r for runs in methods.values() for r in runs]
    references = {metric: unimodal_references(runs_all, metric) for metric, _ in CURVE_ROWS}
    drawn_methods = {label: [r for r in runs if unimodal_modality(r) is None] for label, runs in methods.items()}
    drawn_methods = {label: runs for label, runs in drawn_methods.items() if runs}
    mods = group_modalities([r for runs in drawn_methods.values() for r in runs]) or \
        sorted({m for ref in references.values() for m in ref})
    if not mods:
        return None
    columns = [None, *mods]
    fig, axes = plt.subplots(len(CURVE_ROWS), len(columns), figsize=(3.8 * len(columns), 3.0 * len(CURVE_ROWS)),
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = False
    for i, (metric, name) in enumerate(CURVE_ROWS):
        for j, m in enumerate(columns):
            ax = axes[i][j]
            key = f"val/{metric}" if m is None else f"val/mono_{metric}/{m}"
            for k, (label, runs) in enumerate(drawn_methods.items()):
                xs, mean, std = mean_curve(runs, key, "epochs")
                if xs:
                    drawn = True
                    _band(ax, xs, mean, std, colors[k % len(colors)], f"{label} (n={len(runs)})",
                          "." if len(xs) < 30 else None)
            for r, ref_m in enumerate(mods):
                if ref_m in references[metric] and (m is None or m == ref_m):
                    value, n = references[metric][ref_m]
                    ax.axhline(value, color=REFERENCE_COLORS[r % len(REFERENCE_COLORS)], ls="--", lw=1.2,
                               label=f"uni-modal {ref_m} runs (best val, n={n})")
                    drawn = True
            where = "fused" if m is None else f"mono-modal {m}"
            ax.set_title(f"val {name}: {where}", fontsize=10)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if ax.lines:
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    if not drawn:
        close(fig)
        return None
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def coefficient_curves(methods: Mapping[str, Sequence[RunRecord]], title: str = "") -> Figure | None:
    """One panel per method that logged ``coef/<m>``: its coefficient per training step for each
    modality (mean over runs, band = ± std), with the value that leaves training unchanged dotted.
    None when no method logged one."""
    panels = []
    for label, runs in methods.items():
        mods = group_modalities(runs)
        logged = [m for m in mods if any(f"{COEF_PREFIX}{m}" in row for r in runs for row in r.steps[:50])]
        if not logged:  # a coefficient may start late: look further before giving up
            logged = [m for m in mods if any(f"{COEF_PREFIX}{m}" in row for r in runs for row in r.steps)]
        if logged:
            panels.append((label, runs, logged))
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.3 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (label, runs, mods) in zip(axes.flat, panels):
        for k, m in enumerate(mods):
            xs, mean, std = step_curve(runs, f"{COEF_PREFIX}{m}")
            _band(ax, xs, mean, std, colors[k % len(colors)], m)
        coefficient = coefficient_of(runs[0].method)
        if coefficient is not None and coefficient.neutral is not None:
            ax.axhline(coefficient.neutral, color="gray", lw=0.8, ls=":", label="no change")
        meaning = coefficient.meaning if coefficient is not None else "per-modality coefficient"
        ax.set_title("\n".join(textwrap.wrap(f"{label} (n={len(runs)}): {meaning}", 55)), fontsize=8)
        ax.set_xlabel("training step")
        ax.set_ylabel("coef/<m>")
        ax.legend(fontsize=7, title="modality", title_fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def seed_dots(groups: Mapping[GroupKey, Sequence[RunRecord]], key: str = "acc",
              split: str = "test") -> list[tuple[str, Figure]]:
    """Per dataset: one row per group, a dot per complete run (seed) at its ``split`` ``key`` (in %),
    the mean as a bar and its 95% t-interval (n ≥ 2) as a line. The axis spans the data, not 0–100."""
    require("scipy.stats", "the t-intervals of the report's per-seed plots")
    from ..bench.stats import t_interval

    figures = []
    for dataset in sorted({k[0] for k in groups}):
        rows = []
        for k in [k for k in groups if k[0] == dataset]:
            values = [(r.summary.get(split) or {}).get(key) for r in groups[k] if r.complete]
            values = [100.0 * float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
            if values:
                rows.append((f"{k[1]} / {k[2]}", values))
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 0.9 + 0.45 * len(rows)))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        labelled: set[str] = set()

        def once(name: str) -> str | None:  # each legend entry once
            return None if name in labelled or labelled.add(name) else name

        for y, (label, values) in enumerate(rows):
            offsets = [0.12 * ((i % 5) - 2) / 2 for i in range(len(values))]  # spread equal values apart
            ax.scatter(values, [y + o for o in offsets], color=colors[y % len(colors)], s=18, alpha=0.8, zorder=3,
                       label=once("one seed"))
            st = t_interval(values)
            if st.n >= 2 and math.isfinite(st.lo):
                ax.plot([st.lo, st.hi], [y, y], color="black", lw=1.5, zorder=2,
                        label=once("95% t-interval of the mean"))
            ax.plot([st.mean, st.mean], [y - 0.3, y + 0.3], color="black", lw=2, zorder=4, label=once("mean"))
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([f"{label} (n={len(values)})" for label, values in rows], fontsize=8)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        lo, hi = ax.get_xlim()
        ax.set_xlim(max(lo, -0.5), min(hi, 100.5))  # an interval past 0 or 100 % runs to the edge
        ax.set_xlabel(f"{split} {key} (%)")
        ax.grid(axis="x", color="0.9")
        ax.set_title(f"{dataset}: {split} {key} per seed", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        figures.append((f"{split.capitalize()} {key} per seed — {dataset}", fig))
    return figures


def confusion_matrices(groups: Mapping[GroupKey, Sequence[RunRecord]]) -> list[tuple[str, Figure]]:
    """Per dataset: one panel per group, its runs' test confusion matrices summed and each row
    divided by its total (row t: where the samples of class t went)."""
    figures = []
    for dataset in sorted({k[0] for k in groups}):
        panels = []
        for k in [k for k in groups if k[0] == dataset]:
            found = group_confusion(groups[k])
            if found is not None:
                panels.append((f"{k[1]} / {k[2]}", *found))
        if not panels:
            continue
        cols = min(4, len(panels))
        rows = math.ceil(len(panels) / cols)
        size = len(panels[0][1])
        side = min(4.2, 2.4 + 0.12 * size)
        fig, axes = plt.subplots(rows, cols, figsize=(side * cols, side * rows + 0.4), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        image = None
        for ax, (label, cm, names, n) in zip(axes.flat, panels):
            normalised = [[v / sum(row) if sum(row) else math.nan for v in row] for row in cm]
            image = ax.imshow(normalised, vmin=0.0, vmax=1.0, cmap="Blues")
            c = len(cm)
            if c <= 12:
                for t in range(c):
                    for p in range(c):
                        v = normalised[t][p]
                        if math.isfinite(v):
                            ax.text(p, t, f"{100 * v:.0f}", ha="center", va="center", fontsize=6,
                                    color="white" if v > 0.6 else "black")
            ticks = range(c) if c <= 20 else []
            ax.set_xticks(list(ticks))
            ax.set_yticks(list(ticks))
            if c <= 20:
                ax.set_xticklabels(names, rotation=90, fontsize=6)
                ax.set_yticklabels(names, fontsize=6)
            ax.set_xlabel("predicted", fontsize=8)
            ax.set_ylabel("true", fontsize=8)
            ax.set_title(f"{label} (n={n})", fontsize=8)
        fig.suptitle(f"{dataset}: test confusion matrix, summed over seeds, % of each true class", fontsize=10)
        fig.tight_layout()
        if image is not None:
            fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.7, fraction=0.03)
        figures.append((f"Test confusion matrices — {dataset}", fig))
    return figures


def _grouped_bars(ax, labels: Sequence[str], series: Mapping[str, tuple[list[float], list[float]]],
                  scale: float) -> None:
    width = 0.8 / max(len(series), 1)
    for k, (name, (means, stds)) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [m * scale for m in means], width, yerr=[0 if not math.isfinite(s) else s * scale for s in stds],
               label=name, capsize=3)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right")


def per_modality(groups: Mapping[GroupKey, Sequence[RunRecord]], kind: str) -> list[tuple[str, Figure]]:
    """Per dataset: d_m (``kind="competition"``, on its 0–1 scale) or φ_m (``"shapley"``) per group
    and modality, bars with ± std."""
    figures = []
    for dataset in sorted({k[0] for k in groups}):
        keys = [k for k in groups if k[0] == dataset]
        stats = {k: group_stats(groups[k]) for k in keys}
        keys = [k for k in keys if any(s.n for name, s in stats[k].items() if name.startswith(kind + "/"))]
        if not keys:
            continue
        mods = group_modalities([r for k in keys for r in groups[k]])
        labels = [f"{k[1]}/{k[2]}" for k in keys]
        nan = (math.nan, math.nan)
        series = {m: ([getattr(stats[k].get(f"{kind}/{m}"), "mean", nan[0]) for k in keys],
                      [getattr(stats[k].get(f"{kind}/{m}"), "std", nan[1]) for k in keys]) for m in mods}
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
        fig.tight_layout()
        figures.append((title, fig))
    return figures


def report_figures(groups: Mapping[GroupKey, Sequence[RunRecord]]) -> list[tuple[str, Figure]]:
    """Every figure of a report, as (caption, open Figure): per dataset and fusion the training
    curves and the coefficients, then per dataset the per-seed accuracies, the confusion matrices,
    and d_m and φ_m where the runs were analysed. Close each figure (:func:`close`, :func:`save`)."""
    figures: list[tuple[str, Figure]] = []
    multimodal = {d for (d, _, _), runs in groups.items() if any(unimodal_modality(r) is None for r in runs)}
    for (dataset, fusion), methods in _by_dataset_fusion(groups).items():
        references = {label: runs for (d, _, label), runs in groups.items()
                      if d == dataset and any(unimodal_modality(r) for r in runs)}
        if dataset in multimodal and all(unimodal_modality(r) for runs in methods.values() for r in runs):
            continue  # only uni-modal runs under this fusion: they are the reference lines of the others
        fig = training_curves({**methods, **references}, f"{dataset} / {fusion}: validation accuracy and loss")
        if fig is not None:
            figures.append((f"Training curves — {dataset} / {fusion}", fig))
        fig = coefficient_curves(methods, f"{dataset} / {fusion}: per-modality coefficients coef/<m>")
        if fig is not None:
            figures.append((f"Coefficients — {dataset} / {fusion}", fig))
    figures += seed_dots(groups)
    figures += confusion_matrices(groups)
    figures += per_modality(groups, "competition")
    figures += per_modality(groups, "shapley")
    return figures
