"""The engine on a GPU: the same oracles as on the CPU. Skipped where no CUDA device is present
(`pytest -m cuda` runs only these). Figures measured on a GPU machine, if any, are in
docs/benchmarks.md; none is claimed that was not measured."""

from __future__ import annotations

import random

import httpx
import pytest
import torch

from switchboard.server.core.engine import CapacityError, Engine
from tests.factories import KINDS, TEXTS, random_adapter, tiny_backbone
from tests.server_fixture import running_server, upload

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_mixed_batch_on_the_gpu_equals_rows_run_alone_and_the_cpu():
    backbone = tiny_backbone(seed=11)
    gpu = Engine(tiny_backbone(seed=11), device="cuda")
    cpu = Engine(backbone, device="cpu")
    adapters = [random_adapter(gpu.spec, seed=50 + i, backbone_model=backbone.model, **kw) for i, kw in enumerate(KINDS)]
    gpu_slots = [gpu.load(a).slot for a in adapters]
    cpu_slots = [cpu.load(a).slot for a in adapters]
    rng = random.Random(0)
    rows = [rng.randrange(len(adapters)) for _ in range(16)]
    enc = gpu.tokenize([TEXTS[i % len(TEXTS)] for i in range(16)])
    mixed = gpu.forward(enc["input_ids"], enc["attention_mask"], torch.tensor([gpu_slots[r] for r in rows])).cpu()
    on_cpu = cpu.forward(enc["input_ids"], enc["attention_mask"], torch.tensor([cpu_slots[r] for r in rows]))
    finite = torch.isfinite(on_cpu)
    assert torch.equal(torch.isfinite(mixed), finite)
    assert (mixed[finite] - on_cpu[finite]).abs().max().item() < 1e-3  # TF32 off by default; kernels differ
    for i, r in enumerate(rows):
        alone = gpu.forward(enc["input_ids"][i:i + 1], enc["attention_mask"][i:i + 1], torch.tensor([gpu_slots[r]]))
        c = adapters[r].num_labels
        assert (alone[0, :c].cpu() - mixed[i, :c]).abs().max().item() < 1e-4


def test_bf16_on_the_gpu_agrees_with_fp32():
    fp32 = Engine(tiny_backbone(seed=12), device="cuda")
    bf16 = Engine(tiny_backbone(seed=12), device="cuda", precision="bf16")
    adapter = random_adapter(fp32.spec, seed=3, kind="mixed")
    a, b = fp32.load(adapter).slot, bf16.load(adapter).slot
    enc = fp32.tokenize(TEXTS)
    x = fp32.forward(enc["input_ids"], enc["attention_mask"], torch.full((len(TEXTS),), a))
    y = bf16.forward(enc["input_ids"], enc["attention_mask"], torch.full((len(TEXTS),), b))
    assert (x - y).abs().max().item() < 0.25  # tiny random models amplify rounding, as on the CPU


def test_load_evict_and_budget_on_the_gpu():
    engine = Engine(tiny_backbone(seed=13), device="cuda")
    adapter = random_adapter(engine.spec, seed=4, kind="houlsby")
    engine.max_adapter_bytes = engine.task_bytes(adapter)
    slot = engine.load(adapter).slot
    with pytest.raises(CapacityError):
        engine.load(random_adapter(engine.spec, seed=5, kind="houlsby"))
    engine.unload(slot)
    assert engine.resident_bytes == 0 and engine.pool_count == 0
    assert engine.load(adapter).slot >= 1


def test_server_round_trip_on_the_gpu(tmp_path, tiny_dir):
    path, backbone = tiny_dir
    adapter = random_adapter(backbone.spec, seed=6, kind="mixed")
    with running_server(path, tmp_path / "data", env={"SWITCHBOARD_DTYPE": "fp32"}) as (url, _):
        assert upload(url, "t", adapter, backbone.spec.fingerprint).status_code == 201
        got = httpx.post(f"{url}/v1/classify", json={"task": "t", "inputs": TEXTS[:3], "raw_scores": True}).json()
    cpu = Engine(backbone, device="cpu")
    enc = cpu.tokenize(TEXTS[:3])
    want = cpu.forward(enc["input_ids"], enc["attention_mask"], torch.full((3,), cpu.load(adapter).slot))
    for row, preds in enumerate(got["predictions"]):
        for p in preds:
            assert abs(p["score"] - want[row, int(p["label"][5:])].item()) < 1e-3
