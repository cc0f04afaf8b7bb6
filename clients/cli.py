"""The `switchboard` command line: serve, train, and every API operation.

    switchboard serve                          start the server (flags also read SWITCHBOARD_<FLAG>)
    switchboard upload TASK DIR|FILE…          a new version of TASK     (--canary, --labels)
    switchboard classify TASK[,TASK…] TEXT…    predictions (--top-k, --raw-scores; several tasks: fan-out)
    switchboard embed TEXT…                    the backbone's sentence embeddings
    switchboard tasks | task TASK | rollback TASK VERSION | delete TASK
    switchboard train --data F --kind K --out DIR       train locally
    switchboard train --remote TASK --data F            a few-shot job on the server, with a progress bar
    switchboard jobs [ID] [--cancel]           training jobs
    switchboard keys create|list|revoke        API keys (the admin key)
    switchboard tfew-task PEFT_DIR --model T5 --choices A,B --out F   a T5 (IA)3 adapter with its answer choices
    switchboard backbone | convert DIR | --version

Client commands talk to --url (SWITCHBOARD_URL, default http://127.0.0.1:8000) with --api-key
(SWITCHBOARD_API_KEY, else SWITCHBOARD_ADMIN_KEY; the admin key acts for --tenant). These options go
before or after the command. Output is for people; --json prints the API's JSON for scripts. An error is
one line on stderr with a hint; exit codes: 0 ok, 1 the server refused (4xx/5xx) or `serve` could not
start, 2 bad usage or a local file problem, 3 the server could not be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

DEFAULT_URL = os.environ.get("SWITCHBOARD_URL", "http://127.0.0.1:8000")
EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3


class CliError(Exception):
    """One line for stderr, a hint, an exit code."""

    def __init__(self, message: str, hint: str | None = None, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.message, self.hint, self.code = message, hint, code


def _cmd_serve(args: argparse.Namespace) -> int:
    import faulthandler
    import logging
    import signal

    from switchboard.server.log_config import configure_logging, logging_config
    from switchboard.server.settings import ADMIN_KEY_HINT, Settings, admin_key_refusal, open_mode_refusal

    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "model": args.model,
                                   "data_dir": args.data_dir, "store": args.store, "dtype": args.dtype,
                                   "threads": args.threads, "engine_workers": args.engine_workers,
                                   "fronts": args.fronts,
                                   "max_length": args.max_length, "log_level": args.log_level,
                                   "log_format": args.log_format, "admin_key_file": args.admin_key_file,
                                   "allow_unauthenticated": args.allow_unauthenticated or None}.items()
                 if v is not None}
    settings = Settings(**overrides)
    configure_logging(settings.log_level, settings.log_format)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: every thread's stack on stderr
    log = logging.getLogger("switchboard.clients.cli")
    has_key = settings.admin_key is not None or settings.admin_key_file is not None
    refusal = open_mode_refusal(settings.host, has_key, settings.allow_unauthenticated)
    if refusal:
        log.error(refusal)
        print(f"error: {refusal}", file=sys.stderr)
        return 1
    # Refusals that need no model: before anything heavy loads, so they come at once.
    problem = _admin_key_problem(settings, admin_key_refusal, ADMIN_KEY_HINT) or _port_problem(settings.host,
                                                                                               settings.port)
    if problem:
        log.error(problem[0])
        print(f"error: {problem[0]}\nhint: {problem[1]}", file=sys.stderr)
        return 1
    mode = "auth mode" if has_key else (
        "OPEN MODE: no API keys, anyone who can reach this address acts as tenant 'default'")
    log.info("switchboard %s serving on http://%s:%d (%s); data in %s", _version(), settings.host, settings.port,
             mode, Path(settings.data_dir).resolve())
    if not has_key:
        log.warning("open mode: start with SWITCHBOARD_ADMIN_KEY or --admin-key-file for tenants and API keys")
    # the heavy imports (torch, transformers) only once the settings are known to be usable
    from switchboard.server.http.fronts import run_server

    error = run_server(settings, logging_config(settings.log_level, settings.log_format))
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0



def _admin_key_problem(settings, refusal, hint: str) -> tuple[str, str] | None:  # noqa: ANN001
    """(error, hint) for an admin key the server must not start with: too short, a shipped placeholder,
    or an admin key file it cannot read."""
    key = settings.admin_key.get_secret_value() if settings.admin_key is not None else None  # "" is a key too
    if settings.admin_key_file is not None:
        try:
            key = Path(settings.admin_key_file).read_text().strip()
        except OSError as exc:
            return (f"cannot read the admin key file {settings.admin_key_file}: {exc.strerror or exc}",
                    "--admin-key-file (SWITCHBOARD_ADMIN_KEY_FILE) names a readable file holding the key")
    reason = refusal(key)
    return (f"refusing to start: {reason}", hint) if reason else None


def _port_problem(host: str, port: int) -> tuple[str, str] | None:
    """(error, hint) if the server could not listen on host:port: found by binding a probe socket (as
    uvicorn will: SO_REUSEADDR) before the model loads, instead of failing after it."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except socket.gaierror as exc:
            return (f"cannot resolve the host {host!r}: {exc.strerror}",
                    "--host (SWITCHBOARD_HOST) takes an address of this machine, e.g. 127.0.0.1 or 0.0.0.0")
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (f"port {port} on {host} is already in use",
                        f"is a server running there already? Stop it, or pick another port: --port {port + 1} "
                        "(or SWITCHBOARD_PORT)")
            if exc.errno == errno.EADDRNOTAVAIL:
                return (f"{host} is not an address of this machine",
                        "--host (SWITCHBOARD_HOST) takes an address of this machine, e.g. 127.0.0.1 or 0.0.0.0")
            if exc.errno == errno.EACCES:
                return (f"not allowed to listen on port {port} on {host}",
                        "ports below 1024 need privileges: pick --port 8000 or another above 1023")
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}", "check --host and --port"
    return None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("switchboard")
    except PackageNotFoundError:
        return "0+unknown"



