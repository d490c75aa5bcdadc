"""The official recipes' pieces (linear lr scaling, cool-down, a length in iterations, repeated augmentation,
EMA, evaluation interval; photometric distortion, keep-ratio evaluation, output norms, an ImageNet checkpoint in
the segmentation backbone) and the dry run that compares a suite's tasks with the official recipes."""

import random

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from attnbench import models  # noqa: F401  (registers attnbench's models with timm)
from attnbench.cli import main
from attnbench.data import write_colour_pointer
from attnbench.data.ade20k import keep_ratio_size, photometric_distortion
from attnbench.models.checkpoint import CheckpointError
from attnbench.suite import SuiteError, load_suite
from attnbench.train.classification import ClassificationTask
from attnbench.train.distributed import World
from attnbench.train.engine import TrainSettings, train_and_evaluate
from attnbench.train.official import ADE20K_SFPN, IN1K, compare, gpu_hours
from attnbench.train.segmentation import build_segmenter

POSITION_EXACT = {"auto_augment": None, "re_prob": 0.0, "mixup": 0.0, "cutmix": 0.0, "scale": [1.0, 1.0],
                  "hflip": 0.0, "color_jitter": 0.0, "label_smoothing": 0.0, "drop_path_rate": 0.0, "crop_pct": 1.0}
TINY_BIFORMER = {"depths": [1, 1, 1, 1], "embed_dims": [16, 32, 64, 128], "head_dim": 8, "mlp_ratios": [1, 1, 1, 1]}


@pytest.fixture(scope="module")
def pointer(tmp_path_factory):
    return write_colour_pointer(tmp_path_factory.mktemp("data") / "cp", train_images=64, val_images=64, seed=0)


def _task(root) -> ClassificationTask:
    return ClassificationTask("cp", "attnbench_isotropic_proxy", {"attention": "full", "depth": 1},
                              {"root": str(root), "seed": 0}, 32, 16, 0, POSITION_EXACT)


# 64 images, repeated augmentation: 64 samples per epoch (about 21 images three times), 8 batches of 8
RECIPE = TrainSettings(iterations=5, warmup_iterations=2, cooldown_epochs=1, batch_size=8, eval_batch_size=16,
                       lr=1e-3, lr_reference_batch=16, min_lr=1e-5, warmup_lr=1e-6, repeated_augmentation=3,
                       model_ema_decay=0.9, eval_interval=2, amp=False, seed=0)


def test_scaled_lr_is_the_linear_scaling_rule():
    assert RECIPE.scaled_lr(1) == pytest.approx(1e-3 * 8 / 16)
    assert RECIPE.scaled_lr(8) == pytest.approx(1e-3 * 64 / 16)
    assert TrainSettings(lr=3e-4).scaled_lr(8) == 3e-4  # no reference batch: as given


def test_iterations_cooldown_ema_and_evaluation_interval(pointer, tmp_path):
    out = train_and_evaluate(_task(pointer), RECIPE, World(0, 1, torch.device("cpu")), tmp_path, log=lambda m: None)
    history = out["history"]
    assert out["steps_per_epoch"] == 8
    # 5 iterations end inside the first pass; one cool-down epoch of 8 steps follows at min_lr
    assert [entry["step"] for entry in history] == [5, 13]
    assert history[-1]["lr"] == pytest.approx(1e-5)
    assert "top1" not in history[0] and "top1" in history[1]  # evaluated every 2 epochs and after the last
    assert set(history[-1]["ema"]) >= {"top1", "val_loss"}
    from attnbench.measure.accuracy import Accuracy

    columns = Accuracy().columns({"final": history[-1], "history": history}, images=1)
    assert columns["ema_top1"] == history[-1]["ema"]["top1"] and columns["top1"] == history[-1]["top1"]
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    ema, model = state["ema"], state["model"]
    assert ema.keys() == model.keys() and any(not torch.equal(ema[k], model[k]) for k in model)


class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_a_resumed_run_with_ema_and_repeated_augmentation_equals_the_uninterrupted_one(pointer, tmp_path):
    settings = TrainSettings(epochs=2, batch_size=8, eval_batch_size=16, lr=1e-3, warmup_epochs=0.5,
                             repeated_augmentation=3, model_ema_decay=0.9, amp=False, seed=1)
    world = World(0, 1, torch.device("cpu"))
    straight = train_and_evaluate(_task(pointer), settings, world, tmp_path / "a", log=lambda m: None)

    def crash_in_epoch_two(line: str) -> None:
        if "epoch 2/2" in line:
            raise Interrupted
    with pytest.raises(Interrupted):  # epoch 1 was checkpointed; the crash comes at the end of epoch 2
        train_and_evaluate(_task(pointer), settings, world, tmp_path / "b", log=crash_in_epoch_two)
    resumed = train_and_evaluate(_task(pointer), settings, world, tmp_path / "b", log=lambda m: None)
    assert resumed["history"] == straight["history"]
    for name in ("model", "ema"):
        first = torch.load(tmp_path / "a/checkpoint.pt", weights_only=False)[name]
        second = torch.load(tmp_path / "b/checkpoint.pt", weights_only=False)[name]
        for key, tensor in first.items():
            assert torch.equal(second[key], tensor), (name, key)


class _NeverFires:
    def random(self) -> float:
        return 0.9


