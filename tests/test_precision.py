"""`--dtype auto`: the fastest precision that passed the agreement bar, where the hardware runs it."""

from __future__ import annotations

import pytest
import torch

from switchboard.server.core import precision
from switchboard.server.core.precision import Precision, resolve


def test_auto_is_bf16_full_only_with_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert resolve("auto", cpu) is Precision.BF16_FULL
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert resolve("auto", cpu) is Precision.BF16_FULL
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_vnni"})
    assert resolve("auto", cpu) is Precision.FP32


def test_an_explicit_dtype_wins(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: set())
    for name in ("fp32", "bf16", "bf16-full", "int8"):
        assert resolve(name, torch.device("cpu")) is Precision(name)


@pytest.mark.slow  # a real MiniLM-free server on the defaults; docs/quickstart.md (slow) runs them too
def test_the_server_reports_the_resolved_precision(tmp_path, tiny_dir, monkeypatch):
    """A server on the defaults serves in what `auto` resolves to on this machine, in worker processes, and
    says so."""
    from tests.server_fixture import running_server

    monkeypatch.delenv("SWITCHBOARD_DTYPE", raising=False)
    monkeypatch.delenv("SWITCHBOARD_ENGINE_WORKERS", raising=False)  # the default layout too
    expected = resolve("auto", torch.device("cpu"))
    with running_server(tiny_dir[0], tmp_path / "data", env={"SWITCHBOARD_LOG_LEVEL": "info"},
                        extra_args=["--log-level", "info"]) as (url, _):
        pass
    log = (tmp_path / "data" / "server.log").read_text()
    assert f"precision {expected} (setting auto)" in log
    assert "engine worker processes" in log
