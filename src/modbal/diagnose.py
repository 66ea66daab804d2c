"""``modbal diagnose RECIPE``: does a task suffer from modality competition?

Short runs answer it before any balancing method is tried. For a few seeds s, the recipe is trained
with ``method: joint`` (seed s) and with ``method: {name: unimodal, modality: m}`` for every modality
m (seed s + 1000, so that it never shares the joint run's initial weights; these are the uni-modal
*concepts* of ``modbal analyze competition``, with the same settings and validation split). All runs
go through the grid engine (:mod:`modbal.bench.grid`): finished runs are reused, interrupted ones
resumed. Then, per modality and seed s (paired: the joint run of seed s with the uni-modal runs of
seed s + 1000):

- **alone**: the uni-modal run's test accuracy;
- **inside**: the joint run's test ``mono_acc/<m>`` (accuracy of m's exact Shapley share of the
  joint model's logits) and, when the fusion has per-modality heads, ``head_acc/<m>``;
- **shortfall** = alone − inside;
- **competition strength** d_m of the joint run against the uni-modal run (:mod:`modbal.metrics.competition`
  through :func:`modbal.report.analyze.competition`: ridge probe fit on val, scored on test);
- the **ensemble gap** = product-of-experts of the uni-modal runs (the leaderboard's
  :func:`~modbal.bench.leaderboard.product_of_experts`) − the joint run's test accuracy.

Each difference gets the mean over seeds and a two-sided 95% t-interval of the per-seed differences.
:func:`judge` turns one into a claim with a ``margin`` (default one accuracy point): ``"positive"``
when the interval lies above 0 and the mean is at least the margin, ``"below_margin"`` when the whole
interval lies below the margin, ``"unclear"`` otherwise, ``"too_few"`` with fewer than two seeds.
The verdicts (:func:`modality_verdict`, :func:`ensemble_verdict`, :func:`overall_verdict`) say no
more than these claims. Outputs: ``diagnosis.json``, ``diagnosis.md``, ``diagnosis.html`` (one
self-contained page), ``diagnosis.png`` and ``predictions.npz`` (every run's test-set softmax
outputs and the labels, from which the ensemble is computed).
"""
from __future__ import annotations

import argparse
import html
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .bench.grid import Job

LEVEL = 0.95  # the t-intervals' level (the bench's)
DEFAULT_SEEDS = 3
DEFAULT_MARGIN = 0.01  # one accuracy point: differences smaller than this are not worth balancing for


class DiagnoseError(ValueError):
    """A diagnose setting a user can fix."""


# -- the runs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """The runs of one diagnosis: ``joint[i]`` pairs with ``unimodal[m][i]`` (seed ``seeds[i]`` + 1000)."""

    recipe: str
    config: Mapping[str, Any]  # the first joint run's resolved config
    modalities: tuple[str, ...]
    seeds: tuple[int, ...]
    joint: tuple[Job, ...]
    unimodal: Mapping[str, tuple[Job, ...]]
    out: Path

    @property
    def jobs(self) -> list[Job]:
        return list(self.joint) + [job for m in self.modalities for job in self.unimodal[m]]


def default_out(recipe: str | Path) -> Path:
    """``runs/diagnose/<recipe name>``."""
    return Path("runs") / "diagnose" / Path(str(recipe)).stem


