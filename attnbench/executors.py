"""Where a case runs: ``local`` (the default: a ``spawn`` process per case on this machine, attnbench/runner.py
``execute_case``) or ``slurm``/``submitit-local`` (each case one submitit job, on a Slurm cluster or, for
tests and single machines, submitit's own LocalExecutor that runs the same job path as local processes).

A job runs ``CaseJob``: the case in the job's process (``run_case_safely``). An accuracy case with several
tasks trains with DistributedDataParallel: ``submitit.helpers.TorchDistributedEnvironment`` exports RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT as torchrun would, and rank 0 returns the result. When Slurm
preempts a job or its time limit nears, submitit calls ``CaseJob.checkpoint``, which requeues the same case:
training resumes from its last per-epoch checkpoint (``checkpoint_dir``), a speed case runs again. The job's
id, its stdout/stderr paths and final state go into the record (``result.worker["job"]``).

submitit is an optional dependency: ``pip install 'attnbench[cluster]'``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cases import AccuracyCase, Case
from .records import Result
from .status import Status


@dataclass(frozen=True)
class SlurmOptions:
    """The job's resources (submitit's ``slurm_*`` parameters): from the suite's ``slurm:`` mapping or the
    command line's ``--slurm KEY=VALUE``."""

    partition: str | None = None
    time_min: int = 60
    nodes: int = 1
    gpus_per_node: int = 1
    tasks_per_node: int | None = None  # default: one task per GPU for accuracy cases, one for the others
    cpus_per_task: int | None = None
    mem_gb: int | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    additional: dict[str, Any] = field(default_factory=dict)

    def parameters(self, case: Case) -> dict[str, Any]:
        """submitit's parameters for ``case``: speed and model cases on one GPU, accuracy cases on all."""
        training = isinstance(case, AccuracyCase)
        gpus = self.gpus_per_node if training else min(self.gpus_per_node, 1)
        tasks = self.tasks_per_node or (max(gpus, 1) if training else 1)
        parameters = {"timeout_min": self.time_min, "nodes": self.nodes if training else 1,
                      "gpus_per_node": gpus, "tasks_per_node": tasks, "slurm_partition": self.partition,
                      "cpus_per_task": self.cpus_per_task, "mem_gb": self.mem_gb, "slurm_account": self.account,
                      "slurm_qos": self.qos, "slurm_constraint": self.constraint,
                      "slurm_additional_parameters": self.additional or None, "name": f"attnbench-{case.id}"}
        return {key: value for key, value in parameters.items() if value is not None}


class CaseJob:
    """The callable a submitit job runs: one case, resumable (submitit's Checkpointable protocol).

    ``requeues`` counts the times the case was requeued (preemption or time limit) before this run; it goes into
    the record as ``worker["job"]["requeues"]``."""

    def __init__(self, case_json: dict[str, Any], checkpoint_dir: str | None, requeues: int = 0) -> None:
        self.case_json, self.checkpoint_dir, self.requeues = case_json, checkpoint_dir, requeues
        self.requeuing = False

    def __call__(self) -> dict[str, Any]:
        import submitit

        from .cases import parse_case
        from .worker import run_case_safely

        case = parse_case(self.case_json)
        environment = submitit.JobEnvironment()
        if isinstance(case, AccuracyCase) and environment.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        # submitit's signal handler calls ``checkpoint`` and then leaves the process by ``sys.exit`` (a requeue):
        # that SystemExit must end the job, not be recorded as the case's own error
        result = run_case_safely(case, self.checkpoint_dir,
                                 let_through=lambda error: isinstance(error, SystemExit) and self.requeuing)
        result.worker = {**result.worker, "job": {"requeues": self.requeues}}
        return result.model_dump(mode="json")

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Preempted or at its time limit: requeue the same case (training resumes from its checkpoint)."""
        import submitit

        self.requeuing = True
        return submitit.helpers.DelayedSubmission(CaseJob(self.case_json, self.checkpoint_dir, self.requeues + 1))


class SubmititExecutor:
    """Runs each case as a submitit job and waits for it (a sweep runs its cases one job at a time, so a
    suite's records keep their order; run several shards for parallelism)."""

    def __init__(self, folder: Path, cluster: str = "slurm", options: SlurmOptions | None = None) -> None:
        try:
            import submitit
        except ImportError:
            raise RuntimeError("the slurm executor needs submitit: pip install 'attnbench[cluster]'") from None
        self.folder, self.options = Path(folder), options or SlurmOptions()
        self.executor = submitit.AutoExecutor(folder=self.folder, cluster=cluster)

    def submit(self, case: Case, checkpoint_dir: Path | None):
        self.executor.update_parameters(**self.options.parameters(case))
        return self.executor.submit(CaseJob(case.model_dump(mode="json"), str(checkpoint_dir) if checkpoint_dir
                                            else None))

    def execute(self, case: Case, checkpoint_dir: Path | None = None) -> Result:
        job = self.submit(case, checkpoint_dir)
        job_info = {"job_id": str(job.job_id), "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)}
        try:
            result = Result.model_validate(job.result())
        except Exception as error:  # the job failed or was killed outside the case's own handling
            state = getattr(job, "state", "UNKNOWN")
            result = Result(status=Status.ERROR, message=f"job {job.job_id} ended {state}: "
                            f"{str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__}")
        job_info["state"] = getattr(job, "state", None)
        result.worker = {**result.worker, "job": {**result.worker.get("job", {}), **job_info}}
        return result