HINTS = {
    "unauthorized": "pass --api-key or set SWITCHBOARD_API_KEY (an admin creates keys: switchboard keys create; "
                    "the admin key itself works too, with --tenant for another tenant than 'default')",
    "forbidden": "this key lacks the scope; a key with 'manage' uploads, lists and trains",
    "task_not_found": "list your tasks with: switchboard tasks",
    "version_not_found": "list the versions with: switchboard task TASK",
    "job_not_found": "list the jobs with: switchboard jobs",
    "not_ready": "the server is still loading its model; retry in a few seconds",
    "overloaded": "the server is busy; retry after the time it names",
    "invalid_adapter": "upload a directory saved by `switchboard train`, PEFT or AdapterHub (safetensors files)",
    "canary_failed": "the previous version is still current; fix the adapter or the canary file",
    "insufficient_capacity": "the adapter is larger than the server's slot budget (max_adapter_bytes)",
    "quota_exceeded": "the tenant's quota is full: delete tasks, or ask the admin to raise it",
}


def _api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else SWITCHBOARD_API_KEY, else SWITCHBOARD_ADMIN_KEY (the keys commands: the admin key first)."""
    if args.api_key is not None:
        return args.api_key
    names = ["SWITCHBOARD_API_KEY", "SWITCHBOARD_ADMIN_KEY"]
    if getattr(args, "admin", False):
        names.reverse()
    return next((os.environ[name] for name in names if os.environ.get(name)), None)


def _run_client(args: argparse.Namespace, call: Callable[[object], object],
                show: Callable[[object], None]) -> int:
    """Open the SDK client, run `call`, print its result (JSON with --json); errors become CliErrors."""
    import httpx

    from switchboard.clients.sdk import (
        Client,
        InvalidTaskName,
        InvalidURL,
        ServerTimeout,
        ServerUnreachable,
        SwitchboardError,
    )

    try:
        client = Client(args.url, timeout=args.timeout, api_key=_api_key(args), tenant=args.tenant)
    except InvalidURL as exc:
        raise CliError(exc.message, f"for example --url {DEFAULT_URL} (or set SWITCHBOARD_URL)", EXIT_USAGE) from exc
    url = client.url
    try:
        with client:
            try:
                result = call(client)
            except (ServerUnreachable, InvalidTaskName):
                raise
            except SwitchboardError as exc:  # the hint may ask the server (which backbone it runs)
                raise CliError(f"{exc.message} ({exc.status} {exc.type})", _hint(exc, client)) from exc
    except InvalidTaskName as exc:
        raise CliError(exc.message, f"for example {_safe_name(exc.name)!r}", EXIT_USAGE) from exc
    except ServerTimeout as exc:
        raise CliError(f"the server at {url} did not answer within {args.timeout:g} s",
                       "raise --timeout, or check the server's load", EXIT_UNREACHABLE) from exc
    except ServerUnreachable as exc:
        if isinstance(exc.__cause__, httpx.ConnectError | httpx.ConnectTimeout):
            raise CliError(f"cannot reach the Switchboard server at {url}",
                           "is `switchboard serve` running? Point --url or SWITCHBOARD_URL at it",
                           EXIT_UNREACHABLE) from exc
        raise CliError(exc.message, "check --url", EXIT_UNREACHABLE) from exc
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise CliError(str(exc), code=EXIT_USAGE) from exc
    if args.json:
        print(json.dumps(_plain(result), indent=2))
    else:
        show(result)
    return 0


def _hint(exc, client) -> str | None:  # noqa: ANN001
    """The hint for a server error; an adapter for another backbone gets the command that retrains it."""
    if exc.type == "invalid_adapter" and "backbone" in exc.message and "trained" in exc.message:
        try:
            name = client.backbone()["name"]
        except Exception:  # the hint is best effort: the error itself is what matters
            name = "the server's model (see: switchboard backbone)"
        return (f"an adapter works only on the backbone it was trained on; this server runs {name}: retrain on it "
                "with switchboard train --model DIR --data FILE --kind KIND --out OUT, DIR holding that model "
                "(without --model: the embedded all-MiniLM-L6-v2)")
    return HINTS.get(exc.type)


def _safe_name(name: str) -> str:
    """A valid task name close to `name`: what the hint suggests."""
    import re

    return (re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._") or "my-task")[:64]


def _plain(value: object) -> object:
    """SDK dataclasses → the API's JSON shapes."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _table(rows: list[list[object]], header: list[str]) -> None:
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _show_version(v) -> None:  # noqa: ANN001
    print(f"{v.task} version {v.version}: {v.kind}, {v.num_labels} labels ({', '.join(v.labels[:8])}"
          f"{', …' if len(v.labels) > 8 else ''}), {v.params:,} parameters")


