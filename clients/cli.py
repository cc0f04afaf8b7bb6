"""The `switchboard` command line: serve, backbone, upload, classify, tasks, convert, train."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_URL = os.environ.get("SWITCHBOARD_URL", "http://127.0.0.1:8000")


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from switchboard.server.http.app import create_app
    from switchboard.server.log_config import configure_logging, logging_config
    from switchboard.server.runtime.tenancy import open_mode_refusal
    from switchboard.server.settings import Settings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "model": args.model,
                                   "data_dir": args.data_dir, "store": args.store, "dtype": args.dtype,
                                   "threads": args.threads, "engine_workers": args.engine_workers,
                                   "max_length": args.max_length, "log_level": args.log_level,
                                   "log_format": args.log_format, "admin_key_file": args.admin_key_file,
                                   "allow_unauthenticated": args.allow_unauthenticated or None}.items()
                 if v is not None}
    settings = Settings(**overrides)
    configure_logging(settings.log_level, settings.log_format)
    log = logging.getLogger("switchboard.clients.cli")
    has_key = settings.admin_key is not None or settings.admin_key_file is not None
    refusal = open_mode_refusal(settings.host, has_key, settings.allow_unauthenticated)
    if refusal:
        log.error(refusal)
        print(f"error: {refusal}", file=sys.stderr)
        return 1
    mode = "auth mode" if has_key else (
        "OPEN MODE: no API keys, anyone who can reach this address acts as tenant 'default'")
    log.info("switchboard %s serving on http://%s:%d (%s); data in %s", _version(), settings.host, settings.port,
             mode, Path(settings.data_dir).resolve())
    if not has_key:
        log.warning("open mode: start with SWITCHBOARD_ADMIN_KEY or --admin-key-file for tenants and API keys")
    server: uvicorn.Server | None = None

    def stop() -> None:  # startup failed: exit instead of answering 503 forever
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_startup_failure=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                           log_config=logging_config(settings.log_level, settings.log_format),
                                           timeout_graceful_shutdown=int(settings.request_timeout_s)))
    server.run()
    error = app.state.switchboard.startup_error
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("switchboard")
    except PackageNotFoundError:
        return "0+unknown"


def _cmd_backbone(args: argparse.Namespace) -> int:
    from switchboard.server.core.backbone import load_backbone

    print(json.dumps(load_backbone(args.model).spec.as_dict(), indent=2))
    return 0


def _print(value: object) -> None:
    print(json.dumps(value, indent=2, default=lambda o: o.__dict__))


def _sdk_call(fn) -> int:
    """Run one SDK call; a server error prints its JSON-ish description and exits 1."""
    from switchboard.clients.sdk import SwitchboardError

    try:
        _print(fn())
    except SwitchboardError as exc:
        _print({"error": {"status": exc.status, "type": exc.type, "message": exc.message}})
        return 1
    return 0


def _client(args: argparse.Namespace, timeout: float = 60.0, admin: bool = False):  # noqa: ANN202
    from switchboard.clients.sdk import Client

    key = args.api_key or (os.environ.get("SWITCHBOARD_ADMIN_KEY") if admin else None)
    return Client(args.url, timeout=timeout, api_key=key, tenant=getattr(args, "tenant", None))


def _cmd_upload(args: argparse.Namespace) -> int:
    with _client(args, timeout=120) as client:
        return _sdk_call(lambda: client.upload(args.task, *args.paths, labels=args.labels))


def _cmd_classify(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _sdk_call(lambda: client.classify(args.task, args.texts, top_k=args.top_k))


def _cmd_tasks(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _sdk_call(client.tasks)


def _cmd_keys(args: argparse.Namespace) -> int:
    """Over HTTP with the admin key (--api-key, else SWITCHBOARD_ADMIN_KEY)."""
    with _client(args, admin=True) as client:
        if args.keys_command == "create":
            scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
            return _sdk_call(lambda: client.create_key(args.tenant_name, scopes, args.name, args.expires_at))
        if args.keys_command == "list":
            return _sdk_call(client.keys)
        return _sdk_call(lambda: client.revoke_key(args.id) or {"revoked": args.id})


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


def _cmd_train(args: argparse.Namespace) -> int:
    from switchboard.adapter_store.formats import native
    from switchboard.server.core.backbone import load_backbone
    from switchboard.server.runtime.training.data import DataError, read_examples
    from switchboard.server.runtime.training.trainer import TrainConfig, train

    try:
        examples = read_examples(Path(args.data), args.text_column, args.label_column)
        eval_examples = read_examples(Path(args.eval), args.text_column, args.label_column) if args.eval else None
    except (DataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = TrainConfig(kind=args.kind, width=args.width, activation=args.activation, train_layer_norm=args.layer_norm,
                      epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      max_length=args.max_length, precision=args.precision)
    backbone = load_backbone(args.model)
    adapter, report = train(backbone, examples, cfg, eval_examples)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter.safetensors").write_bytes(native.dumps(adapter, backbone.spec.fingerprint))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"eval accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f}, {report['params']} params, "
          f"{report['train_seconds']:.0f} s -> {out / 'adapter.safetensors'}")
    return 0


def _key_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-key", default=None, help="API key (default: SWITCHBOARD_API_KEY)")
    parser.add_argument("--tenant", default=None, help="with the admin key: the tenant to act for")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchboard", description=__doc__)
    parser.add_argument("--version", action="version", version=f"switchboard {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

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

    backbone = sub.add_parser("backbone", help="load the backbone and print its description and fingerprint")
    backbone.add_argument("--model", default=None)
    backbone.set_defaults(func=_cmd_backbone)

    upload = sub.add_parser("upload", help="upload an adapter directory or files as a new version of TASK")
    upload.add_argument("task")
    upload.add_argument("paths", nargs="+")
    upload.add_argument("--labels", nargs="+", default=None, help="label names, in head order")
    upload.add_argument("--url", default=DEFAULT_URL)
    _key_options(upload)
    upload.set_defaults(func=_cmd_upload)

    classify = sub.add_parser("classify", help="classify texts with TASK")
    classify.add_argument("task")
    classify.add_argument("texts", nargs="+")
    classify.add_argument("--top-k", type=int, default=None)
    classify.add_argument("--url", default=DEFAULT_URL)
    _key_options(classify)
    classify.set_defaults(func=_cmd_classify)

    convert = sub.add_parser("convert", help="turn a PEFT/AdapterHub directory's .bin files into safetensors "
                                             "(on your machine: the server never loads pickles)")
    convert.add_argument("dir")
    convert.add_argument("--out", default=None, help="output directory (default: DIR-safetensors)")
    convert.set_defaults(func=_cmd_convert)

    tr = sub.add_parser("train", help="train an adapter + head on the frozen backbone; writes DIR/adapter.safetensors")
    tr.add_argument("--data", required=True, help="training data, .csv or .jsonl")
    tr.add_argument("--kind", choices=["houlsby", "ia3", "mixed"], required=True)
    tr.add_argument("--out", required=True, help="output directory")
    tr.add_argument("--text-column", default="text")
    tr.add_argument("--label-column", default="label")
    tr.add_argument("--eval", default=None, help="held-out data (default: 10 %% of --data)")
    tr.add_argument("--model", default=None, help="local model directory (default: embedded MiniLM)")
    tr.add_argument("--width", type=int, default=64, help="Houlsby bottleneck width")
    tr.add_argument("--activation", default="gelu", help="Houlsby activation: gelu, relu, silu, tanh")
    tr.add_argument("--layer-norm", action="store_true", help="also train per-task LayerNorm gains/biases")
    tr.add_argument("--epochs", type=int, default=10)
    tr.add_argument("--steps", type=int, default=None, help="fixed number of steps (no early stop)")
    tr.add_argument("--batch-size", type=int, default=32)
    tr.add_argument("--lr", type=float, default=None, help="default: 3e-3 (ia3), 1e-3 (houlsby)")
    tr.add_argument("--max-length", type=int, default=None,
                    help="truncate to this many tokens (default: the model's limit, as the server does; "
                         "serve with the same --max-length to get the trained predictions)")
    tr.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: autocast matmuls while training (faster on CPUs with bf16; weights stay fp32)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--threads", type=int, default=0)
    tr.set_defaults(func=_cmd_train)

    keys = sub.add_parser("keys", help="API keys (the admin key: --api-key or SWITCHBOARD_ADMIN_KEY)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="a new key for TENANT; prints its secret once")
    create.add_argument("tenant_name", metavar="TENANT")
    create.add_argument("--scopes", default="classify", help="comma-separated: classify, manage (default classify)")
    create.add_argument("--name", default=None, help="a name to recognise the key by")
    create.add_argument("--expires-at", default=None, help="RFC 3339 time after which the key is refused")
    keys_sub.add_parser("list", help="live keys, without secrets")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by id, effective at once")
    revoke.add_argument("id")
    for p in (create, keys_sub.choices["list"], revoke):
        p.add_argument("--url", default=DEFAULT_URL)
        p.add_argument("--api-key", default=None, help="the admin key (default: SWITCHBOARD_ADMIN_KEY)")
    keys.set_defaults(func=_cmd_keys)

    tasks = sub.add_parser("tasks", help="list the server's tasks")
    tasks.add_argument("--url", default=DEFAULT_URL)
    _key_options(tasks)
    tasks.set_defaults(func=_cmd_tasks)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
