"""The command line as a user meets it: every API operation, human output and --json, and errors that are
one line on stderr with a hint and a documented exit code (0 ok, 1 refused, 2 usage/file, 3 unreachable)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from switchboard.adapter_store.formats import native
from switchboard.clients.cli import build_parser, main
from tests.factories import random_adapter
from tests.server_fixture import free_port, serving_in_thread


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    path, backbone = tiny_dir
    with serving_in_thread(tmp_path_factory.mktemp("data"), backbone, model=path) as (url, _):
        yield url


@pytest.fixture
def adapter_file(tiny_dir, tmp_path):
    def make(seed: int):
        file = tmp_path / f"a{seed}" / "adapter.safetensors"
        file.parent.mkdir()
        file.write_bytes(native.dumps(random_adapter(tiny_dir[1].spec, seed=seed), tiny_dir[1].spec.fingerprint))
        return file.parent
    return make


def run_json(capsys, *argv: str) -> object:
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_every_task_operation(served, adapter_file, capsys, tmp_path):
    url = ["--url", served]
    v1 = run_json(capsys, "upload", "cli", str(adapter_file(1)), *url)
    v2 = run_json(capsys, "upload", "cli", str(adapter_file(2)), *url)
    assert (v1["version"], v2["version"]) == (1, 2)
    assert main(["upload", "cli", str(adapter_file(3)), *url]) == 0
    assert "cli version 3: ia3, 3 labels" in capsys.readouterr().out
    task = run_json(capsys, "task", "cli", *url)
    assert task["version"] == 3 and [v["version"] for v in task["versions"]] == [1, 2, 3]
    assert main(["task", "cli", *url]) == 0 and "current" in capsys.readouterr().out
    assert run_json(capsys, "rollback", "cli", "1", *url)["version"] == 1
    assert main(["rollback", "cli", "2", *url]) == 0 and "version 2 is current" in capsys.readouterr().out
    out = run_json(capsys, "classify", "cli", "a chess engine", "fonts", "--top-k", "2", "--raw-scores", *url)
    assert out["version"] == 2 and [len(p) for p in out["predictions"]] == [2, 2]
    assert any(p["score"] < 0 or p["score"] > 1 for row in out["predictions"] for p in row)  # logits
    assert main(["classify", "cli", "a chess engine", *url]) == 0
    assert capsys.readouterr().out.startswith("'a chess engine': label")
    run_json(capsys, "upload", "cli2", str(adapter_file(4)), *url)
    fan = run_json(capsys, "classify", "cli,cli2", "x", *url)
    assert [r["task"] for r in fan["results"]] == ["cli", "cli2"]
    emb = run_json(capsys, "embed", "a", "b", *url)
    assert len(emb) == 2 and abs(sum(x * x for x in emb[0]) - 1) < 1e-4
    assert "cli" in [t["task"] for t in run_json(capsys, "tasks", *url)["tasks"]]
    assert main(["tasks", *url]) == 0 and "TASK" in capsys.readouterr().out
    assert run_json(capsys, "backbone", *url)["fingerprint"]
    assert main(["delete", "cli", *url]) == 0 and "deleted cli" in capsys.readouterr().out
    assert main(["task", "cli", *url]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown task 'cli'") and "hint: list your tasks" in err


def test_upload_with_a_canary_file(served, adapter_file, capsys, tmp_path):
    url = ["--url", served]
    run_json(capsys, "upload", "canaried", str(adapter_file(5)), *url)
    canary = tmp_path / "canary.csv"
    canary.write_text("text,label\na chess engine,no-such-label\n")
    assert main(["upload", "canaried", str(adapter_file(6)), "--canary", str(canary), *url]) == 1
    assert "not labels of this adapter" in capsys.readouterr().err
    assert run_json(capsys, "task", "canaried", *url)["version"] == 1


def test_remote_training_follows_the_job_to_its_end(served, capsys, tmp_path):
    data = tmp_path / "few.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": lb}) for t, lb in
                              [("chess game", "games"), ("card game", "games"), ("dns server", "net"),
                               ("http proxy", "net")] * 2))
    job = run_json(capsys, "train", "--remote", "fewshot", "--data", str(data), "--steps", "3",
                   "--batch-size", "4", "--url", served)
    assert job["status"] == "succeeded" and job["result"]["version"] == 1
    jobs = run_json(capsys, "jobs", "--url", served)["jobs"]
    assert job["id"] in [j["id"] for j in jobs]
    assert main(["jobs", job["id"], "--url", served]) == 0 and "succeeded" in capsys.readouterr().out
    assert main(["jobs", "nope", "--url", served]) == 1 and "switchboard jobs" in capsys.readouterr().err


def test_errors_are_one_line_with_a_hint_and_an_exit_code(capsys, tmp_path):
    nowhere = f"http://127.0.0.1:{free_port()}"
    assert main(["tasks", "--url", nowhere]) == 3
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: cannot reach the Switchboard server at {nowhere}",
                   "hint: is `switchboard serve` running? Point --url or SWITCHBOARD_URL at it"]
    assert main(["upload", "t1", str(tmp_path / "nonexistent"), "--url", nowhere]) == 2
    assert capsys.readouterr().err.startswith("error: no such file or directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["upload", "t1", str(empty), "--url", nowhere]) == 2
    assert "no .json or .safetensors files" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "missing.csv"), "--kind", "ia3", "--out", str(tmp_path)]) == 2
    assert "missing.csv" in capsys.readouterr().err
    assert main(["train", "--data", "x.csv"]) == 2 and "--remote" in capsys.readouterr().err


def test_no_traceback_from_the_installed_command(tmp_path):
    """The reported stumble: `switchboard tasks` against a stopped server printed 70 lines of traceback."""
    r = subprocess.run([sys.executable, "-m", "switchboard.clients.cli", "tasks", "--url",
                        f"http://127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 2


def test_every_option_has_help_text():
    parser = build_parser()
    missing = []

    def walk(p, path):
        for action in p._actions:
            if action.option_strings and not action.help and action.dest != "help":
                missing.append(f"{path} {action.option_strings[0]}")
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")

    walk(parser, "switchboard")
    assert not missing, missing


def test_client_options_work_before_and_after_the_command(served, capsys):
    """The reported stumble: `switchboard --url URL tasks` was a usage error."""
    for argv in (["--url", served, "tasks", "--json"], ["--url", served, "--json", "tasks"],
                 ["tasks", "--url", served, "--json"], ["--json", "tasks", "--url", served],
                 ["--url", "http://127.0.0.1:9", "tasks", "--url", served, "--json"]):  # after the command wins
        assert main(argv) == 0, (argv, capsys.readouterr().err)
        assert "tasks" in json.loads(capsys.readouterr().out), argv
    nowhere = f"http://127.0.0.1:{free_port()}"
    assert main(["--url", nowhere, "--timeout", "5", "keys", "list"]) == 3  # reaches nested commands too
    assert capsys.readouterr().err.startswith(f"error: cannot reach the Switchboard server at {nowhere}")
    parser = build_parser()
    before = parser.parse_args(["--timeout", "5", "--api-key", "k", "--tenant", "acme", "classify", "t", "x"])
    after = parser.parse_args(["classify", "t", "x", "--timeout", "5", "--api-key", "k", "--tenant", "acme"])
    default = parser.parse_args(["classify", "t", "x"])
    for name in ("timeout", "api_key", "tenant", "url", "json"):
        assert getattr(before, name) == getattr(after, name), name
    assert (default.timeout, default.api_key, default.tenant, default.json) == (60.0, None, None, False)


def test_many_texts_on_the_command_line_are_split_for_the_server(served, adapter_file, capsys):
    run_json(capsys, "upload", "many", str(adapter_file(7)), "--url", served)
    out = run_json(capsys, "classify", "many", *[f"text {i}" for i in range(100)], "--url", served)
    assert len(out["predictions"]) == 100


def test_keys_take_the_client_options_at_every_level(capsys):
    nowhere = f"http://127.0.0.1:{free_port()}"
    for argv in (["--url", nowhere, "keys", "list"], ["keys", "--url", nowhere, "list"], ["keys", "list", "--url", nowhere]):
        assert main(argv) == 3, argv
        assert nowhere in capsys.readouterr().err