def _cmd_backbone(args: argparse.Namespace) -> int:
    if args.model is not None:  # on this machine, without a server
        info = _load_backbone(args.model).spec.as_dict()
        print(json.dumps(info, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in info.items()))
        return 0
    return _run_client(args, lambda c: c.backbone(),
                       lambda info: print("\n".join(f"{k}: {v}" for k, v in info.items())))


def _load_backbone(path: str | None):  # noqa: ANN202
    """The model of --model (default: the embedded MiniLM); a wrong directory is one line, not a traceback."""
    from switchboard.server.core.backbone import UnsupportedBackboneError, load_backbone

    try:
        return load_backbone(path)
    except (UnsupportedBackboneError, OSError) as exc:
        raise CliError(str(exc), "--model takes a local model directory (config.json, tokenizer and weights); "
                                 "without it: the embedded all-MiniLM-L6-v2", EXIT_USAGE) from exc


def _read_pairs(path: str, text_column: str = "text", label_column: str = "label",
                min_labels: int = 2, column_flags: bool = True) -> list[tuple[str, str]]:
    """(text, label) rows of a .csv or .jsonl file (canaries, training); column_flags: the command has
    --text-column/--label-column to name other columns."""
    from switchboard.server.runtime.training.data import DataError, read_examples

    try:
        return read_examples(Path(path), text_column, label_column, min_labels)
    except DataError as exc:
        raise CliError(str(exc), _data_hint(exc, column_flags), EXIT_USAGE) from exc
    except OSError as exc:
        raise CliError(str(exc), code=EXIT_USAGE) from exc


def _read_training(args: argparse.Namespace, path: str) -> list:
    """The training (or eval) examples as --objective reads them: (input, label) rows, pairs where the file
    has a --text-pair-column; for rerank, (query, document) pairs labelled relevant/irrelevant."""
    from switchboard.server.runtime.training.data import DataError, read_examples, read_rerank_examples

    try:
        if args.objective == "rerank":
            return read_rerank_examples(Path(path))
        return read_examples(Path(path), args.text_column, args.label_column, text_pair_column=args.text_pair_column)
    except DataError as exc:
        raise CliError(str(exc), _data_hint(exc, True), EXIT_USAGE) from exc
    except OSError as exc:
        raise CliError(str(exc), code=EXIT_USAGE) from exc


def _data_hint(exc, column_flags: bool) -> str | None:  # noqa: ANN001
    found = getattr(exc, "found_columns", None)
    if found is None:
        return None
    if not column_flags:
        return f"the file needs a text and a label column (it has: {', '.join(found)})"
    return f"name the columns that hold them: --text-column COLUMN --label-column COLUMN (found: {', '.join(found)})"


def _cmd_upload(args: argparse.Namespace) -> int:
    canary = _read_pairs(args.canary, min_labels=1, column_flags=False) if args.canary else None
    return _run_client(args, lambda c: c.upload(args.task, *args.paths, labels=args.labels, canary=canary),
                       _show_version)


def _cmd_classify(args: argparse.Namespace) -> int:
    tasks = [t for t in args.task.split(",") if t]
    inputs: list = list(args.texts)
    if args.text_pair:
        if len(args.text_pair) != len(args.texts):
            raise CliError(f"{len(args.texts)} TEXT and {len(args.text_pair)} --text-pair; give one --text-pair per "
                           "TEXT (pair tasks) or none", code=EXIT_USAGE)
        inputs = [[a, b] for a, b in zip(args.texts, args.text_pair, strict=True)]

    def call(c):  # noqa: ANN001, ANN202
        if len(tasks) == 1:
            return [c.classify(tasks[0], inputs, raw_scores=args.raw_scores, top_k=args.top_k)]
        return c.classify_many(tasks, inputs, raw_scores=args.raw_scores, top_k=args.top_k)

    def show(results) -> None:  # noqa: ANN001
        for result in results:
            if len(results) > 1:
                print(f"[{result.task} v{result.version}]")
            for text, preds in zip(args.texts, result.predictions):
                shown = "  ".join(f"{p.label} {p.score:.3f}" for p in preds[: args.top_k or 3])
                print(f"{text[:60]!r}: {shown}")

    if args.json:  # the API's own shapes: one result, or {"results": [...]} for several tasks
        def call_json(c):  # noqa: ANN001, ANN202
            out = call(c)
            return out[0] if len(tasks) == 1 else {"results": out}
        return _run_client(args, call_json, lambda _: None)
    return _run_client(args, call, show)


