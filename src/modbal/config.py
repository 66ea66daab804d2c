"""Recipes: defaults ← YAML recipe ← ``key=value`` overrides, validated before any work starts.

A resolved config is a plain dict (what ``config.yaml`` in a run directory holds)::

    imports: [mypkg.parts]              # plug-in modules, imported before the rest is validated
    seed: 0
    run_dir: null                       # default: runs/<dataset>/<fusion>/<method>-seed<seed>-<time>
    dataset: {name: synthetic, ...}     # DATASETS.create(name, **rest)
    model:
      encoders: {audio: {name: mlp, ...}, "*": {name: mlp}}   # "*": every other modality
      fusion: {name: concat, ...}
    method: {name: agm, alpha: 1.5}     # METHODS.create(name, **rest)
    methods: {agm: {alpha: 2.5}, ...}   # per-method settings, merged under `method` of that name
    optim: {...}                        # see OPTIM_DEFAULTS
    train: {...}                        # see TRAIN_DEFAULTS

Any part may be written as a bare name (``method: agm`` ≡ ``method: {name: agm}``). An override
``method=agm`` switches the method: the old method's keyword arguments are dropped and that
method's block from ``methods:`` is used, then later ``method.alpha=…`` overrides win.
Every error is a :class:`ConfigError` naming the key, the value and what is allowed.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .plugins import PluginError, merged_imports
from .registry import DATASETS, ENCODERS, FUSIONS, METHODS


class _Loader(yaml.SafeLoader):
    """YAML 1.1 safe loader that also reads ``1e-3`` (no dot) as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with ``1e-3`` read as a number."""
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A recipe or override a user can fix; the message names the key and allowed values."""


OPTIM_DEFAULTS: dict[str, Any] = {
    "name": "sgd",            # sgd | adam | adamw
    "lr": 0.01,               # base learning rate (a method's parameter group may set its own)
    "momentum": 0.9,          # sgd only
    "nesterov": False,        # sgd only
    "weight_decay": 0.0,
    "betas": [0.9, 0.999],    # adam / adamw only
    "eps": 1e-8,              # adam / adamw only
    "schedule": "none",       # none | step | cosine (stepped once per epoch)
    "step_size": 30,          # step: epochs between decays
    "gamma": 0.1,             # step: decay factor
    "min_lr": 0.0,            # cosine: final learning rate
}

TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 10,
    "batch_size": 64,             # global batch; each of W ranks gets batch_size // W
    "eval_batch_size": None,      # default: batch_size
    "device": "auto",             # auto | cpu | cuda | cuda:N
    "amp": "none",                # none | bf16 | fp16 (autocast; fp16 adds a gradient scaler)
    "deterministic": False,       # torch.use_deterministic_algorithms(True)
    "num_workers": 0,
    "checkpoint_every": 0,        # also checkpoint every N steps (0: at epoch ends only)
    "val_fraction": 0.1,          # carved (seeded) from train when the dataset has no val split
    "val_seed": None,             # seed of that carve-out (default: the run's seed)
    "select": "acc",              # validation metric choosing the best epoch: acc | macro_f1 | loss
    "drop_last": False,           # drop the last partial training batch
    "log_every": 1,               # write every N-th step to steps.jsonl
    "tensorboard": "auto",        # auto (if installed) | true | false
    "wandb": False,               # also log to Weights & Biases (extra [wandb]; WANDB_PROJECT, WANDB_MODE)
    "find_unused_parameters": False,  # DistributedDataParallel option
    "max_steps_per_epoch": None,  # cap on steps per epoch (quick checks)
    "dist_timeout_s": 1800.0,     # torchrun: seconds a process waits for the others before the run fails
}

DEFAULTS: dict[str, Any] = {
    "imports": [],  # plug-in modules imported before the rest is read (modbal.plugins)
    "seed": 0,
    "run_dir": None,
    "dataset": {"name": "synthetic"},
    "model": {"encoders": {"*": {"name": "mlp"}}, "fusion": {"name": "concat"}},
    "method": {"name": "joint"},
    "methods": {},
    "optim": OPTIM_DEFAULTS,
    "train": TRAIN_DEFAULTS,
}

TOP_KEYS = tuple(DEFAULTS)
CHOICES: dict[str, tuple[Any, ...]] = {
    "optim.name": ("sgd", "adam", "adamw"),
    "optim.schedule": ("none", "step", "cosine"),
    "train.amp": ("none", "bf16", "fp16"),
    "train.select": ("acc", "macro_f1", "loss"),
    "train.tensorboard": ("auto", True, False),
}
# keys whose value may be None besides their default type
NULLABLE = {"run_dir", "train.eval_batch_size", "train.max_steps_per_epoch"}
POSITIVE = {"train.epochs", "train.batch_size", "train.eval_batch_size", "train.log_every",
            "train.max_steps_per_epoch", "optim.step_size", "train.dist_timeout_s"}
