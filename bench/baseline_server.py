"""The baseline for bench/serve.py: the same classify API built the way a PEFT user serves many tasks.

One PeftModel holds every task's (IA)3 adapter; each request switches its task's adapter in
(`set_adapter`) and runs its own forward — PEFT cannot mix (IA)3 tasks in a batch (peft#759).

    python -m bench.baseline_server --port 8001 --tasks 100
    python -m bench.baseline_server --model DIR --device cuda --dtype bf16   # on a GPU (bench/device_check.py)
"""

from __future__ import annotations

import argparse
import asyncio
import threading

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from peft import IA3Config, TaskType, get_peft_model

from bench.adapters import PEFT_BERT_SITES, bench_adapter
from switchboard.server.core.backbone import load_backbone
from switchboard.server.http.schemas import ClassifyRequest

_PEFT_MODULES = {"k_out": "attention.self.key", "v_out": "attention.self.value",
                 "attn_out_in": "attention.output.dense", "ffn_out_in": "output.dense"}


def build_app(num_tasks: int, max_length: int, model_dir: str | None = None, device: str = "cpu",
              dtype: str = "fp32") -> FastAPI:
    backbone = load_backbone(model_dir)
    dev = torch.device(device)
    spec, tokenizer = backbone.spec, backbone.tokenizer
    cfg = IA3Config(task_type=TaskType.FEATURE_EXTRACTION, target_modules=["key", "value", "output.dense"],
                    feedforward_modules=["output.dense"])
    adapters = {f"task-{i}": bench_adapter(spec, "ia3", seed=i, sites=PEFT_BERT_SITES) for i in range(num_tasks)}
    model = None
    for name in adapters:
        if model is None:
            model = get_peft_model(backbone.model, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    assert model is not None
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, adapter in adapters.items():
            for site, vec in adapter.parts["ia3"].vectors.items():
                for layer in range(spec.num_layers):
                    key = f"base_model.model.encoder.layer.{layer}.{_PEFT_MODULES[site]}.ia3_l.{name}"
                    p = params[key]
                    p.copy_(vec[layer].reshape(p.shape))
    model = model.to(dev, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]).eval()
    heads = {name: (a.head.out_w.to(dev), a.head.out_b.to(dev)) for name, a in adapters.items()}
    lock = threading.Lock()

    def run(task: str, texts: list[str]) -> list[list[dict]]:
        adapter = adapters[task]
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(dev)
        out_w, out_b = heads[task]
        with lock, torch.inference_mode():
            model.set_adapter(task)
            hidden = model(**enc).last_hidden_state.float()
            weights = enc["attention_mask"].unsqueeze(-1).float()
            feats = (hidden * weights).sum(1) / weights.sum(1)
            logits = feats @ out_w.t() + out_b
            scores = torch.softmax(logits, -1).cpu()
        out = []
        for row in scores:
            values, idx = torch.sort(row, descending=True)
            out.append([{"label": adapter.labels[i], "score": v} for v, i in zip(values.tolist(), idx.tolist())])
        return out

    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest):
        if body.task not in adapters:
            return JSONResponse({"error": {"type": "task_not_found", "message": body.task}}, status_code=404)
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        predictions = await asyncio.to_thread(run, body.task, texts)
        return {"task": body.task, "version": 1, "predictions": predictions}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--model", default=None, help="local model directory (default: the embedded MiniLM)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    uvicorn.run(build_app(args.tasks, args.max_length, args.model, args.device, args.dtype), host="127.0.0.1",
                port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
