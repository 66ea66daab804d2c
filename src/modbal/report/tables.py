"""Reading run directories and aggregating them into tables (mean ± std over seeds).

A run directory (see docs/design.md, "The runner's files") holds ``config.yaml``, ``summary.json``,
``epochs.jsonl``, ``steps.jsonl`` and, after ``modbal analyze``, ``competition.json`` and
``shape.json``. Runs are grouped by (dataset, fusion, method); every number in a table is a mean ±
sample standard deviation over the group's runs, with the number of runs beside it.
"""
from __future__ import annotations

import html
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from ..train.logging import read_jsonl

RUN_MARKERS = ("summary.json", "config.yaml")
# written into every concept model's folder (modbal.report.analyze): searches of a folder skip them
CONCEPT_MARKER = ".modbal-concept"
GroupKey = tuple[str, str, str]  # (dataset, fusion, method)


@dataclass
class RunRecord:
    """Everything a report needs from one run directory (missing files → empty values)."""

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    competition: dict[str, Any] | None = None
    shape: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        return self.summary.get("status") == "complete"

    @property
    def dataset(self) -> str:
        return str(self.summary.get("dataset") or _name(self.config.get("dataset")) or "?")

    @property
    def fusion(self) -> str:
        model = self.config.get("model") if isinstance(self.config.get("model"), Mapping) else {}
        return str(self.summary.get("fusion") or _name(model.get("fusion")) or "?")

    @property
    def method(self) -> str:
        return str(self.summary.get("method") or _name(self.config.get("method")) or "?")

    @property
    def seed(self) -> Any:
        return self.summary.get("seed", self.config.get("seed"))

    @property
    def modalities(self) -> list[str]:
        mods = self.summary.get("modalities")
        if mods:
            return list(mods)
        found: list[str] = []
        for row in self.epochs[:1]:
            found += [k.split("/", 2)[2] for k in row if k.startswith("val/mono_acc/")]
        return found

    @property
    def key(self) -> GroupKey:
        return (self.dataset, self.fusion, self.method)


def _name(spec: Any) -> str | None:
    if isinstance(spec, Mapping):
        return spec.get("name")
    return spec if isinstance(spec, str) else None




def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def is_run_dir(path: Path) -> bool:
    return any((path / marker).exists() for marker in RUN_MARKERS)


def load_run(path: str | Path, steps: bool = True) -> RunRecord:
    """Read one run directory; ``steps=False`` skips ``steps.jsonl`` (the largest file)."""
    path = Path(path)
    if not is_run_dir(path):
        raise FileNotFoundError(f"{path} is not a run directory (no summary.json or config.yaml)")
    config = {}
    if (path / "config.yaml").exists():
        with open(path / "config.yaml", encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
    return RunRecord(
        path=path, config=config, summary=_read_json(path / "summary.json") or {},
        epochs=read_jsonl(path / "epochs.jsonl"), steps=read_jsonl(path / "steps.jsonl") if steps else [],
        competition=_read_json(path / "competition.json"), shape=_read_json(path / "shape.json"),
    )


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories among ``paths``: each is a run directory or a folder searched recursively."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"no such run directory: {p}")
        if is_run_dir(p):
            found.append(p)
            continue
        hits = sorted({q.parent for marker in RUN_MARKERS for q in p.rglob(marker)})
        # concept models are runs of their own, in RUN/concepts/ or a shared cache: leave them out
        found += [h for h in hits if not (h / CONCEPT_MARKER).exists() and "concepts" not in h.relative_to(p).parts]
    return sorted(set(found), key=lambda q: str(q))


def load_runs(paths: Iterable[str | Path], steps: bool = True) -> list[RunRecord]:
    """Every run under ``paths`` (run directories or folders holding them; concept runs left out)."""
    return [load_run(p, steps=steps) for p in find_run_dirs(paths)]


# config keys that never split a group: the seeds are what a group averages over
NOT_GROUPED = ("seed", "run_dir", "methods")


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in config.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        elif f"{prefix}{k}" not in NOT_GROUPED:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True, default=str)
    return out


def group_runs(runs: Iterable[RunRecord]) -> dict[GroupKey, list[RunRecord]]:
    """Runs by (dataset, fusion, method), split further by every config setting that differs
    between runs of the same (dataset, fusion, method) — a learning-rate sweep gives one group per
    rate, named ``method (lr=0.01)``; only the seed is averaged over. Keys sorted."""
    base: dict[GroupKey, list[RunRecord]] = defaultdict(list)
    for run in runs:
        base[run.key].append(run)
    groups: dict[GroupKey, list[RunRecord]] = defaultdict(list)
    for (dataset, fusion, method), members in base.items():
        flats = [_flat(r.config) for r in members]
        known = [f for f in flats if f]  # a run without config.yaml splits nothing
        varying = sorted(k for k in set().union(*known) if len({f.get(k) for f in known}) > 1)
        short = {k: k.rsplit(".", 1)[-1] for k in varying}
        if len(set(short.values())) < len(short):
            short = {k: k for k in varying}
        for run, flat in zip(members, flats):
            label = ", ".join(f"{short[k]}={json.loads(flat[k])}" for k in varying if k in flat)
            groups[(dataset, fusion, f"{method} ({label})" if label else method)].append(run)
    return {k: groups[k] for k in sorted(groups)}


