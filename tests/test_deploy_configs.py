"""The deployment files under deploy/: the Compose file validates against the Compose Specification
schema (vendored, tests/fixtures/compose-spec.SOURCE.md) and names only files that exist; the
services agree with each other (nginx upstreams, Prometheus targets, Grafana's datasource and
dashboard mounts, SWITCHBOARD_* variables that Settings reads); promtool accepts the Prometheus
config, the alerts and every dashboard query; Debian's nginx accepts nginx.conf and, run with it,
passes the headers and large bodies through to a keepalive upstream; and every metric the dashboard
or the alerts name is one a live server exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import jsonschema_rs
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from switchboard.adapter_store.formats import native
from switchboard.clients.local_services import free_port, nginx_bin
from switchboard.server.settings import Settings
from tests.factories import TEXTS, random_adapter
from tests.server_fixture import ROOT, serving_in_thread

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
NGINX_CONF = DEPLOY / "nginx" / "nginx.conf"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDER = DEPLOY / "grafana" / "provisioning" / "dashboards" / "switchboard.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "switchboard.json"
SCHEMA = ROOT / "tests" / "fixtures" / "compose-spec.json"
REPLICAS = ("replica-1", "replica-2")
METRIC = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
OURS = ("switchboard_", "process_")


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def compose() -> dict:
    return load_yaml(COMPOSE)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict) -> Iterator[dict]:
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in panels(dashboard()) for t in p.get("targets", [])]


def alert_exprs() -> list[str]:
    return [str(rule["expr"]) for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """The switchboard_* / process_* identifiers in a PromQL expression (label values are quoted and
    label names never start so, so every match is a metric name)."""
    return {name for name in METRIC.findall(re.sub(r'"[^"]*"', '""', expr)) if name.startswith(OURS)}


def bind_sources(service: dict) -> list[str]:
    """Host paths a service mounts (short syntax `SRC:DST[:MODE]` or long syntax), relative ones only."""
    out = []
    for volume in service.get("volumes", []):
        source = volume.get("source", "") if isinstance(volume, dict) else volume.split(":")[0]
        if source.startswith((".", "/")):
            out.append(source)
    return out


def mounts(service: dict) -> dict[str, str]:
    """Container path -> host path of a service's relative bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str) and volume.startswith("."):
            source, target = volume.split(":")[:2]
            out[target] = source
    return out


# --- Compose ---------------------------------------------------------------------------------------


