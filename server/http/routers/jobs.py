"""Few-shot training jobs: start one for a task, follow it, cancel it."""

from __future__ import annotations

from fastapi import APIRouter, Response

from switchboard.server.errors import InvalidRequest, PayloadTooLarge
from switchboard.server.http.deps import ERRORS, RuntimeDep, SettingsDep, TaskName
from switchboard.server.http.schemas import JobList, JobSummary, TrainRequest
from switchboard.server.runtime.training.jobs import JobSpec

router = APIRouter(tags=["training jobs"])


@router.post("/v1/tasks/{task}/train", status_code=202, response_model=JobSummary, responses=ERRORS)
def train_task(task: TaskName, body: TrainRequest, runtime: RuntimeDep, settings: SettingsDep,
               response: Response) -> JobSummary:
    """Start a background few-shot (IA)3 job; on success its adapter becomes the task's next version."""
    s = settings
    n = len(body.examples) + len(body.eval_examples or [])
    if n > s.max_train_examples:
        raise PayloadTooLarge(f"{n} examples; at most {s.max_train_examples} per job")
    if body.steps > s.max_train_steps:
        raise InvalidRequest(f"steps: at most {s.max_train_steps}")
    labels = {e.label for e in body.examples}
    if len(labels) < 2:
        raise InvalidRequest("examples need at least two distinct labels")
    if len(labels) > s.max_labels:
        raise InvalidRequest(f"at most {s.max_labels} labels")
    unseen = {e.label for e in body.eval_examples or []} - labels
    if unseen:
        raise InvalidRequest(f"eval_examples use labels absent from examples: {sorted(unseen)[:5]}")
    spec = JobSpec(examples=[(e.text, e.label) for e in body.examples],
                   eval_examples=[(e.text, e.label) for e in body.eval_examples] if body.eval_examples else None,
                   steps=body.steps, batch_size=body.batch_size, lr=body.lr, seed=body.seed)
    job = runtime.jobs.submit(task, spec)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobSummary(**job.summary())


@router.get("/v1/jobs", response_model=JobList, responses=ERRORS)
def list_jobs(runtime: RuntimeDep) -> JobList:
    return JobList(jobs=[JobSummary(**job.summary()) for job in runtime.jobs.list()])


@router.get("/v1/jobs/{job_id}", response_model=JobSummary, responses=ERRORS)
def get_job(job_id: str, runtime: RuntimeDep) -> JobSummary:
    return JobSummary(**runtime.jobs.get(job_id).summary())


@router.delete("/v1/jobs/{job_id}", response_model=JobSummary, responses=ERRORS)
def cancel_job(job_id: str, runtime: RuntimeDep) -> JobSummary:
    """Cancel a queued or running job (a finished one is left as it is)."""
    return JobSummary(**runtime.jobs.cancel(job_id).summary())