# -- statistics ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (0 for a single value) and count of finite values."""

    mean: float
    std: float
    n: int

    def format(self, scale: float = 1.0, digits: int = 2) -> str:
        if self.n == 0:
            return "—"
        if self.n == 1:
            return f"{self.mean * scale:.{digits}f}"
        return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f}"


def mean_std(values: Iterable[Any]) -> Stat:
    vals = [float(v) for v in values if v is not None and isinstance(v, (int, float)) and math.isfinite(float(v))]
    n = len(vals)
    if n == 0:
        return Stat(math.nan, math.nan, 0)
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return Stat(mean, std, n)


def group_modalities(runs: Sequence[RunRecord]) -> list[str]:
    seen: list[str] = []
    for run in runs:
        for m in run.modalities:
            if m not in seen:
                seen.append(m)
    return seen


def _competition_score(run: RunRecord, m: str) -> Any:
    return ((run.competition or {}).get("scores") or {}).get(m)


def _shapley(run: RunRecord, m: str) -> Any:
    return ((run.shape or {}).get("shapley") or {}).get(m)


def group_stats(runs: Sequence[RunRecord]) -> dict[str, Stat]:
    """Aggregated numbers of one group: test/val metrics, mono-modal test accuracy, d_m, φ_m."""
    done = [r for r in runs if r.complete] or list(runs)
    stats = {}
    for split in ("test", "val"):
        keys = sorted({k for r in done for k, v in (r.summary.get(split) or {}).items() if isinstance(v, (int, float))})
        for k in keys:
            stats[f"{split}/{k}"] = mean_std((r.summary.get(split) or {}).get(k) for r in done)
    for m in group_modalities(runs):
        stats[f"competition/{m}"] = mean_std(_competition_score(r, m) for r in runs)
        stats[f"shapley/{m}"] = mean_std(_shapley(r, m) for r in runs)
    stats["cooperation"] = mean_std((r.shape or {}).get("cooperation") for r in runs)
    stats["elapsed_s"] = mean_std(r.summary.get("elapsed_s") for r in done)
    return stats


