"""Every registered method trains end to end through the CLI with every registered fusion."""
import json

import pytest

from modbal.cli import main
from modbal.registry import FUSIONS, METHODS

METHOD_ARGS = {"unimodal": ["method.modality=slow"]}
# they act on encoder parameters only
ENCODER_METHODS = {"mses", "mslr", "ogm_ge"} | {n for n in METHODS.names()
                                                if getattr(METHODS.get(n), "acts_on_encoders", False)}
FUSION_ARGS = {"early": ['model.encoders={"*": {name: identity}}']}
# they read earlier runs (uni-modal teachers): run end to end in their own tests
NEEDS_RUNS = {"umt", "ume"}


@pytest.mark.parametrize("fusion", FUSIONS.names())
@pytest.mark.parametrize("method", METHODS.names())
def test_method_trains_with_fusion_through_cli(tmp_path, capsys, method, fusion):
    if method in NEEDS_RUNS:
        pytest.skip(f"{method} needs the run directories of uni-modal runs (tests/test_method_{method}.py)")
    run_dir = tmp_path / "run"
    code = main(["train", "recipes/synthetic.yaml", f"method={method}", *METHOD_ARGS.get(method, []),
                 f"model.fusion.name={fusion}", *FUSION_ARGS.get(fusion, []),
                 "dataset.num_train=96", "dataset.num_val=32", "dataset.num_test=32", "dataset.bayes_samples=100",
                 "train.epochs=2", "train.batch_size=32", "--run-dir", str(run_dir), "--quiet"])
    if method in ENCODER_METHODS and fusion == "early":  # identity encoders: nothing to act on
        assert code == 2
        assert "have none (raw-input early fusion with identity encoders?)" in capsys.readouterr().err
        return
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["method"] == method and summary["fusion"] == fusion
    assert 0.0 <= summary["test"]["acc"] <= 1.0
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 6 and all(s["loss"] == s["loss"] for s in steps)  # 3 steps × 2 epochs, no NaN
