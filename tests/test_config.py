"""Recipes: defaults, overrides, method switching, and validation errors naming key and values."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from modbal.config import ConfigError, builtin_recipes, diff, load_recipe, parse_override, resolve
from modbal.registry import DATASETS, ENCODERS, FUSIONS, METHODS

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def write(tmp_path, data):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_overrides_typed_by_yaml():
    cfg = load_recipe(None, ["optim.lr=1e-3", "train.epochs=3", "train.amp=bf16", "optim.betas=[0.8, 0.9]",
                             "run_dir=null", "train.deterministic=true"])
    assert cfg["optim"]["lr"] == 1e-3 and cfg["train"]["epochs"] == 3 and cfg["train"]["amp"] == "bf16"
    assert cfg["optim"]["betas"] == [0.8, 0.9] and cfg["train"]["deterministic"] is True
    assert cfg["method"] == {"name": "joint"} and cfg["train"]["batch_size"] == 64
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")


def test_method_switch_takes_per_method_settings(tmp_path):
    path = write(tmp_path, {"method": {"name": "agm", "alpha": 3.0, "cap": 7.0},
                            "methods": {"agm": {"alpha": 2.5, "reference": "ema"}}})
    assert load_recipe(path)["method"] == {"name": "agm", "alpha": 3.0, "reference": "ema", "cap": 7.0}
    assert load_recipe(path, ["method=joint"])["method"] == {"name": "joint"}
    assert load_recipe(path, ["method=agm"])["method"] == {"name": "agm", "alpha": 2.5, "reference": "ema"}
    assert load_recipe(path, ["method=agm", "method.alpha=1.5"])["method"]["alpha"] == 1.5
    assert load_recipe(path, ["method.alpha=1.5"])["method"]["alpha"] == 1.5
    # a resolved config resolves to itself
    cfg = load_recipe(path, ["seed=4"])
    assert resolve(cfg) == cfg and diff(cfg, resolve(cfg)) == []


def test_bare_names_and_star_encoders(tmp_path):
    cfg = load_recipe(write(tmp_path, {"method": "agm", "dataset": "synthetic",
                                       "model": {"encoders": {"fast": "mlp", "slow": {"name": "mlp", "out_dim": 4}},
                                                 "fusion": "concat"}}))
    assert cfg["method"]["name"] == "agm" and cfg["dataset"] == {"name": "synthetic"}
    assert cfg["model"]["encoders"] == {"fast": {"name": "mlp"}, "slow": {"name": "mlp", "out_dim": 4}}


@pytest.mark.parametrize("overrides, message", [
    (["trian.epochs=3"], "unknown top-level key 'trian' (did you mean 'train'?)"),
    (["train.epoch=3"], "unknown key 'epoch' (did you mean 'epochs'?)"),
    (["train.epochs=abc"], "train.epochs must be an integer, got 'abc'"),
    (["train.epochs=0"], "train.epochs must be > 0"),
    (["train.deterministic=3"], "train.deterministic must be true or false"),
    (["optim.lr=-1"], "optim.lr must be >= 0"),
    (["optim.name=rmsprop"], "optim.name='rmsprop' is not allowed; allowed values: sgd, adam, adamw"),
    (["train.amp=fp8"], "allowed values: none, bf16, fp16"),
    (["train.device=tpu"], "train.device='tpu' is not allowed"),
    (["method=agx"], "method.name='agx' is not a registered method; allowed values: "),
    (["dataset.name=nope"], "dataset.name='nope' is not a registered dataset"),
    (["model.fusion=nope"], "model.fusion.name='nope' is not a registered fusion"),
    (["model.encoders.*.name=nope"], "model.encoders.*.name='nope' is not a registered encoder"),
    (["method=agm", "method.alpah=1"], "unknown argument 'alpah' (did you mean 'alpha'?)"),
    (["method=agm", "method.alpha=abc"], "method.alpha must be float like its default"),
    (["method=agm", "method.alpha=-1"], "method agm: Invalid alpha: -1"),
    (["method.alpha=1"], "method: unknown argument 'alpha'"),
    (["dataset.num_trian=5"], "dataset: unknown argument 'num_trian'"),
    (["model.fusion.num_classes=3"], "model.fusion.num_classes is set by the runner"),
    (["methods.nope.x=1"], "methods.nope: not a registered method"),
    (["train"], "must look like key=value"),
    (["train.epochs=[1"], "is not valid YAML"),
    (["seed.x=1"], "cannot set seed.x: seed is 0, not a mapping"),
    (["method=mslr", "method.form=lr", "optim.schedule=cosine", "optim.min_lr=0.001"],
     "method mslr with optim.schedule=cosine needs optim.min_lr=0 (got 0.001)"),
])
def test_bad_configs_name_key_and_allowed_values(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_recipe(None, overrides)
    assert message in str(err.value)


def test_a_cosine_floor_is_refused_only_for_methods_that_rescale_learning_rates():
    assert load_recipe(None, ["method=mslr", "optim.schedule=cosine", "optim.min_lr=0"])["method"]["name"] == "mslr"
    assert load_recipe(None, ["method=agm", "optim.schedule=cosine", "optim.min_lr=0.001"])["optim"]["min_lr"] == 0.001
    # MSLR's default gradient form leaves learning rates alone
    assert load_recipe(None, ["method=mslr", "optim.schedule=cosine", "optim.min_lr=0.001"])["optim"]["min_lr"] == 0.001


def test_bad_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_recipe(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match=r"r.yaml: unknown top-level key 'optimizer'"):
        load_recipe(write(tmp_path, {"optimizer": {"lr": 1}}))


def test_builtin_recipes_load_by_name(tmp_path, monkeypatch):
    assert {"synthetic", "synthetic_competition", "avdigits", "avmnist_late"} <= set(builtin_recipes())
    assert load_recipe("synthetic", ["method=agm"]) == load_recipe(
        Path(__file__).resolve().parents[1] / "recipes" / "synthetic.yaml", ["method=agm"])
    monkeypatch.chdir(tmp_path)  # the name resolves from anywhere, not only from the repository root
    assert load_recipe("avdigits")["dataset"] == {"name": "avdigits"}
    (tmp_path / "synthetic").write_text("seed: 7\n")  # an existing file wins over the built-in name
    assert load_recipe("synthetic")["seed"] == 7
    with pytest.raises(ConfigError, match=r"'synthetc' does not exist .*built-in: .*synthetic"):
        load_recipe("synthetc")
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe("somewhere/synthetic")  # a path with folders is never a built-in name


def _missing_parts(data):
    """Registry names a recipe uses that are not registered in this checkout."""
    missing = []
    dataset = data.get("dataset", {})
    dataset = dataset if isinstance(dataset, dict) else {"name": dataset}
    if dataset.get("name") not in DATASETS:
        missing.append(f"dataset {dataset.get('name')}")
    model = data.get("model", {})
    for m, spec in (model.get("encoders") or {}).items():
        name = spec if isinstance(spec, str) else spec.get("name")
        if name not in ENCODERS:
            missing.append(f"encoder {name}")
    fusion = model.get("fusion", {})
    name = fusion if isinstance(fusion, str) else fusion.get("name")
    if name is not None and name not in FUSIONS:
        missing.append(f"fusion {name}")
    for name in [(data.get("method") or {}).get("name")] + list(data.get("methods") or {}):
        if name is not None and name not in METHODS:
            missing.append(f"method {name}")
    return missing


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_validates(path):
    data = yaml.safe_load(path.read_text())
    missing = _missing_parts(data)
    if missing:
        pytest.skip(f"{path.name} names parts not registered yet: {', '.join(missing)}")
    cfg = load_recipe(path)
    for name in cfg["methods"]:
        assert load_recipe(path, [f"method={name}"])["method"]["name"] == name


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert "synthetic.yaml" in names