def test_compose_file_validates_against_the_compose_specification():
    validator = jsonschema_rs.validator_for(json.loads(SCHEMA.read_text()))
    doc = compose()
    errors = [f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, errors
    # the schema is applied, not vacuously passed: a misspelt key and a wrong type are refused
    assert not validator.is_valid({"services": {"x": {"image": "a", "dependson": ["y"]}}})
    assert not validator.is_valid({"services": {"x": {"image": "a", "ports": "8080:8080"}}})

    services = doc["services"]
    assert set(services) == {"postgres", *REPLICAS, "nginx", "prometheus", "grafana"}
    assert services["postgres"]["image"] == "postgres:15"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    for name in REPLICAS:
        replica = services[name]
        assert replica["image"] == "switchboard:latest"
        assert replica["depends_on"]["postgres"]["condition"] == "service_healthy"
        env = replica["environment"]
        assert env["SWITCHBOARD_STORE"].startswith("postgresql://") and "@postgres:5432/" in env["SWITCHBOARD_STORE"]
        assert env["SWITCHBOARD_ADMIN_KEY"].startswith("${SWITCHBOARD_ADMIN_KEY:?")  # no default key, ever
        assert env["SWITCHBOARD_LOG_FORMAT"] == "json"
        assert env["SWITCHBOARD_HOST"] == "0.0.0.0"  # the default 127.0.0.1 is unreachable from nginx
        assert "/data" in {v.split(":")[1] for v in replica["volumes"]} and env["SWITCHBOARD_DATA_DIR"] == "/data"
        # every SWITCHBOARD_* variable is one Settings reads (a misspelt one would be silently ignored)
        unknown = {k for k in env if k.removeprefix("SWITCHBOARD_").lower() not in Settings.model_fields}
        assert not unknown, unknown
    assert set(services["nginx"]["depends_on"]) == set(REPLICAS)
    assert "8080:8080" in services["nginx"]["ports"]
    named = {v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith(".")}
    assert named <= set(doc["volumes"]), named - set(doc["volumes"])


def test_compose_mounts_only_files_that_exist():
    services = compose()["services"]
    sources = {name: bind_sources(s) for name, s in services.items()}
    assert sources["nginx"] and sources["prometheus"] and sources["grafana"], sources
    for name, paths in sources.items():
        for source in paths:
            assert (DEPLOY / source).resolve().exists(), f"{name} mounts {source}, which is not under deploy/"
    assert mounts(services["nginx"])["/etc/nginx/nginx.conf"] == "./nginx/nginx.conf"
    assert (DEPLOY / mounts(services["prometheus"])["/etc/prometheus"] / "prometheus.yml").resolve() == PROMETHEUS
    grafana = mounts(services["grafana"])
    assert (DEPLOY / grafana["/etc/grafana/provisioning"]).resolve() == DATASOURCE.parent.parent
    # the dashboard provider reads the folder the dashboards are mounted at
    provider_path = load_yaml(PROVIDER)["providers"][0]["options"]["path"]
    assert (DEPLOY / grafana[provider_path]).resolve() == DASHBOARD.parent


def test_compose_builds_the_top_level_dockerfile():
    for name in REPLICAS:
        build = compose()["services"][name]["build"]
        assert (DEPLOY / build["context"]).resolve() == ROOT
        dockerfile = ROOT / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"compose builds {dockerfile.relative_to(ROOT)}, which does not exist"


def test_the_services_agree_on_names_and_ports():
    services = compose()["services"]
    conf = NGINX_CONF.read_text()
    upstreams = re.findall(r"^\s*server\s+([\w.-]+:\d+)", conf, re.M)
    assert upstreams == [f"{name}:8000" for name in REPLICAS]
    assert re.search(r"^\s*listen 8080;", conf, re.M)  # test_affinity and the test below replace it
    job = next(j for j in load_yaml(PROMETHEUS)["scrape_configs"] if j["job_name"] == "switchboard")
    assert job.get("metrics_path", "/metrics") == "/metrics" and job["scrape_interval"] == "5s"
    assert [t for c in job["static_configs"] for t in c["targets"]] == [f"{name}:8000" for name in REPLICAS]
    assert all(name in services for name in REPLICAS)
    (source,) = load_yaml(DATASOURCE)["datasources"]
    assert (source["name"], source["type"], source["uid"]) == ("Prometheus", "prometheus", "prometheus")
    assert source["url"] == "http://prometheus:9090" and "9090:9090" in services["prometheus"]["ports"]


# --- Prometheus ------------------------------------------------------------------------------------


def promtool() -> str:
    binary = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if binary is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return binary


def test_promtool_accepts_the_config_and_the_alerts():
    for args in (["check", "config", str(PROMETHEUS)], ["check", "rules", str(ALERTS)]):
        r = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
    assert load_yaml(PROMETHEUS)["rule_files"] == [ALERTS.name]
    alerts = {rule["alert"]: str(rule["expr"]) for g in load_yaml(ALERTS)["groups"] for rule in g["rules"]}
    exprs = " ".join(alerts.values())
    for needle in ("up{", "switchboard_dropped_requests_total[5m]", "process_resident_memory_bytes",
                   "switchboard_store_up == 0"):
        assert needle in exprs, needle


def test_promtool_parses_every_dashboard_query(tmp_path: Path):
    """Grafana's variables replaced by what they expand to, each query becomes a recording rule."""
    exprs = dashboard_exprs()
    rules = [{"record": f"dashboard:query_{i}", "expr": e.replace("$__rate_interval", "1m").replace("$instance", ".*")}
             for i, e in enumerate(exprs)]
    assert not [r["expr"] for r in rules if "$" in r["expr"]]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# --- nginx -----------------------------------------------------------------------------------------


def proxy_config(port: int, upstreams: list[int]) -> str:
    text = NGINX_CONF.read_text()
    assert "listen 8080;" in text
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    for name, upstream in zip(("replica-1:8000", "replica-2:8000"), upstreams, strict=True):
        assert name in text
        text = text.replace(name, f"127.0.0.1:{upstream}")
    if os.geteuid() == 0:
        # as root nginx's workers would run as `nobody`, who cannot enter the test's private temporary
        # folder to spool large bodies (in the nginx image the prefix is /etc/nginx, open to them)
        text = "user root;\n" + text
    return text


def test_nginx_accepts_the_config(tmp_path: Path):
    binary = nginx_bin()
    if binary is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx)")
    (tmp_path / "nginx.conf").write_text(proxy_config(free_port(), [free_port(), free_port()]))
    r = subprocess.run([binary, "-t", "-p", f"{tmp_path}/", "-c", "nginx.conf", "-e", "stderr"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "test is successful" in r.stderr


class Recorder(BaseHTTPRequestHandler):
    """An HTTP/1.1 upstream that answers 200 and records each request's headers, body size and
    connection (to see nginx reuse its keepalive connections)."""

    protocol_version = "HTTP/1.1"
    seen: list[dict] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        size = 0
        while size < length:
            size += len(self.rfile.read(min(1 << 20, length - size)))
        self.seen.append({"path": self.path, "headers": dict(self.headers), "bytes": size,
                          "connection": self.client_address})
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args) -> None:
        pass


@contextmanager
def recording_upstream() -> Iterator[tuple[int, list[dict]]]:
    handler = type("Handler", (Recorder,), {"seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="recording-upstream", daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler.seen
    finally:
        server.shutdown()
        server.server_close()


def test_nginx_passes_headers_and_large_uploads_to_a_keepalive_upstream_and_skips_a_dead_one(nginx_proxy):
    with recording_upstream() as (live, seen):
        dead = free_port()  # nothing listens: connection refused, the next upstream is tried
        port = free_port()
        proxy = nginx_proxy(proxy_config(port, [live, dead]), port)
        with httpx.Client(base_url=proxy, timeout=30) as http:
            for i in range(12):  # some of these tasks hash to the dead replica
                r = http.post("/v1/classify", json={"task": f"t{i}", "inputs": TEXTS[0]},
                              headers={"Authorization": "Bearer k", "X-Switchboard-Task": f"t{i}",
                                       "X-Switchboard-Tenant": "acme"})
                assert r.status_code == 200, r.text
            blob = os.urandom(3 << 20)  # past nginx's 1 MiB default body limit and its in-memory buffer
            r = http.put("/v1/tasks/big", files=[("files", ("a.safetensors", blob))],
                         headers={"Authorization": "Bearer k", "X-Switchboard-Task": "big"})
            assert r.status_code == 200, r.text
    assert len(seen) == 13
    for i, request in enumerate(seen[:12]):
        headers = {k.lower(): v for k, v in request["headers"].items()}
        assert headers["authorization"] == "Bearer k"
        assert headers["x-switchboard-task"] == f"t{i}" and headers["x-switchboard-tenant"] == "acme"
        assert headers.get("connection", "") == ""  # HTTP/1.1 to the upstream, no "Connection: close"
    assert seen[12]["bytes"] > 3 << 20
    # keepalive: nginx reused its upstream connections instead of opening one per request
    assert len({r["connection"] for r in seen}) < len(seen)


# --- the dashboard and the alerts against a live server --------------------------------------------


SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",),
            "stateset": ("",), "gaugehistogram": ("_bucket", "_gsum", "_gcount"), "unknown": ("",)}


def exported_names(text: str) -> tuple[set[str], set[str]]:
    """(names of the samples in /metrics, the series names its families export once observed: a
    labelled family nobody touched yet has HELP and TYPE lines but no sample)."""
    samples, possible = set(), set()
    for family in text_string_to_metric_families(text):
        samples |= {s.name for s in family.samples}
        possible |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return samples, possible | samples


def test_every_metric_the_dashboard_and_the_alerts_name_is_exported(tiny_dir, tmp_path: Path):
    dash = dashboard()
    assert 38 <= dash["schemaVersion"] <= 41
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids))
    series = [p for p in panels(dash) if p["type"] != "row"]
    assert series and all(p["type"] == "timeseries" for p in series)
    for p in series:
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "prometheus" and all(t["datasource"]["uid"] == "prometheus"
                                                                for t in p["targets"])
        assert p["gridPos"]["x"] >= 0 and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24

    backbone = tiny_dir[1]
    with serving_in_thread(tmp_path, backbone) as (url, state):
        # traffic, so that the labelled families have samples: requests by endpoint and status, one
        # tenant's requests, rows and tokens, a load into a device slot, batches
        assert httpx.get(f"{url}/v1/backbone").status_code == 200
        assert httpx.post(f"{url}/v1/classify", json={"task": "missing", "inputs": "x"}).status_code == 404
        blob = native.dumps(random_adapter(backbone.spec, seed=1), state.runtime.engine.spec.fingerprint)
        r = httpx.put(f"{url}/v1/tasks/t", files=[("files", ("a.safetensors", blob))], timeout=30)
        assert r.status_code == 201, r.text
        r = httpx.post(f"{url}/v1/classify", json={"task": "t", "inputs": TEXTS[:3]}, timeout=30)
        assert r.status_code == 200, r.text
        text = httpx.get(f"{url}/metrics").text
    samples, possible = exported_names(text)
    assert "switchboard_tenant_rows_total" in samples and "switchboard_request_duration_seconds_bucket" in samples

    named = {name: source for source, exprs in (("dashboard", dashboard_exprs()), ("alerts", alert_exprs()))
             for expr in exprs for name in metric_names(expr)}
    missing = {name: source for name, source in named.items() if name not in possible}
    assert not missing, f"named but not exported: {missing}"
    # the families the dashboard is about are all there
    for needle in ("switchboard_requests_total", "switchboard_request_duration_seconds_bucket",
                   "switchboard_queue_depth_rows", "switchboard_queue_tokens", "switchboard_batch_rows_bucket",
                   "switchboard_batch_tokens_bucket", "switchboard_batch_padding_fraction_bucket",
                   "switchboard_batch_tasks_bucket", "switchboard_resident_adapters",
                   "switchboard_resident_adapter_bytes", "switchboard_registered_tasks",
                   "switchboard_adapter_loads_total", "switchboard_adapter_evictions_total",
                   "switchboard_tenant_requests_total", "switchboard_tenant_rows_total",
                   "switchboard_tenant_tokens_total", "switchboard_dropped_requests_total",
                   "switchboard_tenant_throttled_total", "process_resident_memory_bytes", "process_cpu_seconds_total",
                   "switchboard_store_up"):
        assert needle in named, needle
    # and the check bites: a name the server does not export is caught
    assert "switchboard_request_total" not in possible and "switchboard_queue_depth" not in possible
