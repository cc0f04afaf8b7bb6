"""docs/quickstart.md runs as written: its bash blocks, in order, in one shell, against real servers
(real MiniLM, the default engine layout and precision). Slow: `pytest -m slow`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server_fixture import ROOT, free_port


def quickstart_script() -> str:
    text = (ROOT / "docs" / "quickstart.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    return "\n".join(b for b in blocks if "quickstart-test: skip" not in b)


def test_the_blocks_are_found_and_the_install_block_is_the_one_skipped():
    text = (ROOT / "docs" / "quickstart.md").read_text()
    skipped = [b for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S) if "quickstart-test: skip" in b]
    assert len(skipped) == 1 and "pip install" in skipped[0]
    script = quickstart_script()
    for command in ("switchboard serve", "switchboard train", "switchboard upload", "switchboard classify",
                    "switchboard rollback", "switchboard keys create"):
        assert command in script


@pytest.mark.slow
def test_the_quickstart_runs_as_written(tmp_path):
    """Run from a stand-in for the clone's root, with mktemp's directories under our own TMPDIR: the page
    must leave nothing in either (it works in a scratch directory and removes it)."""
    clone, scratch = tmp_path / "clone", tmp_path / "tmp"
    clone.mkdir()
    scratch.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}  # the defaults, as a user
    env |= {"SWITCHBOARD_PORT": str(port), "SWITCHBOARD_URL": f"http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", "TMPDIR": str(scratch)}
    script = "set -euo pipefail\ntrap 'kill $SERVER 2>/dev/null || true' EXIT\n" + quickstart_script()
    r = subprocess.run(["bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    logs = [*clone.rglob("server.log"), *scratch.rglob("server.log")]
    log = logs[0].read_text() if logs else ""
    assert r.returncode == 0, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}\nserver log:\n{log[-2000:]}"
    out = r.stdout
    assert "sections version 1: ia3" in out and "sections version 2: houlsby" in out
    assert "sections: version 1 is current again" in out
    assert "refused without a key, as it should be" in out
    assert '"task":"sections","version":1' in out.replace(" ", "")  # the curl with the tenant's key
    assert re.search(r"^sections\s+1\s+ia3", out, flags=re.M)  # `tasks --tenant default` with the admin key
    assert not list(clone.iterdir()), f"left in the clone: {sorted(p.name for p in clone.iterdir())}"
    assert not list(scratch.iterdir()), f"left behind: {sorted(p.name for p in scratch.iterdir())}"
