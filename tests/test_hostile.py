"""Hostile clients, each probe from the review that found it, against the real app on loopback HTTP.

Every probe must be refused with a 4xx JSON error (or fail as a bounded job) quickly, while `/health`
keeps answering within 1 s, and the process's memory stays bounded. The values are the reported ones
where a test can afford them, scaled to the tiny test model otherwise.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import contextmanager

import httpx
import psutil
import pytest
import torch
from safetensors.torch import save

from switchboard.adapter_store.formats import native
from tests.factories import TEXTS, random_adapter
from tests.server_fixture import serving_in_thread, upload

LIMITS = dict(max_task_bytes=16 << 20, max_adapter_bytes=8 << 20, max_pending_uploads=3, max_train_examples=4096,
              max_upload_bytes=64 << 20)


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    with serving_in_thread(tmp_path_factory.mktemp("data"), tiny_dir[1], model=tiny_dir[0], **LIMITS) as (url, state):
        fp = httpx.get(f"{url}/v1/backbone").json()["fingerprint"]
        assert upload(url, "keep", random_adapter(tiny_dir[1].spec, seed=1), fp).status_code == 201
        yield url, state, fp


class HealthWatch:
    """Polls /health in the background; records the slowest answer and any failure."""

    def __init__(self, url: str) -> None:
        self.url, self.slowest, self.failures = url, 0.0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    status = client.get(f"{self.url}/health").status_code
                except httpx.HTTPError as exc:
                    status = repr(exc)
                self.slowest = max(self.slowest, time.monotonic() - start)
                if status != 200:
                    self.failures.append(status)
                self._stop.wait(0.05)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@contextmanager
def probe(url: str, max_seconds: float = 1.0):
    """The probe must finish within `max_seconds` while /health answers within 1 s throughout."""
    with HealthWatch(url) as watch:
        start = time.monotonic()
        yield
        elapsed = time.monotonic() - start
    assert elapsed < max_seconds, f"probe took {elapsed:.2f} s"
    assert not watch.failures and watch.slowest < 1.0, (watch.failures, watch.slowest)


def refused(r: httpx.Response, status: int, needle: str = "") -> dict:
    assert r.status_code == status, (r.status_code, r.text[:500])
    error = r.json()["error"]
    assert needle in error["message"], error
    assert len(r.content) < 4096, "an error body stays small"
    return error


def peft_files(spec, feedforward, keys_per_site: int = 1) -> list:
    """A PEFT IA3 directory for the tiny model; `keys_per_site` > 1 maps several tensors to one site."""
    tensors = {}
    for i in range(spec.num_layers):
        for k in range(keys_per_site):
            prefix = "base_model.model." + ("bert." if k == 0 else f"m{chr(97 + k % 26)}{chr(97 + k // 26)}.")
            tensors[f"{prefix}encoder.layer.{i}.attention.self.key.ia3_l"] = torch.ones(spec.hidden_size, 1)
    tensors["base_model.model.classifier.weight"] = torch.randn(2, spec.hidden_size)
    tensors["base_model.model.classifier.bias"] = torch.zeros(2)
    config = {"peft_type": "IA3", "task_type": "SEQ_CLS", "target_modules": ["key"], "feedforward_modules": feedforward}
    return [("files", ("adapter_config.json", json.dumps(config).encode())),
            ("files", ("adapter_model.safetensors", save(tensors)))]


def test_a_regex_bomb_in_a_peft_config_never_runs(server, tiny_dir):
    url, _, _ = server
    with probe(url):  # (a|aa)*c against a long name backtracks exponentially in `re`
        for pattern in ["(a|aa)*c", "(.*a){20}", "(x+x+)+y", "^(([a-z])+.)+[A-Z]([a-z])+$"]:
            r = httpx.put(f"{url}/v1/tasks/bomb", files=peft_files(tiny_dir[1].spec, pattern))
            refused(r, 422, "list")
    assert httpx.get(f"{url}/v1/tasks/bomb").status_code == 404


def test_several_peft_tensors_for_one_site_are_refused(server, tiny_dir):
    url, _, _ = server
    with probe(url):
        r = httpx.put(f"{url}/v1/tasks/dupes", files=peft_files(tiny_dir[1].spec, ["output.dense"], keys_per_site=100))
        refused(r, 422, "both scale layer")


def test_label_count_and_length_are_bounded_at_every_entry_point(server, tiny_dir):
    url, _, fp = server
    spec = tiny_dir[1].spec
    many = random_adapter(spec, seed=2, num_labels=20_000)  # the reported 20,000 labels, in the native metadata
    long_label = random_adapter(spec, seed=3, num_labels=2)
    long_label.labels = ["x" * (20 << 20), "y"]  # one 20 MiB label name
    with probe(url, max_seconds=5):
        refused(upload(url, "labels", many, fp), 422, "at most 1024")
        refused(upload(url, "labels", long_label, fp), 422, "header")
        ok = native.dumps(random_adapter(spec, seed=4, num_labels=2), fp)
        form = {"labels": json.dumps(["z" * 200, "w"])}
        refused(httpx.put(f"{url}/v1/tasks/labels", files=[("files", ("a.safetensors", ok))], data=form), 422,
                "at most 128")
        body = {"examples": [{"text": "a", "label": "l" * 500}, {"text": "b", "label": "m"}]}
        refused(httpx.post(f"{url}/v1/tasks/labels/train", json=body), 422, "at most 128")
    assert httpx.get(f"{url}/v1/tasks/labels").status_code == 404


def test_zero_padding_expansion_is_checked_before_it_is_allocated(server, tiny_dir):
    """One wide layer (AdapterHub's per-layer widths are padded to the widest for every layer)."""
    url, state, _ = server
    spec = tiny_dir[1].spec
    d, wide = spec.hidden_size, 8192  # a 4 MiB file that pads to 25 MB, over max_task_bytes
    prefix = "bert.encoder.layer.0.attention.output.adapters.hub."
    tensors = {prefix + "adapter_down.0.weight": torch.zeros(wide, d), prefix + "adapter_down.0.bias": torch.zeros(wide),
               prefix + "adapter_up.weight": torch.zeros(d, wide), prefix + "adapter_up.bias": torch.zeros(d)}
    config = {"config": {"reduction_factor": 16, "original_ln_before": False, "original_ln_after": True,
                         "residual_before_ln": True, "non_linearity": "relu"}, "name": "hub"}
    head = {"config": {"head_type": "classification", "layers": 1, "num_labels": 2}}
    files = [("files", ("adapter_config.json", json.dumps(config).encode())),
             ("files", ("adapter.safetensors", save(tensors))),
             ("files", ("head_config.json", json.dumps(head).encode())),
             ("files", ("model_head.safetensors", save({"heads.hub.1.weight": torch.zeros(2, d),
                                                        "heads.hub.1.bias": torch.zeros(2)})))]
    rss = psutil.Process().memory_info().rss
    with probe(url):
        refused(httpx.put(f"{url}/v1/tasks/wide", files=files), 422, "pads to")
        head["config"]["num_labels"] = 10**9  # a label count that would build a billion names
        narrow = {name: (t[:4] if "down" in name else t[:, :4] if name.endswith("up.weight") else t).contiguous()
                  for name, t in tensors.items()}
        files[1] = ("files", ("adapter.safetensors", save(narrow)))
        files[2] = ("files", ("head_config.json", json.dumps(head).encode()))
        refused(httpx.put(f"{url}/v1/tasks/wide", files=files), 422, "outputs but num_labels")
    assert psutil.Process().memory_info().rss - rss < 64 << 20


def test_an_adapter_larger_than_the_slot_budget_is_refused_at_upload(server, tiny_dir):
    url, state, fp = server
    engine = state.runtime.engine
    big = random_adapter(tiny_dir[1].spec, seed=5, kind="houlsby", width=3000)  # 9.3 MB: under max_task_bytes
    big_bytes = engine.task_bytes(big)
    assert LIMITS["max_adapter_bytes"] < big_bytes < LIMITS["max_task_bytes"]
    evictions = state.metrics.adapter_evictions._value.get()
    with probe(url, max_seconds=3):
        refused(upload(url, "huge", big, fp), 507, "whole slot budget")
    assert httpx.get(f"{url}/v1/tasks/huge").status_code == 404  # nothing written
    assert state.metrics.adapter_evictions._value.get() == evictions  # nobody else was evicted
    assert httpx.post(f"{url}/v1/classify", json={"task": "keep", "inputs": "x"}).status_code == 200


def test_training_requests_are_bounded_at_submission(server):
    url, _, _ = server
    long_text = " ".join(["word"] * 300)  # 1.5 KB: 4,000 of them fit the 8 MiB body limit, as reported
    many_long = [{"text": long_text, "label": str(i % 4)} for i in range(4000)]
    with probe(url, max_seconds=8):
        refused(httpx.post(f"{url}/v1/tasks/big/train", json={"examples": many_long, "batch_size": 256}), 422,
                "batch_size")
        refused(httpx.post(f"{url}/v1/tasks/big/train", json={"examples": many_long, "batch_size": 64,
                                                               "steps": 2000}), 422, "tokens")
        refused(httpx.post(f"{url}/v1/tasks/big/train", json={"examples": many_long[:2], "seed": 2**80}), 422, "seed")
        nan = b'{"examples": [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}], "lr": NaN}'
        refused(httpx.post(f"{url}/v1/tasks/big/train", content=nan, headers={"content-type": "application/json"}), 422)
    assert httpx.get(f"{url}/v1/jobs").json()["jobs"] == []


def test_request_fields_have_bounds(server):
    url, _, _ = server
    with probe(url):
        error = refused(httpx.post(f"{url}/v1/classify", json={"task": "t" * 1_000_000, "inputs": "x"}), 422)
        assert len(error["message"]) < 300  # the 1 MB name is not echoed
        refused(httpx.post(f"{url}/v1/classify", json={"task": "keep", "inputs": "x" * 60_000}), 413, "characters")
        refused(httpx.post(f"{url}/v1/classify", json={"task": "keep", "inputs": "x", "top_k": 2**80}), 422)
        refused(httpx.post(f"{url}/v1/tasks/keep/rollback", json={"version": 2**80}), 422)
        refused(httpx.get(f"{url}/v1/jobs/{'j' * 1000}"), 422)
        refused(httpx.get(f"{url}/v1/tasks", params={"limit": 10**9}), 422)


def test_405_names_the_allowed_methods_and_openapi_lists_every_error(server):
    url, _, _ = server
    r = httpx.patch(f"{url}/v1/tasks/keep")
    assert r.status_code == 405 and set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "PUT", "DELETE"}
    spec = httpx.get(f"{url}/openapi.json").json()
    put = spec["paths"]["/v1/tasks/{task}"]["put"]["responses"]
    assert {"400", "413", "422", "429", "507"} <= set(put)


