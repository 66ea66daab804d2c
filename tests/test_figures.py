"""Figures of ``modbal report`` and ``modbal demo``: one coefficient key ``coef/<m>`` for every
method, the uni-modal reference line, the test confusion matrix kept per run, SVG and PDF files."""
from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
import yaml
from matplotlib.lines import Line2D
from test_report import make_run

from modbal.cli import main
from modbal.config import load_recipe
from modbal.registry import METHODS
from modbal.report import load_runs
from modbal.report.plots import coefficient_curves, confusion_matrices, seed_dots, training_curves
from modbal.train import run_experiment

# methods whose coefficient is also logged under the paper's own name, and how to read it from there
ALIASES = {"agm": "kappa/{m}", "mslr": "factor/{m}", "pmr": "beta/{m}", "inforeg": "beta/{m}",
           "gblend": "weight/{m}"}
# the arguments a method needs here (short estimation runs; the uni-modal method's modality)
ARGS = {"gblend": {"epochs": 1}, "unimodal": {"modality": "a"}, "mses": {"patience": 1}}


def recipe(method: dict, epochs: int = 2) -> dict:
    return {
        "seed": 1,
        "dataset": {"name": "synthetic", "num_train": 96, "num_val": 48, "num_test": 40, "num_classes": 3,
                    "bayes_samples": 50, "modalities": {"a": {"dim": 3, "separation": 3.0, "label_noise": 0.2},
                                                        "b": {"dim": 5, "separation": 2.0}}},
        "model": {"encoders": {"*": {"name": "mlp", "hidden": [8], "out_dim": 6}}, "fusion": {"name": "concat"}},
        "method": method,
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "train": {"epochs": epochs, "batch_size": 32, "device": "cpu", "checkpoint_every": 0, "tensorboard": False},
    }


