"""Command line: ``python -m attnbench list | suites | run | train | report | compare | data | env``.

Exit codes: 0 done, 2 bad input (suite file, profile, run directory), 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import signal
import sys
from pathlib import Path

import yaml

import attentions

from .data.errors import DataError
from .kernel_bound import STAGE_TOPK as BOUND_STAGE_TOPK
from .records import RecordStore
from .suite import Suite, SuiteError, expand, load_suite, resolve_suite, shard, shipped_suites
from .suite.load import data_root_problem, is_split_of, suite_tasks
from .versus_official import MODELS as OFFICIAL_MODELS
from .versus_official import STAGE_TOPK as OFFICIAL_STAGE_TOPK


def _list(args: argparse.Namespace) -> int:
    descriptions = attentions.available()
    width = max(map(len, descriptions), default=0)
    for name, description in descriptions.items():
        print(f"{name:<{width}}  {description}")
        if args.options:
            for option, default in attentions.options(name).items():
                print(f"{'':<{width}}    {option} = {default!r}")
    return 0


def _data_roots(pairs: list[str]) -> dict[str, str]:
    roots = {}
    for pair in pairs:
        name, separator, root = pair.partition("=")
        if not separator or not name or not root:
            raise SuiteError(f"--data-root {pair}: expected TASK=PATH, e.g. --data-root imagenet=/data/imagenet")
        roots[name] = root
    return roots


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    """--set KEY=VALUE pairs and the shorthand options, as dotted suite fields."""
    overrides = {f"{key}": value for key, value in _option_values(args.set, flag="--set").items()}
    for axis in ("batch", "dtype", "mode"):
        values = getattr(args, axis)
        if values:
            overrides[f"grid.{axis}"] = [yaml.safe_load(value) for value in values.split(",")]
    if args.device:
        overrides["device"] = args.device
    for flag in ("amp", "channels_last", "compile"):
        if getattr(args, flag):
            overrides[flag] = True
    return overrides


def _only_filter(pairs: list[str]) -> dict[str, list[str]]:
    only: dict[str, list[str]] = {}
    for pair in pairs:
        field, separator, values = pair.partition("=")
        if not separator or not field or not values:
            raise SuiteError(f"--only {pair}: expected FIELD=VALUE[,VALUE...], e.g. --only mechanism=bra,swin")
        only.setdefault(field, []).extend(value for value in values.split(",") if value)
    return only


def _earlier_durations(results_dir: Path, suite_name: str, before: str | None = None) -> dict[str, float]:
    """Seconds each case took in earlier runs of this suite (by case key: what it measures), where recorded;
    with ``before`` (an ISO time), only records finished before it."""
    seconds: dict[str, float] = {}
    for records in sorted((results_dir / suite_name).glob("*/records.jsonl")):
        for record in RecordStore(records).latest():
            duration = record.worker.get("duration_s")
            if duration is not None and (before is None or (record.finished or before) < before):
                seconds[record.case.key] = duration
    return seconds


def _shard_split(results_dir: Path, suite: Suite, run_name: str | None,
                 count: int) -> tuple[dict[str, int] | None, dict[str, float]]:
    """What ``--shard I/count`` splits the suite's cases by, as (recorded split, durations).

    A shard run records its split in run.json (``shard_plan``); a shard of the same cases into ``count`` parts takes
    this run's own split when it is resumed, else the earliest-created sibling's. Where no sibling recorded one (a
    first shard, or siblings from before splits were recorded) the split balances the durations of earlier runs
    finished before the first sibling started (a first shard: all of them). Either way shards started at different
    times agree: durations that a sibling recorded since never move a case between shards (which made two shards run
    the same case and none run another)."""
    case_ids = [case.id for case in expand(suite)]
    info = suite.run_info()
    whole, only = info.get("suite_cases", case_ids), info.get("only")
    recorded, started = [], []
    for run_json in (results_dir / suite.name).glob("*/run.json"):
        try:
            run = json.loads(run_json.read_text())
        except (OSError, ValueError):
            continue  # a damaged run.json is reported when its own run is resumed
        if not isinstance(run, dict) or not str(run.get("shard", "")).endswith(f"/{count}"):
            continue
        plan = run.get("shard_plan")
        if is_split_of(plan, case_ids, count):
            recorded.append((run_json.parent.name != run_name, str(run.get("created", "")), run_json.parent.name, plan))
        elif plan is None and run.get("suite_cases") == whole and run.get("only") == only and run.get("created"):
            started.append(str(run["created"]))  # a sibling shard from before splits were recorded
    if recorded:
        return min(recorded, key=lambda entry: entry[:3])[3], {}
    return None, _earlier_durations(results_dir, suite.name, before=min(started) if started else None)


def _estimate(results_dir: Path, suite_name: str, cases: list) -> str:
    """How long the cases took in earlier runs of this suite, where known."""
    seconds = _earlier_durations(results_dir, suite_name)
    known = [seconds[case.key] for case in cases if case.key in seconds]
    if not known:
        return "no earlier run of these cases to estimate the time from"
    unknown = len(cases) - len(known)
    return (f"about {sum(known) / 60:.1f} min for the {len(known)} cases measured before"
            + (f" (+ {unknown} never measured)" if unknown else "")
            + f", from earlier runs in {results_dir / suite_name}")


def _slurm_options(args: argparse.Namespace, suite):
    """The suite's ``slurm:`` options with the command line's ``--slurm KEY=VALUE`` over them."""
    from .executors import SlurmOptions

    fields = {**suite.slurm, **_option_values(getattr(args, "slurm", None) or [], flag="--slurm")}
    try:
        return SlurmOptions(**fields)
    except TypeError as error:
        raise SuiteError(f"slurm options: {error}; allowed: {', '.join(SlurmOptions.__dataclass_fields__)}") from None


def _print_official_recipes(args: argparse.Namespace, suite, cases: list) -> None:
    """For accuracy cases whose task names an ``official`` recipe: each setting beside the official value and
    its source, the deviations, and the estimated GPU-hours of the training (attnbench/train/official.py)."""
    from .train.official import OFFICIAL_RECIPES, describe, gpu_hours

    official = [case for case in cases if case.kind == "accuracy" and case.task.get("official")]
    if not official:
        return
    options = _slurm_options(args, suite)
    processes = options.nodes * (options.tasks_per_node or max(options.gpus_per_node, 1))
    print(f"official recipes (processes = {processes}: slurm nodes × tasks per node; with torchrun, pass the same "
          "counts with --slurm nodes=N --slurm gpus_per_node=G for this check):")
    total = 0.0
    for case in official:
        recipe = OFFICIAL_RECIPES[case.task["official"]]
        print(f"{case.id}  {case.describe()}")
        for line in describe(recipe, case.task, case.model, dict(case.options), processes):
            print(line)
        hours, how = gpu_hours(case, recipe, processes, args.assume_tflops)
        total += hours
        print(f"    estimated: {hours:,.0f} GPU-hours ({how})")
    print(f"estimated GPU-hours in all: {total:,.0f} (an estimate from counted FLOPs and an assumed sustained rate, "
          "not a measurement: --assume-tflops sets the rate, e.g. from your speed suite's training throughput)")


def _executor(args: argparse.Namespace, suite, run_dir: Path):
    """None for the local spawn-per-case runner; else a submitit executor with the suite's and the command
    line's Slurm options (jobs' logs under RUN_DIR/jobs/)."""
    if getattr(args, "executor", "local") == "local":
        return None
    if args.executor == "warm":
        from .runner import WarmWorkerExecutor

        return WarmWorkerExecutor(run_dir / ".scratch" / "warm")
    from .executors import SubmititExecutor

    options = _slurm_options(args, suite)
    cluster = "local" if args.executor == "submitit-local" else "slurm"
    try:
        return SubmititExecutor(run_dir / "jobs", cluster, options)
    except RuntimeError as error:  # no submitit, or no Slurm here
        raise SuiteError(f"--executor {args.executor}: {error}") from None


def _results_dir(path: str) -> Path:
    """``--results-dir``: a folder, or a path where one can be made; a SuiteError with one line otherwise."""
    results = Path(path)
    if results.exists() and not results.is_dir():
        raise SuiteError(f"--results-dir {path}: not a directory")
    return results


def _shown_path(path: Path) -> str:
    """A path as a record shows it: relative to the working directory when it lies inside it (a shipped suite
    resolves to an absolute path, which would name this machine's checkout), else as given."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def _resume_command(args: argparse.Namespace, run_name: str, in_process: bool) -> str:
    """The command that resumes this run: the one given, with ``--run NAME`` when it had none."""
    if in_process and "WORLD_SIZE" in os.environ:
        return f"the same torchrun command (with --run-name {run_name})"
    argv = list(getattr(args, "argv", sys.argv[1:]))
    if args.run is None:
        argv += ["--run", run_name]
    return shlex.join(["python", "-m", "attnbench", *argv])


@contextlib.contextmanager
def _signals_as_interrupts():
    """SIGTERM and SIGHUP stop a run as Ctrl-C does (the case in progress is stopped, the report rendered);
    yields a list that receives the signal number that stopped it."""
    received: list[int] = []

    def interrupt(signum: int, frame: object) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = {number: signal.signal(number, interrupt) for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _stopped_run(run_dir: Path, line: str, code: int) -> int:
    """Render the report of what was measured (if there is anything to render) and say ``line``."""
    from .report import build_report

    try:
        report = f"; report: {build_report(run_dir)}" if (run_dir / "run.json").exists() else ""
    except Exception as error:  # a full disk: the records are what matters
        report = f"; the report could not be written ({type(error).__name__}: {error})"
    print(f"{line}{report}", file=sys.stderr)
    return code


def _run(args: argparse.Namespace, in_process: bool = False) -> int:
    from .report import build_report
    from .runner import RunStopped, path_component, run_suite

    args.suite = resolve_suite(args.suite)
    suite = load_suite(args.suite, args.profile, _data_roots(args.data_root), _overrides(args),
                       _only_filter(args.only), args.allow_large, require_data=not args.dry_run)
    if args.shard:
        index, separator, count = args.shard.partition("/")
        if not (separator and index.isdigit() and count.isdigit() and int(count) > 0):
            raise SuiteError(f"--shard {args.shard}: expected I/N, e.g. --shard 0/4")
        plan, costs = _shard_split(Path(args.results_dir), suite, args.run, int(count))
        shard(suite, int(index), int(count), costs, plan)
    cases = expand(suite)
    if args.dry_run:
        for case in cases:
            print(f"{case.id}  {case.describe()}")
        print(f"{len(cases)} cases of suite {suite.name!r} ({args.suite}), profile {args.profile or '(none)'}; "
              f"{_estimate(Path(args.results_dir), suite.name, cases)}")
        for task in suite_tasks(suite):
            problem = data_root_problem(task)
            if problem:
                print(f"note: task {task.name}: {problem} (needed to run, not for this dry run)")
        _print_official_recipes(args, suite, cases)
        return 0
    run_name = args.run if args.run is not None else datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path_component(run_name, "--run")
    results_dir = _results_dir(args.results_dir)
    command = " ".join(["python -m attnbench", *sys.argv[1:]])
    run_dir = results_dir / path_component(suite.name, "suite name") / run_name
    resume = _resume_command(args, run_name, in_process)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if main_rank:
        print(f"run directory: {run_dir} (to resume: {resume})", flush=True)
    try:
        with _signals_as_interrupts() as received:
            summary = run_suite(suite, _shown_path(args.suite), results_dir, run_name, args.profile, command,
                                in_process, args.retry_failed, args.allow_mixed, _executor(args, suite, run_dir),
                                getattr(args, "retry_flagged", False))
    except KeyboardInterrupt:
        number = received[0] if received else signal.SIGINT
        line = (f"interrupted by {signal.Signals(number).name}: the case in progress was stopped and not recorded; "
                f"{run_dir} keeps what was measured; resume with: {resume}")
        return _stopped_run(run_dir, line, 128 + number) if main_rank else 128 + number
    except RunStopped as error:
        return _stopped_run(run_dir, f"error: {error}", 1) if main_rank else 1
    if not main_rank:
        return 0
    try:
        report = build_report(summary.run_dir)
    except OSError as error:
        print(f"error: {summary.run_dir}: the report could not be written ({error.strerror or error}); the records "
              f"are intact: free some space and run python -m attnbench report {summary.run_dir}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{count} {status}" for status, count in summary.statuses.items()) or "nothing new"
    print(f"{summary.total} cases ({summary.skipped} already recorded; {counts}) in {summary.seconds:.0f} s")
    print(f"records: {summary.run_dir / 'records.jsonl'}")
    print(f"report:  {report}")
    failed = [r for r in RecordStore(summary.run_dir / "records.jsonl").latest() if r.status.failed]
    if failed and not args.allow_failures:
        print(f"{len(failed)} case(s) failed ({', '.join(sorted({r.status.value for r in failed}))}): exit 1 "
              "(--allow-failures to exit 0; --retry-failed to run them again)", file=sys.stderr)
        return 1
    return 0


def _train(args: argparse.Namespace) -> int:
    if args.run is None and "WORLD_SIZE" in os.environ:
        raise SuiteError("train: under torchrun every rank must write to the same run; give --run-name NAME")
    return _run(args, in_process=True)


def _option_values(pairs: list[str], flag: str = "--option") -> dict[str, object]:
    """``KEY=VALUE`` pairs with each value read as YAML reads it (numbers, booleans, lists, strings)."""
    options = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key or not value.strip():
            raise SuiteError(f"{flag} {pair}: expected KEY=VALUE, e.g. {flag} "
                             f"{'train_per_class=64' if flag == '--option' else 'repeats.max_time_s=1'}")
        try:
            options[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise SuiteError(f"{flag} {pair}: the value is not valid YAML") from None
    return options


def _generate(args: argparse.Namespace) -> int:
    from .data import GENERATORS

    options = _option_values(args.option)
    try:
        root = GENERATORS[args.dataset](args.root, seed=args.seed, **options)
    except TypeError as error:
        raise SuiteError(f"data generate {args.dataset}: {error}") from None
    print(root)
    return 0


def _run_directory(path: str) -> Path:
    run_dir = Path(path)
    if not (run_dir / "run.json").is_file():
        raise SuiteError(f"{run_dir}: not a run directory (no run.json); expected <results-dir>/<suite>/<run>")
    return run_dir


def _report(args: argparse.Namespace) -> int:
    from .report import build_report, export

    run_dir = _run_directory(args.run_dir)
    print(build_report(run_dir) if args.format == "markdown" else export(run_dir, args.format))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .compare import compare, render

    run_a, run_b = _run_directory(args.run_a), _run_directory(args.run_b)
    threshold = None
    if args.fail_above is not None:
        try:
            threshold = float(args.fail_above.rstrip("%")) / (100 if args.fail_above.endswith("%") else 1)
        except ValueError:
            raise SuiteError(f"--fail-above {args.fail_above}: expected a fraction or a percentage, e.g. 10%") from None
    comparison = compare(run_a, run_b, threshold)
    text = render(comparison, run_a, run_b, threshold)
    if args.output:
        Path(args.output).write_text(text)
        print(args.output)
    else:
        print(text, end="")
    return 1 if comparison.regressions else 0


def _merge(args: argparse.Namespace) -> int:
    from .merge import merge_runs
    from .report import build_report

    summary = merge_runs([_run_directory(path) for path in args.run_dirs], Path(args.into), args.allow_mixed)
    for line in summary.notes:
        print(line)
    print(f"merged {summary.records} records from {len(args.run_dirs)} runs into {args.into}")
    print(f"report:  {build_report(Path(args.into))}")
    return 0


def _suites(args: argparse.Namespace) -> int:
    for name, path in shipped_suites().items():
        description = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        print(f"{name:<18} {' '.join(str(description).split())[:100]}")
    return 0


def _versus_official(args: argparse.Namespace) -> int:
    import torch

    from . import versus_official
    from .suite import resolve_device

    root = Path(args.official_root)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or Path("results/versus_official") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    command = "python -m attnbench " + shlex.join(args.argv)
    try:
        versus_official.official_module(root, "ops.bra_legacy")
        versus_official.run(root, out, args.layers, args.models, args.batch, args.mode, args.model_mode,
                            torch.device(resolve_device(args.device)), args.rounds, args.warmup, command)
    except versus_official.OfficialCodeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except versus_official.NotTheSameFunction as error:
        print(f"error: not the same function, nothing timed: {error}", file=sys.stderr)
        return 1
    print(f"report:  {out / 'report.md'}")
    return 0


def _kernel_bound(args: argparse.Namespace) -> int:
    import torch

    from . import kernel_bound

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or Path("results/kernel_bound") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    try:
        kernel_bound.run(out, args.stages, args.batch, "python -m attnbench " + shlex.join(args.argv))
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"report:  {out / 'report.md'}")
    return 0


def _env(args: argparse.Namespace) -> int:
    from .env import environment
    from .suite import resolve_device

    print(json.dumps(environment(resolve_device("auto")), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m attnbench",
                                     description="Benchmark and reproduction suite for sparse vision attention.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    list_parser = commands.add_parser(
        "list", help="list the registered attention mechanisms",
        description="List the registered attention mechanisms (built-in and plug-ins of the "
                    "'attnbench.attentions' entry-point group).")
    list_parser.add_argument("--options", action="store_true", help="also print each mechanism's options")
    list_parser.set_defaults(handler=_list)

    run = commands.add_parser(
        "run", help="run a suite and write its records and report",
        description="Run every case of SUITE, each in its own process, appending one record per case to "
                    "RESULTS_DIR/<suite>/<run>/records.jsonl, then write report.md beside it. Running again "
                    "with the same --run resumes: recorded cases are skipped.")
    run.add_argument("suite", help="a suite YAML file (suites/speed.yaml) or a shipped suite's name (speed); "
                                   "'attnbench suites' lists them")
    run.add_argument("--profile", help="a named profile of the suite (e.g. quick, full)")
    run.add_argument("--results-dir", default="results", help="where runs are stored (default: results)")
    run.add_argument("--run", "--run-name", dest="run",
                     help="run name (default: a timestamp); reuse one to resume it (--run-name under torchrun)")
    run.add_argument("--dry-run", action="store_true",
                     help="list the cases without running them (and, for tasks that follow an official recipe, "
                          "each setting against it and the estimated GPU-hours)")
    run.add_argument("--assume-tflops", type=float, default=20.0, metavar="TFLOPS",
                     help="sustained TFLOP/s per GPU for the dry run's GPU-hour estimate (default 20: a conservative "
                          "end-to-end rate for one A100, about 6%% of its bfloat16 peak: BRA's gathers and the data "
                          "pipeline keep training far below peak; set it from your own measured training throughput)")
    run.add_argument("--only", action="append", default=[], metavar="FIELD=V1,V2",
                     help="keep the cases whose FIELD (mechanism, model, label, shape, task, batch, dtype, mode) is "
                          "one of the values, e.g. --only mechanism=bra,swin (repeatable)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override any suite field, validated like the file: --set repeats.max_time_s=1, "
                          "--set timeout_s=60, --set grid.batch=[4,8] (repeatable)")
    run.add_argument("--batch", help="batch sizes, comma-separated (replaces the suite's)")
    run.add_argument("--dtype", help="dtypes, comma-separated: float32, float64, bfloat16, float16")
    run.add_argument("--mode", help="modes, comma-separated: forward, forward_backward")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="device (replaces the suite's)")
    run.add_argument("--amp", action="store_true", help="model suites: autocast (bfloat16 on CPU, float16 on CUDA)")
    run.add_argument("--channels-last", action="store_true", help="model suites: channels-last tensors")
    run.add_argument("--compile", action="store_true", help="model suites: torch.compile the model")
    run.add_argument("--allow-large", action="store_true", help="allow a suite of more than 10,000 cases")
    run.add_argument("--shard", metavar="I/N",
                     help="run shard I of N (0-based): a deterministic share of the cases, balanced by their time in "
                          "earlier runs; every shard records the split in its run.json and a shard started later "
                          "takes its first sibling's; give each shard its own --run and join them with "
                          "'attnbench merge'")
    run.add_argument("--executor", choices=["local", "warm", "slurm", "submitit-local"], default="local",
                     help="local: a process per case (default); warm: one long-lived process runs the cases one "
                          "after another (imports and the CUDA context paid once: for short GPU cases); slurm: a "
                          "submitit job per case on a Slurm cluster; submitit-local: the same job path on this "
                          "machine (submitit's LocalExecutor)")
    run.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                     help="a Slurm option over the suite's slurm: mapping, e.g. --slurm partition=gpu --slurm "
                          "gpus_per_node=8 --slurm time_min=4320")
    run.add_argument("--retry-flagged", action="store_true",
                     help="when resuming, run the cases whose last record's timing is flagged (⚠: wide spread, no "
                          "convergence, the load changing or the machine busy, a roofline above 100%%) again; the "
                          "new record supersedes the old, and is flagged again if it deserves it")
    run.add_argument("--retry-failed", action="store_true",
                     help="when resuming, run the cases whose last record is a failure again")
    run.add_argument("--allow-failures", action="store_true",
                     help="exit 0 even when cases ended in error, oom, timeout, nan or mismatch")
    run.add_argument("--allow-mixed", action="store_true",
                     help="resume even if the suite's cases or the environment changed (each record keeps its own "
                          "environment stamp)")
    run.add_argument("--data-root", action="append", default=[], metavar="TASK=PATH",
                     help="data root of an accuracy suite's task (repeatable), e.g. imagenet=/data/imagenet")
    run.set_defaults(handler=_run)

    train = commands.add_parser(
        "train", help="run an accuracy suite in this process (for torchrun: DDP over its processes)",
        description="Like 'run', but every case trains in this process, so that 'torchrun --nproc_per_node N "
                    "-m attnbench train SUITE --run-name NAME' trains each case with DistributedDataParallel over N "
                    "processes; rank 0 writes the records and the report.")
    for action in run._actions[1:]:
        train._add_action(action)
    train.set_defaults(handler=_train)

    data = commands.add_parser("data", help="write a generated data set in the ImageNet or ADE20K layout")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    generate = data_commands.add_parser(
        "generate", help="write a small generated data set (real JPEG/PNG files) at ROOT",
        description="Write a generated data set at ROOT in the layout its loader reads: imagenet (ImageFolder), "
                    "relation_proxy (ImageFolder; the ablation's old CPU proxy), colour_pointer (ImageFolder and a "
                    "per-image distance index; suites/ablation_proxy.yaml) or ade20k (ADEChallengeData2016).")
    generate.add_argument("dataset", choices=["imagenet", "relation_proxy", "colour_pointer", "ade20k"])
    generate.add_argument("root", help="where to write it")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                          help="a generator argument, e.g. train_per_class=64 (see attnbench/data/generate.py)")
    generate.set_defaults(handler=_generate)

    report = commands.add_parser("report", help="(re)build report.md (or records.csv / records.json) of a run",
                                 description="Render RUN_DIR/report.md and RUN_DIR/plots/ from RUN_DIR/records.jsonl, "
                                             "or write the report's frame as RUN_DIR/records.csv or records.json.")
    report.add_argument("run_dir", help="a run directory, RESULTS_DIR/<suite>/<run>")
    report.add_argument("--format", choices=["markdown", "csv", "json"], default="markdown")
    report.set_defaults(handler=_report)

    comparison = commands.add_parser(
        "compare", help="compare two runs case by case (ratios B ÷ A, noise-aware)",
        description="Match the cases of RUN_A and RUN_B by what they measure and print a markdown table of ratios "
                    "B ÷ A (latency, throughput, memory, FLOPs, accuracy), 'same' within the runs' own noise, the "
                    "geometric mean per mechanism, and the cases found in one run only.")
    comparison.add_argument("run_a", help="the reference run directory")
    comparison.add_argument("run_b", help="the run compared with it")
    comparison.add_argument("--fail-above", metavar="PCT",
                            help="exit 1 when a matched case is slower than A by more than this and beyond noise")
    comparison.add_argument("--output", help="write the markdown here instead of printing it")
    comparison.set_defaults(handler=_compare)

    merging = commands.add_parser(
        "merge", help="merge the run directories of a suite's shards into one run",
        description="Merge RUN_DIR... (shards of one suite, from one or several machines) into OUT: one record per "
                    "case (the newest), each keeping its own environment stamp; refuses runs of different suites, "
                    "profiles or environments unless --allow-mixed; reports duplicate and missing cases.")
    merging.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    merging.add_argument("--into", required=True, metavar="OUT", help="the merged run directory (created)")
    merging.add_argument("--allow-mixed", action="store_true",
                         help="merge runs measured in different environments (the report says so)")
    merging.set_defaults(handler=_merge)

    suites = commands.add_parser("suites", help="list the suites shipped with attnbench (run them by name)")
    suites.set_defaults(handler=_suites)

    versus = commands.add_parser(
        "versus-official", help="time our BRA and BiFormer models against the official code, in one process (float32)",
        description="Import the official BiFormer code from OFFICIAL_ROOT (a checkout of rayleizhu/BiFormer; needs "
                    "einops, and fairscale for the models), check that ours computes the same function with the same "
                    "weights, then time both interleaved in one process; rows.jsonl and report.md in --out.")
    versus.add_argument("official_root",
                        help="a checkout of rayleizhu/BiFormer (ops/bra_legacy.py, models/biformer.py)")
    versus.add_argument("--out", help="output directory (default results/versus_official/<timestamp>); a rerun into "
                                      "it skips the rows already measured")
    versus.add_argument("--layers", nargs="*", default=list(OFFICIAL_STAGE_TOPK), choices=list(OFFICIAL_STAGE_TOPK),
                        metavar="STAGE", help="BiFormer-T's BRA stages to compare (default: 1-3; its stage 4 is dense "
                                              "attention with LePE, compared within the models)")
    versus.add_argument("--models", nargs="*", default=list(OFFICIAL_MODELS), choices=OFFICIAL_MODELS,
                        help="official models to compare (default: both)")
    versus.add_argument("--batch", nargs="+", type=int, default=[32, 64])
    versus.add_argument("--mode", nargs="+", choices=["forward", "forward_backward"],
                        default=["forward", "forward_backward"], help="for the layers")
    versus.add_argument("--model-mode", nargs="+", choices=["forward", "train_step"],
                        default=["forward", "train_step"], help="for the models (train_step: forward, "
                                                                 "cross-entropy, backward, AdamW)")
    versus.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    versus.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    versus.add_argument("--rounds", type=int, default=15, help="timed rounds, each calling both sides once (>= 4)")
    versus.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    versus.set_defaults(handler=_versus_official)

    bound = commands.add_parser(
        "kernel-bound", help="time BRA's ATen kernels alone (CPU): how near the GEMM rate a BRA made of them can get",
        description="Time each ATen kernel that does BRA's useful work alone, at one thread, at BiFormer-T's "
                    "stage shapes; report the FLOP rate a BRA made only of them would reach (the kernel bound) "
                    "over the GEMM rate, beside our BRA's measured rate, in one process "
                    "(attnbench/kernel_bound.py).")
    bound.add_argument("--out", help="output directory, new or empty (default results/kernel_bound/<timestamp>)")
    bound.add_argument("--stages", nargs="+", default=list(BOUND_STAGE_TOPK), choices=list(BOUND_STAGE_TOPK))
    bound.add_argument("--batch", nargs="+", type=int, default=[32, 64], help="batches to time our BRA at")
    bound.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    bound.set_defaults(handler=_kernel_bound)

    env = commands.add_parser("env", help="print the environment that records are stamped with")
    env.set_defaults(handler=_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the command that resumes a run
    try:
        return args.handler(args)
    except (SuiteError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (``attnbench list | head``): stop quietly, as cat does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