def _cmd_rerank(args: argparse.Namespace) -> int:
    def show(result) -> None:  # noqa: ANN001
        print(f"[{result.task} v{result.version}] {args.query[:60]!r}")
        for rank, r in enumerate(result.results, 1):
            print(f"{rank:>3}. {r.relevance_score:.3f}  [{r.index}] {args.documents[r.index][:70]!r}")

    if args.json:
        def call_json(c):  # noqa: ANN001, ANN202
            r = c.rerank(args.task, args.query, args.documents, top_n=args.top_n, raw_scores=args.raw_scores)
            return {"task": r.task, "version": r.version,
                    "results": [{"index": x.index, "relevance_score": x.relevance_score} for x in r.results]}
        return _run_client(args, call_json, lambda _: None)
    return _run_client(args, lambda c: c.rerank(args.task, args.query, args.documents, top_n=args.top_n,
                                                raw_scores=args.raw_scores), show)


def _cmd_embed(args: argparse.Namespace) -> int:
    def show(vectors) -> None:  # noqa: ANN001
        for text, vector in zip(args.texts, vectors):
            print(json.dumps({"text": text, "embedding": [round(x, 6) for x in vector]}))

    return _run_client(args, lambda c: c.embed(args.texts, normalize=not args.no_normalize), show)


def _cmd_tasks(args: argparse.Namespace) -> int:
    def show(tasks) -> None:  # noqa: ANN001
        if not tasks:
            print("no tasks yet; upload one with: switchboard upload TASK DIR")
            return
        _table([[t.task, t.version, t.kind, t.num_labels, f"{t.params:,}"] for t in tasks],
               ["TASK", "VERSION", "KIND", "LABELS", "PARAMS"])

    return _run_client(args, lambda c: {"tasks": c.tasks()} if args.json else c.tasks(), show)


def _cmd_task(args: argparse.Namespace) -> int:
    def show(t) -> None:  # noqa: ANN001
        _show_version(t)
        _table([[v.version, "current" if v.version == t.version else "", v.kind, v.num_labels, v.sha256[:12]]
                for v in t.versions], ["VERSION", "", "KIND", "LABELS", "SHA256"])

    return _run_client(args, lambda c: c.task(args.task), show)


def _cmd_rollback(args: argparse.Namespace) -> int:
    return _run_client(args, lambda c: c.rollback(args.task, args.version),
                       lambda v: print(f"{v.task}: version {v.version} is current again"))


def _cmd_delete(args: argparse.Namespace) -> int:
    return _run_client(args, lambda c: c.delete(args.task) or {"deleted": args.task},
                       lambda _: print(f"deleted {args.task} and all its versions"))


def _show_job(job) -> None:  # noqa: ANN001
    line = f"job {job.id} ({job.task}): {job.status}, step {job.step}/{job.total_steps}"
    if job.loss is not None:
        line += f", loss {job.loss:.3f}"
    if job.result:
        line += (f"; version {job.result['version']}, accuracy {job.result['accuracy']:.4f} on "
                 f"{job.result['evaluated_on']}")
    if job.error:
        line += f"; {job.error}"
    print(line)


def _cmd_jobs(args: argparse.Namespace) -> int:
    if args.id is None:
        def show(jobs) -> None:  # noqa: ANN001
            if not jobs:
                print("no training jobs")
            _table([[j.id, j.task, j.status, f"{j.step}/{j.total_steps}"] for j in jobs],
                   ["ID", "TASK", "STATUS", "STEP"])
        return _run_client(args, lambda c: {"jobs": c.jobs()} if args.json else c.jobs(), show)
    if args.cancel:
        return _run_client(args, lambda c: c.cancel_job(args.id), _show_job)
    return _run_client(args, lambda c: c.job(args.id), _show_job)


def _cmd_keys(args: argparse.Namespace) -> int:
    """Over HTTP with the admin key (--api-key, else SWITCHBOARD_ADMIN_KEY)."""
    args.admin = True
    if args.keys_command == "create":
        scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]

        def show_created(k) -> None:  # noqa: ANN001
            print(f"key {k.id} for tenant {k.tenant} ({', '.join(k.scopes)}): {k.key}")
            print("store it now: it is shown this once (the server keeps only a hash)", file=sys.stderr)
        return _run_client(args, lambda c: c.create_key(args.tenant_name, scopes, args.name, args.expires_at),
                           show_created)
    if args.keys_command == "list":
        return _run_client(args, lambda c: {"keys": c.keys()} if args.json else c.keys(),
                           lambda keys: _table([[k.id, k.tenant, ",".join(k.scopes), k.name or "", k.expires_at or ""]
                                                for k in keys], ["ID", "TENANT", "SCOPES", "NAME", "EXPIRES"]))
    return _run_client(args, lambda c: c.revoke_key(args.id) or {"revoked": args.id},
                       lambda _: print(f"revoked key {args.id}"))


PICKLE_RENAMES = {"pytorch_adapter.bin": "adapter.safetensors", "pytorch_model_head.bin": "model_head.safetensors",
                  "adapter_model.bin": "adapter_model.safetensors"}