def plan_diagnosis(recipe: str | Path, overrides: Sequence[str] = (), seeds: int = DEFAULT_SEEDS,
                   epochs: int | None = None, out: str | Path | None = None) -> Plan:
    """Every run's resolved config and directory (validated, nothing trained): joint runs in
    ``OUT/joint/seed<s>-<config key>``, uni-modal ones where ``modbal analyze competition`` looks for
    shared concepts (``OUT/unimodal/<hash>/<m>-seed<s+1000>``), so its d_m reuses them."""
    from .config import load_recipe, resolve
    from .report.analyze import CONCEPT_SEED_OFFSET, concept_config, concept_dir
    from .train.run import build_data

    if seeds < 1:
        raise DiagnoseError(f"--seeds must be >= 1, got {seeds}")
    if epochs is not None and epochs < 1:
        raise DiagnoseError(f"--epochs must be >= 1, got {epochs}")
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key == "method" or key.startswith("method."):
            raise DiagnoseError(f"diagnose chooses the method itself (joint and unimodal); drop the override {text!r}")
    fixed = list(overrides) + ([f"train.epochs={epochs}"] if epochs is not None else [])
    base = load_recipe(recipe, fixed + ["method=joint"])
    out = Path(out) if out is not None else default_out(recipe)
    data = build_data(base)  # also checks the dataset before anything trains
    modalities, carved = tuple(data["modalities"]), bool(data["carved_val"])
    if len(modalities) < 2:
        raise DiagnoseError(f"the dataset has {len(modalities)} modality ({', '.join(modalities)}); "
                            f"competition needs at least two")
    first = int(base["seed"])
    seed_list = tuple(range(first, first + seeds))
    joint, unimodal = [], {m: [] for m in modalities}
    for seed in seed_list:
        config = load_recipe(recipe, fixed + ["method=joint", f"seed={seed}"])
        job = Job.of(config, "")
        joint.append(Job.of(config, out / "joint" / f"seed{seed}-{job.key}"))
        for m in modalities:
            # a carved validation split pinned to the joint run's, as for any concept
            uni = resolve(concept_config(config, m, seed + CONCEPT_SEED_OFFSET, carved),
                          source=f"{recipe} (unimodal {m})")
            unimodal[m].append(Job.of(uni, concept_dir(Path(joint[-1].run_dir), uni, out / "unimodal")))
    return Plan(str(recipe), base, modalities, seed_list, tuple(joint), {m: tuple(v) for m, v in unimodal.items()},
                out)


# -- statistics and claims (pure) --------------------------------------------------------------
def stat(values: Sequence[float]) -> dict[str, Any]:
    """``values`` with their n, mean, sample std and 95% t-interval of the mean (nan bounds for n < 2)."""
    from .bench.stats import t_interval

    s = t_interval(values, LEVEL)
    return {"values": [float(v) for v in values], "n": s.n, "mean": s.mean, "std": s.std, "ci_lo": s.lo,
            "ci_hi": s.hi}


def judge(diff: Mapping[str, Any], margin: float = DEFAULT_MARGIN) -> str:
    """What a paired difference (a :func:`stat`) allows one to claim, with ``margin`` the smallest
    difference worth acting on: ``"positive"`` (interval above 0 and mean ≥ margin), ``"below_margin"``
    (whole interval below the margin: at most a negligible difference, possibly negative),
    ``"unclear"`` (the interval admits both), ``"too_few"`` (no interval: fewer than two seeds)."""
    lo, hi, mean = diff["ci_lo"], diff["ci_hi"], diff["mean"]
    if diff["n"] < 2 or not (math.isfinite(lo) and math.isfinite(hi)):
        return "too_few"
    if lo > 0 and mean >= margin:
        return "positive"
    if hi < margin:
        return "below_margin"
    return "unclear"


def _pct(x: float) -> str:
    return "—" if not math.isfinite(x) else f"{100 * x:.1f}%"


def _points(x: float) -> str:
    return f"{100 * x:g} point" + ("" if 100 * x == 1 else "s")


def _pts(s: Mapping[str, Any]) -> str:
    """``+4.2 points [1.0, 7.4]`` (the interval when there is one)."""
    mean = f"{100 * s['mean']:+.1f} points"
    if not (math.isfinite(s["ci_lo"]) and math.isfinite(s["ci_hi"])):
        return mean
    return f"{mean} [{100 * s['ci_lo']:+.1f}, {100 * s['ci_hi']:+.1f}]"


