"""Write the API reference, ``docs/api/*.md``, from modbal's docstrings and signatures.

    python tools/gen_api.py              # rewrite docs/api/
    python tools/gen_api.py --out DIR    # write elsewhere (the test compares that with docs/api/)

Standard library only (``inspect``) plus modbal itself. Each page lists the public objects of some
modules: a module's ``__all__`` where it has one, otherwise the names chosen in ``PAGES``. Objects
come in a fixed order and signatures are printed as written in the source, so the output depends on
the code alone, not on the Python version or on what is registered at run time.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api"
WIDTH = 100

# page file → (title, introduction, [(module, names or None for the module's __all__)])
PAGES: dict[str, tuple[str, str, list[tuple[str, list[str] | None]]]] = {
    "modbal.md": (
        "`modbal`",
        "The top-level package: the model protocol, `adapt` for a model of one's own, the run logger "
        "and the registries of parts by name. Every method class is importable from here too "
        "(listed at the end, documented in [methods](methods.md)).",
        [("modbal", None)],
    ),
    "methods.md": (
        "`modbal.methods`: balancing methods",
        "Every method has the interface of `Method` (used like a `torch.optim` object in a training loop "
        "of one's own, see the guide's [own loop](../guide/own-loop.md)); each is registered by name in "
        "`modbal.METHODS`. What each computes and how it was checked: [methods](../methods.md), "
        "[baselines](../baselines.md), [AGM](../agm.md).",
        [("modbal.methods", None)],
    ),
    "fusions.md": (
        "`modbal.fusions`: fusion modules",
        "A fusion maps `{modality: feature}` to logits; each is registered by name in `modbal.FUSIONS` "
        "and built as `FUSIONS.create(name, feature_shapes=..., num_classes=..., **settings)`. "
        "Overview: [fusions](../fusions.md).",
        [("modbal.fusions", None)],
    ),
    "encoders.md": (
        "`modbal.encoders`: encoders",
        "An encoder maps one modality's input to a feature and exposes `out_shape`; each is registered "
        "by name in `modbal.ENCODERS` and built as `ENCODERS.create(name, input_shape=..., **settings)`.",
        [("modbal.encoders", None)],
    ),
    "datasets.md": (
        "`modbal.datasets`: datasets",
        "Loaders of the shipped datasets and the types a dataset of one's own returns. How to obtain "
        "each dataset: the guide's [datasets](../guide/datasets.md); a dataset of one's own: "
        "[own data](../guide/own-data.md).",
        [("modbal.datasets", None)],
    ),
    "train.md": (
        "`modbal.train`: the runner",
        "One training loop for every method, evaluation, checkpoints and run directories; `RunLogger` "
        "writes the same run directory from a loop of one's own.",
        [("modbal.train", None), ("modbal.train.logging", ["RunLogger"])],
    ),
    "config.md": (
        "`modbal.config`: recipes",
        "Recipes (YAML) resolved against the defaults and validated before any work starts.",
        [("modbal.config", ["ConfigError", "builtin_recipes", "load_recipe", "read_recipe", "resolve",
                            "validate", "dump", "diff"])],
    ),
    "metrics.md": (
        "`modbal.metrics` and `modbal.shapley`: measurement",
        "Classification metrics, the competition strength d_m, SHAPE contributions and exact Shapley "
        "values. How to read them: [competition](../competition.md).",
        [("modbal.metrics.classification", ["accuracy", "macro_f1", "confusion_matrix",
                                            "accuracy_from_confusion", "macro_f1_from_confusion"]),
         ("modbal.metrics.competition", ["RidgeFit", "ridge_fit", "ridge_predict", "competition_strength",
                                         "probe_competition", "extract_representations", "competition_scores",
                                         "competition_scores_per_set"]),
         ("modbal.metrics.shape", ["shape_scores", "coalition_accuracies", "model_shape_scores"]),
         ("modbal.shapley", ["num_coalitions", "full_coalition", "shapley_matrix", "shapley_values",
                             "mono_outputs"])],
    ),
    "report.md": (
        "`modbal.report`: reports, analyses and sweeps",
        "What `modbal report`, `modbal analyze` and `modbal sweep` do, from Python.",
        [("modbal.report", None),
         ("modbal.report.analyze", ["competition", "shape"]),
         ("modbal.report.sweep", ["SweepError", "parse_axes", "sweep"]),
         ("modbal.report.plots", ["training_curves"])],
    ),
    "bench.md": (
        "`modbal.bench`: fair comparisons",
        "What `modbal bench` does, from Python: a study file, its plan, the runs and the leaderboard. "
        "The protocol: [leaderboard](../leaderboard.md).",
        [("modbal.bench.study", ["Study", "StudyError", "builtin_studies", "load_study", "plan_study"]),
         ("modbal.bench.runner", ["run_study"]),
         ("modbal.bench.grid", ["make_executor", "LocalExecutor", "RayExecutor", "SubmititExecutor", "run_grid"]),
         ("modbal.bench.leaderboard", ["leaderboard", "markdown", "csv_text", "write"]),
         ("modbal.bench.stats", ["Summary", "t_interval", "paired_t", "holm", "gap_closed"])],
    ),
    "diagnose.md": (
        "`modbal.diagnose`: does a task suffer from modality competition?",
        "What `modbal diagnose` does, from Python: plan the short joint and uni-modal runs, measure "
        "each modality alone and inside the joint model, and judge what the intervals allow. "
        "Usage: the guide's [diagnose](../guide/diagnose.md).",
        [("modbal.diagnose", ["plan_diagnosis", "measure", "judge", "modality_verdict", "ensemble_verdict",
                              "overall_verdict", "write"])],
    ),
}

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc):`~?([^`]+)`")


SECTION = re.compile(r"^(Args|Arguments|Parameters|Returns|Yields|Raises|Attributes|Note|Notes|Example|Examples"
                     r"|Warning|Warns):$")
LISTED = {"Args", "Arguments", "Parameters", "Raises", "Attributes", "Warns"}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _sections(lines: list[str]) -> list[str]:
    """Google-style sections (``Args:`` and an indented block) as a bold title and a list."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = SECTION.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        title, i = match.group(1), i + 1
        block = []
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > 0):
            block.append(lines[i])
            i += 1
        while block and not block[-1].strip():
            block.pop()
        base = min((_indent(b) for b in block if b.strip()), default=0)
        out += [f"**{title}:**", ""]
        if title in LISTED:
            for b in block:
                if b.strip() and _indent(b) == base:
                    name, _, rest = b.strip().partition(": ")
                    name, _, kind = name.partition(" (")
                    kind = f" ({kind}" if kind else ""
                    out.append(f"- `{name}`{kind}: {rest}" if rest else f"- {b.strip()}")
                elif b.strip():
                    out[-1] += " " + b.strip()
        else:
            out += [b[base:] for b in block]
        out.append("")
    return out


