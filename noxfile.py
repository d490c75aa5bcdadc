"""Sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s bench`` (the main job), ``nox -s microbench``.

Each session builds its own virtual environment and installs the project into it, so a fresh clone needs
only ``python3 -m pip install nox``. torch resolves to the build pip's index offers (2.14.1 here).
"""

import nox

nox.options.sessions = ["tests", "lint"]
# a session's environment (5.5 GB with torch) is built once and reused by later runs while the project's
# requirements are unchanged ("yes"); `nox -R` reuses it without reinstalling, `--reuse-venv=no` rebuilds
nox.options.reuse_venv = "yes"


@nox.session
def tests(session: nox.Session) -> None:
    """Install attnbench with its test extras and run pytest (arguments after -- go to pytest)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Run ruff over the repository."""
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def bench(session: nox.Session) -> None:
    """The speed suite's quick profile (CPU when there is no GPU); records and report under results/speed/."""
    session.install("-e", ".")
    session.run("python", "-m", "attnbench", "run", "suites/speed.yaml", "--profile", "quick", *session.posargs)


@nox.session
def microbench(session: nox.Session) -> None:
    """pytest-benchmark micro-benchmarks of every mechanism's forward (tests/bench/)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "tests/bench", "--benchmark-autosave", *session.posargs,
                env={"ATTNBENCH_MICROBENCH": "1"})