def modality_verdict(m: str, alone: Mapping[str, Any], inside: Mapping[str, Any], shortfall: Mapping[str, Any],
                     margin: float = DEFAULT_MARGIN) -> tuple[str, str]:
    """(claim, sentence) for one modality: is it under-used inside the joint model?"""
    claim = judge(shortfall, margin)
    a, b, s = _pct(alone["mean"]), _pct(inside["mean"]), _pts(shortfall)
    if claim == "positive":
        text = f"{m} is under-used inside the joint model: alone it reaches {a}, inside {b} (shortfall {s})."
    elif claim == "below_margin" and shortfall["ci_hi"] < 0:
        text = f"{m} is not under-used: inside the joint model it does better ({b}) than alone ({a}); shortfall {s}."
    elif claim == "below_margin":
        text = (f"{m} is not under-used: inside the joint model it reaches {b}, alone {a}; the shortfall "
                f"({s}) is below {_points(margin)}.")
    elif claim == "unclear":
        text = (f"{m}: no claim. Alone {a}, inside {b}, shortfall {s}: the interval admits both no shortfall "
                f"and one of {_points(margin)} or more; more seeds would narrow it.")
    else:
        text = f"{m}: alone {a}, inside {b} (one seed: no interval, no claim)."
    return claim, text


def ensemble_verdict(joint: Mapping[str, Any], ensemble: Mapping[str, Any], gap: Mapping[str, Any],
                     margin: float = DEFAULT_MARGIN) -> tuple[str, str]:
    """(claim, sentence): does the uni-modal ensemble beat joint training?"""
    claim = judge(gap, margin)
    j, e, g = _pct(joint["mean"]), _pct(ensemble["mean"]), _pts(gap)
    if claim == "positive":
        text = (f"The uni-modal ensemble beats joint training by {g} (ensemble {e}, joint {j}): "
                f"a balancing method may close this gap.")
    elif claim == "below_margin" and gap["ci_hi"] < 0:
        text = (f"Joint training beats the uni-modal ensemble ({j} vs {e}; gap {g}): "
                f"balancing is unlikely to help.")
    elif claim == "below_margin":
        text = (f"Joint training already matches the uni-modal ensemble ({j} vs {e}; gap {g}, below "
                f"{_points(margin)}): balancing is unlikely to help.")
    elif claim == "unclear":
        text = (f"Joint {j} vs uni-modal ensemble {e}, gap {g}: no claim; the interval admits both no gap and "
                f"a gap worth closing; more seeds would narrow it.")
    else:
        text = f"Joint {j} vs uni-modal ensemble {e} (one seed: no interval, no claim)."
    return claim, text


def overall_verdict(modality_claims: Mapping[str, str], ensemble_claim: str) -> tuple[str, str]:
    """(kind, sentence) from the per-modality claims and the ensemble claim:
    ``competition`` (a modality under-used and the ensemble ahead), ``underused_no_gap``,
    ``gap_without_underuse``, ``no_competition`` (nothing under-used, no gap), ``inconclusive``."""
    if ensemble_claim == "too_few":  # one seed: no claim at all
        return "inconclusive", ("One seed gives no intervals, so no claim: rerun with --seeds 3 or more; "
                                "finished runs are reused.")
    under = [m for m, c in modality_claims.items() if c == "positive"]
    all_fine = all(c == "below_margin" for c in modality_claims.values())
    names = " and ".join(under)
    verb = "is" if len(under) == 1 else "are"
    if under and ensemble_claim == "positive":
        return "competition", (f"Yes: {names} {verb} under-used inside the joint model, and the uni-modal ensemble "
                               f"beats joint training: a balancing method may help.")
    if under and ensemble_claim == "below_margin":
        return "underused_no_gap", (f"Partly: {names} {verb} under-used inside the joint model, but joint training "
                                    f"already matches the uni-modal ensemble: balancing may change what the model "
                                    f"relies on, but is unlikely to raise accuracy.")
    if all_fine and ensemble_claim == "below_margin":
        return "no_competition", ("No: every modality does as well inside the joint model as alone, and joint "
                                  "training matches the uni-modal ensemble: balancing is unlikely to help.")
    if all_fine and ensemble_claim == "positive":
        return "gap_without_underuse", ("The uni-modal ensemble beats joint training, but no modality falls short of "
                                        "what it reaches alone: the gap is not explained by an under-used modality, "
                                        "and a balancing method may or may not close it.")
    known = [f"{names} {verb} under-used inside the joint model"] if under else []
    known += {"positive": ["the uni-modal ensemble beats joint training"],
              "below_margin": ["joint training matches the uni-modal ensemble"]}.get(ensemble_claim, [])
    unclear = [m for m, c in modality_claims.items() if c == "unclear"]
    questions = [f"whether {' or '.join(unclear)} {'is' if len(unclear) == 1 else 'are'} under-used"] if unclear else []
    questions += ["whether the uni-modal ensemble beats joint training"] if ensemble_claim == "unclear" else []
    return "inconclusive", ("Not clear with these seeds: " + (", ".join(known) + ", but " if known else "")
                            + "the intervals are too wide to tell " + " or ".join(questions)
                            + ". Rerun with more seeds (--seeds); finished runs are reused.")