def _cmd_convert(args: argparse.Namespace) -> int:
    """Client side only: the server never unpickles. weights_only=True refuses arbitrary objects."""
    import shutil

    import torch
    from safetensors.torch import save_file

    src, out = Path(args.dir), Path(args.out or f"{args.dir.rstrip('/')}-safetensors")
    out.mkdir(parents=True, exist_ok=True)
    converted = 0
    for path in sorted(src.iterdir()):
        if path.suffix in (".bin", ".pt", ".pth"):
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                print(f"{path}: not a flat dict of tensors", file=sys.stderr)
                return 1
            name = PICKLE_RENAMES.get(path.name, path.with_suffix(".safetensors").name)
            save_file({k: v.contiguous() for k, v in state.items()}, out / name)
            converted += 1
            print(f"{path.name} -> {out / name}")
        elif path.suffix in (".json", ".safetensors") and path.is_file():
            shutil.copy2(path, out / path.name)
    print(f"converted {converted} file(s); upload with: switchboard upload TASK {out}")
    return 0


def _train_local(args: argparse.Namespace) -> int:
    from switchboard.adapter_store.formats import native
    from switchboard.server.runtime.training.data import default_pooling
    from switchboard.server.runtime.training.trainer import TrainConfig, train

    examples = _read_training(args, args.data)
    eval_examples = _read_training(args, args.eval) if args.eval else None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = TrainConfig(kind=args.kind, width=args.width, activation=args.activation, train_layer_norm=args.layer_norm,
                      epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      recipe=args.recipe,
                      max_length=args.max_length, precision=args.precision, head_lr=args.head_lr,
                      head_init=args.head_init, pooling=args.pooling or default_pooling(examples),
                      choices=_choices(args.choices), template=args.template)
    backbone = _load_backbone(args.model)
    adapter, report = train(backbone, examples, cfg, eval_examples)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter.safetensors").write_bytes(native.dumps(adapter, backbone.spec.fingerprint,
                                                           backbone_name=backbone.spec.name))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plotted = _plot_report(report, out / "report.png")
    print(f"eval accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f} on {report['eval_examples']} "
          f"held-out examples, {report['params']:,} params, {report['steps']} steps, "
          f"{report['train_seconds']:.0f} s -> {out / 'adapter.safetensors'}")
    if not plotted:
        print("(pip install matplotlib, or the [plot] extra, for a learning-curve report.png)", file=sys.stderr)
    return 0


def _choices(text: str | None) -> tuple[str, ...] | None:
    """--choices "positive,negative" → the answer choices of a T5 task, in label order."""
    if not text:
        return None
    choices = tuple(c.strip() for c in text.split(","))
    if len(choices) < 2 or not all(choices) or len(set(choices)) != len(choices):
        raise CliError(f"--choices {text[:80]!r}: at least two distinct, non-empty choices, comma-separated",
                       "e.g. --choices positive,negative", EXIT_USAGE)
    return choices


def _cmd_tfew_task(args: argparse.Namespace) -> int:
    """A PEFT (IA)3 adapter of a T5 model (T0, Flan-T5) + its answer choices and template → one native file."""
    from safetensors.torch import load

    from switchboard.adapter_store.formats import native, peft
    from switchboard.server.core.adapter import AdapterValidationError
    from switchboard.server.core.tuners.choices.config import choices_from_text

    backbone = _load_backbone(args.model)
    if backbone.spec.family != "t5":
        raise CliError(f"--model is a {backbone.spec.family} backbone", "tfew-task needs a T5 model directory",
                       EXIT_USAGE)
    directory = Path(args.dir)
    choices = _choices(args.choices) or ()
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
        tensors = load((directory / "adapter_model.safetensors").read_bytes())
        adapter = peft.parse(config, tensors, backbone.spec, labels=list(choices))
        adapter.parts["choices"] = choices_from_text(backbone.tokenizer, list(choices), args.template)
        adapter.validate(backbone.spec)
    except (OSError, ValueError, AdapterValidationError) as exc:
        raise CliError(str(exc), "DIR: a PEFT IA3 adapter saved with save_pretrained (safetensors)",
                       EXIT_USAGE) from exc
    out = Path(args.out)
    out.write_bytes(native.dumps(adapter, backbone.spec.fingerprint, backbone_name=backbone.spec.name))
    print(f"{len(choices)} choices, {adapter.num_params:,} params -> {out}; upload with: switchboard upload TASK {out}")
    return 0