def _doctests(lines: list[str]) -> list[str]:
    """Runs of ``>>>`` lines as fenced Python code."""
    out: list[str] = []
    in_code = False
    for line in lines:
        is_code = line.startswith((">>> ", "... ")) or line in (">>>", "...")
        if is_code and not in_code:
            if out and out[-1].strip():
                out.append("")
            out.append("```python")
        elif in_code and not is_code:
            out.append("```")
        in_code = is_code
        out.append(line)
    if in_code:
        out.append("```")
    return out


def markdown_doc(text: str | None) -> str:
    """A docstring as Markdown: Google-style sections as lists, doctests fenced, reST roles and
    ``literals`` as `code`, a closing ``::`` as ``:``."""
    if not text:
        return ""
    text = inspect.cleandoc(text)
    text = ROLE.sub(r"`\1`", text)
    text = re.sub(r"``(.+?)``", r"`\1`", text, flags=re.S)
    text = re.sub(r"::$", ":", text, flags=re.M)
    lines = _doctests(_sections(text.split("\n")))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def first_paragraph(text: str) -> str:
    return text.split("\n\n", 1)[0].strip()


def _annotation(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type):
        return annotation.__qualname__
    return inspect.formatannotation(annotation)


def _default(value: Any) -> str:
    if inspect.isroutine(value) or inspect.isclass(value):  # print, not <built-in function print>
        return value.__qualname__
    text = repr(value)
    if re.search(r" at 0x[0-9a-f]+", text):
        raise ValueError(f"a default value without a stable text: {text}")
    return text