# -- measuring ---------------------------------------------------------------------------------
def _summary(run_dir: str) -> dict[str, Any]:
    from .bench.study import read_summary

    return read_summary(run_dir) or {}


def _metric(run_dir: str, key: str, optional: bool = False) -> float | None:
    """``test.<key>`` of a run's summary.json, checked to be a finite number."""
    test = _summary(run_dir).get("test")
    value = test.get(key) if isinstance(test, dict) else None
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DiagnoseError(f"{Path(run_dir) / 'summary.json'}: test.{key} is missing or not a finite number "
                            f"({value!r})")
    return float(value)


def measure(plan: Plan, margin: float = DEFAULT_MARGIN,
            alpha: float | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The diagnosis (what ``diagnosis.json`` holds) and the arrays of ``predictions.npz``, from the
    run directories of the seeds whose runs are all complete."""
    import numpy as np

    from .bench.leaderboard import probabilities_on_test, product_of_experts
    from .metrics.competition import DEFAULT_ALPHA
    from .report.analyze import competition

    alpha = DEFAULT_ALPHA if alpha is None else alpha
    mods = plan.modalities
    done = [i for i in range(len(plan.seeds))
            if all(_summary(j.run_dir).get("status") == "complete"
                   for j in [plan.joint[i]] + [plan.unimodal[m][i] for m in mods])]
    if not done:
        raise DiagnoseError(f"no seed has all of its runs complete in {plan.out}; see the errors above")
    cache: dict[str, Any] = {}
    arrays: dict[str, Any] = {}
    runs, joint_acc, ens_acc = [], [], []
    alone: dict[str, list[float]] = {m: [] for m in mods}
    inside: dict[str, list[float]] = {m: [] for m in mods}
    head: dict[str, list[float]] = {m: [] for m in mods}
    strength: dict[str, list[float]] = {m: [] for m in mods}
    for i in done:
        seed, jdir = plan.seeds[i], plan.joint[i].run_dir
        joint_acc.append(_metric(jdir, "acc"))
        probs, labels = probabilities_on_test(jdir, cache)
        if "labels" not in arrays:
            arrays["labels"] = labels.numpy()
        elif not np.array_equal(arrays["labels"], labels.numpy()):
            raise DiagnoseError(f"{jdir}: its test labels differ from the other runs' (the test split is not fixed)")
        arrays[f"joint-seed{seed}"] = probs.numpy()
        runs.append({"role": "joint", "modality": None, "seed": seed, "pair": seed, "run_dir": jdir,
                     "predictions": f"joint-seed{seed}"})
        members = []
        for m in mods:
            udir = plan.unimodal[m][i].run_dir
            useed = int(plan.unimodal[m][i].config["seed"])
            alone[m].append(_metric(udir, "acc"))
            inside[m].append(_metric(jdir, f"mono_acc/{m}"))
            own = _metric(jdir, f"head_acc/{m}", optional=True)  # fusions with per-modality heads
            if own is not None:
                head[m].append(own)
            p, lab = probabilities_on_test(udir, cache)
            if not np.array_equal(arrays["labels"], lab.numpy()):
                raise DiagnoseError(f"{udir}: its test labels differ from the joint run's "
                                    f"(the test split is not fixed)")
            key = f"unimodal-{m}-seed{useed}"
            arrays[key] = p.numpy()
            members.append((p, lab))
            runs.append({"role": "unimodal", "modality": m, "seed": useed, "pair": seed, "run_dir": udir,
                         "predictions": key})
        ens_acc.append(product_of_experts(members)[0])
        scores = competition(jdir, alpha=alpha, concept_cache=plan.out / "unimodal", write=False,
                             echo=lambda _: None)["scores"]
        for m in mods:
            strength[m].append(float(scores[m]))
    per_mod: dict[str, Any] = {}
    for m in mods:
        a, b = stat(alone[m]), stat(inside[m])
        short = stat([x - y for x, y in zip(alone[m], inside[m])])
        claim, text = modality_verdict(m, a, b, short, margin)
        per_mod[m] = {"alone": a, "inside": b, "shortfall": {**short, "claim": claim},
                      "head": stat(head[m]) if len(head[m]) == len(done) else None,
                      "head_shortfall": (stat([x - y for x, y in zip(alone[m], head[m])])
                                         if len(head[m]) == len(done) else None),
                      "competition": stat(strength[m]), "verdict": text}
    joint, ens = stat(joint_acc), stat(ens_acc)
    gap = stat([e - j for e, j in zip(ens_acc, joint_acc)])
    eclaim, etext = ensemble_verdict(joint, ens, gap, margin)
    kind, text = overall_verdict({m: per_mod[m]["shortfall"]["claim"] for m in mods}, eclaim)
    cfg = plan.config
    diagnosis = {
        "recipe": plan.recipe, "dataset": cfg["dataset"]["name"], "fusion": cfg["model"]["fusion"]["name"],
        "modalities": list(mods), "epochs": int(cfg["train"]["epochs"]),
        "seeds": [plan.seeds[i] for i in done], "seeds_missing": [s for i, s in enumerate(plan.seeds) if i not in done],
        "level": LEVEL, "margin": margin,
        "competition_strength": {"alpha": alpha, "probe_split": "val", "eval_split": "test",
                                 "definition": "d_m = trace(RᵀR B⁺)/rank(B) of a ridge probe from the joint "
                                               "model's fused representation to the uni-modal run's "
                                               "(modbal.metrics.competition); 0 = kept, 1 = lost"},
        "runs": runs, "joint": joint, "ensemble": {**ens, "rule": "product of experts: argmax Σ_m log p_m"},
        "ensemble_gap": {**gap, "claim": eclaim}, "ensemble_verdict": etext, "per_modality": per_mod,
        "verdict": {"kind": kind, "text": text}, "predictions": "predictions.npz",
    }
    return diagnosis, arrays


# -- outputs -----------------------------------------------------------------------------------
def figure(diagnosis: Mapping[str, Any]) -> bytes:
    """PNG: per modality, accuracy alone vs inside the joint model (seeds as dots, mean with its 95%
    interval); joint vs the uni-modal ensemble (seeds joined by lines); d_m per modality."""
    import io

    from .extras import require

    matplotlib = require("matplotlib", "the diagnosis figure")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mods = diagnosis["modalities"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), gridspec_kw={"width_ratios": [max(2, len(mods)) * 1.2, 1.3, 1.3]})

    def dots(ax: Any, x: float, s: Mapping[str, Any], color: str, label: str | None = None,
             k: float = 100) -> list[float]:
        """Seeds as small dots left of ``x``; the mean with its interval beside them; the dots' x."""
        vals = [k * v for v in s["values"]]
        n = len(vals)
        xs = [x + (k - (n - 1) / 2) * 0.04 for k in range(n)]
        ax.scatter(xs, vals, s=14, color=color, alpha=0.55, zorder=2)
        if math.isfinite(s["ci_lo"]):
            err = [[k * (s["mean"] - s["ci_lo"])], [k * (s["ci_hi"] - s["mean"])]]
        else:
            err = None
        ax.errorbar([x + 0.15], [k * s["mean"]], yerr=err, fmt="o", color=color, capsize=4, ms=6, label=label,
                    zorder=3)
        return xs

    ax = axes[0]
    kinds = [("alone", "alone (uni-modal run)", "#1f77b4"), ("inside", "inside: mono-modal (Shapley)", "#d62728"),
             ("head", "inside: own head", "#ff7f0e")]
    kinds = [k for k in kinds if all(diagnosis["per_modality"][m][k[0]] for m in mods)]
    width = 0.8 / len(kinds)
    for j, (key, label, color) in enumerate(kinds):
        for i, m in enumerate(mods):
            dots(ax, i + (j - (len(kinds) - 1) / 2) * width, diagnosis["per_modality"][m][key], color,
                 label if i == 0 else None)
    ax.set_xticks(range(len(mods)), mods)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(max(-2, ax.get_ylim()[0]), min(102, ax.get_ylim()[1]))  # intervals past 0 or 100% are cut
    ax.set_title("each modality: alone vs inside the joint model")
    ax.legend(fontsize=8, loc="best")
    ax.grid(axis="y", alpha=0.3)

    ax = axes[1]
    joint, ens = diagnosis["joint"], diagnosis["ensemble"]
    pairs = zip(dots(ax, 0, joint, "#2ca02c"), joint["values"], dots(ax, 1, ens, "#9467bd"), ens["values"])
    for x0, a, x1, b in pairs:  # one line per seed
        ax.plot([x0, x1], [100 * a, 100 * b], color="#999", lw=0.8, zorder=1)
    ax.set_xticks([0, 1], ["joint", "ensemble"])
    ax.set_xlim(-0.5, 1.6)
    ax.set_ylim(max(-2, ax.get_ylim()[0]), min(102, ax.get_ylim()[1]))
    gap = diagnosis["ensemble_gap"]
    ax.set_title(f"joint vs uni-modal ensemble\n(gap {_pts(gap)})", fontsize=10)
    ax.grid(axis="y", alpha=0.3)

    ax = axes[2]
    for i, m in enumerate(mods):
        s = diagnosis["per_modality"][m]["competition"]
        dots(ax, i, s, "#555", k=1)
    ax.set_xticks(range(len(mods)), mods)
    ax.set_xlim(-0.6, len(mods) - 0.4)
    ax.set_ylabel("d_m (0 = kept, 1 = lost)")
    ax.set_title("competition strength d_m", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{diagnosis['dataset']} ({diagnosis['fusion']} fusion): seeds {diagnosis['seeds']}, "
                 f"{diagnosis['epochs']} epochs; bars: 95% t-intervals", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _ci(s: Mapping[str, Any] | None, scale: float = 100, digits: int = 1) -> str:
    if not s or not s.get("n"):
        return "—"
    mean = f"{scale * s['mean']:.{digits}f}"
    if not (math.isfinite(s["ci_lo"]) and math.isfinite(s["ci_hi"])):
        return mean
    return f"{mean} [{scale * s['ci_lo']:.{digits}f}, {scale * s['ci_hi']:.{digits}f}]"


def tables(d: Mapping[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of the per-modality table and the joint-vs-ensemble table."""
    heads = any(d["per_modality"][m]["head"] for m in d["modalities"])
    header = ["modality", "alone (%)", "inside: mono-modal (%)", "shortfall (points)"]
    header += ["inside: own head (%)", "head shortfall (points)"] if heads else []
    header += ["d_m", "claim"]
    rows = []
    for m in d["modalities"]:
        r = d["per_modality"][m]
        row = [m, _ci(r["alone"]), _ci(r["inside"]), _ci(r["shortfall"])]
        row += [_ci(r["head"]), _ci(r["head_shortfall"])] if heads else []
        row += [_ci(r["competition"], 1, 3), _CLAIMS[r["shortfall"]["claim"]]]
        rows.append(row)
    ens = [["joint training", _ci(d["joint"])], ["uni-modal ensemble (product of experts)", _ci(d["ensemble"])],
           ["gap: ensemble − joint (points)", _ci(d["ensemble_gap"])]]
    return [("Each modality: alone vs inside the joint model", header, rows),
            ("Joint training vs the uni-modal ensemble", ["", "test accuracy (%)"], ens)]


_CLAIMS = {"positive": "under-used", "below_margin": "not under-used", "unclear": "no claim (interval too wide)",
           "too_few": "no claim (one seed)"}


def _method_note(d: Mapping[str, Any]) -> str:
    return (f"Seeds {d['seeds']} of joint training, each paired with one uni-modal run per modality (seed + 1000), "
            f"{d['epochs']} epochs, test split. Numbers: mean over seeds [95% t-interval]; differences are paired "
            f"by seed. A claim needs the interval of the difference above 0 and a mean of at least "
            f"{100 * d['margin']:g} point(s); 'not under-used' / 'matches' needs the whole interval below that "
            f"margin. d_m: competition strength (ridge α = {d['competition_strength']['alpha']:g}, probe fit on val, "
            f"scored on test; 0 = the uni-modal run's representation is linearly readable from the joint model's "
            f"fused one, 1 = lost).")


def markdown(d: Mapping[str, Any]) -> str:
    lines = [f"# Diagnosis: {d['recipe']}", "", f"**{d['verdict']['text']}**", ""]
    lines += [f"- {d['per_modality'][m]['verdict']}" for m in d["modalities"]] + [f"- {d['ensemble_verdict']}", ""]
    for title, header, rows in tables(d):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows] + [""]
    lines += [_method_note(d), "", "![diagnosis](diagnosis.png)", ""]
    if d["seeds_missing"]:
        lines += [f"Seeds left out (a run did not complete): {d['seeds_missing']}.", ""]
    return "\n".join(lines)


def html_page(d: Mapping[str, Any], png: bytes) -> str:
    from .report.html import STYLE, figure_html

    esc = html.escape
    parts = [f"<h1>Diagnosis: {esc(d['recipe'])}</h1>", f"<p><strong>{esc(d['verdict']['text'])}</strong></p><ul>"]
    parts += [f"<li>{esc(d['per_modality'][m]['verdict'])}</li>" for m in d["modalities"]]
    parts += [f"<li>{esc(d['ensemble_verdict'])}</li></ul>"]
    parts.append(figure_html("Left: test accuracy of each modality alone (uni-modal runs) and inside the joint model; "
                             "middle: joint training vs the uni-modal ensemble, seeds joined; right: competition "
                             "strength d_m. Small dots: seeds; large markers: means with 95% t-intervals.", png))
    for title, header, rows in tables(d):
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
        parts.append(f"<h2>{esc(title)}</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    parts.append(f'<p class="note">{esc(_method_note(d))}</p>')
    if d["seeds_missing"]:
        parts.append(f'<p class="note">Seeds left out (a run did not complete): {esc(str(d["seeds_missing"]))}.</p>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Diagnosis: {esc(d['recipe'])}</title><style>{STYLE}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")


def write(diagnosis: Mapping[str, Any], arrays: Mapping[str, Any], out: str | Path) -> dict[str, Path]:
    """``diagnosis.json``, ``.md``, ``.html``, ``.png`` and ``predictions.npz`` in ``out``."""
    import numpy as np

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"diagnosis.{k}" for k in ("json", "md", "html", "png")}
    paths["predictions"] = out / "predictions.npz"
    png = figure(diagnosis)
    paths["png"].write_bytes(png)
    paths["json"].write_text(json.dumps(diagnosis, indent=1) + "\n", encoding="utf-8")
    paths["md"].write_text(markdown(diagnosis), encoding="utf-8")
    paths["html"].write_text(html_page(diagnosis, png), encoding="utf-8")
    with open(paths["predictions"], "wb") as f:
        np.savez(f, **arrays)
    return paths


def diagnose(recipe: str | Path, overrides: Sequence[str] = (), seeds: int = DEFAULT_SEEDS, epochs: int | None = None,
             out: str | Path | None = None, executor: Any = None, threads: int | None = None,
             margin: float = DEFAULT_MARGIN, alpha: float | None = None, progress: bool = True,
             echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Plan, train what is missing, measure, write; returns the diagnosis with ``"paths"`` and
    ``"failed"`` (run directory → error) added."""
    from .bench.grid import LocalExecutor, run_grid
    from .extras import require

    require("scipy", "modbal diagnose (its intervals)")  # before anything trains
    require("matplotlib", "modbal diagnose (its figure)")
    if not margin >= 0:
        raise DiagnoseError(f"--margin must be >= 0 points, got {100 * margin:g}")
    plan = plan_diagnosis(recipe, overrides, seeds, epochs, out)
    result = run_grid(plan.jobs, executor or LocalExecutor(), threads, name="diagnose", where=plan.out, echo=echo,
                      progress=progress)
    diagnosis, arrays = measure(plan, margin, alpha)
    paths = write(diagnosis, arrays, plan.out)
    return {**diagnosis, "paths": {k: str(v) for k, v in paths.items()}, "failed": result.failed}


# -- command line ------------------------------------------------------------------------------
HELP = """\
Does my task suffer from modality competition? Trains, for a few seeds, the recipe with joint
training and each modality alone (uni-modal runs), then compares per modality: its test accuracy
alone vs its mono-modal accuracy inside the joint model (the shortfall), its competition strength
d_m, and joint training vs the ensemble of the uni-modal runs (product of experts). Prints a
plain-language verdict that claims only what the 95% intervals over seeds allow, and writes
diagnosis.md, diagnosis.json, diagnosis.html (one self-contained page) and diagnosis.png to --out.

Finished runs are reused: rerun with more --seeds to narrow the intervals.
  modbal diagnose synthetic
  modbal diagnose recipes/avmnist_late.yaml train.device=cuda --seeds 5 --epochs 10 --jobs 2
"""


def _cmd(args: argparse.Namespace) -> int:
    from .bench.cli import executor_from_args, exit_status

    out = args.out or str(default_out(args.recipe))
    res = diagnose(args.recipe, args.overrides, seeds=args.seeds, epochs=args.epochs, out=out,
                   executor=executor_from_args(args, out), threads=args.threads, margin=args.margin / 100,
                   alpha=args.alpha, progress=not args.quiet)
    print()
    print(res["verdict"]["text"])
    for m in res["modalities"]:
        print(f"  - {res['per_modality'][m]['verdict']}")
        print(f"    competition strength d_{m} = {_ci(res['per_modality'][m]['competition'], 1, 3)}")
    print(f"  - {res['ensemble_verdict']}")
    print("written: " + " ".join(res["paths"][k] for k in ("md", "html", "json", "png")))
    return exit_status(res["failed"])


def register(subparsers: Any) -> None:
    """Add ``diagnose`` to the top-level ``modbal`` parser."""
    from .bench.cli import add_executor_options
    from .metrics.competition import DEFAULT_ALPHA
    from .report.cli import _guard

    p = subparsers.add_parser("diagnose", help="does my task suffer from modality competition? (short runs, verdict)",
                              description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", metavar="RECIPE", help="YAML recipe, or the name of a built-in one (e.g. synthetic)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, typed as YAML (not method: diagnose sets it); seed=K sets the first seed")
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                   help=f"seeds of joint training, each with one uni-modal run per modality (default: {DEFAULT_SEEDS})")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the recipe's)")
    p.add_argument("--out", default=None, help="output folder (default: runs/diagnose/<recipe>)")
    p.add_argument("--margin", type=float, default=100 * DEFAULT_MARGIN,
                   help="smallest difference in accuracy points worth a claim (default: 1)")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                   help=f"ridge penalty of the competition-strength probe (default: {DEFAULT_ALPHA:g})")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_executor_options(p)
    guarded = _guard("diagnose", _cmd)

    def run(args: argparse.Namespace) -> int:
        try:
            return guarded(args)
        except DiagnoseError as e:
            print(f"modbal diagnose: error: {e}", file=sys.stderr)
            return 2

    p.set_defaults(func=run)
