"""A small accuracy suite for the scale-out tests: the colour-pointer proxy (suites/ablation_proxy.yaml's task
and backbone) at a size that trains in seconds, one thread per case so that runs are bitwise repeatable."""

import textwrap
from pathlib import Path

SUITE = """
name: accuracy_demo
device: cpu
measures: [accuracy, params]
threads: 1
grid:
  model:
{models}
  task:
    - name: colour_pointer
      task: classification
      image_size: 32
      data: {{dataset: colour_pointer, root: {root}, seed: 0,
             generate: {{train_images: {train_images}, val_images: 64}}}}
      train: {{epochs: {epochs}, batch_size: 32, eval_batch_size: 64, lr: 2.0e-3, warmup_epochs: 1, amp: false}}
      recipe: {{auto_augment: null, re_prob: 0.0, mixup: 0.0, cutmix: 0.0, scale: [1.0, 1.0], hflip: 0.0,
               color_jitter: 0.0, label_smoothing: 0.0, drop_path_rate: 0.0, crop_pct: 1.0}}
  seed: {seeds}
"""


def write_demo_suite(folder: Path, mechanisms: tuple[str, ...] = ("full",), seeds: tuple[int, ...] = (0,),
                     epochs: int = 2, train_images: int = 128) -> str:
    """Write the suite into ``folder`` (its data under ``folder/data``) and return its path."""
    models = "\n".join(f"    - {{name: attnbench_isotropic_proxy, label: {name}, options: {{attention: {name}}}}}"
                       for name in mechanisms)
    text = SUITE.format(models=models, root=folder / "data", train_images=train_images, epochs=epochs,
                        seeds=list(seeds))
    path = folder / "accuracy_demo.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)