def test_photometric_distortion_is_seeded_and_changes_nothing_when_no_step_fires():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(photometric_distortion(image, _NeverFires())), np.asarray(image))
    first = np.asarray(photometric_distortion(image, random.Random(1)))
    assert np.array_equal(first, np.asarray(photometric_distortion(image, random.Random(1))))
    changed = [not np.array_equal(np.asarray(photometric_distortion(image, random.Random(seed))), np.asarray(image))
               for seed in range(20)]
    assert sum(changed) >= 15 and first.shape == (20, 30, 3) and first.dtype == np.uint8


@pytest.mark.parametrize("size,expected", [((683, 512), (704, 512)), ((300, 200), (768, 512)),
                                           ((4000, 500), (2048, 256)), ((512, 512), (512, 512))])
def test_keep_ratio_evaluation_size_is_mmcv_rescale_then_align_to_32(size, expected):
    assert keep_ratio_size(*size, scale=(2048, 512), size_divisor=32) == expected


SEGMENTATION_RECIPE = {"fpn_channels": 16, "head_channels": 8, "dropout": 0.1, "drop_path_rate": 0.0,
                       "output_norms": True, "backbone_checkpoint": None}


def test_the_segmentation_backbone_loads_an_imagenet_checkpoint_exactly(tmp_path):
    options = {**TINY_BIFORMER, "n_win": 8, "auto_pad": True}
    classifier = timm.create_model("biformer_tiny", **options)
    torch.save({"model": classifier.state_dict()}, tmp_path / "in1k.pth")
    model = build_segmenter("biformer_tiny", 150, {**SEGMENTATION_RECIPE, "backbone_checkpoint": tmp_path / "in1k.pth"},
                            options)
    loaded = model.backbone.model.state_dict()
    for key, tensor in classifier.state_dict().items():
        if not key.startswith(("head.", "norm.")):
            assert torch.equal(loaded[key], tensor), key
    assert isinstance(model.backbone.model.norm, torch.nn.Identity) and len(model.output_norms) == 4
    logits = model.eval()(torch.randn(1, 3, 160, 128))  # keep-ratio sizes: multiples of 32, not of 32 × n_win
    assert logits.shape == (1, 150, 160, 128)
    other = timm.create_model("biformer_tiny", **{**options, "embed_dims": [24, 48, 96, 192]})
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="other.pth does not fit the backbone.*shape mismatches"):
        build_segmenter("biformer_tiny", 150, {**SEGMENTATION_RECIPE, "backbone_checkpoint": tmp_path / "other.pth"},
                        options)


def _in1k_task(**train) -> dict:
    suite = load_suite("suites/accuracy_imagenet.yaml", "in1k", require_data=False)
    task = suite.grid.task[0].model_dump()
    task["train"].update(train)
    return task


def test_compare_marks_deviations_and_unpublished_values():
    rows = {row.path: row for row in compare(IN1K, _in1k_task(lr=1e-3), "biformer_tiny", {}, processes=8)}
    assert rows["train.lr"].verdict == "DEVIATION" and rows["train.epochs"].verdict == "same"
    assert rows["recipe.drop_path_rate"].verdict.startswith("unverified")  # T: not in the official code
    assert rows["processes"].verdict.startswith("unverified")
    small = {row.path: row for row in compare(IN1K, _in1k_task(), "biformer_small", {}, processes=8)}
    assert small["processes"].verdict == "DEVIATION" and small["processes"].official == 16
    assert all(row.verdict == "same" for path, row in small.items() if path not in ("processes",
                                                                                     "recipe.drop_path_rate"))
    assert small["recipe.drop_path_rate"].ours == 0.1 and small["recipe.drop_path_rate"].verdict == "DEVIATION"


def test_gpu_hours_count_the_images_the_recipe_trains_on(monkeypatch):
    from attnbench.train import official

    monkeypatch.setattr(official, "training_flops_per_image", lambda case: 1e10)

    class Case:
        task = {"train": {"epochs": 300, "cooldown_epochs": 10}}
    hours, how = gpu_hours(Case, IN1K, 8, sustained_tflops=10)
    assert hours == pytest.approx(310 * 1_281_167 * 1e10 / 1e13 / 3600) and "310 epochs" in how
    Case.task = {"train": {"iterations": 80_000, "batch_size": 4}}
    hours, _ = gpu_hours(Case, ADE20K_SFPN, 8, sustained_tflops=10)
    assert hours == pytest.approx(80_000 * 32 * 1e10 / 1e13 / 3600)


def test_the_dry_run_prints_each_official_setting_with_its_source(capsys):
    assert main(["run", "accuracy_imagenet", "--profile", "in1k", "--dry-run", "--only", "model=biformer_stl"]) == 0
    out = capsys.readouterr().out
    for setting in IN1K.settings:
        line = next(line for line in out.splitlines() if line.strip().startswith(setting.path + " "))
        assert "[BiFormer@1697bbb" in line and " same " in line, line
    assert "deviations: none among the settings" in out and "also differs:" in out
    assert "GPU-hours" in out and "assumed 20 TFLOP/s" in out


def test_recipe_fields_are_validated_with_one_line(tmp_path):
    text = open("suites/accuracy_imagenet.yaml").read()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("recipe: {drop_path_rate: 0.15}", "recipe: {drop_pat_rate: 0.15}"))
    with pytest.raises(SuiteError, match=r"grid\.model\[1\]\.recipe: unknown key\(s\) drop_pat_rate"):
        load_suite(bad, "in1k", require_data=False)
    bad.write_text(text.replace("train: {epochs: 300, cooldown_epochs: 10,",
                                "train: {epochs: 300, iterations: 5, cooldown_epochs: 10,"))
    with pytest.raises(SuiteError, match="give epochs or iterations, not both"):
        load_suite(bad, "in1k", require_data=False)