def _plot_report(report: dict, path: Path) -> bool:
    """The learning curve (training loss per step, eval accuracy per epoch) as a PNG, if matplotlib is there."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    history = report["history"]
    fig, loss_ax = plt.subplots(figsize=(7, 4))
    loss_ax.plot(range(1, len(history["loss"]) + 1), history["loss"], color="tab:blue", linewidth=0.8)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("training loss", color="tab:blue")
    if history["eval"]:
        acc_ax = loss_ax.twinx()
        steps, accs = zip(*history["eval"])
        acc_ax.plot(steps, accs, "o-", color="tab:orange")
        acc_ax.set_ylabel("eval accuracy", color="tab:orange")
    stop = report.get("stopped_early")
    title = f"{report['kind']}: eval accuracy {report['accuracy']:.3f}"
    if stop:
        loss_ax.axvline(stop["step"], color="gray", linestyle="--")
        title += f" (stopped early at step {stop['step']}, kept epoch {stop['best_epoch']})"
    loss_ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True




def _cmd_train(args: argparse.Namespace) -> int:
    if args.remote is None:
        if args.kind is None or args.out is None:
            raise CliError("local training needs --kind and --out", "or train on the server: --remote TASK",
                           EXIT_USAGE)
        return _train_local(args)
    return _train_remote(args)


def _train_remote(args: argparse.Namespace) -> int:
    """A few-shot (IA)3 job on the server, followed with a progress bar until it ends."""
    import time

    from tqdm import tqdm

    examples = _read_training(args, args.data)
    eval_examples = _read_training(args, args.eval) if args.eval else None
    choices = _choices(args.choices)
    options = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                                 "seed": args.seed, "choices": list(choices) if choices else None,
                                 "template": args.template}.items() if v is not None}

    def call(client):  # noqa: ANN001, ANN202
        job = client.train(args.remote, examples, eval_examples, **options)
        if args.no_wait:
            return job
        with tqdm(total=job.total_steps, desc=f"job {job.id[:8]} {args.remote}", unit="step",
                  disable=args.json) as bar:
            while not job.done:
                time.sleep(1.0)
                job = client.job(job.id)
                bar.update(job.step - bar.n)
                if job.loss is not None:
                    bar.set_postfix(loss=f"{job.loss:.3f}", status=job.status)
        return job

    code = _run_client(args, call, _show_job)
    return code


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where the help text does not already name one, and never a None/False one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action) or text


def _client_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """Options of every command that talks to a server. They are on the main parser too (with the
    defaults), so they work before the command; the commands' copies default to SUPPRESS, so an option
    given before the command is not reset by the command's parser."""
    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--url", default=default(DEFAULT_URL),
                        help="the server (default: SWITCHBOARD_URL, else http://127.0.0.1:8000); http:// may be "
                             "left out")
    parser.add_argument("--api-key", default=default(None),
                        help="API key (default: SWITCHBOARD_API_KEY, else SWITCHBOARD_ADMIN_KEY)")
    parser.add_argument("--tenant", default=default(None),
                        help="with the admin key: the tenant to act for (X-Switchboard-Tenant; default: 'default')")
    parser.add_argument("--timeout", type=float, default=default(60.0),
                        help="seconds to wait for an answer (default 60)")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print the API's JSON (for scripts)")