BELOW_ONE = {"optim.momentum"}  # and >= 0
NON_NEGATIVE = {"train.num_workers", "train.checkpoint_every", "optim.lr", "optim.weight_decay",
                "optim.momentum", "optim.min_lr", "optim.gamma", "optim.eps"}
# arguments the runner supplies itself; recipes must not set them
INJECTED = {"dataset": set(), "encoder": {"input_shape"}, "fusion": {"feature_shapes", "num_classes"},
            "method": set()}


# -- overrides ---------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=1e-3"`` → ``(["a", "b"], 0.001)``; the value is typed by YAML (``null``, ``[1, 2]``…)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. method.alpha=1.5)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value {raw!r} is not valid YAML ({e.__class__.__name__})") from None
    return key.split("."), value


def _as_spec(value: Any, where: str) -> dict[str, Any]:
    """A part spec: a bare name or a mapping with ``name``."""
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, Mapping):
        return dict(value)
    raise ConfigError(f"{where} must be a name or a mapping with a 'name' key, got {value!r}")


def apply_override(config: dict[str, Any], path: Sequence[str], value: Any) -> None:
    """Set ``config[path]``; ``method=<name>`` switches method (dropping the old one's arguments)."""
    if path[0] not in TOP_KEYS:
        raise ConfigError(_unknown_key(path[0], TOP_KEYS, "top-level key"))
    if list(path) == ["method"]:
        config["method"] = _as_spec(value, "method")
        return
    node = config
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str) and i < 2 and path[0] in ("dataset", "model", "method"):
            child = node[part] = {"name": child}
        elif not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {'.'.join(path[:i + 1])} is {child!r}, not a mapping")
        node = child
    node[path[-1]] = value


# -- loading -----------------------------------------------------------------------------------
def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with modbal (``modbal/recipes/<name>.yaml``)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def shipped_or_file(name: str | Path, folder: Path) -> Path | None:
    """An existing file ``name``, or the bare name of a YAML file shipped in ``folder``; None if neither."""
    path = Path(name)
    if path.is_file():
        return path
    builtin = folder / f"{path.name}.yaml"
    if path.parent == Path(".") and not path.suffix and builtin.is_file():
        return builtin
    return None


def recipe_path(recipe: str | Path) -> Path:
    """A recipe file: an existing path, or the name of a built-in recipe (``synthetic``)."""
    path = shipped_or_file(recipe, RECIPES_DIR)
    if path is None:
        raise ConfigError(f"recipe {str(recipe)!r} does not exist (neither a file nor a built-in recipe; "
                          f"built-in: {', '.join(builtin_recipes())})")
    return path


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in ``path`` or built-in recipe ``path`` (ConfigError when missing or not a mapping)."""
    path = recipe_path(path)
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(path)!r} must hold a mapping of settings, got {type(data).__name__}")
    return data


def resolve(recipe: Mapping[str, Any], overrides: Sequence[str] = (), source: str = "recipe") -> dict[str, Any]:
    """Defaults ← ``recipe`` ← ``overrides``, normalised and validated (see :func:`validate`)."""
    for key in recipe:
        if key not in TOP_KEYS and key != "paper_settings":
            raise ConfigError(f"{source}: " + _unknown_key(key, TOP_KEYS, "top-level key"))
    recipe = {k: v for k, v in recipe.items() if k != "paper_settings"}
    for part in ("dataset", "method"):
        if part in recipe:
            recipe[part] = _as_spec(recipe[part], f"{source}: {part}")
    if isinstance(recipe.get("model"), Mapping) and "fusion" in recipe["model"]:
        recipe["model"] = dict(recipe["model"])
        recipe["model"]["fusion"] = _as_spec(recipe["model"]["fusion"], f"{source}: model.fusion")
    config = copy.deepcopy(DEFAULTS)
    # dataset / model / method specs replace the defaults' (a recipe naming another encoder set
    # must not inherit the default "*" entry); optim / train merge key by key.
    for key, value in recipe.items():
        if key in ("optim", "train") and isinstance(value, Mapping):
            config[key] = _merge(config[key], value)
        elif key == "model" and isinstance(value, Mapping):
            config[key] = (_merge({"encoders": {}, "fusion": {}}, value) if "encoders" in value
                           else _merge(config[key], value))
        else:
            config[key] = copy.deepcopy(value)
    for text in overrides:
        path, value = parse_override(text)
        apply_override(config, path, value)
    try:  # plug-ins first: they register the parts named below
        config["imports"] = merged_imports(config["imports"], f"{source}: imports")
    except PluginError as e:
        raise ConfigError(str(e)) from None
    config["dataset"] = _as_spec(config["dataset"], "dataset")
    if isinstance(config.get("model"), dict):
        if "fusion" in config["model"]:
            config["model"]["fusion"] = _as_spec(config["model"]["fusion"], "model.fusion")
        if isinstance(config["model"].get("encoders"), dict):
            config["model"]["encoders"] = {m: _as_spec(e, f"model.encoders.{m}")
                                           for m, e in config["model"]["encoders"].items()}
    method = _as_spec(config["method"], "method")
    per_method = config.get("methods") or {}
    if not isinstance(per_method, Mapping):
        raise ConfigError(f"methods must be a mapping of method name → settings, got {per_method!r}")
    name = method.get("name")
    if isinstance(name, str) and isinstance(per_method.get(name), Mapping):
        method = {"name": name, **_merge(dict(per_method[name]), {k: v for k, v in method.items() if k != "name"})}
    config["method"] = method
    validate(config)
    return config


def load_recipe(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Load a YAML recipe or a built-in one by name (None: the defaults alone), apply ``key=value``
    overrides, validate.

    >>> load_recipe("recipes/synthetic.yaml", ["method=agm", "method.alpha=1.5", "seed=2"])
    >>> load_recipe("synthetic", ["method=agm"])              # the same file, shipped with modbal
    """
    recipe = read_recipe(path) if path is not None else {}
    return resolve(recipe, overrides, source=str(path) if path is not None else "defaults")