# -- tables ----------------------------------------------------------------------------------
@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""

    def markdown(self) -> str:
        lines = [f"### {md_text(self.title)}", ""]
        if self.note:
            lines += [md_text(self.note), ""]
        lines.append("| " + " | ".join(md_text(h) for h in self.header) + " |")
        lines.append("|" + "|".join("---" for _ in self.header) + "|")
        lines += ["| " + " | ".join(md_text(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"


def md_text(text: Any) -> str:
    """Text from run directories (names, paths, labels) made inert in Markdown: HTML characters
    escaped (a renderer that passes HTML through shows ``<script>`` as text), table pipes escaped
    and line breaks flattened."""
    text = html.escape(str(text), quote=False).replace("|", "\\|")
    return " ".join(text.splitlines())


def _count(runs: Sequence[RunRecord]) -> str:
    done = sum(r.complete for r in runs)
    return f"{done}/{len(runs)}" if done != len(runs) else str(len(runs))


def accuracy_table(groups: Mapping[GroupKey, Sequence[RunRecord]]) -> Table:
    """Test accuracy, macro-F1 and per-modality mono-modal test accuracy per group (in %)."""
    mods = group_modalities([r for runs in groups.values() for r in runs])
    header = ["dataset", "fusion", "method", "runs", "test acc (%)", "test macro-F1 (%)", "val acc (%)"]
    header += [f"mono acc {m} (%)" for m in mods]
    rows = []
    for (dataset, fusion, method), runs in groups.items():
        st = group_stats(runs)
        none = Stat(math.nan, math.nan, 0)
        row = [dataset, fusion, method, _count(runs), st.get("test/acc", none).format(100),
               st.get("test/macro_f1", none).format(100), st.get("val/acc", none).format(100)]
        row += [st.get(f"test/mono_acc/{m}", none).format(100) for m in mods]
        rows.append(row)
    return Table("Accuracy", header, rows,
                 "Mean ± sample std over runs (seeds); runs = complete runs (complete/total when some "
                 "are unfinished). Test = the best-on-validation checkpoint.")


def _concept_seeds_cell(runs: Sequence[RunRecord]) -> str:
    """How many concept seeds the runs' d_m average over, and how many runs share a seed with their concept."""
    counts = sorted({len(r.competition.get("concept_seeds") or [None]) for r in runs})
    shared = sum(bool(r.competition.get("shared_init")) for r in runs)
    cell = "/".join(map(str, counts))
    return cell + (f" (shared init in {shared})" if shared else "")


def per_modality_table(groups: Mapping[GroupKey, Sequence[RunRecord]], kind: str) -> Table | None:
    """Competition strength d_m (``kind="competition"``) or Shapley contributions (``"shapley"``)."""
    source = (lambda r: r.competition) if kind == "competition" else (lambda r: r.shape)
    have = {k: [r for r in runs if source(r)] for k, runs in groups.items()}
    have = {k: runs for k, runs in have.items() if runs}
    if not have:
        return None
    mods = group_modalities([r for runs in have.values() for r in runs])
    header = ["dataset", "fusion", "method", "runs"]
    if kind == "competition":
        header += [f"d_{m}" for m in mods] + ["concept seeds per run"]
        title, note, scale = ("Competition strength", "d_m = whitened residual of a ridge probe from the "
                              "fused representation to modality m's uni-modal concept (averaged over the "
                              "concept seeds): 0 = concept kept, 1 = concept lost. A concept that shares its "
                              "run's seed shares its initial weights, which lowers d_m by itself.", 1.0)
    else:
        header += [f"φ_{m} (%)" for m in mods] + ["cooperation (%)"]
        title, note, scale = ("Shapley contributions (SHAPE)", "φ_m = Shapley value of test accuracy "
                              "over coalitions of muted inputs; cooperation = v(all) − v(∅) − "
                              "Σ_m (v({m}) − v(∅)).", 100.0)
    rows = []
    for (dataset, fusion, method), runs in have.items():
        st = group_stats(runs)
        row = [dataset, fusion, method, str(len(runs))]
        row += [st[f"{kind}/{m}"].format(scale, 3 if kind == "competition" else 2) for m in mods]
        if kind == "shapley":
            row.append(st["cooperation"].format(100))
        else:
            row.append(_concept_seeds_cell(runs))
        rows.append(row)
    return Table(title, header, rows, note)


def runs_table(runs: Sequence[RunRecord]) -> Table:
    """One row per run: where it is, its status and test accuracy."""
    rows = []
    for r in sorted(runs, key=lambda r: (r.key, str(r.seed), str(r.path))):
        acc = (r.summary.get("test") or {}).get("acc")
        rows.append([str(r.path), *r.key, str(r.seed), r.summary.get("status", "unfinished"),
                     "—" if acc is None else f"{100 * acc:.2f}", str(len(r.epochs))])
    return Table("Runs", ["run", "dataset", "fusion", "method", "seed", "status", "test acc (%)", "epochs"], rows)


def report_tables(runs: Sequence[RunRecord]) -> list[Table]:
    groups = group_runs(runs)
    tables = [accuracy_table(groups)]
    for kind in ("competition", "shapley"):
        t = per_modality_table(groups, kind)
        if t is not None:
            tables.append(t)
    tables.append(runs_table(runs))
    return tables


def markdown_report(runs: Sequence[RunRecord], title: str = "modbal report") -> str:
    """The text of ``report.md``: the report's tables for ``runs``, grouped and averaged over seeds."""
    parts = [f"# {md_text(title)}", "",
             f"{len(runs)} runs in {len(group_runs(runs))} groups (dataset, fusion, method, and any "
             "other setting that differs between their runs; seeds are averaged over).", ""]
    parts += [t.markdown() for t in report_tables(runs)]
    return "\n".join(parts)


# -- curves over training ----------------------------------------------------------------------
def epoch_curve(run: RunRecord, key: str, source: str) -> dict[int, float]:
    """``{epoch: value}``: from epochs.jsonl (``source="epochs"``) or the epoch mean of steps.jsonl."""
    if source == "epochs":
        return {int(row["epoch"]): float(row[key]) for row in run.epochs
                if "epoch" in row and isinstance(row.get(key), (int, float))}
    sums: dict[int, list[float]] = defaultdict(list)
    for row in run.steps:
        if "epoch" in row and isinstance(row.get(key), (int, float)) and math.isfinite(row[key]):
            sums[int(row["epoch"])].append(float(row[key]))
    return {e: sum(v) / len(v) for e, v in sorted(sums.items())}


def mean_curve(runs: Sequence[RunRecord], key: str, source: str) -> tuple[list[int], list[float], list[float]]:
    """Epochs, mean and std over the runs that logged ``key`` at each epoch."""
    curves = [epoch_curve(r, key, source) for r in runs]
    epochs = sorted({e for c in curves for e in c})
    xs, means, stds = [], [], []
    for e in epochs:
        st = mean_std(c[e] for c in curves if e in c)
        xs.append(e)
        means.append(st.mean)
        stds.append(st.std)
    return xs, means, stds