def _client_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    _client_options(parent, defaults=False)
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchboard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"switchboard {_version()}")
    _client_options(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    client = _client_parent()

    serve = sub.add_parser("serve", help="start the server (flags also read SWITCHBOARD_<FLAG>)")
    serve.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8000)")
    serve.add_argument("--model", default=None, help="local model directory (default: embedded MiniLM)")
    serve.add_argument("--data-dir", default=None, help="data directory (default ./switchboard-data)")
    serve.add_argument("--store", default=None,
                       help="postgresql://… for a store shared by replicas (SWITCHBOARD_STORE); default: the "
                            "embedded SQLite store in --data-dir")
    serve.add_argument("--dtype", choices=["auto", "fp32", "bf16", "bf16-full", "int8"], default=None,
                       help="encoder precision (default auto: bf16-full where the hardware runs bf16 natively, else "
                            "fp32; SWITCHBOARD_DTYPE; docs/precision.md)")
    serve.add_argument("--fronts", type=int, default=None,
                       help="HTTP front processes on the one port (HTTP, auth, tokenizing) in front of the one "
                            "scheduler; default: one per 4 cores, at most 8 (1: a single process)")
    serve.add_argument("--engine-workers", type=int, default=None,
                       help="engine worker processes (default: 1 on a GPU, else min(cores, 2); 0 = the engine "
                            "runs inside the server process; SWITCHBOARD_ENGINE_WORKERS)")
    serve.add_argument("--threads", type=int, default=None,
                       help="torch threads per engine worker (default: cores ÷ workers; SWITCHBOARD_THREADS)")
    serve.add_argument("--max-length", type=int, default=None, help="truncate inputs to this many tokens")
    serve.add_argument("--admin-key-file", default=None,
                       help="file holding the admin API key: auth mode (or SWITCHBOARD_ADMIN_KEY); without one the "
                            "server runs in open mode, allowed on loopback only")
    serve.add_argument("--allow-unauthenticated", action="store_true",
                       help="allow open mode (no API keys) on a non-loopback address "
                            "(SWITCHBOARD_ALLOW_UNAUTHENTICATED)")
    serve.add_argument("--log-level", default=None, choices=["critical", "error", "warning", "info", "debug"],
                       help="log level (default info; SWITCHBOARD_LOG_LEVEL)")
    serve.add_argument("--log-format", default=None, choices=["text", "json"],
                       help="text, or one JSON object per line for log shippers (default text; SWITCHBOARD_LOG_FORMAT)")
    serve.set_defaults(func=_cmd_serve)

    backbone = sub.add_parser("backbone", parents=[client], help="the served backbone: name, sizes, fingerprint")
    backbone.add_argument("--model", default=None, help="describe this local model directory instead (no server)")
    backbone.set_defaults(func=_cmd_backbone)

    upload = sub.add_parser("upload", parents=[client], help="upload an adapter directory or files as TASK's next "
                                                             "version")
    upload.add_argument("task", metavar="TASK")
    upload.add_argument("paths", nargs="+", metavar="DIR|FILE", help="a saved adapter directory, or its files")
    upload.add_argument("--labels", nargs="+", default=None, help="label names, in head order (PEFT heads)")
    upload.add_argument("--canary", default=None, metavar="FILE",
                        help="a .csv/.jsonl of text,label rows: the version goes live only if it classifies each "
                             "as stated (else 409, nothing stored)")
    upload.set_defaults(func=_cmd_upload)

    classify = sub.add_parser("classify", parents=[client], help="classify texts with TASK (TASK1,TASK2,…: each "
                                                                 "text under every task, in one batch)")
    classify.add_argument("task", metavar="TASK[,TASK…]")
    classify.add_argument("texts", nargs="+", metavar="TEXT")
    classify.add_argument("--top-k", type=int, default=None, help="the k best labels per text (default: all; "
                                                                  "3 shown)")
    classify.add_argument("--raw-scores", action="store_true", help="logits instead of probabilities")
    classify.add_argument("--text-pair", action="append", default=None, metavar="TEXT_PAIR",
                          help="the second text of a pair, once per TEXT in order (pair tasks: NLI, duplicates, "
                               "relevance)")
    classify.set_defaults(func=_cmd_classify)

    rerank = sub.add_parser("rerank", parents=[client], help="sort DOCUMENTs by TASK's relevance to QUERY (a pair "
                                                             "task)")
    rerank.add_argument("task", metavar="TASK")
    rerank.add_argument("query", metavar="QUERY")
    rerank.add_argument("documents", nargs="+", metavar="DOCUMENT")
    rerank.add_argument("--top-n", type=int, default=None, help="the n most relevant documents (default: all)")
    rerank.add_argument("--raw-scores", action="store_true", help="the relevance logit instead of a probability")
    rerank.set_defaults(func=_cmd_rerank)

    embed = sub.add_parser("embed", parents=[client], help="sentence embeddings from the served backbone")
    embed.add_argument("texts", nargs="+", metavar="TEXT")
    embed.add_argument("--no-normalize", action="store_true", help="raw mean-pooled vectors, not unit length")
    embed.set_defaults(func=_cmd_embed)

    tasks = sub.add_parser("tasks", parents=[client], help="list your tasks")
    tasks.set_defaults(func=_cmd_tasks)
    task = sub.add_parser("task", parents=[client], help="one task with all its versions")
    task.add_argument("task", metavar="TASK")
    task.set_defaults(func=_cmd_task)
    rollback = sub.add_parser("rollback", parents=[client], help="make an earlier version of TASK current again")
    rollback.add_argument("task", metavar="TASK")
    rollback.add_argument("version", type=int, metavar="VERSION")
    rollback.set_defaults(func=_cmd_rollback)
    delete = sub.add_parser("delete", parents=[client], help="delete TASK and all its versions")
    delete.add_argument("task", metavar="TASK")
    delete.set_defaults(func=_cmd_delete)

    jobs = sub.add_parser("jobs", parents=[client], help="training jobs on the server (one with ID)")
    jobs.add_argument("id", nargs="?", default=None, metavar="ID")
    jobs.add_argument("--cancel", action="store_true", help="cancel job ID")
    jobs.set_defaults(func=_cmd_jobs)

    convert = sub.add_parser("convert", help="turn a PEFT/AdapterHub directory's .bin files into safetensors "
                                             "(on your machine: the server never loads pickles)")
    convert.add_argument("dir")
    convert.add_argument("--out", default=None, help="output directory (default: DIR-safetensors)")
    convert.set_defaults(func=_cmd_convert)

    tr = sub.add_parser("train", parents=[client], formatter_class=_DefaultsFormatter,
                        help="train an adapter + head on the frozen backbone (or --remote: a job on the server)",
                        description="Train an (IA)3 or Houlsby adapter and a head on the frozen backbone, on this "
                                    "machine, into --out (upload it with `switchboard upload`); or, with --remote "
                                    "TASK, a few-shot (IA)3 job on the server that registers TASK's next version. "
                                    "Defaults are the papers' recipes (docs/training.md): (IA)3 after T-Few, lr 3e-3; "
                                    "Houlsby m=64, lr 1e-3; AdamW, 10 % warm-up then linear decay, batch 32, early "
                                    "stop on eval accuracy; the head starts as a linear probe on the frozen features "
                                    "(LP-FT). At <= 32 examples per class (single texts) --recipe auto picks the "
                                    "few-shot recipe instead (Houlsby m=16 with a contrastive warm-up; (IA)3 on "
                                    "T-Few's fixed schedule); pair data train a pair-pooled head (docs/pairs.md).")
    tr.add_argument("--data", required=True, help="training data, .csv or .jsonl (text and label columns)")
    tr.add_argument("--kind", choices=["houlsby", "ia3", "mixed"], default=None, help="what to train (local)")
    tr.add_argument("--out", default=None, help="output directory: adapter.safetensors, report.json (local)")
    tr.add_argument("--remote", default=None, metavar="TASK",
                    help="train on the server as TASK's next version ((IA)3 few-shot job); follows it with a "
                         "progress bar")
    tr.add_argument("--no-wait", action="store_true", help="with --remote: print the job and return")
    tr.add_argument("--objective", choices=["classify", "rerank"], default="classify",
                    help="rerank: --data rows of query, positive, negatives (a JSONL list, or one per CSV row) become "
                         "relevant/irrelevant pairs; serve the task with /v1/rerank")
    tr.add_argument("--pooling", choices=["mean", "cls", "pooler", "pair"], default=None,
                    help="the head's pooling (default: pair for pair data, mean otherwise; docs/pairs.md)")
    tr.add_argument("--text-column", default="text", help="the text column of --data/--eval")
    tr.add_argument("--text-pair-column", default="text_pair",
                    help="the second text of pair tasks; used when --data has this column")
    tr.add_argument("--label-column", default="label", help="the label column of --data/--eval")
    tr.add_argument("--eval", default=None, help="held-out data (default: a stratified 10 %% of --data)")
    tr.add_argument("--model", default=None, help="local model directory (default: embedded MiniLM)")
    tr.add_argument("--width", type=int, default=64, help="Houlsby bottleneck width m")
    tr.add_argument("--activation", default="gelu", help="Houlsby activation: gelu, gelu_tanh, relu, silu, tanh")
    tr.add_argument("--layer-norm", action="store_true", help="also train per-task LayerNorm gains/biases")
    tr.add_argument("--epochs", type=int, default=10, help="at most this many passes (early stop on eval)")
    tr.add_argument("--steps", type=int, default=None, help="a fixed number of steps instead (no early stop)")
    tr.add_argument("--recipe", choices=["auto", "few-shot", "epochs"], default="auto",
                    help="auto: the few-shot recipe at <= 32 examples per class, else epochs (docs/training.md)")
    tr.add_argument("--batch-size", type=int, default=32, help="examples per step")
    tr.add_argument("--lr", type=float, default=None,
                    help="peak learning rate of the adapter (default: 3e-3 for ia3, 1e-3 for houlsby)")
    tr.add_argument("--head-lr", type=float, default=None, help="the head's learning rate (default: --lr)")
    tr.add_argument("--head-init", choices=["probe", "random"], default="probe",
                    help="probe: start the head as a linear probe on frozen features (LP-FT); random: small init")
    tr.add_argument("--max-length", type=int, default=None,
                    help="truncate to this many tokens (default: the model's limit, as the server does; "
                         "serve with the same --max-length to get the trained predictions)")
    tr.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: autocast matmuls while training (faster on CPUs with bf16; weights stay fp32)")
    tr.add_argument("--seed", type=int, default=0, help="random seed (split, init, order)")
    tr.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    tr.add_argument("--choices", default=None,
                    help="T5 backbones: the answer choice of each label, comma-separated (the labels themselves); "
                         "trains T-Few's recipe (docs/backbones.md)")
    tr.add_argument("--template", default=None,
                    help='T5 backbones: the prompt around each text, e.g. "{text} Is it positive or negative?"')
    tr.set_defaults(func=_cmd_train)

    tfew = sub.add_parser("tfew-task", help="a PEFT (IA)3 adapter of a T5 model + its answer choices and template "
                                            "-> one adapter file to upload (docs/backbones.md)")
    tfew.add_argument("dir", metavar="PEFT_DIR")
    tfew.add_argument("--model", required=True, help="the T5 / T0 / Flan-T5 model directory the server runs")
    tfew.add_argument("--choices", required=True, help="answer choices, comma-separated (they become the labels)")
    tfew.add_argument("--template", default=None, help='the prompt around each text, holding {text} once')
    tfew.add_argument("--out", required=True, help="the adapter file to write (.safetensors)")
    tfew.set_defaults(func=_cmd_tfew_task)

    keys = sub.add_parser("keys", parents=[client], help="API keys (the admin key: --api-key or SWITCHBOARD_ADMIN_KEY)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="create|list|revoke")
    create = keys_sub.add_parser("create", parents=[client], help="a new key for TENANT; prints its secret once")
    create.add_argument("tenant_name", metavar="TENANT")
    create.add_argument("--scopes", default="classify", help="comma-separated: classify, manage (default classify)")
    create.add_argument("--name", default=None, help="a name to recognise the key by")
    create.add_argument("--expires-at", default=None, help="RFC 3339 time after which the key is refused")
    keys_sub.add_parser("list", parents=[client], help="live keys, without secrets")
    revoke = keys_sub.add_parser("revoke", parents=[client], help="revoke a key by id, effective at once")
    revoke.add_argument("id", metavar="ID")
    keys.set_defaults(func=_cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