# -- validation --------------------------------------------------------------------------------
def _unknown_key(key: str, allowed: Sequence[str], what: str = "key") -> str:
    hint = difflib.get_close_matches(str(key), [str(a) for a in allowed], n=1)
    did = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown {what} {key!r}{did}; allowed: {', '.join(str(a) for a in allowed) or '(none)'}"


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_type(key: str, value: Any, default: Any) -> None:
    if value is None and (key in NULLABLE or default is None):
        return
    if key in CHOICES:
        if not any(value == c and type(value) is type(c) for c in CHOICES[key]):
            raise ConfigError(f"{key}={value!r} is not allowed; allowed values: "
                              f"{', '.join(str(c).lower() if isinstance(c, bool) else str(c) for c in CHOICES[key])}")
        return
    if default is None:
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
        expected = "an integer or null"
    elif isinstance(default, bool):
        ok, expected = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, expected = isinstance(value, str), "a string"
    elif isinstance(default, list):
        ok, expected = isinstance(value, list), "a list"
    else:
        ok, expected = True, ""
    if not ok:
        raise ConfigError(f"{key} must be {expected}, got {value!r} ({_type_name(value)})")
    if key in POSITIVE and isinstance(value, (int, float)) and value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if key in NON_NEGATIVE and isinstance(value, (int, float)) and value < 0:
        raise ConfigError(f"{key} must be >= 0, got {value!r}")
    if key in BELOW_ONE and isinstance(value, (int, float)) and value >= 1:
        raise ConfigError(f"{key} must be in [0, 1), got {value!r}")


def _check_section(name: str, section: Any, defaults: Mapping[str, Any]) -> None:
    if not isinstance(section, Mapping):
        raise ConfigError(f"{name} must be a mapping, got {section!r}")
    for key, value in section.items():
        if key not in defaults:
            raise ConfigError(f"{name}: " + _unknown_key(key, list(defaults), "key"))
        _check_type(f"{name}.{key}", value, defaults[key])


