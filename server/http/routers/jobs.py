"""Few-shot training jobs: start one for a task, follow it, cancel it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response

from switchboard.adapter_store.limits import check_labels
from switchboard.server.core.adapter import AdapterValidationError
from switchboard.server.core.tokenize import Input, InvalidText, check_text, tokenize
from switchboard.server.core.tuners.choices.config import choices_from_text
from switchboard.server.errors import InvalidRequest, PayloadTooLarge
from switchboard.server.http.audit import audited
from switchboard.server.http.auth import ManageAuth
from switchboard.server.http.deps import ERRORS, RuntimeDep, SettingsDep, TaskName
from switchboard.server.http.schemas import JobList, JobSummary, LabelledText, TrainRequest
from switchboard.server.runtime.training.jobs import Job, JobSpec

router = APIRouter(tags=["training jobs"])
JobId = Annotated[str, Path(max_length=64, description="a job id, as returned by POST …/train")]


@router.post("/v1/tasks/{task}/train", status_code=202, response_model=JobSummary, responses=ERRORS)
async def train_task(task: TaskName, body: TrainRequest, request: Request, runtime: RuntimeDep,
                     settings: SettingsDep, principal: ManageAuth, response: Response) -> JobSummary:
    """Start a background few-shot (IA)3 job; on success its adapter becomes the task's next version.
    Every bound is checked here, before anything is queued; the job's process is bounded again in
    memory (RLIMIT_AS) and wall time while it runs."""
    with audited(request, principal):
        job = await _submit(task, body, runtime, settings, principal.tenant)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobSummary(**job.summary())


async def _submit(task: str, body: TrainRequest, runtime: RuntimeDep, settings: SettingsDep, tenant: str) -> Job:
    s = settings
    examples = body.examples + (body.eval_examples or [])
    if len(examples) > s.max_train_examples:
        raise PayloadTooLarge(f"{len(examples)} examples; at most {s.max_train_examples} per job")
    if body.steps > s.max_train_steps:
        raise InvalidRequest(f"steps: at most {s.max_train_steps}")
    if body.batch_size > s.max_train_batch_size:
        raise InvalidRequest(f"batch_size: at most {s.max_train_batch_size}")
    longest_text = max(len(e.text) + len(e.text_pair or "") for e in examples)
    if longest_text > s.max_train_text_chars:
        raise PayloadTooLarge(f"an example of {longest_text} characters; at most {s.max_train_text_chars}")
    labels = sorted({e.label for e in body.examples})
    if len(labels) < 2:
        raise InvalidRequest("examples need at least two distinct labels")
    try:
        check_labels(labels, runtime.upload_limits, "example labels")
    except AdapterValidationError as exc:
        raise InvalidRequest(str(exc)) from exc
    unseen = {e.label for e in body.eval_examples or []} - set(labels)
    if unseen:
        raise InvalidRequest(f"eval_examples use labels absent from examples: {sorted(unseen)[:5]}")
    rank = runtime.engine.spec.family == "t5"
    if rank != (body.choices is not None) or (body.template is not None and not rank):
        raise InvalidRequest("answer choices and a template are for T5 backbones (rank classification), and a T5 "
                             "backbone needs choices" if rank else
                             f"choices and template are for T5 backbones; this one is {runtime.engine.spec.family}")
    template_tokens = 0
    if rank:
        outside = sorted({e.label for e in examples} - set(body.choices or ()))
        if outside or len(set(body.choices or ())) != len(body.choices or ()):
            raise InvalidRequest(f"choices must be distinct and cover every label; not among them: {outside[:5]}")
        try:
            check_labels(list(body.choices or ()), runtime.upload_limits, "choices")
            check_text([body.template or "x"], "template")
            # what the job's process will build, here: a template or choice past its token bounds is a 422 now
            built = await runtime.request_pool.run(choices_from_text, runtime.engine.backbone.tokenizer,
                                                   list(body.choices or ()), body.template)
        except (AdapterValidationError, InvalidText, ValueError) as exc:
            raise InvalidRequest(str(exc)) from exc
        template_tokens = int((built.prefix_ids >= 0).sum() + (built.suffix_ids >= 0).sum())
    # Token budget: every step runs at most batch_size rows of at most the longest example's tokens.
    _, mask = await runtime.request_pool.run(tokenize, runtime.engine.backbone.tokenizer,
                                             [_input(e) for e in body.examples], runtime.engine.spec.max_length)
    passes = 1 + len(body.choices or ())  # rank classification: a decoder pass per answer choice
    budget = body.steps * min(body.batch_size, len(body.examples)) * (int(mask.shape[1]) + template_tokens) * passes
    if budget > s.max_train_tokens:
        raise InvalidRequest(f"the job could process {budget} tokens (steps × batch rows × {mask.shape[1]} tokens of "
                             f"the longest example); at most {s.max_train_tokens}: use fewer steps, a smaller "
                             "batch_size or shorter examples")
    if len({e.text_pair is None for e in examples}) > 1:
        raise InvalidRequest("mix of pairs and single texts: give every example a text_pair, or none")
    spec = JobSpec(examples=[(_input(e), e.label) for e in body.examples],
                   eval_examples=[(_input(e), e.label) for e in body.eval_examples] if body.eval_examples else None,
                   steps=body.steps, batch_size=body.batch_size, lr=body.lr, seed=body.seed,
                   choices=tuple(body.choices) if body.choices else None, template=body.template)
    return runtime.jobs.submit(tenant, task, spec)


@router.get("/v1/jobs", response_model=JobList, responses=ERRORS)
def list_jobs(runtime: RuntimeDep, principal: ManageAuth) -> JobList:
    return JobList(jobs=[JobSummary(**job.summary()) for job in runtime.jobs.list(principal.tenant)])


@router.get("/v1/jobs/{job_id}", response_model=JobSummary, responses=ERRORS)
def get_job(job_id: JobId, runtime: RuntimeDep, principal: ManageAuth) -> JobSummary:
    return JobSummary(**runtime.jobs.get(principal.tenant, job_id).summary())


@router.delete("/v1/jobs/{job_id}", response_model=JobSummary, responses=ERRORS)
def cancel_job(job_id: JobId, request: Request, runtime: RuntimeDep, principal: ManageAuth) -> JobSummary:
    """Cancel a queued or running job (a finished one is left as it is)."""
    with audited(request, principal, target=job_id[:64]):
        return JobSummary(**runtime.jobs.cancel(principal.tenant, job_id).summary())


def _input(example: LabelledText) -> Input:
    return example.text if example.text_pair is None else (example.text, example.text_pair)
