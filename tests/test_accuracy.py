"""Accuracy suites: loaders on generated data in both layouts, clear errors for malformed roots, the metrics, one
training step and evaluation per task, determinism, resume from a checkpoint, and the suite end to end."""

import json
import textwrap

import numpy as np
import pytest
import torch

from attnbench.cases import AccuracyCase
from attnbench.cli import main
from attnbench.data import (
    ADE20KSubset,
    DataError,
    ImageNetSubset,
    SegmentationTransform,
    write_ade20k_like,
    write_imagenet_like,
    write_relation_proxy,
)
from attnbench.data.ade20k import IGNORE_INDEX, reduce_zero_label
from attnbench.records import RecordStore
from attnbench.train import run_accuracy_case
from attnbench.train.segmentation import confusion_matrix, scores

TINY_BACKBONE = {"depths": [1, 1, 1, 1], "embed_dims": [24, 48, 96, 192], "head_dim": 8, "mlp_ratios": [1, 1, 1, 1]}
NO_AUGMENT = {"auto_augment": None, "re_prob": 0.0, "mixup": 0.0, "cutmix": 0.0, "scale": [1.0, 1.0],
              "color_jitter": 0.0, "crop_pct": 1.0}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"imagenet": write_imagenet_like(root / "imagenet", num_classes=3, train_per_class=4, val_per_class=2),
            "relation": write_relation_proxy(root / "relation", train_per_class=6, val_per_class=2),
            "ade20k": write_ade20k_like(root / "ade20k", train_images=4, val_images=2, classes=4)}


def test_imagenet_layout_subsets_are_deterministic(datasets):
    full = ImageNetSubset(datasets["imagenet"], "train")
    assert full.classes == ["n00000000", "n00000001", "n00000002"] and len(full) == 12
    assert all(path.suffix == ".JPEG" for path, _ in full.samples)
    subset = ImageNetSubset(datasets["imagenet"], "train", num_classes=2, images_per_class=3, seed=1)
    again = ImageNetSubset(datasets["imagenet"], "train", num_classes=2, images_per_class=3, seed=1)
    assert len(subset) == 6 and subset.samples == again.samples
    assert subset.description()["files_sha1"] == again.description()["files_sha1"]
    listed = ImageNetSubset(datasets["imagenet"], "val", classes=["n00000002", "n00000000"])
    assert [label for _, label in listed.samples] == [0, 0, 1, 1]  # labels follow the given class order
    image, label = full[0]
    assert image.mode == "RGB" and image.size == (64, 64) and label == 0


def test_relation_proxy_is_an_imagefolder_of_two_balanced_classes(datasets):
    train = ImageNetSubset(datasets["relation"], "train")
    assert train.classes == ["different", "same"]
    assert [label for _, label in train.samples].count(1) == 6 and len(train) == 12
    image, _ = train[0]
    assert image.size == (112, 112)


def test_ade20k_layout_labels_are_reduced_and_the_pipeline_crops(datasets):
    assert reduce_zero_label(np.array([0, 1, 150])).tolist() == [IGNORE_INDEX, 0, 149]
    val = ADE20KSubset(datasets["ade20k"], "val", transform=SegmentationTransform((64, 64), train=False))
    image, label = val[0]
    assert image.shape == (3, 64, 64) and label.shape == (96, 128)  # label kept at full size for scoring
    assert (label[:2] == IGNORE_INDEX).all()  # the generator's 0-labelled border is ignored after reduction
    assert set(label.unique().tolist()) <= set(range(150)) | {IGNORE_INDEX}
    train = ADE20KSubset(datasets["ade20k"], "train", images=3, seed=0,
                         transform=SegmentationTransform((64, 64), train=True))
    assert len(train) == 3
    image, label = train[1]
    assert image.shape == (3, 64, 64) and label.shape == (64, 64) and label.dtype == torch.int64


