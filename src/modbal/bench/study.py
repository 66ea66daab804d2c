"""Studies: which tasks, fusions and methods a fair comparison covers, and its two-stage protocol.

A study is a YAML file (shipped ones: ``modbal/studies/<name>.yaml``; ``modbal bench --list``)::

    description: every method on the synthetic task          # optional, shown in the output
    recipe: synthetic                 # a recipe file or built-in name (or `tasks:` for several)
    overrides: [train.epochs=20]      # applied to every run
    fusions: [concat, gated]          # or {name: [overrides]}; default: the recipe's fusion
    lrs: [0.01, 0.03, 0.1]            # every method's learning rates (a method may set its own)
    selection_seeds: [0, 1, 2]        # stage 1: choose each method's configuration on validation
    report_seeds: 5                   # stage 2: a count (the seeds after the selection seeds) or a list
    budget: 3                         # configurations per method in stage 1 (default: the smallest grid)
    methods:
      joint: [method=joint]                              # a label and its overrides
      AGM: {overrides: [method=agm], grid: {method.alpha: [0.5, 1.5, 2.5]}}
      uni-modal slow: [method=unimodal, method.modality=slow]

``methods: all`` takes every registered method (a method whose only required argument is
``modality`` once per modality), with optional ``grids: {method name: {argument: [values]}}`` and
``variants: {label: {overrides, grid}}``, extra rows for settings of a method beside its default
row (e.g. ``ugm experts: {overrides: [method=ugm, method.heads=assist], grid: {...}}``). A
method's or variant's mapping may list ``fusions: [...]``, the study's fusions its row runs under
(default: all), e.g. a row that brings its own fusion head.
``tasks: {name: {recipe: ..., overrides: [...]}}`` replaces ``recipe``/``overrides`` for several
tasks. ``reference`` names the label compared against (default: the method ``joint``).

Prior runs as inputs. A method that takes ``teachers`` (``{modality: run directory}`` of
``unimodal`` runs: UMT, UME) and is not given them gets the study's own uni-modal runs: for each
modality, the uni-modal method of the same task and fusion (``teachers: {modality: label}`` in a
method's mapping names them when there are several), at its chosen configuration, on the same
seed. Such cells run in a later phase: stage 1 chooses the uni-modal configurations first, then
trains the dependent cells' selection runs on their teachers of each selection seed; stage 2 trains
the teachers' report runs before theirs. The teachers' run directories are part of the dependent
runs' configs, so their keys cover them. A method that trains nothing (:attr:`Method.trains` False,
UME) has no learning rates to try: its configurations are its own grid, run for one epoch.

Protocol. Each method's configurations are its learning rates × its own grid; every method gets
the same number, ``budget``: a larger grid is subsampled with a seeded sampler (``sampler_seed``).
Stage 1 trains them on the selection seeds and keeps the one with the best mean validation
``select`` metric. Stage 2 trains that one on the report seeds, disjoint from the selection seeds,
and only those runs' test metrics are reported.
"""
from __future__ import annotations

import copy
import inspect
import itertools
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..config import ConfigError, load_recipe, parse_override, recipe_path, shipped_or_file
from ..methods.teachers import ARGUMENT as TEACHERS
from .grid import Job, run_status

STUDIES_DIR = Path(__file__).resolve().parents[1] / "studies"
KEYS = ("description", "recipe", "overrides", "tasks", "fusions", "lrs", "methods", "grids", "variants",
        "selection_seeds", "seeds", "report_seeds", "budget", "sampler_seed", "reference", "ensemble", "select")
DEFAULT_SELECTION_SEEDS = (0, 1, 2)
DEFAULT_REPORT_SEEDS = 5
UNIMODAL = "unimodal"  # the method whose runs form the uni-modal ensemble
REFERENCE = "joint"  # the default reference method


class StudyError(ValueError):
    """A study file a user can fix; the message names the file and the key."""


# -- the study file ----------------------------------------------------------------------------
@dataclass
class MethodSpec:
    label: str
    overrides: list[str]
    grid: dict[str, list[Any]] = field(default_factory=dict)
    lrs: list[float] = field(default_factory=list)
    na: str | None = None  # why this method cannot take part (known before any check)
    method: str = "?"  # registry name, where known before the configs are resolved
    teachers: dict[str, str] | None = None  # modality → label of its teachers' cell, as the study names them
    fusions: list[str] | None = None  # the study's fusions this row runs under (None: all)

    def space(self) -> list[dict[str, Any]]:
        """Every configuration: ``{"optim.lr": lr, key: value, ...}``, learning rate slowest (no
        learning rates: the grid alone)."""
        keys = list(self.grid)
        return [({} if lr is None else {"optim.lr": lr}) | dict(zip(keys, combo))
                for lr in (self.lrs or [None]) for combo in itertools.product(*(self.grid[k] for k in keys))]


