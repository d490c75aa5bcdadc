"""Suite files: the schema (schema.py), loading and validation with one-line errors (load.py), and the
expansion into typed cases (expand.py).

A suite is a YAML file::

    name: speed
    device: auto                      # auto | cpu | cuda
    measures: [params, flops, memory, latency]
    grid:                             # cartesian product of these axes
      mechanism:
        - {name: bra, options: {n_win: 7}, options_by_shape: {biformer_t.stage1: {topk: 1}}}
        - {name: full}
      shape: [biformer_t.stage1, {name: tiny, height: 14, width: 21, dim: 64, heads: 2}]
      batch: [8]
      dtype: [float32]
      mode: [forward, forward_backward]
    zip:                              # each group is one axis whose lists advance together
      - {shape: [...], batch: [...]}
    profiles:                         # named partial suites merged over the base (lists replace)
      quick: {grid: {batch: [2]}, repeats: {max_time_s: 1}}

A suite of whole models uses ``model`` (timm names, attnbench's models included) and ``image_size`` axes
instead of ``mechanism`` and ``shape``; a model's ``paper`` names its row in attnbench/paper_figures.yaml.

Every error names the file, the field path and what is allowed, in one line (``SuiteError``).
"""

from .expand import expand, resolve_device
from .load import load_suite, resolve_suite, shard, shipped_suites
from .schema import Suite, SuiteError

__all__ = ["Suite", "SuiteError", "expand", "load_suite", "resolve_device", "resolve_suite", "shard",
           "shipped_suites"]
