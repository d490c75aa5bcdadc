"""Suite cases as submitit jobs: the LocalExecutor runs the real job path on this machine; the Slurm path is
built (its sbatch script) and checked without a cluster."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

submitit = pytest.importorskip("submitit")

from attnbench.cases import AccuracyCase, AttentionCase  # noqa: E402
from attnbench.cli import main  # noqa: E402
from attnbench.executors import CaseJob, SlurmOptions  # noqa: E402
from attnbench.records import RecordStore  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_submitit_local_executor_runs_cases_as_jobs_and_records_them(tmp_path):
    results = tmp_path / "results"
    assert main(["run", "suites/smoke.yaml", "--results-dir", str(results), "--run", "jobs", "--executor",
                 "submitit-local", "--only", "mechanism=full", "--only", "shape=small"]) == 0
    records = RecordStore(results / "smoke/jobs/records.jsonl").load()
    assert [record.status for record in records] == ["ok", "ok"]
    for record in records:
        job = record.worker["job"]
        assert job["job_id"] and Path(job["stdout"]).parent == results / "smoke/jobs/jobs"
        assert record.metrics["latency"]["median_s"] > 0


def _case(kind: str):
    common = dict(label="x", batch=1, dtype="float32", device="cuda", measures=("latency",))
    if kind == "attention":
        return AttentionCase(mechanism="full", shape="s", height=4, width=4, dim=8, heads=1, mode="forward",
                             **common).with_id()
    task = {"name": "in1k", "task": "classification", "image_size": 224, "data": {"dataset": "imagenet"},
            "train": {"batch_size": 128}}
    return AccuracyCase(model="biformer_tiny", task=task, mode="train", **common).with_id()


def test_slurm_jobs_get_one_gpu_for_speed_and_every_gpu_and_node_for_training(tmp_path, monkeypatch):
    # submitit builds a Slurm executor only where `srun` is on PATH: a stand-in lets it write the sbatch script
    # (nothing is submitted)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    options = SlurmOptions(partition="gpu", time_min=4320, nodes=2, gpus_per_node=8, cpus_per_task=10)
    speed, training = options.parameters(_case("attention")), options.parameters(_case("accuracy"))
    assert (speed["nodes"], speed["gpus_per_node"], speed["tasks_per_node"]) == (1, 1, 1)
    assert (training["nodes"], training["gpus_per_node"], training["tasks_per_node"]) == (2, 8, 8)
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    executor.update_parameters(**training)
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit " + str(tmp_path),
                                                           "uid")
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=4320", "#SBATCH --cpus-per-task=10",
                 "#SBATCH --signal=USR2@90"):
        assert line in script, line


def test_a_preempted_job_requeues_the_same_case():
    job = CaseJob(_case("accuracy").model_dump(mode="json"), "/ckpt/case")
    again = job.checkpoint()
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert again.function.case_json == job.case_json and again.function.checkpoint_dir == "/ckpt/case"


def test_unknown_slurm_options_and_a_missing_cluster_are_one_line(capsys, tmp_path):
    assert main(["run", "suites/smoke.yaml", "--executor", "slurm", "--slurm", "gpus=4", "--results-dir",
                 str(tmp_path)]) == 2
    assert "slurm options:" in capsys.readouterr().err
    assert main(["run", "suites/smoke.yaml", "--executor", "slurm", "--results-dir", str(tmp_path)]) == 2
    assert 'Could not detect "srun"' in capsys.readouterr().err


def _job_processes(folder: Path) -> list[int]:
    """The pids of submitit job tasks running for ``folder`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"submitit.core._submit" in command and str(folder).encode() in command:
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_a_job_preempted_mid_training_is_requeued_and_resumes_to_the_same_weights(tmp_path):
    """Slurm's preemption, as submitit's LocalExecutor reproduces it: SIGUSR2 to the job's task after the first
    epoch's checkpoint; the job requeues itself (exit 144), the controller restarts it, training resumes from the
    checkpoint and ends with the weights and history of an uninterrupted run (run by the default executor)."""
    import signal
    import time

    from tests.accuracy_demo import write_demo_suite

    suite = write_demo_suite(tmp_path, epochs=6, train_images=512)
    results = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    preempted = subprocess.Popen([sys.executable, "-m", "attnbench", "run", suite, "--results-dir", str(results),
                                  "--run", "preempted", "--executor", "submitit-local"], cwd=REPO, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = results / "accuracy_demo/preempted"
    deadline = time.monotonic() + 300
    while not list(run_dir.glob("checkpoints/*/checkpoint.pt")):  # the first epoch is done and checkpointed
        assert preempted.poll() is None and time.monotonic() < deadline, preempted.communicate()[0]
        time.sleep(0.02)
    tasks = _job_processes(run_dir / "jobs")
    assert len(tasks) == 1
    os.kill(tasks[0], signal.SIGUSR2)
    output, _ = preempted.communicate(timeout=600)
    assert preempted.returncode == 0, output
    assert main(["run", suite, "--results-dir", str(results), "--run", "straight"]) == 0

    (record,) = RecordStore(run_dir / "records.jsonl").load()
    (straight,) = RecordStore(results / "accuracy_demo/straight/records.jsonl").load()
    assert record.status == "ok" and record.worker["job"]["requeues"] == 1, record.message
    assert record.worker["job"]["state"] == "FINISHED"
    history = record.metrics["accuracy"]["history"]
    assert len(history) == 6 and history == straight.metrics["accuracy"]["history"]
    final = torch.load(next(run_dir.glob("checkpoints/*/checkpoint.pt")), weights_only=False)["model"]
    reference = torch.load(next((results / "accuracy_demo/straight").glob("checkpoints/*/checkpoint.pt")),
                           weights_only=False)["model"]
    assert final.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=0, msg=name)