@dataclass
class TaskSpec:
    name: str
    recipe: str  # the file
    overrides: list[str]
    written: str = ""  # the recipe as the study names it


@dataclass
class Study:
    """A study file as read by ``load_study``: its tasks, fusions, methods and their grids, learning
    rates, selection and report seeds, budget and reference method."""

    name: str
    source: str
    description: str
    tasks: list[TaskSpec]
    fusions: dict[str, list[str]]  # empty: each task's recipe fusion
    methods: list[MethodSpec] | None  # None: every registered method
    grids: dict[str, dict[str, list[Any]]]
    variants: list[MethodSpec]  # rows added to ``methods: all``
    lrs: list[float]
    selection_seeds: list[int]
    report_seeds: list[int]
    budget: int | None
    sampler_seed: int
    reference: str | None
    ensemble: bool
    select: str


def builtin_studies() -> list[str]:
    """The names of the studies shipped with modbal (``modbal bench --list``)."""
    return sorted(p.stem for p in STUDIES_DIR.glob("*.yaml"))


def study_path(study: str | Path) -> Path:
    """A study file: an existing path, or the name of a shipped study (``synthetic``)."""
    path = shipped_or_file(study, STUDIES_DIR)
    if path is None:
        raise StudyError(f"study {str(study)!r} does not exist (neither a file nor a shipped study; "
                         f"shipped: {', '.join(builtin_studies())})")
    return path


def _recipe(text: Any, base: Path, where: str) -> str:
    """A recipe as written in a study: a path (from the working folder or the study's folder) or a built-in name."""
    if not isinstance(text, str) or not text:
        raise StudyError(f"{where}: recipe must be a file or a built-in recipe name, got {text!r}")
    for candidate in (Path(text), base / text):
        if candidate.is_file():
            return str(candidate)
    try:
        return str(recipe_path(Path(text).stem if Path(text).parent.name == "recipes" else text))
    except ConfigError as e:
        raise StudyError(f"{where}: {e}") from None


def _str_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise StudyError(f"{where} must be a list of key=value strings, got {value!r}")
    return list(value)


def _numbers(value: Any, where: str) -> list[float]:
    if not isinstance(value, list) or not value or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value):
        raise StudyError(f"{where} must be a non-empty list of positive numbers, got {value!r}")
    if len(set(value)) != len(value):
        raise StudyError(f"{where} repeats a value: {value!r}")
    return [float(v) for v in value]


def _seeds(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                          for v in value):
        raise StudyError(f"{where} must be a non-empty list of integers, got {value!r}")
    if len(set(value)) != len(value):
        raise StudyError(f"{where} repeats a seed: {value!r}")
    return list(value)


def _grid(value: Any, where: str) -> dict[str, list[Any]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(v, list) and v for v in value.values()):
        raise StudyError(f"{where} must map each key to a non-empty list of values, got {value!r}")
    for key, values in value.items():
        if key in ("optim.lr", "seed"):
            raise StudyError(f"{where}.{key}: learning rates go under lrs and seeds under selection_seeds/report_seeds")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise StudyError(f"{where}.{key} repeats a value: {values!r}")
    return {str(k): list(v) for k, v in value.items()}


def _method(label: Any, spec: Any, lrs: list[float], where: str) -> MethodSpec:
    if isinstance(spec, list):
        return MethodSpec(str(label), _str_list(spec, where), {}, lrs)
    if not isinstance(spec, Mapping):
        raise StudyError(f"{where} must be a list of overrides or a mapping with overrides/grid/lrs, got {spec!r}")
    unknown = sorted(set(spec) - {"overrides", "grid", "lrs", "teachers", "fusions"})
    if unknown:
        raise StudyError(f"{where}: unknown key(s) {unknown}; allowed: overrides, grid, lrs, teachers, fusions")
    own = _numbers(spec["lrs"], f"{where}.lrs") if "lrs" in spec else lrs
    teachers = spec.get("teachers")
    if teachers is not None and (not isinstance(teachers, Mapping) or not teachers or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in teachers.items())):
        raise StudyError(f"{where}.teachers must map each modality to the label of a uni-modal method of this "
                         f"study, got {teachers!r}")
    fusions = spec.get("fusions")
    if "fusions" in spec and (not isinstance(fusions, list) or not fusions
                              or not all(isinstance(f, str) for f in fusions)):
        raise StudyError(f"{where}.fusions must be a list of the study's fusion names, got {fusions!r}")
    return MethodSpec(str(label), _str_list(spec.get("overrides"), f"{where}.overrides"),
                      _grid(spec.get("grid"), f"{where}.grid"), own, teachers=dict(teachers) if teachers else None,
                      fusions=fusions)


