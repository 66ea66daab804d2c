"""The leaderboard as one self-contained HTML page: the tables, and per task a dot plot of every
report seed with each method's 95% interval, accuracy against cost, and mono-modal accuracy per
modality against the uni-modal reference (figures embedded as PNG; nothing external)."""
from __future__ import annotations

import html
import math
from typing import Any, Mapping, Sequence

from ..report.html import STYLE, figure_html, table_html
from ..report.plots import close, plt, render
from ..report.tables import Table
from .leaderboard import group_table, protocol_text
from .study import UNIMODAL

COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]
NOWRAP = ("body { max-width: 1500px; } td { white-space: nowrap; } "
          "td:nth-child(2) { white-space: normal; min-width: 12em; }")


def _png(fig) -> bytes:
    data = render(fig, "png")
    close(fig)
    return data


def _rows(group: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [r for r in group["rows"] if r.get("test_acc")]


def _limits(values: Sequence[float], pad: float = 0.15) -> tuple[float, float]:
    vals = [v for v in values if math.isfinite(v)]
    lo, hi = min(vals), max(vals)
    span = max(hi - lo, 0.5)
    return lo - pad * span, hi + pad * span


def dot_plot(task: str, groups: Sequence[Mapping[str, Any]]) -> bytes | None:
    """One panel per fusion: every report seed's test accuracy (dots), the mean (bar) and its 95%
    t-interval (line) per method; dashed: the reference's mean, dotted: the uni-modal ensemble's."""
    groups = [g for g in groups if _rows(g)]
    if not groups:
        return None
    height = 0.45 * max(len(_rows(g)) + (1 if g.get("ensemble") else 0) for g in groups) + 1.2
    fig, axes = plt.subplots(1, len(groups), figsize=(max(8.0, 5.2 * len(groups)), height), squeeze=False)
    for ax, g in zip(axes[0], groups):
        rows = _rows(g)
        entries = [(r["label"], r["test_acc"], r["acc"]) for r in rows]
        if g.get("ensemble"):
            entries.append(("ensemble (PoE)", g["ensemble"]["test_acc"], g["ensemble"]["acc"]))
        # the axis spans the multimodal methods' and the ensemble's seeds; a uni-modal row or an
        # interval beyond it is clipped, its mean written at the edge
        unimodal = {r["label"] for r in rows if r["method"] == UNIMODAL}
        values = [100 * a for label, accs, _ in entries if label not in unimodal for a in accs]
        values = values or [100 * a for _, accs, _ in entries for a in accs]
        lo, hi = _limits(values)
        for i, (label, accs, st) in enumerate(entries):
            y = len(entries) - 1 - i
            color = COLORS[i % len(COLORS)]
            jitter = [0.12 * ((k % 3) - 1) for k in range(len(accs))]
            ax.scatter([100 * a for a in accs], [y + j for j in jitter], s=16, color=color, alpha=0.7, zorder=3)
            if math.isfinite(st["ci_lo"]):
                ax.plot([100 * st["ci_lo"], 100 * st["ci_hi"]], [y, y], color=color, lw=2.2, zorder=2)
            ax.plot([100 * st["mean"]] * 2, [y - 0.3, y + 0.3], color="black", lw=1.2, zorder=4)
            if not lo <= 100 * st["mean"] <= hi:  # the mean written at the edge, above the row's dots
                left = 100 * st["mean"] < lo
                ax.annotate(f"{'◀ ' if left else ''}{100 * st['mean']:.1f}{'' if left else ' ▶'}",
                            (lo if left else hi, y), xytext=(3 if left else -3, 5), textcoords="offset points",
                            ha="left" if left else "right", va="bottom", fontsize=7, color=color)
        ref = next((r for r in rows if r["label"] == g["reference"]), None)
        if ref is not None:
            ax.axvline(100 * ref["acc"]["mean"], color="gray", ls="--", lw=0.8)
        if g.get("ensemble"):
            ax.axvline(100 * g["ensemble"]["acc"]["mean"], color="gray", ls=":", lw=0.8)
        ax.set_yticks(range(len(entries)))
        ax.set_yticklabels([e[0] for e in reversed(entries)], fontsize=8)
        ax.set_xlim(lo, hi)
        ax.set_xlabel("test accuracy (%)")
        ax.set_title(f"{task} / {g['fusion']}", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def cost_plot(task: str, groups: Sequence[Mapping[str, Any]]) -> bytes | None:
    """Mean test accuracy (± 95% interval) against the time per training step relative to the reference."""
    points = [(g["fusion"], r) for g in groups for r in _rows(g)
              if isinstance(r.get("step_ratio"), float) and math.isfinite(r["step_ratio"])]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(8.0, 4.8))
    fusions = list(dict.fromkeys(f for f, _ in points))
    markers = "osD^v<>P*X"
    ys = []
    for f, r in points:
        st = r["acc"]
        err = ([[100 * (st["mean"] - st["ci_lo"])], [100 * (st["ci_hi"] - st["mean"])]]
               if math.isfinite(st["ci_lo"]) else None)
        ax.errorbar([r["step_ratio"]], [100 * st["mean"]], yerr=err, fmt=markers[fusions.index(f) % len(markers)],
                    color=COLORS[fusions.index(f) % len(COLORS)], capsize=3, ms=5)
        ax.annotate(r["label"], (r["step_ratio"], 100 * st["mean"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
        ys.append(100 * st["mean"])  # the axis spans the means; a wider interval is clipped
    for k, f in enumerate(fusions):
        ax.plot([], [], markers[k % len(markers)], color=COLORS[k % len(COLORS)], label=f)
    ax.legend(title="fusion", fontsize=8)
    ax.set_ylim(*_limits(ys, pad=0.3))
    ax.axvline(1.0, color="gray", lw=0.6, ls="--")
    ax.set_xlabel("time per training step × reference (same study)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{task}: accuracy against cost", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def mono_plot(task: str, group: Mapping[str, Any]) -> bytes | None:
    """Per modality: each method's mono-modal test accuracy (every report seed; bar: mean) against the
    uni-modal run of that modality (dotted line: its mean test accuracy)."""
    rows = [r for r in _rows(group) if r["method"] != UNIMODAL and r.get("mono_acc")]
    mods = [m for m in group["modalities"] if any(m in r["mono_acc"] for r in rows)]
    if not rows or not mods:
        return None
    uni = {r["modality"]: r["acc"]["mean"] for r in _rows(group) if r["method"] == UNIMODAL and r.get("modality")}
    cols = min(3, len(mods))
    nrows = math.ceil(len(mods) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 0.42 * len(rows) * nrows + 1.3 * nrows),
                             squeeze=False)
    for k, m in enumerate(mods):
        ax = axes[k // cols][k % cols]
        values = []
        for i, r in enumerate(rows):
            y = len(rows) - 1 - i
            accs = [100 * a for a in r["mono_acc"].get(m, [])]
            ax.scatter(accs, [y] * len(accs), s=14, color=COLORS[i % len(COLORS)], alpha=0.7)
            if accs:
                ax.plot([sum(accs) / len(accs)] * 2, [y - 0.3, y + 0.3], color="black", lw=1.2)
            values += accs
        if m in uni:
            ax.axvline(100 * uni[m], color="gray", ls=":", lw=1.0, label="uni-modal run")
            values.append(100 * uni[m])
            ax.legend(fontsize=7, loc="lower right")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([r["label"] for r in reversed(rows)], fontsize=8)
        ax.set_xlim(*_limits(values))
        ax.set_xlabel(f"mono-modal test accuracy, {m} (%)")
        ax.grid(axis="x", alpha=0.3)
    for k in range(len(mods), nrows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle(f"{task} / {group['fusion']}: each modality inside the multimodal model vs trained alone",
                 fontsize=10)
    fig.tight_layout()
    return _png(fig)


def leaderboard_html(board: Mapping[str, Any]) -> str:
    """The whole page as a string."""
    title = f"Leaderboard: {board['study']}"
    intro = [board["description"], protocol_text(board)]
    parts = [f"<h1>{html.escape(title)}</h1>"] + [f"<p>{html.escape(p)}</p>" for p in intro if p]
    for task, reason in board["tasks_na"].items():
        parts.append(f"<h2>{html.escape(task)}</h2><p>n/a: {html.escape(reason)}</p>")
    tasks = list(dict.fromkeys(g["task"] for g in board["groups"]))
    for task in tasks:
        groups = [g for g in board["groups"] if g["task"] == task]
        for g in groups:
            header, rows = group_table(g)
            parts.append(table_html(Table(f"{task} / {g['fusion']}", header, rows)))
        figures = [(f"{task}: test accuracy of every report seed (dots), mean (black) and 95% t-interval (line) per "
                    "method; dashed: reference mean, dotted: uni-modal ensemble mean", dot_plot(task, groups)),
                   (f"{task}: test accuracy (mean, 95% interval) against time per training step relative to the "
                    "reference", cost_plot(task, groups))]
        figures += [(f"{task} / {g['fusion']}: mono-modal accuracy per modality against the uni-modal run",
                     mono_plot(task, g)) for g in groups]
        parts += [figure_html(caption, png) for caption, png in figures if png is not None]
    parts.append(f"<p class=\"note\">{board['runs']} runs, {board['train_s'] / 60:.1f} min of training in total; "
                 f"study {html.escape(board['source'])}.</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}{NOWRAP}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")
