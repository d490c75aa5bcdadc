"""attnbench: benchmark and reproduction suite for sparse vision attention.

The harness (measures, suites, runner, reports) and the models. Mechanisms live in the sibling package
``attentions`` and are reached only through its registry.
"""

__version__ = "0.1.0"
