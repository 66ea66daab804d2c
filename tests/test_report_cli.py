"""End to end through the real runner: sweep → analyze competition / shape → report (tiny synthetic task)."""
import json

import pytest
import torch
import yaml
from _tiny_study import one_thread, tiny_recipe  # noqa: F401  (one_thread: an autouse fixture)

from modbal.cli import main
from modbal.report.tables import find_run_dirs

RECIPE = tiny_recipe(epochs=1, extra="methods: {agm: {alpha: 1.0}}\n")


def test_sweep_analyze_report(tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE)
    grid = tmp_path / "grid"
    assert main(["sweep", str(recipe), "method=joint,agm", "train.epochs=2", "--out", str(grid), "--no-report"]) == 0
    runs = sorted(p.name for p in grid.iterdir())
    assert runs == ["method-agm", "method-joint"]
    agm = grid / "method-agm"
    assert json.loads((agm / "summary.json").read_text())["status"] == "complete"
    assert json.loads((agm / "summary.json").read_text())["epochs"] == 2

    # a second sweep skips what is complete
    capsys.readouterr()
    assert main(["sweep", str(recipe), "method=joint,agm", "train.epochs=2", "--out", str(grid), "--no-report"]) == 0
    assert "2 complete, 0 to resume, 0 new" in capsys.readouterr().out

    assert main(["analyze", "competition", str(agm), "--alpha", "1"]) == 0
    comp = json.loads((agm / "competition.json").read_text())
    assert set(comp["scores"]) == {"fast", "slow"}
    assert all(0.0 <= d < 2.0 for d in comp["scores"].values())
    # the default concept seed is not the run's (0): a shared start would bias d_m down
    assert comp["concept_seeds"] == [1000] and comp["shared_init"] is False
    concept = agm / "concepts" / "fast-seed1000"
    assert (concept / "summary.json").exists()
    concept_cfg = yaml.safe_load((agm / "concepts" / "slow-seed1000" / "config.yaml").read_text())
    assert concept_cfg["method"] == {"name": "unimodal", "modality": "slow"} and concept_cfg["seed"] == 1000
    # cached concepts are reused: same numbers, no retraining
    mtime = (concept / "summary.json").stat().st_mtime_ns
    assert main(["analyze", "competition", str(agm), "--alpha", "1"]) == 0
    assert (concept / "summary.json").stat().st_mtime_ns == mtime
    assert json.loads((agm / "competition.json").read_text())["scores"] == comp["scores"]
    # several concept seeds: the cached one is reused, the others trained; scores are their mean
    assert main(["analyze", "competition", str(agm), "--alpha", "1", "--concept-seeds", "1000:1003"]) == 0
    multi = json.loads((agm / "competition.json").read_text())
    assert (multi["concept_seeds"] == [1000, 1001, 1002]
            and (agm / "concepts" / "slow-seed1002" / "summary.json").exists())
    assert (concept / "summary.json").stat().st_mtime_ns == mtime
    for m, values in multi["scores_by_concept_seed"].items():
        assert len(values) == 3 and values[0] == pytest.approx(comp["scores"][m])
        assert multi["scores"][m] == pytest.approx(sum(values) / 3)
        assert multi["scores_std"][m] == pytest.approx(float(torch.tensor(values).std()))
    assert "d_fast = " in capsys.readouterr().out
    assert main(["analyze", "competition", str(agm), "--concept-seeds", "1,1"]) == 2
    assert "concept seeds must differ" in capsys.readouterr().err
    # the run's own seed is refused unless allowed explicitly
    assert main(["analyze", "competition", str(agm), "--concept-seeds", "0"]) == 2
    assert "concept seed 0 is the seed of run" in capsys.readouterr().err
    assert main(["analyze", "competition", str(agm), "--concept-seeds", "0", "--allow-shared-init"]) == 0
    assert json.loads((agm / "competition.json").read_text())["shared_init"] is True

    # a shared concept cache: the sweep's two runs (they differ only in method) share one concept per modality
    cache = grid / "cache"  # inside the sweep folder: its concepts must not be taken for runs
    assert main(["analyze", "competition", str(grid), "--alpha", "1", "--concept-cache", str(cache)]) == 0
    trained = sorted(p.relative_to(cache).parts[1] for p in cache.glob("*/*/summary.json"))
    assert trained == ["fast-seed1000", "slow-seed1000"]
    assert find_run_dirs([grid]) == [grid / "method-agm", grid / "method-joint"]
    used = [json.loads((grid / r / "competition.json").read_text())["concepts"] for r in ("method-agm", "method-joint")]
    assert used[0] == used[1] and str(cache) in used[0]["fast"][0]["run_dir"]
    # concepts from the run folder and from the cache are trained alike: the same d_m for the same seed
    assert json.loads((agm / "competition.json").read_text())["scores"] == pytest.approx(comp["scores"])
    assert main(["analyze", "competition", str(agm), "--concept-cache", str(cache), "--retrain"]) == 2
    assert "--retrain with a shared concept cache" in capsys.readouterr().err

    assert main(["analyze", "shape", str(grid)]) == 0
    shape = json.loads((agm / "shape.json").read_text())
    assert sum(shape["shapley"].values()) == pytest.approx(shape["full"] - shape["empty"])

    out = tmp_path / "report"
    assert main(["report", str(grid), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| synthetic | concat | agm | 1 |" in md and "Competition strength" in md and "SHAPE" in md
    assert (out / "report.html").read_text().count("data:image/png;base64,") >= 4


def test_user_errors_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["sweep", "defaults", "seed=3:1", "--out", str(tmp_path / "g")]) == 2
    assert main(["analyze", "shape", str(tmp_path)]) == 2


def test_concepts_carve_the_runs_validation_split(tmp_path, synthetic_without_val):
    """Without a dataset validation split the run carves one from train with its seed; the concept
    (another seed) must carve the same one, or it would train on the samples the probe is fit on."""
    from modbal.config import load_recipe
    from modbal.report.analyze import competition
    from modbal.train.run import build_data, run_experiment

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE)
    run_dir = tmp_path / "run"
    run_experiment(load_recipe(recipe, ["seed=3", "train.val_fraction=0.25"]), run_dir)
    result = competition(run_dir, alpha=1.0, echo=lambda _: None)
    concept_cfg = yaml.safe_load((run_dir / "concepts" / "fast-seed1003" / "config.yaml").read_text())
    assert concept_cfg["seed"] == 1003 and concept_cfg["train"]["val_seed"] == 3
    run_val = build_data(load_recipe(recipe, ["seed=3", "train.val_fraction=0.25"]))["val"].indices
    assert build_data(concept_cfg)["val"].indices == run_val
    assert build_data(load_recipe(recipe, ["seed=1003", "train.val_fraction=0.25"]))["val"].indices != run_val
    assert set(result["scores"]) == {"fast", "slow"}


def test_sweep_with_analyze_scores_every_run_and_reports_it(tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE)
    grid = tmp_path / "grid"
    assert main(["sweep", str(recipe), "method=joint,agm", "--out", str(grid), "--analyze"]) == 0
    for run in ("method-agm", "method-joint"):
        comp = json.loads((grid / run / "competition.json").read_text())
        assert comp["concept_seeds"] == [1000] and set(comp["scores"]) == {"fast", "slow"}
        assert (grid / run / "shape.json").exists()
    # the two runs (same seed, different method) share one concept per modality
    assert len(list((grid / "concept-cache").glob("*/*/summary.json"))) == 2
    md = (grid / "report" / "report.md").read_text()
    assert "Competition strength" in md and "Shapley contributions" in md and "unimodal" not in md
