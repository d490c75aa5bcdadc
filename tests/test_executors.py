"""Suite cases as submitit jobs: the LocalExecutor runs the real job path on this machine; the Slurm path is
built (its sbatch script) and checked without a cluster."""

from pathlib import Path

import pytest

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
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
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
