"""Does a training job starve serving? Classify latency with and without a few-shot job running.

One run, the same offered load (Poisson, one real text per request, Zipf over 20 (IA)³ tasks) in three
phases: (a) no job; (b) a job with the defaults (its own process, nice 19 + SCHED_IDLE, 1 torch thread); (c) the same
job unbounded (nice 0, as many threads as cores) on a second server — what the defaults protect
against. Also the job's own speed with and without serving load. The job: (IA)³, 32 Debian-sections
examples per class (bench.debian_sections).

    python -m bench.train_job --quick
    python -m bench.train_job
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
from pathlib import Path

from bench.accuracy import as_examples, per_class
from bench.debian_sections import load as load_splits
from bench.serve import open_loop, upload_all, zipf_tasks
from bench.texts import sample_texts
from switchboard.clients.local_server import running_server
from switchboard.clients.sdk import Client, Job


def wait_running(client: Client, job_id: str, timeout: float = 300) -> Job:
    deadline = time.monotonic() + timeout
    while (job := client.job(job_id)).step == 0:
        if job.done or time.monotonic() > deadline:
            raise RuntimeError(f"job did not start: {job}")
        time.sleep(0.2)
    return job


def job_steps_per_s(client: Client, job_id: str, seconds: float) -> float:
    first = client.job(job_id)
    time.sleep(seconds)
    last = client.job(job_id)
    return (last.step - first.step) / seconds


def phase(url: str, args: argparse.Namespace, examples: list[tuple[str, str]], train_env: str | None) -> dict:
    tasks = zipf_tasks(20, 20000, 1.1, random.Random(1))
    texts = sample_texts(2000, seed=2)
    with Client(url, timeout=120) as client:
        out: dict = {}
        if train_env is None:
            out["latency"] = asyncio.run(open_loop(url, tasks, texts, args.rate, args.duration, seed=3))
            return out
        job = client.train("trained", examples, steps=args.steps, batch_size=16)
        wait_running(client, job.id)
        out["job_steps_per_s_idle"] = job_steps_per_s(client, job.id, args.probe)
        steps_before, t0 = client.job(job.id).step, time.monotonic()
        out["latency"] = asyncio.run(open_loop(url, tasks, texts, args.rate, args.duration, seed=3))
        out["job_steps_per_s_under_load"] = (client.job(job.id).step - steps_before) / (time.monotonic() - t0)
        still_running = not client.job(job.id).done
        client.cancel_job(job.id)
        out["job_ran_through_the_phase"] = still_running
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rate", type=float, default=20.0, help="offered classify load, requests/s")
    parser.add_argument("--data", type=Path, default=Path("bench/data/debian-sections"))
    args = parser.parse_args()
    args.duration = 20.0 if args.quick else 60.0
    args.probe = 10.0 if args.quick else 20.0
    args.warmup = 10.0 if args.quick else 20.0
    args.steps = 2000  # long enough to outlast a phase; cancelled after it
    examples = per_class(as_examples(load_splits(args.data)["train"]), 32, seed=32)
    cores = os.cpu_count() or 1
    results: dict = {"rate": args.rate, "duration_s": args.duration, "cores": cores,
                     "examples": len(examples)}
    bounded = {"SWITCHBOARD_TRAIN_NICE": "19", "SWITCHBOARD_TRAIN_THREADS": "1", "SWITCHBOARD_TRAIN_SCHED_IDLE": "1"}
    unbounded = {"SWITCHBOARD_TRAIN_NICE": "0", "SWITCHBOARD_TRAIN_THREADS": str(cores),
                 "SWITCHBOARD_TRAIN_SCHED_IDLE": "0"}
    for name, env in (("bounded", bounded), ("unbounded", unbounded)):
        with tempfile.TemporaryDirectory() as tmp, running_server(Path(tmp), env=env) as (url, _):
            upload_all(url, 20)
            # warm-up: the first forwards of each padded length pay one-off kernel set-up costs
            asyncio.run(open_loop(url, zipf_tasks(20, 5000, 1.1, random.Random(9)), sample_texts(500, seed=9),
                                  args.rate, args.warmup, seed=9))
            if name == "bounded":
                results["no_job"] = phase(url, args, examples, None)
                print("no job:", results["no_job"], flush=True)
            results[name] = phase(url, args, examples, name)
            print(f"{name} job:", results[name], flush=True)
    base = results["no_job"]["latency"]["p99_ms"]
    results["p99_ratio_bounded_vs_no_job"] = results["bounded"]["latency"]["p99_ms"] / base
    results["p99_ratio_unbounded_vs_no_job"] = results["unbounded"]["latency"]["p99_ms"] / base
    print(json.dumps({k: v for k, v in results.items() if k.startswith("p99")}, indent=1))
    out = Path("bench/out/train_job.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
