"""The leaderboard of a study, computed from its run directories alone (any executor, same table).

Per task and fusion, for each method: test accuracy over the report seeds (mean, std, 95%
t-interval), macro-F1, mono-modal test accuracy per modality, the paired difference to the
reference (joint training) seed by seed with a paired t-test, Holm-corrected over the methods
compared, "gap closed" towards the uni-modal ensemble (product of experts of the uni-modal runs of
the same seed), the time per training step relative to the reference, and the runs and training
time spent (selection and report; for a method with teachers, its teachers' rows' runs included).
Written as Markdown, CSV, JSON and one self-contained HTML page.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from .grid import run_status
from .stats import gap_closed, holm, paired_t, t_interval
from .study import REFERENCE, UNIMODAL, Cell, Choice, Plan, job_of, read_summary, teachers_complete


# -- reading runs ------------------------------------------------------------------------------
def step_seconds(run_dir: str | Path, summary: Mapping[str, Any]) -> float:
    """Training wall time per step: the epochs' time (validation included) over the steps taken."""
    from ..train.logging import read_jsonl

    epochs = read_jsonl(Path(run_dir) / "epochs.jsonl")
    config = _config(run_dir)
    train = config.get("train", {})
    n, bs = (summary.get("sizes") or {}).get("train"), int(train.get("batch_size", 64))
    if not n:
        return math.nan
    per_epoch = n // bs if train.get("drop_last") else math.ceil(n / bs)
    if train.get("max_steps_per_epoch"):
        per_epoch = min(per_epoch, int(train["max_steps_per_epoch"]))
    seconds = sum(float(r.get("time_s", 0.0)) for r in epochs)
    steps = per_epoch * len(epochs)
    return seconds / steps if steps else math.nan


