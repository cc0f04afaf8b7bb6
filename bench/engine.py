"""Engine throughput: mixed-task batches vs the backbone alone vs one sub-batch per task (PEFT's way).

Everything is measured side by side in one run, interleaved round-robin over repetitions, on real
text (Debian package descriptions), real MiniLM, 2 threads. Prints a table and, as its last line, one
JSON object with the headline ratios.

    python -m bench.engine --quick      # < 3 minutes
    python -m bench.engine              # the full table in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
from peft import IA3Config, PeftModel, TaskType, get_peft_model

from bench.adapters import bench_adapter
from bench.texts import sample_texts
from switchboard.server.core.adapter import TaskAdapter
from switchboard.server.core.backbone import load_backbone
from switchboard.server.core.engine import Engine

NUM_LABELS = 8


def make_adapter(spec, kind: str, seed: int, width: int = 64) -> TaskAdapter:
    return bench_adapter(spec, kind, seed, width=width, num_labels=NUM_LABELS)


def peft_model(backbone_model, num_tasks: int, dtype: torch.dtype) -> PeftModel:
    """A PEFT IA3 model with `num_tasks` adapters loaded, the paper's sites, random vectors."""
    base = copy.deepcopy(backbone_model).float()
    cfg = IA3Config(task_type=TaskType.FEATURE_EXTRACTION, target_modules=["key", "value", "output.dense"],
                    feedforward_modules=["output.dense"])
    model = get_peft_model(base, cfg, adapter_name="t0")
    for t in range(1, num_tasks):
        model.add_adapter(f"t{t}", cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    return model.to(dtype).eval()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batches", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--dtypes", default="fp32,bf16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    num_batches = args.batches or (2 if args.quick else 4)
    reps = args.reps or (3 if args.quick else 5)
    task_counts = (1, 8, 32)

    backbone = load_backbone()
    spec = backbone.spec
    texts = sample_texts(args.batch * num_batches, seed=1)
    batches = []
    for b in range(num_batches):
        enc = backbone.tokenizer(texts[b * args.batch:(b + 1) * args.batch], padding=True, truncation=True,
                                 max_length=args.max_length, return_tensors="pt")
        batches.append((enc["input_ids"], enc["attention_mask"]))
    tokens = sum(int(m.sum()) for _, m in batches)
    padded = sum(m.numel() for _, m in batches)
    rows = args.batch * num_batches
    print(f"MiniLM ({spec.fingerprint}), {args.threads} threads, {num_batches} batches × {args.batch} rows of real "
          f"text, max_length {args.max_length}: {tokens} tokens, {padded} with padding; {reps} reps interleaved")

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    results: dict[str, dict[str, float]] = {}
    memory: dict[str, dict[str, int]] = {}
    logits_by_dtype: dict[str, dict[str, torch.Tensor]] = {}
    for dname in args.dtypes.split(","):
        dtype = dtypes[dname]
        bb = load_backbone()
        hf_model = copy.deepcopy(bb.model).to(dtype)
        engine = Engine(bb, precision=dname, device="cpu")
        resident = {kind: [engine.load(make_adapter(spec, kind, seed=i)) for i in range(max(task_counts))]
                    for kind in ("ia3", "houlsby")}
        if dname == "fp32":
            for kind, adapters in resident.items():
                a = make_adapter(spec, kind, seed=0)
                memory[kind] = {"param_bytes_fp32": a.num_params * 4, "resident_bytes": adapters[0].nbytes,
                                "params": a.num_params}
        peft = peft_model(bb.model, max(task_counts), dtype) if dname == "fp32" else None

        def slots_for(kind: str, n_tasks: int, n_rows: int) -> torch.Tensor:
            return torch.tensor([resident[kind][r % n_tasks].slot for r in range(n_rows)])

        def run_hf() -> None:
            with torch.inference_mode():
                for ids, mask in batches:
                    hf_model(input_ids=ids, attention_mask=mask)

        def run_hf_chunked() -> None:
            with torch.inference_mode():
                for ids, mask in batches:
                    for rows, width in engine.chunks(mask):
                        hf_model(input_ids=ids[rows, :width], attention_mask=mask[rows, :width])

        def run_bare() -> None:
            for ids, mask in batches:
                for rows, width in engine.chunks(mask):
                    engine.bare_hidden(ids[rows, :width], mask[rows, :width])

        def run_mixed_unchunked(kind: str, n_tasks: int) -> Callable[[], None]:
            def run() -> None:
                chunk_rows, engine.chunk_rows = engine.chunk_rows, 0
                try:
                    for ids, mask in batches:
                        engine.forward(ids, mask, slots_for(kind, n_tasks, ids.shape[0]))
                finally:
                    engine.chunk_rows = chunk_rows
            return run

        def run_mixed(kind: str, n_tasks: int) -> Callable[[], None]:
            def run() -> None:
                for ids, mask in batches:
                    engine.forward(ids, mask, slots_for(kind, n_tasks, ids.shape[0]))
            return run

        def sub_batches(n_tasks: int, ids: torch.Tensor, mask: torch.Tensor):
            task_of_row = torch.arange(ids.shape[0]) % n_tasks
            for t in range(n_tasks):
                sel = (task_of_row == t).nonzero().squeeze(1)
                sub_mask = mask[sel]
                width = int(sub_mask.sum(1).max())  # each sub-batch padded to its own longest row
                yield t, ids[sel, :width], sub_mask[:, :width]

        def run_engine_per_task(kind: str, n_tasks: int) -> Callable[[], None]:
            def run() -> None:
                for ids, mask in batches:
                    for t, sub_ids, sub_mask in sub_batches(n_tasks, ids, mask):
                        engine.forward(sub_ids, sub_mask, torch.full((sub_ids.shape[0],), resident[kind][t].slot))
            return run

        def run_peft_per_task(n_tasks: int) -> Callable[[], None]:
            def run() -> None:
                with torch.inference_mode():
                    for ids, mask in batches:
                        for t, sub_ids, sub_mask in sub_batches(n_tasks, ids, mask):
                            peft.set_adapter(f"t{t}")
                            peft(input_ids=sub_ids, attention_mask=sub_mask)
            return run

        configs: dict[str, Callable[[], None]] = {
            "backbone (HF forward, whole batch)": run_hf,
            "backbone (HF forward, same length-sorted chunks)": run_hf_chunked,
            "backbone (our forward, same chunks)": run_bare,
        }
        for kind in ("ia3", "houlsby"):
            for n in task_counts:
                configs[f"{kind} mixed, {n} tasks"] = run_mixed(kind, n)
            configs[f"{kind} mixed, 32 tasks, one padded batch (no chunks)"] = run_mixed_unchunked(kind, 32)
        for n in (8, 32):
            configs[f"ia3 per-task sub-batches (ours), {n} tasks"] = run_engine_per_task("ia3", n)
            if peft is not None:
                configs[f"ia3 per-task sub-batches (PEFT set_adapter), {n} tasks"] = run_peft_per_task(n)
        configs["houlsby per-task sub-batches (ours), 32 tasks"] = run_engine_per_task("houlsby", 32)

        for fn in configs.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(reps):
            for name, fn in configs.items():
                times[name].append(timed(fn))
        results[dname] = {name: rows / statistics.median(ts) for name, ts in times.items()}
        ids, mask = batches[0]
        logits_by_dtype[dname] = {kind: engine.forward(ids, mask, slots_for(kind, 32, ids.shape[0]))
                                  for kind in ("ia3", "houlsby")}

    print("\n'vs bb' = throughput / the fastest backbone-alone row of the same dtype (same texts, same chunks)")
    print(f"\n{'configuration':62s}" + "".join(f"{d + ' seq/s':>12s}{'vs bb':>8s}" for d in results))
    names = list(next(iter(results.values())).keys())
    summary: dict[str, float] = {}
    for name in names:
        line = f"{name:62s}"
        for dname, res in results.items():
            backbone_rate = max(v for k, v in res.items() if k.startswith("backbone"))
            if name in res:
                line += f"{res[name]:12.1f}{res[name] / backbone_rate:8.3f}"
            else:
                line += f"{'–':>12s}{'':8s}"
        print(line)

    fp = results.get("fp32") or next(iter(results.values()))
    backbone_rate = max(v for k, v in fp.items() if k.startswith("backbone"))
    summary["ia3_vs_backbone"] = fp["ia3 mixed, 32 tasks"] / backbone_rate
    summary["houlsby_vs_backbone"] = fp["houlsby mixed, 32 tasks"] / backbone_rate
    peft_key = "ia3 per-task sub-batches (PEFT set_adapter), 32 tasks"
    summary["mixed_vs_per_task"] = fp["ia3 mixed, 32 tasks"] / fp.get(peft_key, fp["ia3 per-task sub-batches (ours), 32 tasks"])
    summary["mixed_vs_per_task_ours"] = fp["ia3 mixed, 32 tasks"] / fp["ia3 per-task sub-batches (ours), 32 tasks"]
    summary["houlsby_mixed_vs_per_task"] = fp["houlsby mixed, 32 tasks"] / fp["houlsby per-task sub-batches (ours), 32 tasks"]
    summary["backbone_seq_per_s_fp32"] = backbone_rate
    summary["chunked_vs_one_padded_batch_ia3"] = fp["ia3 mixed, 32 tasks"] / fp["ia3 mixed, 32 tasks, one padded batch (no chunks)"]
    if "bf16" in results and "fp32" in results:
        bf = results["bf16"]
        summary["bf16_speedup_ia3"] = bf["ia3 mixed, 32 tasks"] / fp["ia3 mixed, 32 tasks"]
        summary["bf16_speedup_houlsby"] = bf["houlsby mixed, 32 tasks"] / fp["houlsby mixed, 32 tasks"]
        for kind in ("ia3", "houlsby"):
            a, b = logits_by_dtype["fp32"][kind], logits_by_dtype["bf16"][kind]
            summary[f"bf16_max_abs_logit_diff_{kind}"] = (a - b).abs().max().item()
        summary["fp32_logit_abs_max"] = logits_by_dtype["fp32"]["ia3"].abs().max().item()
    for kind, mem in memory.items():
        summary[f"bytes_per_task_{kind}"] = mem["resident_bytes"]
        summary[f"param_bytes_{kind}"] = mem["param_bytes_fp32"]
    print("\nmemory per resident task (fp32):",
          {k: f"{m['resident_bytes']} B resident for {m['params']} params ({m['param_bytes_fp32']} B)"
           for k, m in memory.items()})
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}))


if __name__ == "__main__":
    main()