def test_listing_is_paged_and_bounded(server, tiny_dir):
    url, _, fp = server
    for i in range(5):
        assert upload(url, f"page-{i}", random_adapter(tiny_dir[1].spec, seed=10 + i), fp).status_code == 201
    names, after = [], None
    while True:
        page = httpx.get(f"{url}/v1/tasks", params={"limit": 2, **({"after": after} if after else {})}).json()
        assert len(page["tasks"]) <= 2 and all("versions" not in t for t in page["tasks"])
        names += [t["task"] for t in page["tasks"]]
        if not (after := page["next"]):
            break
    assert names == sorted(names) and {f"page-{i}" for i in range(5)} <= set(names)


def test_slow_uploads_do_not_starve_classification(server, tiny_dir):
    """Uploads parse on their own bounded pool; classify tokenizes on another."""
    url, _, fp = server
    blob = native.dumps(random_adapter(tiny_dir[1].spec, seed=6, kind="houlsby", width=1200), fp)  # ~7.4 MB
    latencies: list[float] = []
    statuses: list[int] = []

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            async def uploads() -> None:
                rs = await asyncio.gather(*[client.put(f"{url}/v1/tasks/slow-{i}",
                                                       files=[("files", ("a.safetensors", blob))]) for i in range(8)])
                statuses.extend(r.status_code for r in rs)

            async def classify() -> None:
                await asyncio.sleep(0.05)
                for _ in range(15):
                    start = time.monotonic()
                    r = await client.post(f"{url}/v1/classify", json={"task": "keep", "inputs": TEXTS[:2]})
                    assert r.status_code == 200
                    latencies.append(time.monotonic() - start)

            await asyncio.gather(uploads(), classify())

    with HealthWatch(url) as watch:
        asyncio.run(run())
    assert set(statuses) <= {201, 429} and 429 in statuses  # max_pending_uploads=3: the rest wait their turn
    assert max(latencies) < 1.0, latencies
    assert not watch.failures and watch.slowest < 1.0


