"""The official BiFormer training recipes, setting by setting with the file each comes from, and the comparison
of a suite's accuracy case against them (what ``run --dry-run`` prints for a task with ``official:``).

Sources are read in rayleizhu/BiFormer at commit 1697bbb (``fetch github:rayleizhu/BiFormer``), abbreviated
``BiFormer@1697bbb``. ImageNet: ``main.py`` (DeiT's training script: argument defaults, the linear scaling rule,
RASampler, ModelEma, create_scheduler), ``configs/train_args.yaml`` (those defaults exported), ``scripts/train.sh``
and ``README.md`` (per-model drop path, batch and node counts), ``samplers.py`` (RASampler), ``datasets.py``
(evaluation resize). ADE20K Semantic FPN: ``semantic_segmentation/configs/ade20k/sfpn.biformer_{small,base}.py``,
``configs/_base_/datasets/ade20k_sfpn.py``, ``configs/_base_/models/fpn_r50.py``, ``models_mm/biformer_mm.py``,
``slurm_train.sh``.

A setting's value may depend on the model (``PerModel``); a model the official code gives no value for is
"not published" and our value is listed as unverified. ``notes`` are the deviations no setting expresses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

REPO = "BiFormer@1697bbb"
SEG = f"{REPO} semantic_segmentation/configs"


@dataclass(frozen=True)
class PerModel:
    """A value per model name; models missing from ``values`` have no published value."""

    values: dict[str, Any]


@dataclass(frozen=True)
class Setting:
    """One official setting: where it lives in a suite task (``train.lr``, ``recipe.mixup``, ``image_size``,
    ``options.n_win`` for a model option, ``processes`` for the number of training processes) and its value."""

    path: str
    value: Any
    source: str

    def official_value(self, model: str) -> tuple[bool, Any]:
        """(published, value) for ``model``."""
        if isinstance(self.value, PerModel):
            return (model in self.value.values, self.value.values.get(model))
        return True, self.value


@dataclass(frozen=True)
class OfficialRecipe:
    name: str
    description: str
    settings: tuple[Setting, ...]
    notes: tuple[str, ...] = ()
    train_images: int = 0  # the full data set's training images (for the GPU-hour estimate without data)
    task_defaults: dict[str, Any] = field(default_factory=dict)


# --- ImageNet-1K classification (main.py is DeiT's; BiFormer overrides per model on the command line) ---------
IN1K = OfficialRecipe(
    name="biformer_in1k",
    description="BiFormer ImageNet-1K classification, 300 epochs + 10 cool-down (rayleizhu/BiFormer main.py)",
    train_images=1_281_167,
    settings=(
        Setting("data.dataset", "imagenet", f"{REPO} main.py --data-set IMNET"),
        Setting("data.num_classes", None, f"{REPO} main.py --data-set IMNET (all 1000 classes)"),
        Setting("data.images_per_class", None, f"{REPO} main.py (every training image)"),
        Setting("image_size", 224, f"{REPO} scripts/train.sh input_size=224"),
        Setting("train.epochs", 300, f"{REPO} configs/train_args.yaml epochs"),
        Setting("train.cooldown_epochs", 10, f"{REPO} main.py --cooldown-epochs (default 10)"),
        Setting("train.batch_size", 128, f"{REPO} scripts/train.sh batch_size=128 (per GPU)"),
        Setting("processes", PerModel({"biformer_small": 16, "biformer_stl": 8}),
                f"{REPO} scripts/train.sh slurm.nodes × slurm.ngpus (S: 2 × 8, STL: 1 × 8)"),
        Setting("train.lr", 5e-4, f"{REPO} scripts/train.sh lr=5e-4"),
        Setting("train.lr_reference_batch", 512, f"{REPO} main.py linear_scaled_lr = lr × batch × world / 512"),
        Setting("train.warmup_epochs", 5, f"{REPO} configs/train_args.yaml warmup_epochs"),
        Setting("train.warmup_lr", 1e-6, f"{REPO} configs/train_args.yaml warmup_lr"),
        Setting("train.min_lr", 1e-5, f"{REPO} configs/train_args.yaml min_lr"),
        Setting("train.schedule", "cosine", f"{REPO} configs/train_args.yaml sched"),
        Setting("train.weight_decay", 0.05, f"{REPO} configs/train_args.yaml weight_decay"),
        Setting("train.clip_grad", None, f"{REPO} configs/train_args.yaml clip_grad"),
        Setting("train.amp", True, f"{REPO} main.py NativeScaler (mixed precision)"),
        Setting("train.repeated_augmentation", 3, f"{REPO} main.py --repeated-aug (default on), samplers.py RASampler"),
        Setting("train.model_ema_decay", 0.99996, f"{REPO} configs/train_args.yaml model_ema, model_ema_decay"),
        Setting("recipe.auto_augment", "rand-m9-mstd0.5-inc1", f"{REPO} configs/train_args.yaml aa"),
        Setting("recipe.re_prob", 0.25, f"{REPO} configs/train_args.yaml reprob"),
        Setting("recipe.mixup", 0.8, f"{REPO} configs/train_args.yaml mixup"),
        Setting("recipe.cutmix", 1.0, f"{REPO} configs/train_args.yaml cutmix"),
        Setting("recipe.label_smoothing", 0.1, f"{REPO} configs/train_args.yaml smoothing"),
        Setting("recipe.color_jitter", 0.4, f"{REPO} configs/train_args.yaml color_jitter"),
        Setting("recipe.interpolation", "bicubic", f"{REPO} configs/train_args.yaml train_interpolation"),
        Setting("recipe.crop_pct", 0.875, f"{REPO} datasets.py Resize(256/224 × size), CenterCrop(size)"),
        Setting("recipe.drop_path_rate", PerModel({"biformer_small": 0.15, "biformer_stl": 0.1}),
                f"{REPO} scripts/train.sh, README.md drop_path (S 0.15, STL 0.1; T and B not published)"),
    ),
    notes=(
        "the learning rate follows the schedule per step here; main.py steps timm's scheduler once per epoch",
        "the reported top-1 is the last epoch's (and its EMA's); main.py logs the best epoch's ('Max accuracy')",
        "mixed precision is bfloat16 autocast where the GPU supports it; main.py uses float16 with dynamic loss "
        "scaling (NativeScaler)",
        "repeated augmentation's order is seeded by (seed, epoch); RASampler's by the epoch alone",
        "evaluation counts every validation image once; main.py's dist_eval pads the last shard with repeats",
    ),
)

# --- ADE20K Semantic FPN (UniFormer's recipe, which BiFormer's sfpn configs follow) ------------------------------
ADE20K_SFPN = OfficialRecipe(
    name="biformer_ade20k_sfpn",
    description="BiFormer ADE20K Semantic FPN, 80k iterations of 32 images (semantic_segmentation/configs)",
    train_images=20_210,
    settings=(
        Setting("data.dataset", "ade20k", f"{SEG}/_base_/datasets/ade20k_sfpn.py dataset_type"),
        Setting("data.images", None, f"{SEG}/_base_/datasets/ade20k_sfpn.py (every training image)"),
        Setting("image_size", 512, f"{SEG}/_base_/datasets/ade20k_sfpn.py crop_size"),
        Setting("train.iterations", 80_000, f"{SEG}/ade20k/sfpn.biformer_small.py max_iters=160000//gpu_multiples"),
        Setting("train.batch_size", 4, f"{SEG}/_base_/datasets/ade20k_sfpn.py samples_per_gpu"),
        Setting("processes", 8, f"{REPO} semantic_segmentation/slurm_train.sh --gres=gpu:8 --ntasks=8"),
        Setting("train.lr", 2e-4, f"{SEG}/ade20k/sfpn.biformer_small.py lr=0.0001*gpu_multiples"),
        Setting("train.lr_reference_batch", None, f"{SEG}/ade20k/sfpn.biformer_small.py (lr not rescaled)"),
        Setting("train.weight_decay", 1e-4, f"{SEG}/ade20k/sfpn.biformer_small.py optimizer"),
        Setting("train.schedule", "cosine", f"{SEG}/ade20k/sfpn.biformer_small.py lr_config CosineAnnealing"),
        Setting("train.warmup_iterations", 1000, f"{SEG}/ade20k/sfpn.biformer_small.py warmup_iters"),
        Setting("train.warmup_lr", 2e-5, f"{SEG}/ade20k/sfpn.biformer_small.py warmup_ratio=1/10 of lr"),
        Setting("train.min_lr", 2e-12, f"{SEG}/ade20k/sfpn.biformer_small.py min_lr_ratio=1e-8 of lr"),
        Setting("train.amp", True, f"{SEG}/ade20k/sfpn.biformer_small.py Fp16OptimizerHook"),
        Setting("train.sync_bn", True, f"{SEG}/_base_/models/fpn_r50.py SyncBN; models_mm/biformer_mm.py "
                "convert_sync_batchnorm"),
        Setting("recipe.scale", [2048, 512], f"{SEG}/_base_/datasets/ade20k_sfpn.py img_scale"),
        Setting("recipe.ratio_range", [0.5, 2.0], f"{SEG}/_base_/datasets/ade20k_sfpn.py Resize ratio_range"),
        Setting("recipe.cat_max_ratio", 0.75, f"{SEG}/_base_/datasets/ade20k_sfpn.py RandomCrop"),
        Setting("recipe.photometric_distortion", True, f"{SEG}/_base_/datasets/ade20k_sfpn.py PhotoMetricDistortion"),
        Setting("recipe.eval_resize", "keep_ratio", f"{SEG}/_base_/datasets/ade20k_sfpn.py AlignResize keep_ratio"),
        Setting("recipe.size_divisor", 32, f"{SEG}/_base_/datasets/ade20k_sfpn.py AlignResize size_divisor"),
        Setting("recipe.fpn_channels", 256, f"{SEG}/_base_/models/fpn_r50.py neck out_channels"),
        Setting("recipe.head_channels", 128, f"{SEG}/_base_/models/fpn_r50.py decode_head channels"),
        Setting("recipe.dropout", 0.1, f"{SEG}/_base_/models/fpn_r50.py dropout_ratio"),
        Setting("recipe.output_norms", True, f"{REPO} semantic_segmentation/models_mm/biformer_mm.py extra_norms"),
        Setting("recipe.backbone_checkpoint", "an ImageNet-1K checkpoint",
                f"{REPO} semantic_segmentation/slurm_train.sh model.pretrained=CKPT"),
        Setting("recipe.drop_path_rate", PerModel({"biformer_small": 0.15, "biformer_base": 0.3}),
                f"{SEG}/ade20k/sfpn.biformer_{{small,base}}.py drop_path_rate"),
        Setting("options.n_win", 8, f"{SEG}/ade20k/sfpn.biformer_small.py n_win=8 (training resolution 512)"),
        Setting("options.auto_pad", True, f"{SEG}/ade20k/sfpn.biformer_small.py auto_pad=True"),
    ),
    notes=(
        "evaluation runs every train.eval_interval passes over the data; the config evaluates every 4,000 "
        "iterations and keeps the best mIoU (save_best); we report the last evaluation",
        "mixed precision is bfloat16 autocast where the GPU supports it; the config uses float16 with a static "
        "loss scale of 512",
        "the data pipeline is attnbench's (PIL) re-implementation of mmseg's Resize, RandomCrop, RandomFlip, "
        "PhotoMetricDistortion, Pad and AlignResize; interpolation details differ from OpenCV's",
        "the ImageNet checkpoint must fit the backbone exactly (head and final norm dropped); the official "
        "loader uses strict=False",
    ),
)

OFFICIAL_RECIPES = {recipe.name: recipe for recipe in (IN1K, ADE20K_SFPN)}


@dataclass(frozen=True)
class Comparison:
    """One row of the comparison: our value, the official one, its source, and whether they agree."""

    path: str
    ours: Any
    official: Any
    published: bool
    source: str

    @property
    def verdict(self) -> str:
        if not self.published:
            return "unverified (no official value)"
        return "same" if _same(self.ours, self.official) else "DEVIATION"


def _same(ours: Any, official: Any) -> bool:
    if official == "an ImageNet-1K checkpoint":
        return bool(ours)
    if isinstance(ours, list | tuple) and isinstance(official, list | tuple):
        return [float(x) for x in ours] == [float(x) for x in official]
    if isinstance(ours, int | float) and isinstance(official, int | float) and not isinstance(ours, bool):
        return abs(float(ours) - float(official)) <= 1e-12 * max(abs(float(official)), 1e-300)
    return ours == official


def effective_task(task: dict[str, Any]) -> dict[str, Any]:
    """The task as it will train: its recipe merged over the task type's defaults (classification or
    segmentation ``RECIPE``)."""
    from .classification import RECIPE as CLASSIFICATION
    from .segmentation import RECIPE as SEGMENTATION

    defaults = CLASSIFICATION if task["task"] == "classification" else SEGMENTATION
    return {**task, "recipe": {**defaults, **task.get("recipe", {})}}


def compare(recipe: OfficialRecipe, task: dict[str, Any], model: str, options: dict[str, Any],
            processes: int) -> list[Comparison]:
    """Every official setting of ``recipe`` against the case's (``task`` as a suite task mapping, the model's
    ``options``, and the number of training ``processes``)."""
    ours_tree = {**effective_task(task), "options": options, "processes": processes}
    rows = []
    for setting in recipe.settings:
        published, official = setting.official_value(model)
        node: Any = ours_tree
        for part in setting.path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        rows.append(Comparison(setting.path, node, official, published, setting.source))
    return rows


def describe(recipe: OfficialRecipe, task: dict[str, Any], model: str, options: dict[str, Any],
             processes: int) -> list[str]:
    """The dry run's lines for one case: each setting (ours, official, verdict, source), then the notes."""
    rows = compare(recipe, task, model, options, processes)
    width = max(len(row.path) for row in rows)
    lines = [f"  {recipe.description}; {model}, {processes} process(es):"]
    for row in rows:
        lines.append(f"    {row.path:<{width}}  ours {_show(row.ours):<24} official {_show(row.official):<24} "
                     f"{row.verdict:<9}  [{row.source}]")
    deviations = [row.path for row in rows if row.verdict == "DEVIATION"]
    unverified = [row.path for row in rows if not row.published]
    lines.append(f"    deviations: {', '.join(deviations) or 'none among the settings'}"
                 + (f"; unverified: {', '.join(unverified)}" if unverified else ""))
    lines.extend(f"    also differs: {note}" for note in recipe.notes)
    return lines


