"""The user documentation: the API reference is current, user pages and CLI help speak to users
(no issue numbers, no machine-specific paths), every relative link resolves, and the guide's
own-data example trains through the `modbal` command as written."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import modbal
from modbal.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = DOCS / "api"
OWN_DATA = DOCS / "guide" / "own-data.md"
FILE_BLOCK = re.compile(r"^File `([^`]+)`:\n\n```(?:python|yaml)\n(.*?)^```", re.M | re.S)

# what a user must never read: references to the project's issue tracker or to one machine's files
INTERNAL = {
    "an issue number": re.compile(r"\bissues?\s*#?\d+|(?<![\w&/#])#\d+\b", re.I),
    "a reference to 'the issue'": re.compile(r"\b(?:the|this) issue\b", re.I),
    "'this machine'": re.compile(r"\bthis (?:project's )?machine\b", re.I),
    "a path outside the repository": re.compile(r"\.\./shared|(?<![\w.~-])/(?:work|tmp|home|root|mnt)/"),
}


def user_pages() -> list[Path]:
    """README, the guide, the API reference and the top-level pages of docs/ (research notes,
    under docs/research/, are not user pages)."""
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md")), *sorted((DOCS / "guide").rglob("*.md")),
             *sorted(API.glob("*.md"))]
    return [p for p in pages if p.is_file()]


def all_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def internal_references(text: str) -> list[str]:
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for what, pattern in INTERNAL.items():
            if pattern.search(line):
                found.append(f"line {number}: {what}: {line.strip()}")
    return found


def test_the_checks_catch_what_they_are_for():
    bad = ["see issue 12", "fixed in #12", "as the issue asks", "measured on this machine",
           "data in ../shared/data", "written to /tmp/x", "under /work/main", "see Issue #3"]
    good = ["bfloat16 has no such issue", "a list of issues", "[x](#differences)", "x86#", "C# code",
            "runs/demo/results.md", "~/.cache/modbal", "docs/research/results/"]
    assert all(internal_references(b) for b in bad), [b for b in bad if not internal_references(b)]
    assert not any(internal_references(g) for g in good), [g for g in good if internal_references(g)]


@pytest.mark.parametrize("page", user_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_user_page_has_no_internal_references(page):
    found = internal_references(page.read_text())
    assert not found, f"{page.relative_to(ROOT)}:\n" + "\n".join(found)


def _subparsers(parser: argparse.ArgumentParser, prefix: str = "modbal"):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, f"{prefix} {name}")


def test_cli_help_has_no_internal_references():
    commands = dict(_subparsers(build_parser()))
    assert {"modbal", "modbal train", "modbal eval", "modbal demo"} <= set(commands)
    problems = []
    for name, parser in commands.items():
        problems += [f"{name} --help: {p}" for p in internal_references(parser.format_help())]
    assert not problems, "\n".join(problems)


# -- links ----------------------------------------------------------------------------------------
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page (code blocks skipped, repeats numbered)."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def broken_links(page: Path) -> list[str]:
    broken = []
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", page.read_text()))  # code is not a link
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, …
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.name}")
    return broken


def test_link_check_finds_a_broken_link(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n[ok](b.md#part) [missing](c.md) [anchor](b.md#nope) [self](#title)\n"
                                   "```\n[in code](nowhere.md)\n```\n")
    (tmp_path / "b.md").write_text("# B\n\n## Part\n")
    assert broken_links(tmp_path / "a.md") == ["c.md: no such file", "b.md#nope: no heading with that anchor in b.md"]


@pytest.mark.parametrize("page", all_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = broken_links(page)
    assert not broken, f"{page.relative_to(ROOT)}:\n" + "\n".join(broken)


# -- API reference --------------------------------------------------------------------------------
def test_api_reference_is_current(tmp_path):
    """docs/api/ is what tools/gen_api.py writes from the code now (run `make docs` after changing a
    public signature or docstring)."""
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_api.py"), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    fresh = {p.name: p.read_text() for p in tmp_path.glob("*.md")}
    committed = {p.name: p.read_text() for p in API.glob("*.md")}
    assert set(fresh) == set(committed), f"pages differ: {sorted(set(fresh) ^ set(committed))}; run `make docs`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"docs/api/ is out of date in {', '.join(stale)}: run `make docs`"


def test_every_public_name_is_in_the_api_reference():
    top = (API / "modbal.md").read_text()
    methods = (API / "methods.md").read_text()
    for name in modbal.__all__:
        assert f"### `{name}`" in top or f"[`{name}`](methods.md#{name.lower()})" in top, name
    for name in modbal.methods.__all__:
        assert f"### `{name}`" in methods, name
    for module in ("fusions", "encoders", "datasets", "train"):
        page = (API / f"{module}.md").read_text()
        for name in importlib.import_module(f"modbal.{module}").__all__:
            assert f"### `{name}`" in page, f"{module}.{name}"
    for name in ("RunLogger", "run_experiment", "adapt", "load_recipe", "run_study", "competition_strength"):
        assert any(f"### `{name}`" in p.read_text() for p in API.glob("*.md")), name


# -- the own-data example -------------------------------------------------------------------------
def _modbal(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it (python -m modbal.cli where there is none)."""
    script = Path(sys.executable).with_name("modbal")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "modbal.cli"]
    env = {k: v for k, v in os.environ.items() if k not in ("MODBAL_IMPORTS", "PYTHONPATH")}
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def own_data_project(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("own_data")
    files = FILE_BLOCK.findall(OWN_DATA.read_text())
    assert {rel for rel, _ in files} == {"my_npz.py", "make_data.py", "my_npz.yaml"}
    for rel, text in files:
        (folder / rel).write_text(text)
    done = subprocess.run([sys.executable, "make_data.py"], cwd=folder, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return folder


@pytest.mark.slow
def test_own_data_example_trains_through_the_command_line(own_data_project):
    done = _modbal("train", "my_npz.yaml", "--run-dir", "runs/mine", "--quiet", cwd=own_data_project)
    assert done.returncode == 0, done.stdout + done.stderr
    run = own_data_project / "runs" / "mine"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert (summary["dataset"], summary["method"], summary["modalities"]) == ("my_npz", "agm", ["audio", "image"])
    assert summary["test"]["acc"] > 0.5  # four classes: chance is 0.25
    evaluated = _modbal("eval", "runs/mine", "--json", cwd=own_data_project)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["acc"] == pytest.approx(summary["test"]["acc"])


def test_own_data_example_names_a_bad_file(own_data_project, tmp_path):
    import numpy as np

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "classes.txt").write_text((own_data_project / "mydata" / "classes.txt").read_text())
    for split in ("train", "test"):
        arrays = dict(np.load(own_data_project / "mydata" / f"{split}.npz"))
        if split == "test":
            del arrays["image"]
        np.savez(bad / f"{split}.npz", **arrays)
    done = _modbal("train", "my_npz.yaml", f"dataset.root={bad}", "--run-dir", "runs/bad", cwd=own_data_project)
    assert done.returncode == 2
    expected = f"modbal: error: dataset my_npz: {bad / 'test.npz'}: no array image (it holds audio, label)"
    assert done.stderr.strip() == expected
    assert not (own_data_project / "runs" / "bad").exists()


# -- the guide's code -----------------------------------------------------------------------------
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def tiny_loader(n: int, seed: int) -> list[tuple[dict, object]]:
    """Batches shaped like the guide's examples: audio (B, 40), image (B, 1, 16, 16), 4 classes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    audio = torch.randn(n, 40, generator=g) + y[:, None].float()
    image = torch.randn(n, 1, 16, 16, generator=g)
    return [({"audio": audio[i:i + 16], "image": image[i:i + 16]}, y[i:i + 16]) for i in range(0, n, 16)]


def test_own_loop_page_runs_and_writes_a_run_directory_the_report_reads(tmp_path, monkeypatch):
    from modbal.report import load_runs

    blocks = PYTHON_BLOCK.findall((DOCS / "guide" / "own-loop.md").read_text())
    monkeypatch.chdir(tmp_path)
    namespace = {"train_loader": tiny_loader(64, 0), "val_loader": tiny_loader(32, 1),
                 "test_loader": tiny_loader(32, 2), "epochs": 2, "print": lambda *a: None}
    exec(compile(blocks[0], "own-loop.md: the smallest loop", "exec"), namespace)
    assert {"kappa/audio", "kappa/image"} <= set(namespace["method"].statistics())
    exec(compile(blocks[1], "own-loop.md: every hook", "exec"), namespace)
    [run] = load_runs([tmp_path / "runs" / "own-loop"])
    summary = json.loads((tmp_path / "runs" / "own-loop" / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["method"] == "mslr" and summary["best_epoch"] in (0, 1)
    assert {"acc", "mono_acc/audio", "mono_acc/image"} <= set(summary["test"])
    assert len((tmp_path / "runs" / "own-loop" / "epochs.jsonl").read_text().splitlines()) == 2
    assert run.summary["dataset"] == "mydata"


def test_own_model_page_runs_with_every_kind_of_model():
    blocks = PYTHON_BLOCK.findall((DOCS / "guide" / "own-model.md").read_text())
    assert len(blocks) == 3
    namespace = {"train_loader": tiny_loader(48, 0)}
    exec(compile(blocks[0], "own-model.md: the protocol", "exec"), namespace)
    assert "kappa/audio" in namespace["method"].statistics()
    exec(compile(blocks[1], "own-model.md: adapt", "exec"), namespace)
    net, model = namespace["net"], namespace["model"]
    assert model.encoders["audio"] is net.audio_net and model.fusion is net.head  # a view, not a copy
    exec(compile(blocks[2], "own-model.md: heads", "exec"), namespace)
    model = namespace["model"]
    assert set(model.method_modules) and all(p.grad is not None for p in model.method_modules.parameters())


def test_methods_page_lists_every_built_in_method():
    page = (DOCS / "guide" / "methods.md").read_text()
    for name in modbal.METHODS.names():
        if modbal.METHODS.get(name).__module__.startswith("modbal."):
            assert f"| `{name}` |" in page, name


def test_install_page_lists_the_extras_of_pyproject():
    """The extras table of install.md names the packages each extra of pyproject.toml installs."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib comes with Python 3.11")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", (DOCS / "guide" / "install.md").read_text(), re.M))
    for extra, requirements in extras.items():
        if extra == "test":
            continue
        if extra == "all":
            wanted = sorted(re.search(r"\[(.*)\]", requirements[0]).group(1).split(","))
            assert sorted(p.strip(" `") for p in rows["all"].split(",")) == wanted, "all"
            continue
        wanted = sorted(re.split(r"[<>=!\[; ]", r, maxsplit=1)[0].lower() for r in requirements)
        assert extra in rows, f"install.md has no row for the extra {extra}"
        assert sorted(p.strip().lower() for p in rows[extra].split(",")) == wanted, extra