def _check_kwargs(where: str, factory: Any, kwargs: Mapping[str, Any], kind: str) -> None:
    """Keyword arguments against the factory's signature (names, and types of typed defaults)."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    params = {n: p for n, p in sig.parameters.items() if n != "self"}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [n for n, p in params.items() if n not in INJECTED[kind]
               and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    for key, value in kwargs.items():
        if key in INJECTED[kind]:
            raise ConfigError(f"{where}.{key} is set by the runner and must not appear in the recipe")
        if key not in allowed:
            raise ConfigError(f"{where}: " + _unknown_key(key, allowed, "argument"))
        default = params[key].default
        if default is inspect.Parameter.empty or default is None or value is None:
            continue
        bad = False
        if isinstance(default, bool):
            bad = not isinstance(value, bool)
        elif isinstance(default, (int, float)):
            bad = isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float)
                and not value.is_integer())
        elif isinstance(default, str):
            bad = not isinstance(value, str)
        if bad:
            raise ConfigError(f"{where}.{key} must be {type(default).__name__} like its default "
                              f"{default!r}, got {value!r} ({_type_name(value)})")
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in INJECTED[kind]
                and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    missing = [n for n in required if n not in kwargs]
    if missing:
        raise ConfigError(f"{where}: missing required argument(s) {', '.join(missing)}")


def _check_part(where: str, spec: Any, registry: Any, kind: str) -> None:
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ConfigError(f"{where} needs a 'name'; allowed values: {', '.join(registry.names())}")
    name = spec["name"]
    if not isinstance(name, str) or name not in registry:
        raise ConfigError(f"{where}.name={name!r} is not a registered {registry.kind}; "
                          f"allowed values: {', '.join(registry.names())}")
    _check_kwargs(where, registry.get(name), {k: v for k, v in spec.items() if k != "name"}, kind)


def validate(config: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` on the first problem: unknown keys, wrong types, unknown names,
    arguments a part does not take, or values the method itself rejects."""
    for key in config:
        if key not in TOP_KEYS:
            raise ConfigError(_unknown_key(key, TOP_KEYS, "top-level key"))
    _check_type("seed", config["seed"], 0)
    if config["run_dir"] is not None and not isinstance(config["run_dir"], str):
        raise ConfigError(f"run_dir must be a path string or null, got {config['run_dir']!r}")
    _check_section("optim", config["optim"], OPTIM_DEFAULTS)
    _check_section("train", config["train"], TRAIN_DEFAULTS)
    betas = config["optim"]["betas"]
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {betas!r}")
    device = config["train"]["device"]
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"train.device={device!r} is not allowed; allowed values: auto, cpu, cuda, cuda:N")
    vf = config["train"]["val_fraction"]
    if not 0 < vf < 1:
        raise ConfigError(f"train.val_fraction must be in (0, 1), got {vf!r}")
    _check_part("dataset", config["dataset"], DATASETS, "dataset")
    model = config["model"]
    if not isinstance(model, Mapping):
        raise ConfigError(f"model must be a mapping with 'encoders' and 'fusion', got {model!r}")
    for key in model:
        if key not in ("encoders", "fusion"):
            raise ConfigError("model: " + _unknown_key(key, ["encoders", "fusion"]))
    encoders = model.get("encoders")
    if not isinstance(encoders, Mapping) or not encoders:
        raise ConfigError("model.encoders must map each modality (or '*' for all) to an encoder spec, "
                          f"got {encoders!r}")
    for m, spec in encoders.items():
        _check_part(f"model.encoders.{m}", _as_spec(spec, f"model.encoders.{m}"), ENCODERS, "encoder")
    _check_part("model.fusion", model.get("fusion"), FUSIONS, "fusion")
    _check_part("method", config["method"], METHODS, "method")
    methods = config["methods"]
    for name, block in methods.items():
        if name not in METHODS:
            raise ConfigError(f"methods.{name}: not a registered method; allowed values: {', '.join(METHODS.names())}")
        if not isinstance(block, Mapping):
            raise ConfigError(f"methods.{name} must be a mapping of arguments, got {block!r}")
        _check_kwargs(f"methods.{name}", METHODS.get(name), block, "method")
    spec = dict(config["method"])
    name = spec.pop("name")
    try:
        method = METHODS.create(name, **spec)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"method {name}: {e}") from None
    optim = config["optim"]
    if (getattr(method, "rescales_learning_rates", False) and optim["schedule"] == "cosine"
            and optim["min_lr"] > 0):
        raise ConfigError(f"method {name} with optim.schedule=cosine needs optim.min_lr=0 (got {optim['min_lr']}): "
                          f"it rescales each group's rate multiplicatively, which a cosine floor would distort")


def encoder_specs(config: Mapping[str, Any], modalities: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per-modality encoder specs, with ``"*"`` filling every modality not named explicitly."""
    encoders = {m: _as_spec(s, f"model.encoders.{m}") for m, s in config["model"]["encoders"].items()}
    unknown = sorted(set(encoders) - set(modalities) - {"*"})
    if unknown:
        raise ConfigError(f"model.encoders names modalities {unknown} that the dataset does not have; "
                          f"its modalities: {', '.join(modalities)}")
    out = {}
    for m in modalities:
        if m in encoders:
            out[m] = encoders[m]
        elif "*" in encoders:
            out[m] = dict(encoders["*"])
        else:
            raise ConfigError(f"model.encoders has no encoder for modality {m!r} (add it, or a '*' entry); "
                              f"dataset modalities: {', '.join(modalities)}")
    return out


def dump(config: Mapping[str, Any]) -> str:
    """The config as YAML text (key order kept)."""
    return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False)


def diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs."""
    out = []
    for key in sorted(set(a) | set(b), key=str):
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} → {vb!r}")
    return out