def load_study(study: str | Path) -> Study:
    """Read and check a study file (or a shipped study by name); every error names file and key."""
    from ..config import load_yaml

    path = study_path(study)
    where = str(path)
    try:
        data = load_yaml(path.read_text())
    except Exception as e:  # noqa: BLE001  (YAML errors of any kind)
        raise StudyError(f"study {where} is not valid YAML: {e}") from None
    if not isinstance(data, Mapping):
        raise StudyError(f"study {where} must hold a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise StudyError(f"study {where}: unknown key(s) {unknown}; allowed: {', '.join(KEYS)}")
    base = path.parent
    if "tasks" in data:
        if "recipe" in data:
            raise StudyError(f"study {where}: give either recipe (one task) or tasks, not both")
        if not isinstance(data["tasks"], Mapping) or not data["tasks"]:
            raise StudyError(f"study {where}: tasks must map task names to {{recipe, overrides}}")
        tasks = []
        for name, spec in data["tasks"].items():
            if not isinstance(spec, Mapping) or "recipe" not in spec or set(spec) - {"recipe", "overrides"}:
                raise StudyError(f"study {where}: tasks.{name} must be a mapping with recipe and optional overrides")
            tasks.append(TaskSpec(str(name), _recipe(spec["recipe"], base, f"{where}: tasks.{name}"),
                                  _str_list(data.get("overrides"), f"{where}: overrides")
                                  + _str_list(spec.get("overrides"), f"{where}: tasks.{name}.overrides"),
                                  str(spec["recipe"])))
    elif "recipe" in data:
        recipe = _recipe(data["recipe"], base, where)
        overrides = _str_list(data.get("overrides"), f"{where}: overrides")
        try:  # the task is named by its dataset
            name = load_recipe(recipe, overrides)["dataset"]["name"]
        except ConfigError as e:
            raise StudyError(f"study {where}: {e}") from None
        tasks = [TaskSpec(str(name), recipe, overrides, str(data["recipe"]))]
    else:
        raise StudyError(f"study {where}: needs a recipe (or tasks)")
    fusions = data.get("fusions") or {}
    if isinstance(fusions, list):
        fusions = {str(f): [] for f in fusions}
    if not isinstance(fusions, Mapping):
        raise StudyError(f"study {where}: fusions must be a list of names or a mapping name → overrides")
    fusions = {str(k): _str_list(v, f"{where}: fusions.{k}") for k, v in fusions.items()}
    lrs = _numbers(data.get("lrs"), f"{where}: lrs") if "lrs" in data else []
    grids = data.get("grids") or {}
    if not isinstance(grids, Mapping):
        raise StudyError(f"study {where}: grids must map method names to {{argument: [values]}}")
    grids = {str(k): _grid(v, f"{where}: grids.{k}") for k, v in grids.items()}
    raw_methods = data.get("methods")
    if raw_methods == "all":
        methods = None
    elif isinstance(raw_methods, Mapping) and raw_methods:
        if grids:
            raise StudyError(f"study {where}: grids goes with methods: all; give each method its own grid")
        methods = [_method(label, spec, lrs, f"{where}: methods.{label}") for label, spec in raw_methods.items()]
    else:
        raise StudyError(f"study {where}: methods must be 'all' or a mapping label → overrides")
    raw_variants = data.get("variants") or {}
    if raw_variants and (methods is not None or not isinstance(raw_variants, Mapping)):
        raise StudyError(f"study {where}: variants goes with methods: all (a mapping label → overrides/grid); "
                         "with a methods mapping, list the variant there")
    variants = [_method(label, spec, lrs, f"{where}: variants.{label}") for label, spec in raw_variants.items()]
    if not lrs and (methods is None or any(not m.lrs for m in methods)):
        raise StudyError(f"study {where}: lrs is missing (a list of learning rates for every method)")
    if "seeds" in data and "selection_seeds" in data:
        raise StudyError(f"study {where}: seeds is the old name of selection_seeds; give one of them")
    selection = _seeds(data.get("selection_seeds", data.get("seeds", list(DEFAULT_SELECTION_SEEDS))),
                       f"{where}: selection_seeds")
    report = data.get("report_seeds", DEFAULT_REPORT_SEEDS)
    if isinstance(report, int) and not isinstance(report, bool):
        if report < 1:
            raise StudyError(f"study {where}: report_seeds must be >= 1, got {report}")
        report = list(range(max(selection) + 1, max(selection) + 1 + report))
    report = _seeds(report, f"{where}: report_seeds")
    overlap = sorted(set(selection) & set(report))
    if overlap:
        raise StudyError(f"study {where}: selection_seeds and report_seeds overlap in {overlap}; the reported "
                         "numbers must come from seeds never used to choose a configuration")
    budget = data.get("budget")
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
        raise StudyError(f"study {where}: budget must be a positive integer, got {budget!r}")
    select = data.get("select", "acc")
    if select not in ("acc", "macro_f1", "loss"):
        raise StudyError(f"study {where}: select must be acc, macro_f1 or loss, got {select!r}")
    sampler_seed = data.get("sampler_seed", 0)
    if not isinstance(sampler_seed, int):
        raise StudyError(f"study {where}: sampler_seed must be an integer, got {sampler_seed!r}")
    reference = data.get("reference")
    if reference is not None and methods is not None and reference not in [m.label for m in methods]:
        raise StudyError(f"study {where}: reference {reference!r} is not one of the method labels")
    shown = f"{path.stem} (shipped with modbal)" if path.resolve().parent == STUDIES_DIR else where
    return Study(path.stem, shown, str(data.get("description", "")).strip(), tasks, fusions, methods, grids,
                 variants, lrs, selection, report, budget, sampler_seed, reference, bool(data.get("ensemble", True)),
                 select)


# -- planning ----------------------------------------------------------------------------------
@dataclass
class Cell:
    """One (task, fusion, method) of the leaderboard and the configurations it tries."""

    task: str
    fusion: str
    label: str
    method: str  # registry name
    overrides: list[str]  # everything but the candidate's values and the seed
    recipe: str
    space: int = 0  # configurations in the method's grid
    candidates: list[dict[str, Any]] = field(default_factory=list)  # the drawn ones (the budget)
    na: str | None = None
    modality: str | None = None  # for uni-modal methods
    trains: bool = True  # False: the method updates no weights (no learning rates, one epoch)
    wants_teachers: bool = False  # it takes ``teachers`` and the study does not give them
    named_teachers: dict[str, str] | None = None  # modality → label, as the study file names them
    teachers: dict[str, str] = field(default_factory=dict)  # modality → label of the teacher cell
    phase: int = 0  # cells of a phase run after those of the phases before (their teachers)
    bound: dict[int, dict[str, str]] = field(default_factory=dict)  # seed → {modality: teacher run dir}
    blocked: str | None = None  # why its teachers have no runs to give (no configuration chosen)
    _configs: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    def config(self, candidate: Mapping[str, Any], seed: int,
               teachers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The resolved config of one candidate and seed (a fresh copy; resolved once). A cell with
        teachers adds their run directories of that seed (``teachers``, or those bound by
        :func:`bind_teachers`)."""
        values = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in candidate.items()]
        if self.teachers:
            given = teachers if teachers is not None else self.bound.get(seed)
            if given is None:
                raise StudyError(f"{self.task} / {self.fusion} / {self.label}: the run directories of its teachers "
                                 f"on seed {seed} are not known before their configuration is chosen")
            values.append(f"method.{TEACHERS}={json.dumps(dict(given))}")
        overrides = [*self.overrides, *values, f"seed={seed}"]
        key = json.dumps(overrides)
        if key not in self._configs:
            self._configs[key] = load_recipe(self.recipe, overrides)
        return copy.deepcopy(self._configs[key])


@dataclass
class Plan:
    study: Study
    out: Path
    cells: list[Cell]
    task_na: dict[str, str]  # task → reason its data could not be loaded
    budget: int
    modalities: dict[str, list[str]]  # task → modalities


def run_dir_of(out: Path, config: Mapping[str, Any], key: str) -> Path:
    """Where a config trains: named by what it is, unique by its key."""
    safe = re.compile(r"[^A-Za-z0-9._-]+")
    parts = [config["dataset"]["name"], config["model"]["fusion"]["name"], config["method"]["name"]]
    return out / "runs" / Path(*(safe.sub("_", p) for p in parts)) / f"seed{config['seed']}-{key}"


def job_of(out: Path, config: Mapping[str, Any]) -> Job:
    job = Job.of(config, "")
    return Job(str(run_dir_of(out, config, job.key)), config, job.key)


def _fusion_override(name: str, base: str | None) -> str:
    # another fusion drops the recipe fusion's arguments; the recipe's own keeps them
    return f"model.fusion.name={name}" if name == base else f"model.fusion={{name: {name}}}"


def _required(factory: Any) -> list[str]:
    """The arguments a method's constructor needs."""
    params = inspect.signature(factory).parameters
    return [n for n, p in params.items() if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"]


def _method_of(overrides: Sequence[str], base: Mapping[str, Any]) -> tuple[str, set[str]]:
    """The method a cell's overrides select (registry name) and the arguments they give it, read
    before the configs are resolved (an override that does not parse: the recipe's method)."""
    name, given = base["method"]["name"], set(base["method"]) - {"name"}
    for text in overrides:
        try:
            path, value = parse_override(text)
        except ConfigError:
            continue
        if path == ["method"]:
            spec = value if isinstance(value, Mapping) else {"name": value}
            name, given = spec.get("name"), set(spec) - {"name"}
        elif path[0] == "method" and len(path) >= 2:
            if path[1] == "name":
                name = value
            else:
                given.add(path[1])
    return str(name), given


def _expand_all(study: Study, modalities: Sequence[str]) -> list[MethodSpec]:
    """``methods: all``: every registered method; a method needing only ``modality`` once per modality
    (its ``teachers``, when not in its grid, come from the study's uni-modal runs)."""
    from ..registry import METHODS

    unknown = sorted(set(study.grids) - set(METHODS.names()))
    if unknown:
        raise StudyError(f"study {study.source}: grids names {unknown}, not registered methods; "
                         f"registered: {', '.join(METHODS.names())}")
    out = []
    clash = sorted({v.label for v in study.variants} & set(METHODS.names()))
    if clash:
        raise StudyError(f"study {study.source}: variants {clash} take the label of a registered method; "
                         "name each variant apart (e.g. 'ugm experts')")
    for name in METHODS.names():
        grid = study.grids.get(name, {})
        grid = {k if k.startswith("method.") else f"method.{k}": v for k, v in grid.items()}
        missing = [n for n in _required(METHODS.get(name)) if f"method.{n}" not in grid and n != TEACHERS]
        if missing == ["modality"]:
            out += [MethodSpec(f"{name} {m}", [f"method={name}", f"method.modality={m}"], grid, study.lrs)
                    for m in modalities]
        elif missing:
            out.append(MethodSpec(name, [f"method={name}"], grid, study.lrs, method=name,
                                  na=f"needs argument(s) {', '.join(missing)}: give them under grids, or list "
                                     "the method with them under methods"))
        else:
            out.append(MethodSpec(name, [f"method={name}"], grid, study.lrs))
    return out + study.variants


def draw(space: Sequence[Mapping[str, Any]], budget: int, seed: int, label: str) -> list[dict[str, Any]]:
    """``budget`` configurations out of ``space``: all of them when it has exactly that many, else a
    seeded sample without replacement (the same for the same seed and label), in grid order."""
    if len(space) == budget:
        return [dict(c) for c in space]
    picked = sorted(random.Random(f"{seed}:{label}").sample(range(len(space)), budget))
    return [dict(space[i]) for i in picked]


def plan_study(study: Study, out: str | Path, echo=print) -> Plan:
    """Every cell with its drawn configurations, each checked against the model it would train
    (:func:`check_cell`) before anything is trained; what a method cannot serve is marked n/a."""
    from ..registry import METHODS
    from ..train.run import build_data

    out = Path(out)
    cells, task_na, modalities = [], {}, {}
    for task in study.tasks:
        try:
            base = load_recipe(task.recipe, task.overrides)
        except ConfigError as e:
            raise StudyError(f"study {study.source}: task {task.name}: {e}") from None
        try:
            data = build_data(base)
        except Exception as e:  # noqa: BLE001  (data that is absent or unreadable: the task is n/a)
            task_na[task.name] = f"{type(e).__name__}: {e}"
            echo(f"task {task.name}: n/a: {task_na[task.name]}")
            continue
        modalities[task.name] = list(data["modalities"])
        base_fusion = base["model"]["fusion"].get("name")
        fusions = study.fusions or {base_fusion: []}
        methods = study.methods if study.methods is not None else _expand_all(study, data["modalities"])
        for spec in methods:
            unknown = sorted(set(spec.fusions or ()) - set(fusions))
            if unknown:
                raise StudyError(f"study {study.source}: {spec.label}.fusions {unknown} are not fusions of this "
                                 f"study ({', '.join(fusions)})")
        for fusion, f_over in fusions.items():
            for spec in methods:
                if spec.fusions is not None and fusion not in spec.fusions:
                    continue
                overrides = [*task.overrides, _fusion_override(fusion, base_fusion), *f_over, *spec.overrides]
                name, given = _method_of(overrides, base)
                factory = METHODS.get(name) if name in METHODS else None
                trains = getattr(factory, "trains", True)
                wants = (factory is not None and TEACHERS in _required(factory) and TEACHERS not in given
                         and f"method.{TEACHERS}" not in spec.grid)
                if spec.teachers is not None and not wants:
                    raise StudyError(f"study {study.source}: methods.{spec.label}.teachers: method {name!r} "
                                     f"takes no teachers" + (" (they are given)" if factory is not None
                                                             and TEACHERS in _required(factory) else ""))
                space = spec.space() if trains else MethodSpec(spec.label, [], spec.grid).space()
                cell = Cell(task.name, fusion, spec.label, name if spec.method == "?" else spec.method,
                            overrides if trains else [*overrides, "train.epochs=1"], task.recipe, len(space),
                            na=spec.na, trains=trains, wants_teachers=wants, named_teachers=spec.teachers)
                cell.candidates = space
                cells.append(cell)
    sizes = {c.label: c.space for c in cells if not c.na and c.trains}
    budget = study.budget or (min(sizes.values()) if sizes else 0)
    small = {label: n for label, n in sizes.items() if n < budget}
    if small:
        raise StudyError(f"study {study.source}: budget {budget} is larger than the grids of "
                         + ", ".join(f"{k} ({v})" for k, v in small.items())
                         + "; give those methods more learning rates or grid values, or lower budget")
    checked: dict[str, str | None] = {}
    data_cache: dict[str, Any] = {}
    seed = study.selection_seeds[0]
    # the cells that take teachers after the others, since they are checked with their teachers
    for cell in sorted(cells, key=lambda c: c.wants_teachers):
        if not cell.na:
            cell.candidates = draw(cell.candidates, min(budget, len(cell.candidates)) if not cell.trains else budget,
                                   study.sampler_seed, cell.label)
            teachers = None
            if cell.wants_teachers:
                found = find_teachers(cell, cells, modalities[cell.task])
                if isinstance(found, str):
                    cell.na = found
                else:
                    cell.teachers, cell.phase = {m: c.label for m, c in found.items()}, 1 + max(
                        c.phase for c in found.values())
                    teachers = found
            cell.na = cell.na or check_cell(cell, seed, checked, data_cache, teachers)
        if cell.na:
            echo(f"n/a: {cell.task} / {cell.fusion} / {cell.label}: {cell.na}")
    return Plan(study, out, cells, task_na, budget, modalities)


def find_teachers(cell: Cell, cells: Sequence[Cell], modalities: Sequence[str]) -> dict[str, Cell] | str:
    """The cells whose runs teach ``cell``: per modality, the uni-modal method of the same task and
    fusion (the one the study names under ``teachers``), or why there is none to use."""
    group = [c for c in cells if (c.task, c.fusion) == (cell.task, cell.fusion) and c is not cell]
    named = cell.named_teachers or {}
    unknown = sorted(set(named) - set(modalities))
    if unknown:
        return f"teachers names modalities {unknown} the task does not have ({', '.join(modalities)})"
    found = {}
    for m in modalities:
        if m in named:
            mine = [c for c in group if c.label == named[m]]
            if not mine:
                return f"its teacher on {m!r}, {named[m]!r}, is not a method of this study"
        else:
            mine = [c for c in group if c.method == UNIMODAL and c.modality == m]
            if not mine:
                return (f"needs the study's uni-modal runs on every modality as its teachers; there is no "
                        f"'{UNIMODAL}' method on {m!r} (add it to methods)")
            if len(mine) > 1:
                return (f"several uni-modal methods on {m!r} ({', '.join(c.label for c in mine)}): name one per "
                        f"modality under methods.<label>.teachers")
        teacher = mine[0]
        if teacher.na:
            return f"its teacher on {m!r}, {teacher.label}, is n/a"
        if teacher.method != UNIMODAL or teacher.modality != m:
            return f"its teacher on {m!r}, {teacher.label}, is not a '{UNIMODAL}' method on {m!r}"
        found[m] = teacher
    return found


def check_cell(cell: Cell, seed: int, checked: dict[str, str | None], data_cache: dict[str, Any],
               teachers: Mapping[str, Cell] | None = None) -> str | None:
    """Why this cell cannot run (its first candidate that cannot), or None. Each candidate is resolved;
    each distinct model + method (learning rate aside) is built with its optimizer and taken through
    one step of the training loop on a few samples (:func:`_dry_step`) — no run is trained. A cell's
    teachers (cells) are checked against it and given to it as untrained models of their first
    candidate's config."""
    for candidate in cell.candidates:
        teacher_configs = {}
        try:
            if teachers:
                teacher_configs = {m: c.config(c.candidates[0], seed) for m, c in teachers.items()}
                config = cell.config(candidate, seed, {m: f"<{c.label}, seed {seed}>" for m, c in teachers.items()})
            else:
                config = cell.config(candidate, seed)
        except ConfigError as e:
            return str(e)
        cell.method = config["method"]["name"]
        cell.modality = config["method"].get("modality")
        probe = copy.deepcopy(config)
        probe["optim"]["lr"] = 0.0
        key = json.dumps({**{k: probe[k] for k in ("dataset", "model", "method", "optim", "train")},
                          "teachers": teacher_configs}, sort_keys=True, default=str)
        if key not in checked:
            checked[key] = _dry_step(config, data_cache, teacher_configs)
        if checked[key]:
            return checked[key]
    return None


def _dry_step(config: Mapping[str, Any], data_cache: dict[str, Any],
              teachers: Mapping[str, Mapping[str, Any]] | None = None) -> str | None:
    """Build the run's model, method and optimizer as the runner does, then one epoch of the
    runner's loop capped at one step, on eight training and eight validation samples, on the CPU.
    ``teachers`` (modality → config of a teacher run) are checked against the run as its real
    teacher runs will be, and given to the method as untrained models built from those configs."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from ..methods.teachers import check_teacher_config
    from ..train.loop import build_optimizer, fit
    from ..train.run import build_data, build_method, build_model_from_config

    try:
        with torch.random.fork_rng():
            dkey = json.dumps(config["dataset"], sort_keys=True, default=str)
            if dkey not in data_cache:
                data_cache[dkey] = build_data(config)
            data = data_cache[dkey]
            if teachers:
                for m, teacher in teachers.items():
                    check_teacher_config(teacher, m, config, f"its teacher on {m!r}")
                config = {**config, "method": {**config["method"], TEACHERS: {
                    m: build_model_from_config(teacher, data) for m, teacher in teachers.items()}}}
            model = build_model_from_config(config, data)
            method = build_method(config)
            optimizer = build_optimizer(method.param_groups(model), config["optim"])
            method.setup(model, optimizer)
            loaders = [DataLoader(Subset(data[split], range(min(8, len(data[split])))), batch_size=4,
                                  collate_fn=data["collate_fn"]) for split in ("train", "val")]
            fit(model, method, optimizer, *loaders, 1, device="cpu", max_steps_per_epoch=1)
    except Exception as e:  # noqa: BLE001  (whatever stops the method here would stop its runs)
        return f"{type(e).__name__}: {e}".replace("ConfigError: ", "")
    return None


# -- the two stages ----------------------------------------------------------------------------
def phases(plan: Plan) -> list[list[Cell]]:
    """The cells that can run (not n/a), by phase: a cell's teachers are in an earlier phase."""
    valid = [c for c in plan.cells if not c.na]
    return [[c for c in valid if c.phase == k] for k in sorted({c.phase for c in valid})]


def selection_jobs(plan: Plan, cells: Sequence[Cell] | None = None) -> list[tuple[Cell, dict[str, Any], int, Job]]:
    """Stage 1's runs of ``cells`` (default: every cell; those with teachers must be bound first)."""
    cells = [c for c in plan.cells if not c.na] if cells is None else cells
    return [(cell, cand, seed, job_of(plan.out, cell.config(cand, seed)))
            for cell in cells if not cell.na and not cell.blocked
            for cand in cell.candidates for seed in plan.study.selection_seeds]


def bind_teachers(plan: Plan, choices: Mapping[tuple[str, str, str], "Choice"],
                  cells: Sequence[Cell] | None = None) -> None:
    """Give each cell with teachers (of ``cells``; default: all) their run directories seed by seed:
    the teacher cells' runs at their chosen configuration (absolute paths, which the runs' configs
    record). A cell whose teachers have no chosen configuration is ``blocked``, saying why."""
    by_label = {(c.task, c.fusion, c.label): c for c in plan.cells}
    seeds = [*plan.study.selection_seeds, *plan.study.report_seeds]
    for cell in plan.cells if cells is None else cells:
        if cell.na or not cell.teachers:
            continue
        picked = {m: choices.get((cell.task, cell.fusion, label)) for m, label in cell.teachers.items()}
        pending = [f"{cell.teachers[m]} ({c.note if c is not None else 'not chosen yet'})"
                   for m, c in picked.items() if c is None or c.chosen is None]
        if pending:
            cell.bound, cell.blocked = {}, "its teachers have no chosen configuration: " + "; ".join(pending)
            continue
        cell.blocked = None
        cell.bound = {seed: {m: str(Path(job_of(plan.out, by_label[(cell.task, cell.fusion, label)].config(
            picked[m].chosen, seed)).run_dir).resolve()) for m, label in cell.teachers.items()} for seed in seeds}


def teachers_complete(cell: Cell, seed: int) -> bool:
    """Whether every teacher run of ``cell`` on ``seed`` is complete (True for a cell without teachers)."""
    return all(run_status(d) == "complete" for d in cell.bound.get(seed, {}).values())


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class Choice:
    """Stage 1 of one cell: every drawn configuration's mean validation score, and the winner."""

    scores: list[dict[str, Any]]  # {"candidate", "score", "status"} per drawn configuration
    chosen: dict[str, Any] | None
    note: str = ""


def choose(plan: Plan, cell: Cell) -> Choice:
    """The drawn configuration with the best mean validation score over the selection seeds, read
    from the run directories; one that diverged or is unfinished on any seed is not eligible."""
    metric = plan.study.select
    sign = -1.0 if metric == "loss" else 1.0
    scores, best, best_score = [], None, -math.inf
    for cand in cell.candidates:
        values, status = [], "complete"
        for seed in plan.study.selection_seeds:
            job = job_of(plan.out, cell.config(cand, seed))
            st = run_status(job.run_dir)
            if st != "complete":
                status = "diverged" if st == "diverged" else "unfinished"
                break
            values.append(float(read_summary(job.run_dir)["val"][metric]))
        score = sum(values) / len(values) if status == "complete" else math.nan
        scores.append({"candidate": cand, "score": score, "status": status})
        if status == "complete" and sign * score > best_score:
            best, best_score = cand, sign * score
    note = "" if best is not None else (
        "diverged under every configuration" if all(s["status"] == "diverged" for s in scores)
        else "selection runs unfinished")
    return Choice(scores, best, note)


def choose_all(plan: Plan) -> dict[tuple[str, str, str], Choice]:
    """Every cell's choice from the run directories as they are, phase by phase (binding the
    teachers of each phase's cells from the choices before it)."""
    choices: dict[tuple[str, str, str], Choice] = {}
    for cells in phases(plan):
        bind_teachers(plan, choices, cells)
        choices.update(choose_cells(plan, cells))
    return choices


def choose_cells(plan: Plan, cells: Sequence[Cell]) -> dict[tuple[str, str, str], Choice]:
    """:func:`choose` for each cell (a blocked one: no choice, saying why)."""
    return {(c.task, c.fusion, c.label): Choice([], None, c.blocked) if c.blocked else choose(plan, c) for c in cells}


def report_jobs(plan: Plan, choices: Mapping[tuple[str, str, str], Choice],
                cells: Sequence[Cell] | None = None) -> list[Job]:
    """Stage 2's runs of ``cells`` (default: all): the chosen configuration on every report seed
    (for a cell with teachers, on the seeds where its teachers' report runs are complete)."""
    jobs = []
    for cell in plan.cells if cells is None else cells:
        choice = choices.get((cell.task, cell.fusion, cell.label))
        if cell.na or choice is None or choice.chosen is None:
            continue
        jobs += [job_of(plan.out, cell.config(choice.chosen, seed)) for seed in plan.study.report_seeds
                 if teachers_complete(cell, seed)]
    return jobs