def _needs_runs(name: str) -> bool:
    params = inspect.signature(METHODS.get(name)).parameters
    return any(p.default is p.empty and n not in ARGS.get(name, {}) and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                                      p.KEYWORD_ONLY)
               for n, p in params.items())


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_with_a_coefficient_logs_it_as_coef(tmp_path, name):
    cls = METHODS.get(name)
    if _needs_runs(name):
        pytest.skip(f"{name} needs trained runs (teachers) to train; it declares coefficient={cls.coefficient}")
    run_experiment(load_recipe(_write(tmp_path, recipe({"name": name, **ARGS.get(name, {})}))), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    logged = {k for row in rows for k in row if k.startswith("coef/")}
    if cls.coefficient is None:
        assert not logged, f"{name} logs {sorted(logged)} but declares no coefficient"
        return
    assert cls.coefficient.meaning
    assert logged == {"coef/a", "coef/b"}
    for row in rows:  # every step, every modality, a number
        assert all(math.isfinite(row[f"coef/{m}"]) for m in "ab"), row
        if name in ALIASES:
            assert all(row[f"coef/{m}"] == row[ALIASES[name].format(m=m)] for m in "ab"), row
        if name == "mses":
            assert all(row[f"coef/{m}"] == 1.0 - row[f"stopped/{m}"] for m in "ab"), row


def _write(tmp_path, config: dict):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _curves_runs(root, unimodal: bool):
    """Hand-made runs: agm and joint × 2 seeds, and (``unimodal``) uni-modal runs of each modality."""
    for method in ("agm", "joint"):
        for seed in (0, 1):
            make_run(root, method=method, seed=seed, acc=0.7 + 0.05 * seed)
    if unimodal:
        for m, accs in (("audio", (0.61, 0.65)), ("image", (0.52, 0.50))):
            for seed, acc in enumerate(accs):
                run = make_run(root / m, method="unimodal", seed=seed, acc=acc)
                config = yaml.safe_load((run / "config.yaml").read_text())
                config["method"] = {"name": "unimodal", "modality": m}
                (run / "config.yaml").write_text(yaml.safe_dump(config))
                summary = json.loads((run / "summary.json").read_text())
                summary["test"]["acc"] = acc - 0.2  # the reference is the validation score, as the curves
                (run / "summary.json").write_text(json.dumps(summary))


def _references(fig) -> dict[str, float]:
    """label → y of the dashed horizontal lines of the figure."""
    out = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            if isinstance(line, Line2D) and line.get_linestyle() == "--" and "uni-modal" in line.get_label():
                ys = set(line.get_ydata())
                assert len(ys) == 1  # horizontal
                out.setdefault((ax.get_title(), line.get_label()), ys.pop())
    return out


def test_training_curves_draw_the_unimodal_reference_line(tmp_path):
    from modbal.report import group_runs

    _curves_runs(tmp_path / "with", unimodal=True)
    _curves_runs(tmp_path / "without", unimodal=False)
    groups = group_runs(load_runs([tmp_path / "with"]))
    fig = training_curves({label: runs for (_, _, label), runs in groups.items()})
    refs = _references(fig)
    # the mono-modal panels show their own modality's uni-modal runs (mean of the best val accuracy)
    acc_audio = [v for (title, label), v in refs.items() if title == "val accuracy: mono-modal audio"]
    assert acc_audio == [pytest.approx(0.63)]
    assert [label for (title, label) in refs if title == "val accuracy: mono-modal image"] == \
        ["uni-modal image runs (best val, n=2)"]
    # the fused panels show every modality's; uni-modal runs are not drawn as curves themselves
    assert sorted(label for (title, label) in refs if title == "val accuracy: fused") == \
        ["uni-modal audio runs (best val, n=2)", "uni-modal image runs (best val, n=2)"]
    assert all("unimodal" not in line.get_label() for ax in fig.axes for line in ax.get_lines())
    plain = load_runs([tmp_path / "without"])
    assert _references(training_curves({"agm": plain[:2], "joint": plain[2:]})) == {}


def test_seed_dots_show_every_seed_and_the_t_interval(tmp_path):
    from modbal.report import group_runs

    _curves_runs(tmp_path, unimodal=False)
    [(caption, fig)] = seed_dots(group_runs(load_runs([tmp_path])))
    ax = fig.axes[0]
    dots = sorted(x for c in ax.collections for x, _ in c.get_offsets())
    assert dots == pytest.approx([70.0, 70.0, 75.0, 75.0])
    # mean 72.5, s = 3.5355, t(0.975, 1) = 12.706: the interval runs 72.5 ± 31.76, cut at 100 %
    intervals = [line.get_xdata() for line in ax.get_lines() if line.get_label() == "95% t-interval of the mean"]
    assert intervals and intervals[0][0] == pytest.approx(72.5 - 12.7062 * 3.5355 / math.sqrt(2), abs=1e-2)
    assert ax.get_xlim()[1] <= 100.5 and ax.get_xlim()[0] > 0  # the data's range, not 0-based


def test_coefficient_curves_for_every_method_that_logs_coef(tmp_path):
    for method in ("ogm_ge", "mslr", "joint"):
        run = make_run(tmp_path, method=method)
        rows = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()[:-1]]
        if method != "joint":
            for row in rows:
                row.update({"coef/audio": 0.5 + 0.01 * row["step"], "coef/image": 1.0})
        (run / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {r.method: [r] for r in load_runs([tmp_path])}
    fig = coefficient_curves(runs)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert len(titles) == 2 and titles[0].startswith("mslr") and titles[1].startswith("ogm_ge")
    assert "multiplier" in titles[0]  # the method's own words for what its coefficient is
    audio = [line for line in fig.axes[1].get_lines() if line.get_label() == "audio"][0]
    assert list(audio.get_ydata()) == pytest.approx([0.5 + 0.01 * s for s in range(12)])


def test_confusion_matrix_is_saved_and_reported(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in (1, 2):
        config = recipe({"name": "joint"}, epochs=1)
        config["seed"] = seed
        assert main(["train", str(_write(tmp_path, config)), "--run-dir", str(runs / f"joint-{seed}"), "-q"]) == 0
    from modbal.report.analyze import load_trained, split_loader

    total = [[0] * 3 for _ in range(3)]
    for seed in (1, 2):
        run = runs / f"joint-{seed}"
        summary = json.loads((run / "summary.json").read_text())
        model, _, data = load_trained(run)
        expected = [[0] * 3 for _ in range(3)]
        with torch.no_grad():
            for inputs, targets in split_loader(data, "test", 7):
                for t, p in zip(targets.tolist(), model(inputs).argmax(-1).tolist()):
                    expected[t][p] += 1
        assert summary["test_confusion"] == expected
        assert sum(expected[i][i] for i in range(3)) / 40 == pytest.approx(summary["test"]["acc"])
        assert summary["class_names"] == [str(c) for c in data["class_names"]]
        total = [[a + b for a, b in zip(r, s)] for r, s in zip(total, expected)]
    from modbal.report import group_runs

    [(caption, fig)] = confusion_matrices(group_runs(load_runs([runs])))
    shown = fig.axes[0].images[0].get_array()
    for t in range(3):
        for p in range(3):
            assert shown[t][p] == pytest.approx(total[t][p] / sum(total[t]))  # summed, row-normalised
    assert main(["report", str(runs), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "test-confusion-matrices-synthetic.png)" in md


@pytest.mark.parametrize("fmt,magic", [("svg", (b"<?xml", b"<svg")), ("pdf", (b"%PDF",))])
def test_report_writes_svg_and_pdf(tmp_path, capsys, fmt, magic):
    _curves_runs(tmp_path / "runs", unimodal=True)
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "runs"), "--out", str(out), "--format", fmt]) == 0
    files = sorted((out / "figures").iterdir())
    # training curves, coefficients (agm's hand-made runs log kappa only: none), per-seed dots
    assert [f.name for f in files] == [f"01-training-curves-synthetic-concat.{fmt}",
                                       f"02-test-acc-per-seed-synthetic.{fmt}"]
    for f in files:
        assert f.read_bytes().startswith(magic), f
    page = (out / "report.html").read_text()
    embedded = "data:image/svg+xml;base64," if fmt == "svg" else "data:image/png;base64,"
    assert page.count(embedded) == len(files) and page.count("<img ") == len(files)
    # a second report in another format replaces the figures of the first
    assert main(["report", str(tmp_path / "runs"), "--out", str(out), "--format", "png"]) == 0
    assert sorted(f.suffix for f in (out / "figures").iterdir()) == [".png", ".png"]
    with pytest.raises(SystemExit) as error:
        main(["report", str(tmp_path / "runs"), "--out", str(out), "--format", "jpg"])
    assert error.value.code == 2 and "invalid choice: 'jpg'" in capsys.readouterr().err


def test_demo_draws_with_the_report_figures_and_writes_pdf(tmp_path):
    from modbal.config import ConfigError
    from modbal.demo import plot_demo, run_demo

    _curves_runs(tmp_path / "runs", unimodal=True)
    dirs = {}
    for run in load_runs([tmp_path / "runs"]):
        label = run.method + (f":{run.config['method']['modality']}" if run.method == "unimodal" else "")
        dirs.setdefault(label, []).append(run.path)
    out = tmp_path / "demo"
    assert plot_demo(dirs, out, "demo", fmt="pdf") == out / "demo.pdf"
    assert (out / "demo.pdf").read_bytes().startswith(b"%PDF")
    names = sorted(f.name for f in (out / "figures").iterdir())
    assert names == ["01-training-curves-synthetic-concat.pdf", "02-test-acc-per-seed-synthetic.pdf"]
    assert all((out / "figures" / n).read_bytes().startswith(b"%PDF") for n in names)
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 2
    with pytest.raises(ConfigError, match="unknown figure format 'jpg'"):
        run_demo("synthetic", out=tmp_path / "never", fmt="jpg")
    assert not (tmp_path / "never").exists()


def test_the_figures_guide_lists_every_method_with_a_coefficient():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "guide" / "figures.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in page.splitlines() if line.startswith("| `")}
    listed = {name.strip(" `") for cell in rows for name in cell.split(",")}
    with_coef = {n for n in METHODS.names() if getattr(METHODS.get(n), "coefficient", None) is not None}
    assert listed == with_coef
    for cell, line in rows.items():  # the neutral value in the table is the declared one
        neutral = METHODS.get(cell.split(",")[0].strip(" `")).coefficient.neutral
        assert line.split("|")[3].strip() == ("—" if neutral is None else f"{neutral:g}"), line


def test_unimodal_runs_of_another_fusion_are_references_not_a_figure_of_their_own(tmp_path):
    from modbal.report import group_runs
    from modbal.report.plots import report_figures

    _curves_runs(tmp_path, unimodal=True)
    for run in tmp_path.glob("*/*unimodal*"):  # the uni-modal runs trained with another fusion
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "fusion": "sum"}))
    figures = dict(report_figures(group_runs(load_runs([tmp_path]))))
    assert [c for c in figures if c.startswith("Training curves")] == ["Training curves — synthetic / concat"]
    refs = _references(figures["Training curves — synthetic / concat"])
    assert sorted({label for _, label in refs}) == ["uni-modal audio runs (best val, n=2)",
                                                     "uni-modal image runs (best val, n=2)"]
