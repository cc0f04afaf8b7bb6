"""Precision study: fp32, mixed bf16, full bf16 and int8 on real data, side by side in one run.

Data: the Debian-sections test split (`python -m bench.debian_sections`), as whole descriptions
(long: ~94 tokens, truncated at 128) and as synopses alone (short: a few words). Adapters: an (IA)³
and a Houlsby adapter trained on the train split (`switchboard train`, fixed steps; trained here if
missing). For every precision and text set: top-1 agreement with fp32, max |Δlogit|, accuracy, and
the engine's useful tokens/s on the same batches (mixed-task batches of both adapters, length-sorted
chunks, 2 threads). Writes bench/out/precision.json, which bench/roofline.py quotes.

    python -m bench.precision            # ~6 minutes once the adapters exist
    python -m bench.precision --quick    # 400 texts per set

The modes are the server's `--dtype` values (server/core/precision.py); `auto` picks the fastest that
passes on hardware with native bf16.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from bench.debian_sections import load as load_splits
from switchboard.adapter_store.formats import native
from switchboard.server.core.adapter import TaskAdapter
from switchboard.server.core.backbone import load_backbone
from switchboard.server.core.engine import Engine

MODES = ("fp32", "bf16", "bf16-full", "int8")
THRESHOLD = 0.995  # top-1 agreement with fp32 a default must reach


def ensure_adapter(kind: str, data: Path, out: Path, steps: int, max_length: int) -> Path:
    """The trained adapter for `kind`, training it with the CLI if it is not there yet."""
    path = out / f"prec-{kind}"
    if not (path / "adapter.safetensors").exists():
        print(f"training {kind} ({steps} steps) → {path}", flush=True)
        subprocess.run([sys.executable, "-m", "switchboard.clients.cli", "train", "--data", str(data / "train.jsonl"),
                        "--eval", str(data / "dev.jsonl"), "--kind", kind, "--out", str(path), "--steps", str(steps),
                        "--batch-size", "16", "--max-length", str(max_length), "--precision", "bf16"], check=True)
    return path / "adapter.safetensors"


def build_engine(mode: str, max_length: int) -> Engine:
    return Engine(load_backbone(max_length=max_length), precision=mode, device="cpu")


def run_mode(mode: str, adapters: list[TaskAdapter], sets: dict[str, list[str]], max_length: int,
             batch: int) -> dict[str, dict]:
    """Logits per (text set, adapter) and tokens/s per text set, for one precision."""
    engine = build_engine(mode, max_length)
    slots = [engine.load(a).slot for a in adapters]
    out: dict[str, dict] = {}
    for name, texts in sets.items():
        batches = []
        for b in range(0, len(texts), batch):
            enc = engine.tokenize(texts[b:b + batch], max_length=max_length)
            rows = enc["input_ids"].shape[0]
            # every batch mixes both adapters: each text once per adapter
            ids = enc["input_ids"].repeat(len(adapters), 1)
            mask = enc["attention_mask"].repeat(len(adapters), 1)
            task_slots = torch.tensor([s for s in slots for _ in range(rows)])
            batches.append((ids, mask, task_slots))
        engine.forward(*batches[0])  # warm-up
        tokens = sum(int(m.sum()) for _, m, _ in batches)
        start = time.perf_counter()
        logits = [engine.forward(*b) for b in batches]
        seconds = time.perf_counter() - start
        per_adapter: list[list[torch.Tensor]] = [[] for _ in adapters]
        for (ids, _, _), lg in zip(batches, logits):
            rows = ids.shape[0] // len(adapters)
            for i in range(len(adapters)):
                per_adapter[i].append(lg[i * rows:(i + 1) * rows])
        out[name] = {"tokens_per_s": tokens / seconds,
                     "logits": [torch.cat(p)[:, : a.num_labels] for p, a in zip(per_adapter, adapters)]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", type=Path, default=Path("bench/data/debian-sections"))
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=500, help="training steps of a missing adapter")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(2)
    test = load_splits(args.data)["test"]
    if args.quick:
        test = test[:400]
    gold = [r["label"] for r in test]
    sets = {"long": [r["text"] for r in test], "short": [r.get("synopsis") or r["text"] for r in test]}
    args.out.mkdir(parents=True, exist_ok=True)
    fingerprint = load_backbone().spec.fingerprint
    adapters = {kind: native.loads(ensure_adapter(kind, args.data, args.out, args.steps, args.max_length).read_bytes(),
                                   fingerprint) for kind in ("ia3", "houlsby")}
    kinds = list(adapters)
    runs = {mode: run_mode(mode, list(adapters.values()), sets, args.max_length, args.batch) for mode in MODES}
    rows = []
    for mode in MODES:
        for set_name in sets:
            row = {"mode": mode, "texts": set_name, "tokens_per_s": runs[mode][set_name]["tokens_per_s"],
                   "speedup": runs[mode][set_name]["tokens_per_s"] / runs["fp32"][set_name]["tokens_per_s"]}
            for i, kind in enumerate(kinds):
                lg, ref = runs[mode][set_name]["logits"][i], runs["fp32"][set_name]["logits"][i]
                labels = adapters[kind].labels
                pred = [labels[j] for j in lg.argmax(1).tolist()]
                row[f"{kind}_agreement"] = (lg.argmax(1) == ref.argmax(1)).float().mean().item()
                row[f"{kind}_max_abs_diff"] = (lg - ref).abs().max().item()
                row[f"{kind}_accuracy"] = sum(p == g for p, g in zip(pred, gold)) / len(gold)
            row["agreement"] = min(row[f"{k}_agreement"] for k in kinds)
            rows.append(row)
    print(f"\n{len(test)} test texts per set; adapters: {', '.join(kinds)}")
    print(f"{'mode':10s}{'texts':7s}{'tok/s':>8s}{'× fp32':>8s}" + "".join(
        f"{k + ' agree':>13s}{k + ' max|Δ|':>14s}{k + ' acc':>10s}" for k in kinds))
    for r in rows:
        print(f"{r['mode']:10s}{r['texts']:7s}{r['tokens_per_s']:8.0f}{r['speedup']:8.2f}" + "".join(
            f"{r[k + '_agreement']:13.4f}{r[k + '_max_abs_diff']:14.4f}{r[k + '_accuracy']:10.4f}" for k in kinds))
    passing = [m for m in MODES if all(r["agreement"] >= THRESHOLD for r in rows if r["mode"] == m)]
    fastest = max(passing, key=lambda m: min(r["speedup"] for r in rows if r["mode"] == m))
    summary = {"texts": len(test), "passing": passing, "fastest_passing": fastest,
               "agreement": {m: min(r["agreement"] for r in rows if r["mode"] == m) for m in MODES},
               "speedup": {m: min(r["speedup"] for r in rows if r["mode"] == m) for m in MODES}, "rows": rows}
    (args.out / "precision.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))


if __name__ == "__main__":
    main()