def _config(run_dir: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(run_dir) / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def probabilities_on_test(run_dir: str, cache: dict[str, Any]) -> tuple[Any, Any]:
    """Softmax outputs of a run's best checkpoint on the test split (as the method feeds its model), and the labels."""
    import torch

    from ..report.analyze import load_trained, split_loader
    from ..train.run import build_data, build_method

    config = _config(run_dir)
    dkey = json.dumps(config["dataset"], sort_keys=True, default=str) + str(config["seed"])
    if dkey not in cache:
        cache[dkey] = build_data(config)
    model, config, data = load_trained(run_dir, data=cache[dkey])
    method = build_method(config)
    probs, labels = [], []
    with torch.no_grad():
        for inputs, targets in split_loader(data, "test", 256):
            probs.append(torch.softmax(model(method.prepare_inputs(inputs)).float(), -1))
            labels.append(targets)
    return torch.cat(probs), torch.cat(labels)


def product_of_experts(outputs: Sequence[tuple[Any, Any]]) -> tuple[float, float]:
    """Accuracy and macro-F1 of argmax Σ_m log p_m (modalities independent given the class, uniform prior)."""
    from ..metrics.classification import accuracy, macro_f1

    labels = outputs[0][1]
    pred = sum(p.clamp_min(1e-12).log() for p, _ in outputs).argmax(-1)
    return accuracy(pred, labels), macro_f1(pred, labels, int(outputs[0][0].shape[1]))


# -- the leaderboard ---------------------------------------------------------------------------
def _stat(values: Sequence[float]) -> dict[str, float]:
    s = t_interval(values)
    return {"n": s.n, "mean": s.mean, "std": s.std, "ci_lo": s.lo, "ci_hi": s.hi}


def _selection_dirs(plan: Plan, cell: Cell) -> list[str]:
    if cell.na or cell.blocked or (cell.teachers and not cell.bound):
        return []
    return [job_of(plan.out, cell.config(c, seed)).run_dir for c in cell.candidates
            for seed in plan.study.selection_seeds]


def _cell_row(plan: Plan, cell: Cell, choice: Choice | None) -> dict[str, Any]:
    row: dict[str, Any] = {"label": cell.label, "method": cell.method, "modality": cell.modality,
                           "budget": {"drawn": len(cell.candidates), "space": cell.space}, "status": "ok"}
    if cell.teachers:
        row["teachers"] = dict(cell.teachers)
    if cell.na:
        return {**row, "status": "n/a", "reason": cell.na}
    if cell.blocked:
        return {**row, "status": "unfinished" if "unfinished" in cell.blocked or "not chosen" in cell.blocked
                else "n/a", "reason": cell.blocked, **_cost([])}
    row["selection"] = [{"config": s["candidate"], "val": s["score"], "status": s["status"]} for s in choice.scores]
    sel_dirs = _selection_dirs(plan, cell)
    if choice.chosen is None:
        return {**row, "status": "diverged" if "diverged" in choice.note else "unfinished", "reason": choice.note,
                **_cost(sel_dirs)}
    row["chosen"] = choice.chosen
    seeds, accs, f1s, mono, steps, dirs = [], [], [], {}, [], []
    missing, diverged = [], []
    for seed in plan.study.report_seeds:
        run_dir = job_of(plan.out, cell.config(choice.chosen, seed)).run_dir
        summary = read_summary(run_dir)
        if not summary or summary.get("status") != "complete":
            missing.append(seed)
            if run_status(run_dir) == "diverged":
                diverged.append(seed)
            continue
        seeds.append(seed)
        dirs.append(run_dir)
        accs.append(float(summary["test"]["acc"]))
        f1s.append(float(summary["test"].get("macro_f1", math.nan)))
        for m in summary["modalities"]:
            if f"mono_acc/{m}" in summary["test"]:
                mono.setdefault(m, []).append(float(summary["test"][f"mono_acc/{m}"]))
        steps.append(step_seconds(run_dir, summary))
    if diverged and len(diverged) == len(missing):  # final: shown, but not compared on fewer seeds
        row["status"] = "diverged"
        row["reason"] = f"diverged on report seed{'s' if len(diverged) > 1 else ''} {', '.join(map(str, diverged))}"
    elif missing:
        row["status"] = "unfinished"
        row["reason"] = f"report runs missing or not complete for seeds {missing}"
        blocked = [s for s in missing if not teachers_complete(cell, s)]
        if blocked:
            row["reason"] += f" (its teachers' report runs are not complete on seeds {blocked})"
    row.update({"seeds": seeds, "run_dirs": dirs, "test_acc": accs, "macro_f1": f1s, "mono_acc": mono,
                "step_s": steps, "acc": _stat(accs), "f1": _stat(f1s),
                "mono": {m: _stat(v) for m, v in mono.items()}, **_cost(sel_dirs + dirs)})
    return row


def _cost(run_dirs: Sequence[str]) -> dict[str, Any]:
    summaries = [read_summary(d) for d in run_dirs]
    return {"runs": sum(s is not None for s in summaries),
            "train_s": sum(float(s.get("elapsed_s") or 0.0) for s in summaries if s)}


def leaderboard(plan: Plan, choices: Mapping[tuple[str, str, str], Choice]) -> dict[str, Any]:
    """Everything the outputs show, as plain data (what ``leaderboard.json`` holds)."""
    study = plan.study
    groups, cache = [], {}
    for task in [t.name for t in study.tasks if t.name not in plan.task_na]:
        for fusion in dict.fromkeys(c.fusion for c in plan.cells if c.task == task):
            cells = [c for c in plan.cells if (c.task, c.fusion) == (task, fusion)]
            rows = [_cell_row(plan, c, choices.get((c.task, c.fusion, c.label))) for c in cells]
            _add_teacher_cost(rows)
            ok = [r for r in rows if r["status"] == "ok"]
            ref_label = study.reference or next((r["label"] for r in rows if r["method"] == REFERENCE), None)
            ref = next((r for r in ok if r["label"] == ref_label), None)
            ensemble = _ensemble(ok, study.report_seeds, cache) if study.ensemble else None
            compared = [r for r in ok if r is not ref and r["method"] != UNIMODAL]
            if ref is not None:
                ref_by_seed = dict(zip(ref["seeds"], ref["test_acc"]))
                if ensemble:  # gap closed is a fraction of a gap that must exist: paired interval above 0
                    gaps = [a - ref_by_seed[s] for s, a in zip(ensemble["seeds"], ensemble["test_acc"])
                            if s in ref_by_seed]
                    ensemble["diff"] = _stat(gaps)
                    ensemble["above_ref"] = len(gaps) > 1 and ensemble["diff"]["ci_lo"] > 0
                ref_step = _mean(ref["step_s"])
                for r in ok:
                    r["step_ratio"] = _mean(r["step_s"]) / ref_step if ref_step and ref_step > 0 else math.nan
                for r in compared:
                    pairs = [(a, ref_by_seed[s]) for s, a in zip(r["seeds"], r["test_acc"]) if s in ref_by_seed]
                    diffs = [a - b for a, b in pairs]
                    r["diff"] = {**_stat(diffs), "p": paired_t([a for a, _ in pairs], [b for _, b in pairs])}
                    if ensemble and ensemble["above_ref"]:
                        r["gap_closed"] = gap_closed(r["acc"]["mean"], ref["acc"]["mean"], ensemble["acc"]["mean"])
                adjusted = holm([r["diff"]["p"] for r in compared])
                for r, p in zip(compared, adjusted):
                    r["diff"]["p_holm"] = p
            groups.append({"task": task, "fusion": fusion, "modalities": plan.modalities.get(task, []),
                           "reference": ref_label if ref is not None else None, "rows": rows, "ensemble": ensemble})
    total = _cost([d for c in plan.cells for d in _selection_dirs(plan, c)]
                  + [d for g in groups for r in g["rows"] for d in r.get("run_dirs", [])])
    return {"study": study.name, "source": study.source, "description": study.description,
            "protocol": {"selection_seeds": study.selection_seeds, "report_seeds": study.report_seeds,
                         "budget": plan.budget, "sampler_seed": study.sampler_seed, "select": f"val {study.select}",
                         "lrs": study.lrs, "tasks": {t.name: {"recipe": t.written, "overrides": t.overrides}
                                                     for t in study.tasks}},
            "tasks_na": plan.task_na, "groups": groups, "runs": total["runs"], "train_s": total["train_s"]}


def _add_teacher_cost(rows: Sequence[dict[str, Any]]) -> None:
    """A row with teachers also counts its teacher rows' runs and training time (their selection,
    which chose the teachers' configuration, and their report runs): ``teacher_runs``,
    ``teacher_train_s``, included in ``runs`` and ``train_s``."""
    by_label = {r["label"]: r for r in rows}
    for r in rows:
        if "teachers" not in r or "runs" not in r:
            continue
        mine = [by_label[label] for label in dict.fromkeys(r["teachers"].values()) if label in by_label]
        r["teacher_runs"] = sum(t.get("runs", 0) for t in mine)
        r["teacher_train_s"] = sum(t.get("train_s", 0.0) for t in mine)
        r["runs"] += r["teacher_runs"]
        r["train_s"] += r["teacher_train_s"]


def _mean(values: Sequence[float]) -> float:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def _ensemble(rows: Sequence[Mapping[str, Any]], seeds: Sequence[int], cache: dict[str, Any]) -> dict[str, Any] | None:
    members = [r for r in rows if r["method"] == UNIMODAL]
    if len(members) < 2:
        return None
    accs, f1s, used = [], [], []
    for seed in seeds:
        dirs = [dict(zip(r["seeds"], r["run_dirs"])).get(seed) for r in members]
        if any(d is None for d in dirs):
            continue
        acc, f1 = product_of_experts([probabilities_on_test(d, cache) for d in dirs])
        accs.append(acc)
        f1s.append(f1)
        used.append(seed)
    if not accs:
        return None
    return {"members": [r["label"] for r in members], "seeds": used, "test_acc": accs, "macro_f1": f1s,
            "acc": _stat(accs), "f1": _stat(f1s)}


# -- Markdown, CSV, JSON -----------------------------------------------------------------------
def _pct(x: Any, digits: int = 1) -> str:
    return "—" if not isinstance(x, (int, float)) or not math.isfinite(x) else f"{100 * x:.{digits}f}"


def _ci(s: Mapping[str, float]) -> str:
    return "—" if not math.isfinite(s.get("ci_lo", math.nan)) else f"[{_pct(s['ci_lo'])}, {_pct(s['ci_hi'])}]"


def _pm(s: Mapping[str, float]) -> str:
    if not s or not s.get("n"):
        return "—"
    return _pct(s["mean"]) + ("" if not math.isfinite(s["std"]) else f" ± {_pct(s['std'])}")


def _p(x: Any) -> str:
    return "—" if not isinstance(x, (int, float)) or not math.isfinite(x) else f"{x:.2g}"


def _num(x: Any, fmt: str) -> str:
    return "—" if not isinstance(x, (int, float)) or not math.isfinite(x) else format(x, fmt)


def config_text(config: Mapping[str, Any] | None) -> str:
    if not config:
        return "—"
    return ", ".join(f"{k.replace('optim.', '').replace('method.', '')}={v:g}" if isinstance(v, float)
                     else f"{k.replace('optim.', '').replace('method.', '')}={v}" for k, v in config.items())


def _esc(text: str) -> str:
    return str(text).replace("|", "\\|")


HEADER = ["method", "configuration (chosen)", "tried", "test acc", "95% CI", "Δ vs ref (pp)", "p (Holm)", "gap closed",
          "macro-F1"]


def group_table(group: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    mods = group["modalities"]
    header = HEADER + [f"mono {m}" for m in mods] + ["step time × ref", "runs", "train s"]
    rows = []
    for r in group["rows"]:
        label = r["label"] + (" (ref)" if r["label"] == group["reference"] else "")
        if r["status"] == "n/a" or not r.get("acc", {}).get("n"):
            rows.append([label, f"{r['status']}: {r.get('reason', '')}"] + ["—"] * (len(header) - 2))
            continue
        d = r.get("diff", {})
        diff = "—" if not d else (f"{100 * d['mean']:+.1f} {_ci(d)}" if d.get("n") else "—")
        chosen = config_text(r.get("chosen")) if r.get("chosen") else ""
        if "teachers" in r:
            chosen += ("; " if chosen else "") + "teachers: " + ", ".join(dict.fromkeys(r["teachers"].values()))
        runs, train_s = str(r["runs"]), f"{r['train_s']:.1f}"
        if "teacher_runs" in r:
            runs += f" ({r['teacher_runs']} teachers')"
            train_s += f" ({r['teacher_train_s']:.1f} teachers')"
        rows.append([label + ("" if r["status"] == "ok" else f" ({r.get('reason') or r['status']})"), chosen or "—",
                     f"{r['budget']['drawn']} of {r['budget']['space']}", _pm(r["acc"]), _ci(r["acc"]), diff,
                     _p(d.get("p_holm")), _num(r.get("gap_closed"), ".2f"), _pm(r["f1"])]
                    + [_pm(r["mono"].get(m, {})) for m in mods]
                    + [_num(r.get("step_ratio"), ".2f"), runs, train_s])
    e = group.get("ensemble")
    if e:
        d = e.get("diff", {})
        diff = f"{100 * d['mean']:+.1f} {_ci(d)}" if d.get("n") else "—"
        closed = "1 by definition" if e.get("above_ref") else "— (no gap)"
        rows.append([f"ensemble ({' × '.join(e['members'])})", "product of experts", "—", _pm(e["acc"]),
                     _ci(e["acc"]), diff, "—", closed, _pm(e["f1"])] + ["—"] * len(mods) + ["—", "—", "—"])
    return header, rows


def protocol_text(board: Mapping[str, Any]) -> str:
    """One paragraph saying how the numbers were obtained."""
    p = board["protocol"]
    return (f"Protocol: every method gets the same budget of {p['budget']} configurations (learning rates × "
            f"its own hyperparameters; larger grids drawn with sampler seed {p['sampler_seed']}), trained on "
            f"selection seeds {p['selection_seeds']} and chosen by mean {p['select']}; the chosen configuration "
            f"is re-trained on report seeds {p['report_seeds']} (never used for selection) and only those runs' "
            "test metrics are shown. Test metrics in %: mean ± sample std and the 95% t-interval of the mean. "
            "Δ vs ref: paired difference to the reference method seed by seed, with its 95% t-interval; "
            "p: paired t-test, Holm-corrected over the methods compared in the table. Gap closed = (method − "
            "ref) / (ensemble − ref), with the ensemble the product of experts of the uni-modal runs of the "
            "same seed, shown only where the ensemble is above the reference (paired 95% interval above 0). "
            "Step time × ref: wall time per training step (validation included) relative to the "
            "reference in the same study. Tried: the configurations the method was given in selection, of its "
            "grid's. Runs and train s: selection and report runs of the row."
            + (" A method with teachers (UMT, UME) is trained on the uni-modal rows' runs of the same seed at their "
               "chosen configuration; its runs and train s include those rows' runs (in parentheses), its step "
               "time is its own runs' (UME trains nothing: one epoch that evaluates its members)."
               if any("teachers" in r for g in board["groups"] for r in g["rows"]) else ""))


def _wall_time(board: Mapping[str, Any]) -> str:
    """The command's wall time, with how many runs it trained; nothing when it trained none (a
    ``--table-only`` call or a rerun of a finished study says nothing about the study's duration)."""
    trained, wall = board.get("trained_this_call", 0), board.get("wall_s_this_call", 0.0)
    if not trained:
        return ""
    which = "all of them" if trained >= board["runs"] else f"{trained} of them (the others were reused)"
    return f"; {wall / 60:.1f} min wall time for the command that wrote this page, which trained {which}"


def markdown(board: Mapping[str, Any]) -> str:
    """The text of ``leaderboard.md`` for a ``leaderboard(...)`` result."""
    lines = [f"# Leaderboard: {board['study']}", ""]
    if board["description"]:
        lines += [board["description"], ""]
    lines += [protocol_text(board), ""]
    for task, reason in board["tasks_na"].items():
        lines += [f"## {task}", "", f"n/a: {reason}", ""]
    for g in board["groups"]:
        header, rows = group_table(g)
        lines += [f"## {g['task']} / {g['fusion']}", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_esc(c) for c in row) + " |" for row in rows]
        lines.append("")
    lines.append(f"_{board['runs']} runs, {board['train_s'] / 60:.1f} min of training in total (summed over runs)"
                 + _wall_time(board) + f"; study `{board['source']}`._")
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["task", "fusion", "method", "status", "reason", "chosen", "budget", "space", "n", "acc_mean",
              "acc_std", "acc_ci_lo", "acc_ci_hi", "f1_mean", "diff_mean", "diff_ci_lo", "diff_ci_hi", "p", "p_holm",
              "gap_closed", "step_ratio", "runs", "train_s", "teachers", "teacher_runs", "teacher_train_s"]


def csv_text(board: Mapping[str, Any]) -> str:
    """The text of ``leaderboard.csv``: one row per task, fusion and method."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_FIELDS + ["mono"], lineterminator="\n")
    w.writeheader()
    for g in board["groups"]:
        for r in g["rows"]:
            acc, d = r.get("acc", {}), r.get("diff", {})
            w.writerow({"task": g["task"], "fusion": g["fusion"], "method": r["label"], "status": r["status"],
                        "reason": r.get("reason", ""), "chosen": config_text(r.get("chosen")),
                        "budget": r["budget"]["drawn"], "space": r["budget"]["space"], "n": acc.get("n", 0),
                        "acc_mean": acc.get("mean"), "acc_std": acc.get("std"), "acc_ci_lo": acc.get("ci_lo"),
                        "acc_ci_hi": acc.get("ci_hi"), "f1_mean": r.get("f1", {}).get("mean"),
                        "diff_mean": d.get("mean"), "diff_ci_lo": d.get("ci_lo"), "diff_ci_hi": d.get("ci_hi"),
                        "p": d.get("p"), "p_holm": d.get("p_holm"), "gap_closed": r.get("gap_closed"),
                        "step_ratio": r.get("step_ratio"), "runs": r.get("runs"), "train_s": r.get("train_s"),
                        "teachers": json.dumps(r["teachers"]) if "teachers" in r else "",
                        "teacher_runs": r.get("teacher_runs"), "teacher_train_s": r.get("teacher_train_s"),
                        "mono": json.dumps({m: s["mean"] for m, s in r.get("mono", {}).items()})})
        e = g.get("ensemble")
        if e:
            w.writerow({"task": g["task"], "fusion": g["fusion"], "method": "ensemble", "status": "ok",
                        "n": e["acc"]["n"], "acc_mean": e["acc"]["mean"], "acc_std": e["acc"]["std"],
                        "acc_ci_lo": e["acc"]["ci_lo"], "acc_ci_hi": e["acc"]["ci_hi"], "f1_mean": e["f1"]["mean"]})
    return buf.getvalue()


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write(board: Mapping[str, Any], out: str | Path, html: bool = True) -> dict[str, Path]:
    """``leaderboard.md``, ``.csv``, ``.json`` (and ``.html``) in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "leaderboard.md", "csv": out / "leaderboard.csv", "json": out / "leaderboard.json"}
    paths["markdown"].write_text(markdown(board), encoding="utf-8")
    paths["csv"].write_text(csv_text(board), encoding="utf-8")
    paths["json"].write_text(json.dumps(_json_safe(board), indent=1) + "\n", encoding="utf-8")
    if html:
        from .html import leaderboard_html

        paths["html"] = out / "leaderboard.html"
        paths["html"].write_text(leaderboard_html(board), encoding="utf-8")
    return paths
