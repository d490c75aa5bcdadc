"""Command line: ``python -m attnbench list | run | train | report | data | env``.

Exit codes: 0 done, 2 bad input (suite file, profile, run directory), 1 anything else.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import yaml

import attentions

from .data.errors import DataError
from .records import RecordStore
from .suite import SuiteError, expand, load_suite


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


def _run(args: argparse.Namespace, in_process: bool = False) -> int:
    from .report import build_report
    from .runner import run_suite

    suite = load_suite(args.suite, args.profile, _data_roots(args.data_root))
    cases = expand(suite)
    if args.dry_run:
        for case in cases:
            print(f"{case.id}  {case.describe()}")
        print(f"{len(cases)} cases")
        return 0
    run_name = args.run or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    command = " ".join(["python -m attnbench", *sys.argv[1:]])
    summary = run_suite(suite, str(args.suite), Path(args.results_dir), run_name, args.profile, command, in_process,
                        args.retry_failed)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    report = build_report(summary.run_dir)
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


def _option_values(pairs: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` pairs with each value read as YAML reads it (numbers, booleans, lists, strings)."""
    options = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key or not value.strip():
            raise SuiteError(f"--option {pair}: expected KEY=VALUE, e.g. --option train_per_class=64")
        try:
            options[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise SuiteError(f"--option {pair}: the value is not valid YAML") from None
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


def _report(args: argparse.Namespace) -> int:
    from .report import build_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "run.json").exists():
        raise SuiteError(f"{run_dir}: not a run directory (no run.json); expected <results-dir>/<suite>/<run>")
    print(build_report(run_dir))
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
    run.add_argument("suite", type=Path, help="suite YAML file, e.g. suites/speed.yaml")
    run.add_argument("--profile", help="a named profile of the suite (e.g. quick, full)")
    run.add_argument("--results-dir", default="results", help="where runs are stored (default: results)")
    run.add_argument("--run", "--run-name", dest="run",
                     help="run name (default: a timestamp); reuse one to resume it (--run-name under torchrun)")
    run.add_argument("--dry-run", action="store_true", help="list the cases without running them")
    run.add_argument("--retry-failed", action="store_true",
                     help="when resuming, run the cases whose last record is a failure again")
    run.add_argument("--allow-failures", action="store_true",
                     help="exit 0 even when cases ended in error, oom, timeout, nan or mismatch")
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
                    "relation_proxy (ImageFolder; the ablation's CPU proxy) or ade20k (ADEChallengeData2016).")
    generate.add_argument("dataset", choices=["imagenet", "relation_proxy", "ade20k"])
    generate.add_argument("root", help="where to write it")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                          help="a generator argument, e.g. train_per_class=64 (see attnbench/data/generate.py)")
    generate.set_defaults(handler=_generate)

    report = commands.add_parser("report", help="(re)build report.md of a run directory",
                                 description="Render RUN_DIR/report.md and RUN_DIR/plots/ from RUN_DIR/records.jsonl.")
    report.add_argument("run_dir", help="a run directory, RESULTS_DIR/<suite>/<run>")
    report.set_defaults(handler=_report)

    env = commands.add_parser("env", help="print the environment that records are stamped with")
    env.set_defaults(handler=_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (SuiteError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (``attnbench list | head``): stop quietly, as cat does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