def signature_text(name: str, obj: Any, prefix: str = "") -> str:
    """``prefix name(params) -> ret``, as written in the source; one parameter a line when long."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return f"{prefix}{name}(...)"
    parts: list[str] = []
    star_done = False
    params = list(sig.parameters.values())
    for i, p in enumerate(params):
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        if p.kind is p.VAR_POSITIONAL:
            star_done = True
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.annotation is not p.empty:
            text += f": {_annotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {_default(p.default)}" if p.annotation is not p.empty else f"={_default(p.default)}"
        parts.append(text)
        if p.kind is p.POSITIONAL_ONLY and (i + 1 == len(params) or params[i + 1].kind is not p.POSITIONAL_ONLY):
            parts.append("/")
    ret = "" if sig.return_annotation is sig.empty else f" -> {_annotation(sig.return_annotation)}"
    one_line = f"{prefix}{name}({', '.join(parts)}){ret}"
    if len(one_line) <= WIDTH:
        return one_line
    return f"{prefix}{name}(\n" + "".join(f"    {p},\n" for p in parts) + f"){ret}"


def _bases(cls: type) -> str:
    names = [f"`{b.__name__}`" for b in cls.__bases__ if b is not object and not b.__name__.startswith("Generic")]
    return ", ".join(names)


def _members(cls: type) -> list[tuple[str, Any]]:
    """Public methods and properties defined in the class itself (not inherited), in source order."""
    out = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, property):
            out.append((name, value))
    return out


def _registry_text(name: str, registry: Any) -> list[str]:
    builtin = [n for n in registry.names() if getattr(registry.get(n), "__module__", "").startswith("modbal.")]
    return [f"### `{name}`", "", f"The registry of {registry.kind}s (`Registry(\"{registry.kind}\")`): "
            f"`{name}.create(name, **settings)`, `{name}.names()`, `@{name}.register(name)` for a part of "
            "one's own. Built in: " + ", ".join(f"`{n}`" for n in builtin) + ".", ""]


def object_text(name: str, obj: Any) -> list[str]:
    """The Markdown of one public object: heading, signature, docstring, members."""
    from modbal.registry import Registry

    if isinstance(obj, Registry):
        return _registry_text(name, obj)
    lines = [f"### `{name}`", ""]
    if inspect.isclass(obj):
        if issubclass(obj, BaseException) and "__init__" not in vars(obj):
            sig = f"class {name}"
        else:
            sig = signature_text(name, obj, prefix="class ").removesuffix(" -> None")
        lines += ["```python", sig, "```", ""]
        if _bases(obj):
            lines += [f"Bases: {_bases(obj)}.", ""]
        doc = obj.__doc__ or ""
        if doc.startswith(f"{obj.__name__}("):  # the signature a dataclass without a docstring gets
            doc = ""
        doc = markdown_doc(doc)
        if doc:
            lines += [doc, ""]
        members = _members(obj)
        if members:
            lines += ["Members:", ""]
            for mname, member in members:
                if isinstance(member, property):
                    head = f"- `{mname}` (property)"
                else:
                    text = signature_text(mname, member).replace("self, ", "", 1).replace("(self)", "()", 1)
                    text = re.sub(r"\(\n    self,\n", "(\n", text)
                    head = f"- `{' '.join(text.split())}`".replace("( ", "(").replace(", )", ")")
                summary = first_paragraph(markdown_doc(member.__doc__))
                lines.append(f"{head}: {' '.join(summary.split())}" if summary else head)
            lines.append("")
    elif callable(obj):
        lines += ["```python", signature_text(name, obj, prefix="def " if inspect.isfunction(obj) else ""), "```", ""]
        doc = markdown_doc(obj.__doc__)
        if doc:
            lines += [doc, ""]
    else:
        raise TypeError(f"{name}: cannot document a {type(obj).__name__}")
    return lines


def module_names(module: Any, names: list[str] | None) -> list[str]:
    if names is not None:
        missing = [n for n in names if not hasattr(module, n)]
        if missing:
            raise AttributeError(f"{module.__name__} has no {', '.join(missing)}")
        return names
    return sorted(module.__all__, key=str.lower)


def page_text(title: str, intro: str, modules: list[tuple[str, list[str] | None]]) -> str:
    lines = [f"# {title}", "", "_Generated from the docstrings by `tools/gen_api.py` (`make docs`); "
             "do not edit by hand._", "", intro, ""]
    for module_name, names in modules:
        module = importlib.import_module(module_name)
        chosen = module_names(module, names)
        if module_name == "modbal":
            methods = importlib.import_module("modbal.methods")
            lines += [f"## `{module_name}`", ""]
            for name in [n for n in chosen if n not in methods.__all__]:
                lines += object_text(name, getattr(module, name))
            lines += ["## Methods", "", "Importable from `modbal`; documented in [methods](methods.md).", "",
                      "| name | registered as | summary |", "|---|---|---|"]
            for name in [n for n in chosen if n in methods.__all__]:
                cls = getattr(module, name)
                summary = " ".join(first_paragraph(markdown_doc(cls.__doc__)).split()).replace("|", "\\|")
                registered = f"`{cls.name}`" if isinstance(getattr(cls, "name", None), str) and cls.name else "–"
                lines.append(f"| [`{name}`](methods.md#{name.lower()}) | {registered} | {summary} |")
            lines.append("")
            continue
        lines += [f"## `{module_name}`", ""]
        doc = first_paragraph(markdown_doc(module.__doc__))
        if doc and len(modules) > 1:
            lines += [doc, ""]
        for name in chosen:
            lines += object_text(name, getattr(module, name))
    return "\n".join(lines).rstrip("\n") + "\n"


def index_text() -> str:
    lines = ["# API reference", "", "_Generated from the docstrings by `tools/gen_api.py` (`make docs`); "
             "do not edit by hand._", "", "The user guide is [here](../guide/index.md).", ""]
    for page, (title, intro, _) in PAGES.items():
        lines.append(f"- [{title}]({page}): {first_paragraph(intro).split('. ')[0].rstrip('.')}.")
    return "\n".join(lines) + "\n"


def generate() -> dict[str, str]:
    """Every page of the reference: file name → Markdown."""
    pages = {page: page_text(*spec) for page, spec in PAGES.items()}
    pages["index.md"] = index_text()
    return pages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder to write (default: docs/api)")
    args = parser.parse_args(argv)
    pages = generate()
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.md"):
        if old.name not in pages:
            old.unlink()
    for name, text in pages.items():
        (args.out / name).write_text(text)
    print(f"wrote {len(pages)} pages to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
