"""``python -m attnbench``: see ``attnbench.cli``."""

from attnbench.cli import main

raise SystemExit(main())
