"""How close Switchboard runs to this machine's limit: matmul peak → backbone → engine → server, in one run.

Every figure is in useful tokens/s (real tokens, padding not counted) and as a fraction of the
roofline of its precision: the machine's matmul peak (2048² products, the bench's threads) divided by
the encoder's Linear FLOPs per token. Two text sets: Debian package descriptions (long, ~90 tokens at
a 128 cap) and their synopses (short, ~10 tokens). The PEFT-style baseline server (bench/
baseline_server.py: one adapter switched in per request, fp32, as a PEFT user serves (IA)³) runs in
the same run on the same texts and tasks, also with one busy-looping process beside it (a shared host).

    python -m bench.roofline --quick     # ~10 minutes; prints one JSON line last
    python -m bench.roofline             # longer phases, and the engine-layout comparison
    python -m bench.roofline --compare   # also: in-process vs worker-process layouts, interleaved

The server is closed-loop (64 clients sending back to back) for saturation and open-loop (Poisson) at
70 % of each server's own saturation for latency. The load generator shares the 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from bench.adapters import PEFT_BERT_SITES, bench_adapter
from bench.serve import closed_loop, open_loop, server_process, upload_all, zipf_tasks
from bench.texts import sample_texts
from switchboard.clients.local_server import free_port
from switchboard.server.core.backbone import BackboneSpec, load_backbone
from switchboard.server.core.engine import Engine
from switchboard.server.core.precision import resolve

MAX_LENGTH = 128
TASKS = 100


def linear_flops_per_token(spec: BackboneSpec) -> float:
    """Multiply-adds ×2 of every encoder Linear (Q, K, V, attention output, FFN in, FFN out) per token."""
    d, i = spec.hidden_size, spec.intermediate_size
    return spec.num_layers * 2.0 * (4 * d * d + 2 * d * i)


def matmul_peak(precision: str, threads: int, n: int = 2048, reps: int = 8) -> float:
    """GFLOP/s of n×n products (int8: a dynamically quantized Linear, quantizing its input as served)."""
    torch.set_num_threads(threads)
    a = torch.randn(n, n)
    if precision == "int8":
        warnings.filterwarnings("ignore")
        lin = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(n, n)), {torch.nn.Linear},
                                                     dtype=torch.qint8)

        def run() -> object:
            return lin(a)
    else:
        dt = torch.bfloat16 if precision == "bf16" else torch.float32
        x, w = a.to(dt), torch.randn(n, n).to(dt)

        def run() -> object:
            return x @ w
    run()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def engine_throughput(precision: str, kind: str, texts: list[str], tasks: list[str], rows: int, seconds: float,
                      threads: int, bare: bool = False) -> float:
    """Useful tokens/s of the engine alone on pre-tokenized batches of `rows` requests (mixed tasks)."""
    torch.set_num_threads(threads)
    engine = Engine(load_backbone(max_length=MAX_LENGTH), precision=precision, device="cpu")
    names = sorted(set(tasks))
    slots = {t: engine.load(bench_adapter(engine.spec, kind, seed=i, sites=PEFT_BERT_SITES)).slot
             for i, t in enumerate(names)}
    batches = []
    for b in range(0, len(texts) - rows + 1, rows):
        enc = engine.tokenize(texts[b:b + rows], max_length=MAX_LENGTH)
        batches.append((enc["input_ids"], enc["attention_mask"], torch.tensor([slots[t] for t in tasks[b:b + rows]])))
    def bare_chunks(ids: torch.Tensor, mask: torch.Tensor, _: torch.Tensor) -> None:
        for rows, width in engine.chunks(mask):  # the same length-sorted chunks the engine runs
            engine.bare_hidden(ids[rows, :width], mask[rows, :width])

    run = bare_chunks if bare else engine.forward
    run(*batches[0])
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for ids, mask, s in batches:
            run(ids, mask, s)
            tokens += int(mask.sum())
            if time.perf_counter() - start >= seconds:
                break
    return tokens / (time.perf_counter() - start)


def mean_tokens(texts: list[str]) -> float:
    tok = load_backbone().tokenizer
    enc = tok(texts, truncation=True, max_length=MAX_LENGTH)
    return statistics.fmean(len(ids) for ids in enc["input_ids"])


def _busy_loop() -> None:
    while True:
        pass


@contextmanager
def busy_neighbour(enabled: bool):
    """One process spinning on a core for the block's duration: a shared host."""
    if not enabled:
        yield
        return
    proc = multiprocessing.get_context("spawn").Process(target=_busy_loop, daemon=True)
    proc.start()
    try:
        yield
    finally:
        proc.kill()
        proc.join()


