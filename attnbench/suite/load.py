"""Loading a suite: read the YAML, merge a profile, validate, check what the schema cannot (registered
mechanisms and models, option names and values at every shape, distinct report cells): a ``SuiteError`` of one
line naming the file and the field on any problem."""

from __future__ import annotations

import importlib
import inspect
import typing
from importlib import resources
from pathlib import Path
from typing import Any, get_args, get_origin

import torch
import yaml
from pydantic import BaseModel, ValidationError

import attentions

from .expand import expand
from .schema import AXES, Suite, SuiteError, check_recipe_keys


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        elif value is not None:
            merged[key] = value
    return merged


def _location(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that the field path ``loc`` leads into, to list its allowed keys."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            continue
        if part not in current.model_fields:
            return None
        current = current.model_fields[part].annotation
        while get_origin(current) is not None or get_args(current):
            args = [arg for arg in get_args(current) if arg is not type(None)]
            if not args:
                break
            current = args[-1]
            if isinstance(current, type) and issubclass(current, BaseModel):
                break
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _first_error(path: Path, error: ValidationError, model: type[BaseModel],
                 overridden: set[str] = frozenset()) -> SuiteError:
    detail = error.errors()[0]
    loc = tuple(detail["loc"])
    dotted = ".".join(str(part) for part in loc)
    if any(dotted == key or dotted.startswith(key + ".") for key in overridden):
        path = Path(f"{path} (--set {next(key for key in overridden if dotted.startswith(key))})")
    if detail["type"] == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        allowed = ", ".join(parent.model_fields) if parent else "see the suite schema"
        return SuiteError(f"{path}: {_location(loc)}: unknown key {loc[-1]!r}; allowed: {allowed}")
    if detail["type"] == "missing":
        return SuiteError(f"{path}: {_location(loc)}: required field is missing")
    message = detail["msg"].removeprefix("Value error, ")
    return SuiteError(f"{path}: {_location(loc)}: {shorten(message)} (got {shorten(repr(detail.get('input')))})")


def _apply_data_roots(suite: Suite, data_roots: dict[str, str]) -> None:
    tasks = [task for _, values in _axis_values(suite, "task") for task in values]
    names = [task.name for task in tasks]
    for name, root in data_roots.items():
        if name not in names:
            raise SuiteError(f"--data-root {name}={root}: no task named {name!r}; tasks: {', '.join(names) or 'none'}")
        for task in tasks:
            if task.name == name:
                task.data.root = root


def _suites_directory() -> Path:
    """The shipped suites: ``suites/`` of the checkout attnbench runs from, else the copy installed with the
    package (``attnbench/suites``, see pyproject.toml)."""
    checkout = Path(__file__).resolve().parents[2] / "suites"
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files("attnbench") / "suites"))


def shipped_suites() -> dict[str, Path]:
    """Name -> file of every suite shipped with attnbench."""
    return {path.stem: path for path in sorted(_suites_directory().glob("*.yaml"))}


def resolve_suite(name_or_path: str | Path) -> Path:
    """A suite file: the path as given when it exists (or looks like a path), else a shipped suite's name."""
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path
    shipped = shipped_suites()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    raise SuiteError(f"{name_or_path}: no such suite file, and no shipped suite of that name; shipped: "
                     f"{', '.join(shipped) or 'none'}")


MAX_VALUES = 100_000  # values in a suite once its YAML aliases are expanded
MAX_CASES = 10_000  # cases a suite may expand to without --allow-large
MAX_MESSAGE = 300  # characters of a user's value quoted in an error


class _StrictLoader(yaml.SafeLoader):
    """YAML as the safe loader reads it, except that a key given twice in one mapping is an error."""

    def construct_mapping(self, node, deep=False):
        keys = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # <<: *anchor merges; its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if key in keys:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (line {mark.line + 1})", mark)
            keys.add(key)
        return super().construct_mapping(node, deep)