def test_memory_comes_back_after_uploads_of_ever_new_shapes(server, tiny_dir):
    """Distinct label counts and widths each made a pool that lived forever; now an unused pool goes."""
    url, state, fp = server
    engine = state.runtime.engine
    pools = engine.pool_count
    with httpx.Client(timeout=30) as client:
        for i in range(60):
            adapter = random_adapter(tiny_dir[1].spec, seed=100 + i, kind="mixed", width=4 + i, num_labels=2 + i)
            r = client.put(f"{url}/v1/tasks/shape-{i}", files=[("files", ("a.safetensors", native.dumps(adapter, fp)))])
            assert r.status_code == 201
            assert client.post(f"{url}/v1/classify", json={"task": f"shape-{i}", "inputs": "x"}).status_code == 200
        assert engine.pool_count >= pools + 60
        for i in range(60):
            assert client.delete(f"{url}/v1/tasks/shape-{i}").status_code == 204
    assert engine.pool_count <= pools  # (the slot budget may have evicted older tasks' pools too)
    keys = engine.batch_params(torch.tensor([1])).parts  # a forward still gathers only its own pools
    assert set(keys) <= {"ia3", "head"}


def test_sixteen_concurrent_maximum_uploads_leave_the_front_memory_bounded(server, tiny_dir):
    """Issue 20: 16 concurrent 200 MiB F16 uploads took +4.2 GB (each body read whole before the pending
    gate, then converted to F32 before the size check). Now permits are taken from the headers (429
    before the body), admitted bodies are spooled and read one at a time in the upload thread, and a
    safetensors file whose float32 size passes max_task_bytes is refused from its header."""
    url, _, fp = server
    elements = 24 << 20  # 48 MiB as F16, 96 MiB as float32: over max_task_bytes (16 MiB) only once converted
    blob = save({"ia3.k_out": torch.zeros(elements // 384, 384, dtype=torch.float16)},
                metadata={"format": "switchboard", "format_version": "1", "kind": "ia3", "labels": "[]"})
    assert len(blob) < LIMITS["max_upload_bytes"]
    process = psutil.Process()
    before = process.memory_info().rss
    peak = before
    statuses: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, process.memory_info().rss)
            stop.wait(0.01)

    async def run() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            rs = await asyncio.gather(*[client.put(f"{url}/v1/tasks/big-{i}", files=[("files", ("a.safetensors", blob))])
                                        for i in range(16)])
            statuses.extend(r.status_code for r in rs)
            for r in rs:
                assert r.status_code != 422 or "max_task_bytes" in r.json()["error"]["message"], r.text

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with HealthWatch(url) as watch:
        asyncio.run(run())
    stop.set()
    sampler.join()
    assert set(statuses) <= {422, 429} and 422 in statuses, statuses
    # the client's own 16 copies of the body are in this process too (this test serves in a thread)
    growth = peak - before - 16 * len(blob)
    assert growth < 256 << 20, f"front grew {growth >> 20} MiB beyond the client's copies"
    assert not watch.failures  # (its latency here includes this process's own client sending 768 MB)


def test_a_tenant_flooding_at_every_per_request_maximum_does_not_get_another_refused(tiny_dir, tmp_path):
    """Issue 20: A's concurrent 64 × maximum-length embed requests made B's one-text classify wait 10-23 s
    and then refused B (429) — admission counted every tenant's in-flight tokens in B's wait. Now A's
    requests run as chunks B's rows go between, and B's wait counts only what runs before it: B is
    answered every time, while A's own backlog is still queued."""
    admin = "hostile-fairness-admin-key-0123456789abc"
    with serving_in_thread(tmp_path, tiny_dir[1], model=tiny_dir[0], admin_key=admin) as (url, state):
        head = {"Authorization": f"Bearer {admin}"}
        keys = {t: {"Authorization": "Bearer " + httpx.post(f"{url}/v1/keys", headers=head, json={
            "tenant": t, "scopes": ["classify", "manage"]}).json()["key"]} for t in ("a", "b")}
        fp = httpx.get(f"{url}/v1/backbone", headers=head).json()["fingerprint"]
        assert upload(url, "t", random_adapter(tiny_dir[1].spec, seed=3), fp, headers=keys["b"]).status_code == 201
        long_text = "lorem ipsum dolor sit amet " * 110  # 3,000 characters, past max_length: the most a row costs
        batcher = state.runtime.batcher
        a_statuses: list[int] = []
        b_statuses: list[int] = []
        a_backlog_after_b: list[int] = []
        done = asyncio.Event()

        async def run() -> None:
            async with httpx.AsyncClient(timeout=120) as client:
                async def flooder() -> None:
                    while not done.is_set():
                        r = await client.post(f"{url}/v1/embed", headers=keys["a"], json={"inputs": [long_text] * 64})
                        a_statuses.append(r.status_code)
                        if r.status_code == 429:
                            await asyncio.sleep(0.05)

                async def light() -> None:
                    while batcher.queued_rows("a") == 0:  # A's backlog is there first
                        await asyncio.sleep(0.01)
                    for _ in range(10):
                        r = await client.post(f"{url}/v1/classify", headers=keys["b"], json={"task": "t", "inputs": "x"})
                        b_statuses.append(r.status_code)
                        a_backlog_after_b.append(batcher.queued_rows("a"))
                    done.set()

                await asyncio.gather(light(), *[flooder() for _ in range(32)])

        asyncio.run(run())
    assert set(a_statuses) <= {200, 429} and 429 in a_statuses  # A is refused for its own demand
    assert b_statuses == [200] * 10, b_statuses  # B never, while A causes the backlog
    assert sum(rows > 0 for rows in a_backlog_after_b) >= 5, a_backlog_after_b  # B did not wait A's backlog out
