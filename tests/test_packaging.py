"""The package as a user installs it: the wheel's metadata (core requirements, extras, license),
and the core alone in a fresh virtual environment running the README's Python example."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = {"torch", "numpy", "pyyaml", "tqdm"}
OPTIONAL = ("scipy", "matplotlib", "h5py", "PIL", "mlxtend", "espeakng_loader", "tensorboard", "wandb")


def run(*cmd: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    # a copy of the sources: a build inside the repository would reuse (and leave) its build/ folder
    source = tmp_path_factory.mktemp("source") / "modbal"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "runs", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", ".cache"))
    run(sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--quiet", "-w", dist)
    (found,) = dist.glob("modbal-*.whl")
    return found


def test_wheel_metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(info).decode()
        licenses = [n for n in names if ".dist-info/licenses/" in n]
        assert licenses and "MIT License" in z.read(licenses[0]).decode()
    assert "License-Expression: MIT" in metadata
    requires = re.findall(r"^Requires-Dist: (.+)$", metadata, re.M)
    core = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requires if "extra ==" not in r}
    assert core == CORE
    extras = set(re.findall(r"^Provides-Extra: (.+)$", metadata, re.M))
    assert {"data", "report", "tensorboard", "wandb", "all", "test"} <= extras
    for extra in ("data", "report", "tensorboard", "wandb"):
        assert extra in next(r for r in requires if r.startswith("modbal[") and 'extra == "all"' in r)
    assert any(n.startswith("modbal/recipes/") and n.endswith(".yaml") for n in names)


@pytest.mark.slow
def test_core_install_runs_the_readme_example(wheel, tmp_path):
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    # the core only: torch at the developers' pinned version (constraints.txt), no extras
    run(python, "-m", "pip", "install", "--quiet", "--no-compile", "-c", ROOT / "constraints.txt", wheel)
    installed = run(python, "-m", "pip", "list", "--format=freeze").lower()
    for package in ("scipy", "matplotlib", "h5py", "pillow", "mlxtend", "espeakng-loader", "tensorboard", "wandb"):
        assert f"\n{package}==" not in "\n" + installed, f"{package} came with the core install"
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(textwrap.dedent("""\
        import sys
        import torch
        g = torch.Generator().manual_seed(0)
        loader = [({"audio": torch.randn(16, 64, generator=g), "image": torch.randn(16, 784, generator=g)},
                   torch.randint(10, (16,), generator=g)) for _ in range(3)]
        """) + example + textwrap.dedent(f"""\
        stats = method.statistics()
        assert {{"kappa/audio", "kappa/image"}} <= set(stats), stats
        loaded = [m for m in {OPTIONAL!r} if m in sys.modules]
        assert not loaded, loaded
        from modbal.extras import MissingExtraError
        try:
            import modbal.report.plots
        except MissingExtraError as e:
            print("report:", e)
        print("example ok")
        """))
    out = run(python, script, cwd=tmp_path)  # outside the repository: the installed wheel, not src/
    assert "example ok" in out
    assert "pip install 'modbal[report]'" in out
    assert run(env / "bin" / "modbal", "--version", cwd=tmp_path).strip() == "modbal 0.1.0"


def test_developer_install_has_every_extra():
    """`make install` installs `.[all,test]`: every optional package is there, so no test of an
    optional part is skipped on a developer's machine or in CI."""
    from importlib import metadata

    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def expand(names: list[str]) -> set[str]:
        out = set()
        for requirement in names:
            name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
            if name == "modbal":
                out |= expand([r for e in re.search(r"\[(.*)\]", requirement).group(1).split(",")
                               for r in extras[e.strip()]])
            else:
                out.add(name)
        return out

    wanted = expand(extras["all"] + extras["test"])
    assert {"tensorboard", "wandb", "matplotlib", "scipy"} <= wanted
    missing = []
    for name in sorted(wanted):
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    assert not missing, f"not installed (run make install): {missing}"