def _bounded(path: Path, data: Any) -> None:
    """Refuse a suite whose aliases expand it beyond ``MAX_VALUES`` values (a 'billion laughs' file), before
    anything walks it as a tree."""
    stack, seen = [data], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise SuiteError(f"{path}: expands to more than {MAX_VALUES:,} values (nested YAML aliases?)")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def shorten(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit:,} more characters)"


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SuiteError(f"{path}: no such suite file") from None
    except IsADirectoryError:
        raise SuiteError(f"{path}: is a directory, not a suite file") from None
    except UnicodeDecodeError as error:
        raise SuiteError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise SuiteError(f"{path}: cannot read: {error.strerror or error}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise SuiteError(f"{path}: invalid YAML{where}: {shorten(problem)}") from None
    _bounded(path, data)
    return data


def _set(raw: dict, dotted: str, value: Any) -> None:
    """``raw[a][b] = value`` for ``dotted`` = "a.b"; an axis set in the grid leaves the zip groups."""
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        if not isinstance(node.get(part, {}), dict):
            raise SuiteError(f"--set {dotted}: {part!r} is not a mapping in this suite")
        node = node.setdefault(part, {})
    node[last] = value
    if parents == ["grid"]:
        for group in raw.get("zip") or []:
            if isinstance(group, dict):
                group.pop(last, None)
        raw["zip"] = [group for group in raw.get("zip") or [] if group]


def _record_whole_suite(suite: Suite) -> None:
    """Before the first narrowing (--only, then --shard): keep every case id of the whole suite for run.json, so
    that parts run with different --only or --shard values merge into one run that lists what no part ran."""
    suite._selection.setdefault("suite_cases", [case.id for case in expand(suite)])


def _only(path: Path, suite: Suite, only: dict[str, list[str]]) -> None:
    """Keep the cases whose field matches one of the given values (name or label for mechanism/model)."""
    def value_of(case: Any, field: str) -> set[str]:
        if field in ("mechanism", "model"):
            return {getattr(case, "mechanism", None) or getattr(case, "model", None), case.label}
        if field in ("shape", "task", "image_size"):
            return {case.column}
        return {str(getattr(case, field, ""))}
    _record_whole_suite(suite)
    cases = expand(suite)
    for field, values in only.items():
        if field not in ("mechanism", "model", "label", "shape", "task", "image_size", "batch", "dtype", "mode"):
            raise SuiteError(f"--only {field}=...: unknown field; use mechanism, model, label, shape, task, "
                             "image_size, batch, dtype or mode")
        kept = [case for case in cases if value_of(case, field) & set(values)]
        if not kept:
            known = sorted({v for case in cases for v in value_of(case, field) if v})
            raise SuiteError(f"{path}: --only {field}={','.join(values)}: no case matches; "
                             f"{field}s: {', '.join(known)}")
        cases = kept
    suite._selection["only"] = {field: list(values) for field, values in only.items()}
    suite._cases = cases


def count_cases(suite: Suite) -> int:
    """How many cases the suite expands to, counted without building them."""
    count = 1
    for values in suite.grid.given().values():
        count *= len(values)
    for group in suite.zip:
        count *= len(next(iter(group.given().values()), [None]))
    return count


def shard(suite: Suite, index: int, count: int, cost: dict[str, float] | None = None,
          plan: dict[str, int] | None = None) -> None:
    """Keep shard ``index`` of ``count`` (0-based) of the suite's cases. Every case lands in exactly one shard.

    With ``plan`` (case id -> shard, the split a sibling shard recorded in its run.json) that split is kept, so
    shards started at different times never overlap, whatever durations their siblings recorded in between.
    Without it the split is made here: balanced by ``cost`` (case key -> seconds from earlier runs) where known,
    else by count; cases are taken longest first (ties by id) and each goes to the shard with the least load.
    The split is recorded as ``shard_plan`` in run.json, for the siblings started later."""
    if not 0 <= index < count:
        raise SuiteError(f"--shard {index}/{count}: expected I/N with 0 <= I < N")
    _record_whole_suite(suite)
    cases = expand(suite)
    if plan is None:
        plan = _balanced_split(cases, count, cost or {})
    elif not is_split_of(plan, [case.id for case in cases], count):
        raise SuiteError(f"--shard {index}/{count}: the recorded split does not cover these cases in {count} shards")
    suite._selection["shard"] = f"{index}/{count}"
    suite._selection["shard_plan"] = dict(plan)
    suite._cases = [case for case in cases if plan[case.id] == index]


def is_split_of(plan: object, case_ids: list[str], count: int) -> bool:
    """Whether ``plan`` (case id -> shard, e.g. read from a run.json) assigns exactly these cases to shards
    0..count-1."""
    return (isinstance(plan, dict) and set(plan) == set(case_ids)
            and all(type(index) is int and 0 <= index < count for index in plan.values()))


def _balanced_split(cases: list[Any], count: int, cost: dict[str, float]) -> dict[str, int]:
    """Case id -> shard: longest first (an unmeasured case costs the median), each to the least loaded shard."""
    known = sorted(cost.values())
    default = known[len(known) // 2] if known else 1.0
    loads, assigned = [0.0] * count, {}
    for case in sorted(cases, key=lambda case: (-cost.get(case.key, default), case.id)):
        target = min(range(count), key=lambda shard_index: (loads[shard_index], shard_index))
        loads[target] += cost.get(case.key, default)
        assigned[case.id] = target
    return assigned


def load_suite(path: str | Path, profile: str | None = None, data_roots: dict[str, str] | None = None,
               overrides: dict[str, Any] | None = None, only: dict[str, list[str]] | None = None,
               allow_large: bool = False, require_data: bool = True) -> Suite:
    """Read, merge the profile, then the ``overrides`` (dotted field -> value, as ``--set`` gives them), set
    ``data_roots`` (task name -> path), validate, and keep the cases that match ``only`` (field -> values): a
    ``SuiteError`` with one line on any problem. ``require_data=False`` (a dry run) accepts tasks whose data root
    is not given or not here."""
    path = Path(path)
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise SuiteError(f"{path}: (top level): a suite is a mapping with at least 'name' and 'grid'")
    try:
        base = Suite.model_validate(raw)
    except ValidationError as error:
        raise _first_error(path, error, Suite) from None
    if profile is not None:
        if profile not in base.profiles:
            known = ", ".join(base.profiles) or "none"
            raise SuiteError(f"{path}: profiles: no profile {profile!r}; profiles: {known}")
        raw = _merge(raw, raw["profiles"][profile] or {})
    if profile is not None or overrides:
        for dotted, value in (overrides or {}).items():
            _set(raw, dotted, value)
        try:
            base = Suite.model_validate(raw)
        except ValidationError as error:
            raise _first_error(path, error, Suite, overridden=set(overrides or {})) from None
    if count_cases(base) > MAX_CASES and not allow_large:
        raise SuiteError(f"{path}: grid: expands to {count_cases(base):,} cases, more than {MAX_CASES:,}; "
                         "narrow it (--only) or pass --allow-large")
    _apply_data_roots(base, data_roots or {})
    _check_semantics(path, base, require_data)
    _check_rules(path, base)  # against the whole suite: a part (--only, --shard) may leave a gated row out
    if only:
        _only(path, base, only)
    _check_distinct(path, base)
    _check_baseline(path, base)
    return base


def _import_modules(path: Path, suite: Suite) -> None:
    for index, module in enumerate(suite.imports):
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise SuiteError(f"{path}: imports[{index}]: cannot import {module!r}: {error}") from None


def _axis_values(suite: Suite, axis: str) -> list[tuple[str, list]]:
    """(field path, values) of every place an axis is given."""
    places = []
    if getattr(suite.grid, axis) is not None:
        places.append((f"grid.{axis}", getattr(suite.grid, axis)))
    for index, group in enumerate(suite.zip):
        if getattr(group, axis) is not None:
            places.append((f"zip[{index}].{axis}", getattr(group, axis)))
    return places


def _check_semantics(path: Path, suite: Suite, require_data: bool = True) -> None:
    _import_modules(path, suite)
    models = bool(_axis_values(suite, "model"))
    tasks = bool(_axis_values(suite, "task"))
    required = (("model", "task") if tasks else ("model", "image_size")) if models else ("mechanism", "shape")
    for axis in AXES:
        places = _axis_values(suite, axis)
        if len(places) > 1:
            raise SuiteError(f"{path}: {places[1][0]}: axis {axis!r} is already given at {places[0][0]}")
        if axis in required and not places:
            raise SuiteError(f"{path}: grid.{axis}: required axis is missing")
        if places and axis in ("mechanism", "shape", "model", "image_size", "task") and axis not in required:
            raise SuiteError(f"{path}: {places[0][0]}: a suite measures mechanisms at shapes, models at image "
                             "sizes, or models trained on tasks; not a mix")
    for index, group in enumerate(suite.zip):
        lengths = {axis: len(values) for axis, values in group.given().items()}
        if len(set(lengths.values())) > 1:
            raise SuiteError(f"{path}: zip[{index}]: tied axes need equal lengths, got {lengths}")
    runtime = [name for name in ("amp", "channels_last", "compile") if getattr(suite, name)]
    if runtime and (tasks or not models):
        raise SuiteError(f"{path}: {runtime[0]}: applies to suites of whole models (model and image_size axes)")
    if tasks:
        _check_tasks(path, suite, require_data)
        return
    if models:
        _check_models(path, suite)
        return
    (shape_path, shapes), = _axis_values(suite, "shape")
    shape_names = [shape.name for shape in shapes]
    (mechanism_path, mechanisms), = _axis_values(suite, "mechanism")
    registered = attentions.available()
    for index, spec in enumerate(mechanisms):
        where = f"{path}: {mechanism_path}[{index}]"
        if spec.name not in registered:
            raise SuiteError(f"{where}.name: unknown attention {spec.name!r}; registered: {', '.join(registered)}")
        valid = attentions.options(spec.name)
        for key, options in [("options", spec.options), *(
                (f"options_by_shape.{name}", extra) for name, extra in spec.options_by_shape.items())]:
            unknown = sorted(set(options) - set(valid))
            if unknown:
                raise SuiteError(f"{where}.{key}: unknown option(s) {', '.join(unknown)} for attention "
                                 f"{spec.name!r}; valid options: {', '.join(valid)}")
            for option, value in options.items():
                _check_option_type(f"{where}.{key}.{option}", spec.name, option, value)
        for name in spec.options_by_shape:
            if name not in shape_names:
                raise SuiteError(f"{where}.options_by_shape: no shape named {name!r}; shapes: {', '.join(shape_names)}")
        for shape in shapes:
            options = {**spec.options, **spec.options_by_shape.get(shape.name, {})}
            try:
                with torch.device("meta"):
                    module = attentions.create(spec.name, dim=shape.dim, num_heads=shape.heads, **options)
                module.macs(shape.height, shape.width)
            except (ValueError, TypeError) as error:
                raise SuiteError(f"{where}: at shape {shape.name} ({shape.height}x{shape.width}, dim {shape.dim}, "
                                 f"heads {shape.heads}): {error}") from None


def _check_option_type(where: str, mechanism: str, option: str, value: Any) -> None:
    """An option the mechanism annotates as a plain int, float, bool or str takes a value of that kind
    (``n_win: two`` is refused here, with the option's name, not deep inside the mechanism)."""
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    try:
        expected = typing.get_type_hints(attentions.get(mechanism).__init__).get(option)
    except Exception:  # an annotation that cannot be resolved is not ours to check
        return
    if expected not in kinds:
        return
    fits = isinstance(value, expected) and (expected is bool or not isinstance(value, bool))
    fits = fits or (expected is float and isinstance(value, int) and not isinstance(value, bool))
    if not fits:
        raise SuiteError(f"{where}: {mechanism}'s {option} is {kinds[expected]}, got {shorten(repr(value))}")


def data_root_problem(task) -> str | None:
    """Why ``task``'s data root cannot be read (no root given, or not a directory), or None."""
    if task.data.root is None:
        return f"no data root; give it in the suite or with --data-root {task.name}=PATH"
    if task.data.generate is None and not Path(task.data.root).is_dir():
        layout = ("ADEChallengeData2016 with images/ and annotations/" if task.data.dataset == "ade20k"
                  else "an ImageFolder root with train/<class>/ and val/<class>/")
        return f"{task.data.root} is not a directory (expected {layout})"
    return None


def _check_tasks(path: Path, suite: Suite, require_data: bool = True) -> None:
    from ..data import GENERATORS

    if "accuracy" not in suite.measures:
        raise SuiteError(f"{path}: measures: a suite of tasks needs 'accuracy' among its measures")
    if "memory" in suite.measures:
        raise SuiteError(f"{path}: measures: 'memory' is measured by speed suites, not by accuracy suites")
    (task_path, tasks), = _axis_values(suite, "task")
    (model_path, models), = _axis_values(suite, "model")
    for index, model in enumerate(models):
        for task in tasks:
            try:
                check_recipe_keys(model.recipe, task.task, "recipe")
            except ValueError as error:
                raise SuiteError(f"{path}: {model_path}[{index}].{error}") from None
    for index, task in enumerate(tasks):
        where = f"{path}: {task_path}[{index}]"
        problem = data_root_problem(task)
        if problem and require_data:
            raise SuiteError(f"{where}.data.root: {problem}")
        if task.data.generate is not None:
            generator = GENERATORS[task.data.dataset]
            allowed = [name for name in inspect.signature(generator).parameters if name not in ("root", "seed")]
            unknown = sorted(set(task.data.generate) - set(allowed))
            if unknown:
                raise SuiteError(f"{where}.data.generate: unknown key(s) {', '.join(unknown)}; "
                                 f"allowed: {', '.join(allowed)}")
    _check_models(path, suite, paper_tables=("attention_ablation", "models"))


def _check_models(path: Path, suite: Suite, paper_tables: tuple[str, ...] = ("models",)) -> None:
    import timm

    from .. import models  # noqa: F401  (registers BiFormer's models with timm)
    from ..paper import paper_figures

    (model_path, specs), = _axis_values(suite, "model")
    for index, spec in enumerate(specs):
        where = f"{path}: {model_path}[{index}]"
        if not timm.is_model(spec.name):
            raise SuiteError(f"{where}.name: unknown model {spec.name!r}; attnbench's: biformer_tiny, biformer_small, "
                             "biformer_base, biformer_stl*, or any timm model name")
        rows = [row for table in paper_tables for row in paper_figures()[table]]
        if spec.paper is not None and spec.paper not in rows:
            raise SuiteError(f"{where}.paper: no paper row {spec.paper!r}; rows: {', '.join(rows)}")
        try:
            with torch.device("meta"):  # builds the architecture without allocating its weights
                timm.create_model(spec.name, **spec.options)
        except (ValueError, TypeError) as error:
            raise SuiteError(f"{where}.options: {error}") from None
        except (NotImplementedError, RuntimeError):
            pass  # a model that cannot be built on the meta device is checked when its case runs


def _check_distinct(path: Path, suite: Suite) -> None:
    """Two cases may neither measure the same thing (same id) nor land in the same report cell (same label,
    column and table); two shapes may not share a name."""
    for axis in ("shape", "task"):
        for where, values in _axis_values(suite, axis):
            names = [value.name for value in values]
            repeated = sorted({name for name in names if names.count(name) > 1})
            if repeated:
                raise SuiteError(f"{path}: {where}: {axis}s share the name {repeated[0]!r}; give each a distinct name")
    by_id: dict[str, Any] = {}
    by_cell: dict[tuple, Any] = {}
    for case in expand(suite):
        if case.id in by_id:
            first = by_id[case.id]
            raise SuiteError(f"{path}: grid: cases '{first.label} @ {first.column}' and '{case.label} @ {case.column}' "
                             "measure the same thing (same mechanism, options, shape, batch, dtype and mode)")
        cell = (case.kind, case.label, case.column, case.group, case.seed)
        if cell in by_cell:
            raise SuiteError(f"{path}: grid: two cases would share the report cell '{case.label} @ {case.column}' "
                             f"(options {_options_text(by_cell[cell])} and {_options_text(case)}); give them distinct "
                             "labels")
        by_id[case.id] = by_cell[cell] = case


def _options_text(case: Any) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in sorted(case.options.items())) or "none"


def _check_rules(path: Path, suite: Suite) -> None:
    """Every row a gate or a hypothesis names is a row of the suite, and its metric one that a task of the suite
    scores (a misspelt metric would otherwise be judged "not measured" after hours of training)."""
    labels = list(dict.fromkeys(case.label for case in expand(suite)))
    named = [(f"gates[{index}].label", gate.label) for index, gate in enumerate(suite.gates)]
    named += [(f"hypotheses[{index}].{side}", getattr(hypothesis, side))
              for index, hypothesis in enumerate(suite.hypotheses) for side in ("higher", "lower")]
    for field, label in named:
        if label not in labels:
            raise SuiteError(f"{path}: {field}: no row labelled {label!r}; labels: {', '.join(labels)}")
    metrics = _scored_metrics(suite)
    for kind, rules in (("gates", suite.gates), ("hypotheses", suite.hypotheses)):
        if rules and metrics is None:
            raise SuiteError(f"{path}: {kind}: gates and hypotheses judge accuracy, and this suite trains nothing "
                             "(no task axis)")
        for index, rule in enumerate(rules):
            if rule.metric not in metrics:
                raise SuiteError(f"{path}: {kind}[{index}].metric: {rule.metric!r} is not scored by every task of "
                                 f"this suite (each task's table is judged by every rule); metrics: "
                                 f"{', '.join(metrics) or 'none in common'}")
    chanceless = not all(task.task == "classification" for task in suite_tasks(suite))
    for index, gate in enumerate(suite.gates):
        if gate.within_chance is not None and chanceless:
            raise SuiteError(f"{path}: gates[{index}].within_chance: a segmentation task has no chance level; "
                             "use at_least")


def suite_tasks(suite: Suite) -> list[Any]:
    """Every task of the suite's grid and zip groups."""
    return [task for axes in (suite.grid, *suite.zip) for task in axes.task or []]


def _scored_metrics(suite: Suite) -> list[str] | None:
    """The metrics every task of the suite records (None: the suite has no task): top1 (classification), miou
    (segmentation), and the distance bins of the colour-pointer task (attnbench/train/per_distance.py)."""
    from ..train.per_distance import BINS

    common: list[str] | None = None
    for task in suite_tasks(suite):
        scored = ["top1", *BINS] if task.data.dataset == "colour_pointer" else [
            "top1" if task.task == "classification" else "miou"]
        common = scored if common is None else [metric for metric in common if metric in scored]
    return common


def _check_baseline(path: Path, suite: Suite) -> None:
    labels = list(dict.fromkeys(case.label for case in expand(suite)))
    if suite.baseline is not None and suite.baseline not in labels:
        raise SuiteError(f"{path}: baseline: no row labelled {suite.baseline!r}; labels: {', '.join(labels)}")


