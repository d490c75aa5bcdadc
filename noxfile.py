"""Sessions: ``nox -s tests`` (the test suite), ``nox -s lint`` (ruff), ``nox -s bench`` (the main job).

Each session builds its own virtual environment and installs the project into it, so a fresh clone needs
only ``python3 -m pip install nox``. torch resolves to the build pip's index offers (2.14.1 here).
"""

import nox

nox.options.sessions = ["tests", "lint"]


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
    """The main job. Until the suite runner lands, list the registered mechanisms."""
    session.install("-e", ".")
    session.run("python", "-m", "attnbench", "list", *session.posargs)