def switchboard_cmd(port: int, data: str) -> list[str]:
    return [sys.executable, "-m", "switchboard.clients.cli", "serve", "--log-level", "warning", "--max-length",
            str(MAX_LENGTH), "--port", str(port), "--data-dir", data]


def baseline_cmd(port: int) -> list[str]:
    return [sys.executable, "-m", "bench.baseline_server", "--tasks", str(TASKS), "--port", str(port)]


def measure_server(name: str, cmd_for, env: dict[str, str] | None, sets: dict[str, tuple[list[str], list[str]]],
                   tokens: dict[str, float], seconds: float, clients: int, latency: bool, busy: bool,
                   upload: bool) -> dict:
    """Saturation (closed loop) per text set, alone and beside a busy neighbour; p99 at 70 % (long)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out: dict = {}
    with tempfile.TemporaryDirectory() as data, server_process(cmd_for(port, data), url, env) as (_, ready_s):
        if upload:
            upload_all(url, TASKS)
        out["ready_s"] = ready_s
        for set_name, (texts, tasks) in sets.items():
            asyncio.run(closed_loop(url, tasks, texts, clients, min(5.0, seconds)))  # warm-up
            sat = asyncio.run(closed_loop(url, tasks, texts, clients, seconds))
            out[set_name] = {**sat, "tokens_per_s": sat["rps"] * tokens[set_name]}
            print(f"{name}: {set_name} texts {sat['rps']:.1f} req/s = {out[set_name]['tokens_per_s']:.0f} "
                  f"useful tokens/s ({sat['refused']} refused, {sat['errors']} errors)", flush=True)
            if busy:
                with busy_neighbour(True):
                    sat_busy = asyncio.run(closed_loop(url, tasks, texts, clients, seconds))
                out[f"{set_name}_busy"] = {**sat_busy, "tokens_per_s": sat_busy["rps"] * tokens[set_name]}
                print(f"{name}: {set_name} texts beside a busy loop {sat_busy['rps']:.1f} req/s", flush=True)
        if latency:
            texts, tasks = sets["long"]
            at70 = asyncio.run(open_loop(url, tasks, texts, 0.7 * out["long"]["rps"], seconds))
            out["at70"] = at70
            print(f"{name}: open loop at 70 % ({at70['offered_rps']:.1f} req/s): p50 {at70['p50_ms']:.0f} ms, "
                  f"p99 {at70['p99_ms']:.0f} ms, {at70['errors']} errors", flush=True)
    return out


def compare_layouts(layouts: list[str], sets, tokens, seconds: float, clients: int, reps: int) -> dict[str, float]:
    """Closed-loop long-text saturation of each engine layout, interleaved `reps` times; medians."""
    runs: dict[str, list[float]] = {layout: [] for layout in layouts}
    only_long = {"long": sets["long"]}
    for rep in range(reps):
        for layout in layouts:
            workers, threads = layout.split("x")
            env = {"SWITCHBOARD_ENGINE_WORKERS": workers, "SWITCHBOARD_THREADS": threads}
            r = measure_server(f"layout {layout} (rep {rep + 1})", switchboard_cmd, env, only_long, tokens, seconds,
                               clients, latency=False, busy=False, upload=True)
            runs[layout].append(r["long"]["tokens_per_s"])
    return {layout: statistics.median(v) for layout, v in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--compare", action="store_true", help="also compare engine layouts (workers × threads)")
    parser.add_argument("--layouts", default="0x2,1x2,2x1", help="workers x threads; 0 = in-process engine")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=None, help="per measurement")
    parser.add_argument("--precision-json", type=Path, default=None,
                        help="the precision study to quote (default: bench/out/precision.json from a local "
                             "`python -m bench.precision` run, else the recorded docs/precision.json)")
    args = parser.parse_args()
    seconds = args.seconds or (12.0 if args.quick else 30.0)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    rng = random.Random(0)
    n = 2000
    tasks = zipf_tasks(TASKS, n, 1.1, rng)
    sets = {"long": (sample_texts(n, seed=2), tasks), "short": (sample_texts(n, seed=3, short=True), tasks)}
    tokens = {name: mean_tokens(texts) for name, (texts, _) in sets.items()}
    spec = load_backbone().spec
    default = resolve("auto", torch.device("cpu"))
    flops = linear_flops_per_token(spec)

    # 1. the roofline of each precision
    peaks = {p: matmul_peak(p, args.threads) for p in ("fp32", "bf16", "int8")}
    roofline = {p: peaks[p] * 1e9 / flops for p in peaks}
    roofline["bf16-full"] = roofline["bf16"]  # the same matmuls; the rest of the encoder in bf16 too
    for p in peaks:
        print(f"matmul peak {p}: {peaks[p]:.0f} GFLOP/s → roofline {roofline[p]:.0f} tokens/s "
              f"({flops / 1e6:.1f} MFLOP per token)", flush=True)

    # 2. backbone and engine alone, same texts, default precision and fp32
    eng_s = seconds / 2
    engine: dict[str, float] = {}
    for p in dict.fromkeys([str(default), "fp32"]):
        texts, t = sets["long"]
        engine[f"backbone_{p}"] = engine_throughput(p, "ia3", texts, t, 64, eng_s, args.threads, bare=True)
        engine[f"ia3_{p}"] = engine_throughput(p, "ia3", texts, t, 64, eng_s, args.threads)
        engine[f"houlsby_{p}"] = engine_throughput(p, "houlsby", texts, t, 64, eng_s, args.threads)
        engine[f"ia3_short_{p}"] = engine_throughput(p, "ia3", *sets["short"], 64, eng_s, args.threads)
        for k in ("backbone", "ia3", "houlsby", "ia3_short"):
            v = engine[f"{k}_{p}"]
            print(f"engine {k} {p}: {v:.0f} useful tokens/s = {v / roofline[p]:.3f} of the {p} roofline", flush=True)

    # 3. servers: Switchboard on its defaults, and the PEFT-style baseline
    layouts = {}
    if args.compare:
        layouts = compare_layouts(args.layouts.split(","), sets, tokens, seconds, args.clients, 1 if args.quick else 3)
    sb = measure_server("switchboard", switchboard_cmd, None, sets, tokens, seconds, args.clients, latency=True,
                        busy=True, upload=True)
    peft = measure_server("peft-baseline", lambda port, _: baseline_cmd(port), None, sets, tokens, seconds,
                          args.clients, latency=True, busy=True, upload=False)
    # the fp32 server of issue 3–13 (engine in the server process): what the default is measured against
    old = measure_server("switchboard fp32 in-process", switchboard_cmd,
                         # its closed loop would otherwise be shed (2 s wait bound) and sit out Retry-After
                         {"SWITCHBOARD_DTYPE": "fp32", "SWITCHBOARD_ENGINE_WORKERS": "0",
                          "SWITCHBOARD_MAX_QUEUE_DELAY_S": "30"}, {"long": sets["long"]},
                         tokens, seconds, args.clients, latency=False, busy=False, upload=True)

    agreement, source = None, "none"
    study_path = args.precision_json or next(
        (p for p in (Path("bench/out/precision.json"), Path("docs/precision.json")) if p.exists()), None)
    if study_path is not None and study_path.exists():
        study = json.loads(study_path.read_text())
        agreement, source = study["agreement"].get(str(default)), f"{study_path} ({study['texts']} texts × 2)"
    r = roofline[str(default)]
    summary = {
        "default_dtype": str(default),
        "roofline_tokens_per_s": round(r),
        "server_tokens_per_s": round(sb["long"]["tokens_per_s"]),
        "server_vs_engine": sb["long"]["tokens_per_s"] / engine[f"ia3_{default}"],
        "server_vs_roofline": sb["long"]["tokens_per_s"] / r,
        "engine_vs_roofline": engine[f"ia3_{default}"] / r,
        "server_vs_peft_short": sb["short"]["rps"] / peft["short"]["rps"],
        "server_vs_peft_long": sb["long"]["rps"] / peft["long"]["rps"],
        "server_vs_peft_short_busy": sb["short_busy"]["rps"] / peft["short_busy"]["rps"],
        "server_vs_peft_long_busy": sb["long_busy"]["rps"] / peft["long_busy"]["rps"],
        "server_vs_fp32_in_process": sb["long"]["tokens_per_s"] / old["long"]["tokens_per_s"],
        "p99_at_70_ms": sb["at70"]["p99_ms"], "peft_p99_at_70_ms": peft["at70"]["p99_ms"],
        "top1_agreement": agreement, "top1_agreement_source": source,
        "errors": sum(sb[k]["errors"] for k in ("long", "short", "long_busy", "short_busy")) + sb["at70"]["errors"],
        "layouts_tokens_per_s": {k: round(v) for k, v in layouts.items()},
        "peaks_gflops": {k: round(v) for k, v in peaks.items()},
        "engine_tokens_per_s": {k: round(v) for k, v in engine.items()},
        "mean_tokens": {k: round(v, 1) for k, v in tokens.items()},
    }
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}))


if __name__ == "__main__":
    main()