@pytest.mark.parametrize("build,message", [
    (lambda root: ImageNetSubset(root / "absent", "train"), "absent: data root does not exist"),
    (lambda root: ImageNetSubset(root / "imagenet", "test"), "imagenet/test: missing split folder"),
    (lambda root: ImageNetSubset(root / "imagenet", "train", classes=["n09999999"]), "no class folder(s) n09999999"),
    (lambda root: ADE20KSubset(root / "imagenet", "train"), "imagenet/images/training: missing folder"),
])
def test_malformed_roots_raise_one_line_naming_the_path(datasets, build, message):
    root = datasets["imagenet"].parent
    with pytest.raises(DataError) as error:
        build(root)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_missing_annotation_is_named(tmp_path):
    root = write_ade20k_like(tmp_path / "ade", train_images=2, val_images=1)
    next((root / "annotations/training").glob("*.png")).unlink()
    with pytest.raises(DataError, match=r"annotations/training: no annotation for 1 image\(s\)"):
        ADE20KSubset(root, "train")


def test_segmentation_scores_from_a_confusion_matrix():
    label = torch.tensor([[0, 0, 1, IGNORE_INDEX], [2, 2, 1, 1]])
    prediction = torch.tensor([[0, 1, 1, 0], [2, 0, 1, 1]])
    confusion = confusion_matrix(prediction, label, num_classes=4)
    assert confusion.sum() == 7 and confusion[0, 0] == 1 and confusion[2, 0] == 1
    result = scores(confusion)
    # IoU: class 0: 1 / (2 + 2 - 1); class 1: 3 / (3 + 4 - 3); class 2: 1 / (2 + 1 - 1); class 3 absent
    assert result["miou"] == pytest.approx(100 * (1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert result["pixel_accuracy"] == pytest.approx(100 * 5 / 7)


def case_config(task: str, root, epochs: int = 1, attention: str = "bra") -> AccuracyCase:
    if task == "classification":
        spec = {"name": "relation_proxy", "task": "classification", "image_size": 112, "recipe": NO_AUGMENT,
                "data": {"dataset": "relation_proxy", "root": str(root), "seed": 0},
                "train": {"epochs": epochs, "batch_size": 4, "eval_batch_size": 4}}
    else:
        spec = {"name": "ade", "task": "segmentation", "image_size": 112,
                "recipe": {"fpn_channels": 16, "head_channels": 8},
                "data": {"dataset": "ade20k", "root": str(root), "seed": 0},
                "train": {"epochs": epochs, "batch_size": 2, "eval_batch_size": 1, "schedule": "poly"}}
    train = {"lr": 1e-3, "min_lr": 1e-5, "warmup_epochs": 0.5, "warmup_lr": 1e-6, "weight_decay": 0.05,
             "schedule": "cosine", "clip_grad": None, "amp": True, "workers": 0, **spec["train"]}
    spec = {**spec, "train": train, "model_options": {}}
    return AccuracyCase(model="biformer_stl", label=attention, options={"attention": attention, **TINY_BACKBONE},
                        task=spec, device="cpu", seed=0, measures=("accuracy", "params"), batch=train["batch_size"],
                        dtype="float32", mode="train")


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_one_epoch_trains_and_evaluates(datasets, task):
    root = datasets["relation"] if task == "classification" else datasets["ade20k"]
    metrics = run_accuracy_case(case_config(task, root), checkpoint_dir=None, log=lambda line: None)
    (epoch,) = metrics["accuracy"]["history"]
    assert np.isfinite(epoch["train_loss"]) and epoch["train_loss"] > 0
    keys = ("top1", "val_loss") if task == "classification" else ("miou", "pixel_accuracy")
    for key in keys:
        assert key in metrics["accuracy"]["final"] and 0 <= metrics["accuracy"]["final"][key] <= max(100, 1e9)
    assert "top5" not in metrics["accuracy"]["final"]  # two classes: top-5 would be 100% by construction
    assert metrics["params"]["count"] > 0


class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_resume_after_a_crash_equals_the_uninterrupted_run(datasets, tmp_path):
    config = case_config("classification", datasets["relation"], epochs=2, attention="swin")
    straight = run_accuracy_case(config, tmp_path / "straight", log=lambda line: None)

    def crash_in_epoch_two(line: str) -> None:
        if "epoch 2/2" in line:
            raise Interrupted(line)
    with pytest.raises(Interrupted):  # epoch 1 finished and was checkpointed; the crash comes in epoch 2
        run_accuracy_case(config, tmp_path / "resumed", log=crash_in_epoch_two)
    resumed = run_accuracy_case(config, tmp_path / "resumed", log=lambda line: None)
    assert resumed["accuracy"]["history"] == straight["accuracy"]["history"]  # same seed: identical records
    assert (resumed["accuracy"]["resumed_after_epochs"], straight["accuracy"]["resumed_after_epochs"]) == ([1], [])
    first = torch.load(tmp_path / "straight/checkpoint.pt", weights_only=False)["model"]
    second = torch.load(tmp_path / "resumed/checkpoint.pt", weights_only=False)["model"]
    for name, tensor in first.items():
        torch.testing.assert_close(second[name], tensor, rtol=0, atol=0, msg=name)


SUITE = """
name: tiny_ablation
device: cpu
measures: [accuracy, params, flops, latency]
repeats: {{warmup_iters: 1, warmup_time_s: 0.0, min_samples: 5, max_samples: 5, min_run_time_s: 0, max_time_s: 0.1}}
grid:
  model:
    - {{name: biformer_stl, label: bra, paper: bra, options: {{attention: bra}}}}
    - {{name: biformer_stl, label: swin (shifted window), paper: swin, options: {{attention: swin}}}}
  task:
    - name: relation_proxy
      task: classification
      image_size: 112
      data: {{dataset: relation_proxy, root: {root}/relation, generate: {{train_per_class: 4, val_per_class: 2}}}}
      train: {{epochs: 1, batch_size: 4, eval_batch_size: 4}}
      recipe: {recipe}
      model_options: {backbone}
    - name: ade20k_generated
      task: segmentation
      image_size: 112
      data: {{dataset: ade20k, root: {root}/ade, generate: {{train_images: 2, val_images: 1, classes: 3}}}}
      train: {{epochs: 1, batch_size: 2, eval_batch_size: 1, schedule: poly}}
      recipe: {{fpn_channels: 16, head_channels: 8}}
      model_options: {backbone}
"""


def write_suite(tmp_path, **replace) -> str:
    text = SUITE.format(root=tmp_path / "data", recipe=json.dumps(NO_AUGMENT), backbone=json.dumps(TINY_BACKBONE))
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "suite.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.mark.slow
def test_the_suite_trains_every_case_and_renders_the_ablation_table(tmp_path):
    results = tmp_path / "results"
    assert main(["run", write_suite(tmp_path), "--results-dir", str(results), "--run", "r"]) == 0
    records = RecordStore(results / "tiny_ablation/r/records.jsonl").load()
    assert [(r.case.column, r.case.label, r.status) for r in records] == [
        ("relation_proxy", "bra", "ok"), ("relation_proxy", "swin (shifted window)", "ok"),
        ("ade20k_generated", "bra", "ok"), ("ade20k_generated", "swin (shifted window)", "ok")]
    assert records[0].metrics["accuracy"]["data"]["train"]["images"] == 8
    assert records[0].metrics["flops"]["counted_flops"] > 0 and records[0].metrics["latency"]["median_s"] > 0
    report = (results / "tiny_ablation/r/report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| mechanism") and "paper" in line)
    assert "relation_proxy (proxy task, not ImageNet) top-1 %" in header and "paper ImageNet top-1" in header
    swin_row = next(line for line in report.splitlines() if line.startswith("| swin (shifted window)"))
    assert "| 81.3† " in swin_row and "| 41.5† " in swin_row  # the paper's (seed-only) figures, in the paper's columns
    top1 = records[1].metrics["accuracy"]["final"]["top1"]
    assert f"| {top1:.1f} " in swin_row


@pytest.mark.parametrize("replace,message", [
    ({"root: ": "rot: "}, r"data\.rot: unknown key 'rot'"),
    ({"dataset: ade20k": "dataset: imagenet"}, r"data\.dataset 'imagenet' does not fit task 'segmentation'"),
    ({"fpn_channels: 16": "fpn_width: 16"}, r"recipe: unknown key\(s\) fpn_width for segmentation"),
    ({"train_images: 2": "train_count: 2"}, r"data\.generate: unknown key\(s\) train_count; allowed: train_images"),
    ({"measures: [accuracy, params, flops, latency]": "measures: [params]"}, r"measures: a suite of tasks needs"),
    ({", generate: {train_per_class: 4, val_per_class: 2}": ""}, r"task\[0\]\.data\.root: .*relation is not a dir"),
])
def test_malformed_accuracy_suites_exit_2_with_one_line(tmp_path, capsys, replace, message):
    import re

    assert main(["run", write_suite(tmp_path, **replace), "--results-dir", str(tmp_path / "results")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and re.search(message, error), error
    assert not (tmp_path / "results").exists()


def test_data_roots_come_from_the_command_line(tmp_path, capsys):
    assert main(["run", "suites/ablation.yaml", "--run", "x", "--results-dir", str(tmp_path)]) == 2
    assert "grid.task[0].data.root: no data root; give it in the suite or with --data-root imagenet=PATH" in \
        capsys.readouterr().err
    assert main(["run", "suites/ablation.yaml", "--dry-run"]) == 0  # a dry run lists the cases, and says so
    assert "note: task imagenet: no data root; give it in the suite or with --data-root imagenet=PATH (needed to " \
        "run, not for this dry run)" in capsys.readouterr().out
    assert main(["run", "suites/ablation.yaml", "--dry-run", "--data-root", "imagenett=/x"]) == 2
    assert "no task named 'imagenett'; tasks: imagenet, ade20k" in capsys.readouterr().err
    imagenet = write_imagenet_like(tmp_path / "in", num_classes=2, train_per_class=1, val_per_class=1)
    ade = write_ade20k_like(tmp_path / "ade", train_images=1, val_images=1)
    assert main(["run", "suites/ablation.yaml", "--dry-run", "--data-root", f"imagenet={imagenet}",
                 "--data-root", f"ade20k={ade}"]) == 0
    assert "18 cases" in capsys.readouterr().out


def test_demo_profile_is_valid():
    assert main(["run", "suites/ablation.yaml", "--profile", "demo", "--dry-run"]) == 0


@pytest.mark.slow
def test_torchrun_trains_with_ddp_and_rank_0_writes_once(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    suite = write_suite(tmp_path)
    lines = Path(suite).read_text().split("    - name: ade20k_generated")[0].splitlines()
    Path(suite).write_text("\n".join(line for line in lines if "label: swin" not in line) + "\n")  # bra, proxy
    results = tmp_path / "results"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "attnbench", "train", suite, "--run-name", "ddp", "--results-dir", str(results)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
    done = subprocess.run(command, cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (record,) = RecordStore(results / "tiny_ablation/ddp/records.jsonl").load()
    assert record.status == "ok", record.message
    accuracy = record.metrics["accuracy"]
    assert accuracy["world_size"] == 2 and accuracy["steps_per_epoch"] == 1  # 8 images, batch 4 per process
    assert (results / "tiny_ablation/ddp/report.md").exists()


def test_data_generate_command_writes_a_loadable_set_and_refuses_foreign_folders(tmp_path, capsys):
    root = tmp_path / "generated"
    assert main(["data", "generate", "imagenet", str(root), "--option", "num_classes=2",
                 "--option", "train_per_class=2", "--option", "val_per_class=1"]) == 0
    assert len(ImageNetSubset(root, "train")) == 4
    assert main(["data", "generate", "imagenet", str(root), "--option", "num_classes=3"]) == 2  # a different set
    assert "holds a different generated data set" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("user data")
    assert main(["data", "generate", "ade20k", str(tmp_path / "mine")]) == 2
    assert "not empty and not a generated data set" in capsys.readouterr().err
    assert main(["data", "generate", "ade20k", str(tmp_path / "x"), "--option", "colours=3"]) == 2
    assert "unexpected keyword argument 'colours'" in capsys.readouterr().err