def _show(value: Any) -> str:
    return "-" if value is None else str(value)


def training_flops_per_image(case: Any) -> float:
    """FLOPs (2 per MAC) of one training image through the case's model: forward and backward of a batch of
    one at the task's input size, counted by attnbench/measure/flops.py on this machine's CPU."""
    import torch

    from ..data.ade20k import NUM_CLASSES
    from ..measure.flops import count_flops
    from .classification import build_classifier
    from .segmentation import build_segmenter

    task = effective_task(case.task)
    options = dict(case.options)
    if task["task"] == "classification":
        model = build_classifier(case.model, task["data"].get("num_classes") or 1000, task["recipe"], options)
    else:
        model = build_segmenter(case.model, NUM_CLASSES, task["recipe"], options, load_checkpoint=False)
    size = task["image_size"]
    x = torch.randn(2, 3, size, size)  # two images: BatchNorm needs more than one value per channel in training

    def step() -> None:
        model.train()(x).float().sum().backward()

    return count_flops(step).flops / 2


def gpu_hours(case: Any, recipe: OfficialRecipe, processes: int, sustained_tflops: float) -> tuple[float, str]:
    """(estimated GPU-hours, how it was estimated) of training ``case`` on the full data set of ``recipe``."""
    train = case.task["train"]
    if train.get("iterations"):
        images = train["iterations"] * train["batch_size"] * processes
        seen = f"{train['iterations']:,} iterations × {train['batch_size'] * processes} images"
    else:
        epochs = train["epochs"] + train.get("cooldown_epochs", 0)
        images = epochs * recipe.train_images
        seen = f"{epochs} epochs × {recipe.train_images:,} images"
    per_image = training_flops_per_image(case)
    hours = images * per_image / (sustained_tflops * 1e12) / 3600
    return hours, (f"{seen} × {per_image / 1e9:.1f} GFLOPs (forward + backward, counted) at an assumed "
                   f"{sustained_tflops:g} TFLOP/s sustained per GPU; evaluation not included")
