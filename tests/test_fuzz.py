"""Fuzzing: schemathesis against the OpenAPI document of a real server process in auth mode (as the
admin, as a key with the classify scope only, and with no key), and hypothesis on the format parsers.
Zero 5xx; every response conforms to the documented schema, status and content type."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from switchboard.adapter_store.formats import native
from switchboard.adapter_store.upload import parse_upload
from switchboard.server.core.adapter import AdapterValidationError
from tests.factories import random_adapter
from tests.server_fixture import running_server

ADMIN = "fuzz-admin-key-0123456789abcdefghijklmnop"
FIXTURES = Path(__file__).parent / "fixtures" / "adapterhub"


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    env = {"SWITCHBOARD_ADMIN_KEY": ADMIN, "SWITCHBOARD_TRAIN_MAX_SECONDS": "2", "SWITCHBOARD_MAX_QUEUED_JOBS": "2"}
    with running_server(tiny_dir[0], tmp_path_factory.mktemp("data"), env=env) as (url, _):
        fp = httpx.get(f"{url}/v1/backbone", headers={"Authorization": f"Bearer {ADMIN}"}).json()["fingerprint"]
        blob = native.dumps(random_adapter(tiny_dir[1].spec, seed=1), fp)
        for task in ("sentiment", "topic"):  # realistic objects for the generated requests to reach
            httpx.put(f"{url}/v1/tasks/{task}", headers={"Authorization": f"Bearer {ADMIN}"},
                      files=[("files", ("a.safetensors", blob))]).raise_for_status()
        key = httpx.post(f"{url}/v1/keys", headers={"Authorization": f"Bearer {ADMIN}"},
                         json={"tenant": "default", "scopes": ["classify"]}).json()["key"]
        yield url, key


@pytest.mark.slow  # ~30 s against a real server process: in CI's slow run (`pytest -m slow`), not the default
@pytest.mark.parametrize("who", ["admin", "classify key", "no key"])
def test_schemathesis_finds_no_5xx_and_no_schema_violation(server, who, tmp_path):
    url, classify_key = server
    header = {"admin": [f"Authorization: Bearer {ADMIN}"], "classify key": [f"Authorization: Bearer {classify_key}"],
              "no key": []}[who]
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    cmd = [cli, "run", f"{url}/openapi.json", "--checks",
           "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance",
           "--max-examples", "15", "--generation-deterministic", "--no-color",
           *[arg for h in header for arg in ("-H", h)]]
    start = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:]
    assert "passed" in result.stdout and time.monotonic() - start < 300


def _valid_files(spec, fp: str) -> list[dict[str, bytes]]:
    peft = {f"base_model.model.bert.encoder.layer.{i}.attention.self.key.ia3_l": torch.ones(spec.hidden_size, 1)
            for i in range(spec.num_layers)}
    peft |= {"base_model.model.classifier.weight": torch.zeros(2, spec.hidden_size),
             "base_model.model.classifier.bias": torch.zeros(2)}
    hub = {p.name: p.read_bytes() for p in (FIXTURES / "houlsby").iterdir()
           if p.suffix in (".json", ".safetensors") and p.name != "expected_logits.json"}
    return [{"adapter.safetensors": native.dumps(random_adapter(spec, seed=2, kind="mixed"), fp)},
            {"adapter_config.json": json.dumps({"peft_type": "IA3", "feedforward_modules": ["output.dense"]}).encode(),
             "adapter_model.safetensors": save(peft)},
            hub]


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096), name=st.sampled_from(["adapter.safetensors", "adapter_model.safetensors",
                                                            "adapter_config.json", "x.safetensors"]))
def test_arbitrary_bytes_are_refused_as_invalid_adapters(tiny, data, name):
    files = {name: data}
    if name == "adapter_model.safetensors":
        files["adapter_config.json"] = b'{"peft_type": "IA3"}'
    with pytest.raises(AdapterValidationError):
        parse_upload(files, tiny.spec)


@settings(max_examples=200, deadline=3000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 2), mutation=st.sampled_from(["flip", "truncate", "header", "json"]),
       position=st.integers(0, 10**9), value=st.integers(0, 255))
def test_mutated_valid_files_give_an_adapter_or_a_validation_error(tiny, which, mutation, position, value):
    """Never another exception (a 5xx), never a hang (hypothesis' deadline)."""
    files = dict(_valid_files(tiny.spec, tiny.spec.fingerprint)[which])
    name = sorted(files)[position % len(files)]
    data = bytearray(files[name])
    if mutation == "flip":
        data[position % len(data)] = value
    elif mutation == "truncate":
        data = data[: position % len(data)]
    elif mutation == "header" and name.endswith(".safetensors"):
        data[:8] = struct.pack("<Q", (position * 7919) % (len(data) * 2 + 1))
    elif mutation == "json" and name.endswith(".json"):
        data = bytearray(json.dumps({"config": [value] * (position % 50), "peft_type": value}).encode())
    files[name] = bytes(data)
    try:
        parse_upload(files, tiny.spec)
    except AdapterValidationError:
        pass
