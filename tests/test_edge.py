"""The HTTP edge against raw sockets (issue 20): heads bounded as they stream in (431/414), timeouts for
a first request that never comes, a trickling head and a stalled body (408), a connection cap (503),
and everything a request's headers decide — auth, scope, upload permits — answered before one byte of
its body is sent. Each refusal is a JSON error, counted in /metrics, and /health keeps answering."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from tests.server_fixture import metric_samples, serving_in_thread

ADMIN = "edge-test-admin-key-0123456789abcdefghij"
EDGE = dict(header_timeout_s=0.6, body_idle_timeout_s=0.6, max_connections=24, max_header_bytes=16 << 10,
            max_url_bytes=2048, max_pending_uploads=3, tenant_max_pending_uploads=2, admin_key=ADMIN,
            log_level="warning")


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    with serving_in_thread(tmp_path_factory.mktemp("edge"), tiny_dir[1], model=tiny_dir[0], **EDGE) as (url, state):
        admin = {"Authorization": f"Bearer {ADMIN}"}
        keys = {}
        for tenant in ("a", "b"):
            r = httpx.post(f"{url}/v1/keys", headers=admin, json={"tenant": tenant, "scopes": ["classify", "manage"]})
            keys[tenant] = r.json()["key"]
        r = httpx.post(f"{url}/v1/keys", headers=admin, json={"tenant": "a", "scopes": ["classify"]})
        keys["a-classify"] = r.json()["key"]
        yield url, keys


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    return sock


def read_response(sock: socket.socket, timeout: float = 5.0) -> tuple[int, dict]:
    """(status, JSON body) of the one response the server sends before it closes."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            break
        if not chunk:
            break
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep and b"content-length:" in head.lower():
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            if len(body) >= length:
                break
    head, _, body = data.partition(b"\r\n\r\n")
    assert head, "the server closed without an answer"
    return int(head.split()[1]), json.loads(body) if body else {}


def send_slowly(sock: socket.socket, data: bytes, piece: int = 4096) -> bool:
    """Send in small writes, as the hostile client did; False once the server stopped reading."""
    try:
        for i in range(0, len(data), piece):
            sock.sendall(data[i:i + piece])
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def healthy(url: str) -> bool:
    return httpx.get(f"{url}/health", timeout=2).status_code == 200


def test_a_huge_header_is_refused_with_431_after_the_limit_not_after_the_whole_value(server):
    url, _ = server
    sock = connect(url)
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: "
    finished = send_slowly(sock, head + b"a" * (64 << 20))  # the reported 64 MiB: answered after 16 KiB
    status, body = read_response(sock)
    assert status == 431 and body["error"]["type"] == "header_too_large"
    assert "max_header_bytes" in body["error"]["message"]
    assert not finished or status == 431
    sock.close()
    assert healthy(url)
    assert metric_samples(url)['switchboard_http_refused_total{"reason": "header_too_large"}'] >= 1


def test_a_huge_second_head_on_a_keep_alive_connection_is_refused_too(server):
    url, _ = server
    sock = connect(url)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.1)
    first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    send_slowly(sock, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (4 << 20))
    status, body = read_response(sock)
    assert status == 431 and body["error"]["type"] == "header_too_large"
    sock.close()


def test_a_huge_url_is_refused_with_414(server):
    url, _ = server
    sock = connect(url)
    send_slowly(sock, b"GET /v1/tasks?" + b"x" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    status, body = read_response(sock)
    assert status == 414 and "max_url_bytes" in body["error"]["message"]
    sock.close()


def test_headers_under_the_limit_are_served(server):
    url, _ = server
    r = httpx.get(f"{url}/health", headers={"X-Pad": "p" * 8000})
    assert r.status_code == 200


def test_a_connection_that_never_sends_is_closed_with_408(server):
    url, _ = server
    sock = connect(url)
    status, body = read_response(sock, timeout=10)  # header_timeout_s 0.6
    assert status == 408 and "header_timeout_s" in body["error"]["message"]
    sock.close()


def test_a_trickling_head_is_cut_off_at_the_header_timeout(server):
    url, _ = server
    sock = connect(url)
    sock.sendall(b"GET /health HTTP/1.1\r\n")
    start, alive = time.monotonic(), True
    while alive and time.monotonic() - start < 5:  # one header byte every 50 ms, never finishing
        try:
            sock.sendall(b"X-Slow: " + b"z" * 8 + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            alive = False
        time.sleep(0.05)
        sock.settimeout(0.01)
        try:
            peeked = sock.recv(65536, socket.MSG_PEEK)
            alive = alive and not peeked.startswith(b"HTTP/1.1 408")
        except (TimeoutError, BlockingIOError):
            pass
        except (ConnectionResetError, BrokenPipeError):
            alive = False
    assert not alive, "a head trickling in for 5 s should have been cut at header_timeout_s (0.6 s)"
    sock.close()


def test_a_stalled_body_is_closed_with_408_and_its_upload_permit_comes_back(server):
    url, keys = server
    before = metric_samples(url).get('switchboard_http_refused_total{"reason": "body_timeout"}', 0)
    sock = connect(url)
    sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + keys["a"].encode() + b"\r\nContent-Length: 100\r\n\r\n{\"task\":")
    status, body = read_response(sock, timeout=10)
    assert status == 408 and "body_idle_timeout_s" in body["error"]["message"]
    sock.close()
    after = metric_samples(url)['switchboard_http_refused_total{"reason": "body_timeout"}']
    assert after == before + 1


def test_at_max_connections_a_new_client_evicts_the_oldest_idle_connection(server):
    """20,000 idle connections locked every client out. Now past max_connections the connection that has
    waited longest without a request head is closed (408) to make room, so a client that sends its
    request at once is served; the rest of the idle ones go at the header timeout."""
    url, _ = server
    idle = [connect(url) for _ in range(EDGE["max_connections"])]
    time.sleep(0.1)
    fresh = connect(url)
    fresh.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert read_response(fresh)[0] == 200
    fresh.close()
    status, body = read_response(idle[0])
    assert status == 408 and "make room" in body["error"]["message"]
    for sock in idle:
        sock.close()
    assert healthy(url)


def test_when_every_connection_is_busy_a_new_one_gets_503(server):
    """Connections whose requests are in progress are never evicted: past the cap a new one is refused."""
    url, keys = server
    busy = []
    for _ in range(EDGE["max_connections"]):
        sock = connect(url)
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + keys["a"].encode() + b"\r\nContent-Length: 100\r\n\r\n{")
        busy.append(sock)
    time.sleep(0.1)
    extra = connect(url)
    status, body = read_response(extra)
    assert status == 503 and body["error"]["type"] == "too_many_connections"
    assert "max_connections" in body["error"]["message"]
    extra.close()
    for sock in busy:  # their bodies stall: each is answered 408 and the slots come back
        assert read_response(sock, timeout=10)[0] == 408
        sock.close()
    assert healthy(url)


def test_an_unauthenticated_upload_is_refused_before_its_body_is_sent(server):
    """A 250 MiB upload without a key: 401 from the headers; the body is never received or spooled."""
    url, _ = server
    sock = connect(url)
    sock.sendall(b"PUT /v1/tasks/t HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                 b"Content-Length: " + str(250 << 20).encode() + b"\r\n\r\n")
    status, body = read_response(sock)  # answered with no body byte sent
    assert status == 401 and body["error"]["type"] == "unauthorized"
    sock.close()


def test_a_key_without_the_scope_is_refused_before_the_body(server):
    url, keys = server
    sock = connect(url)
    sock.sendall(b"PUT /v1/tasks/t HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                 b"Authorization: Bearer " + keys["a-classify"].encode() + b"\r\n"
                 b"Content-Length: " + str(100 << 20).encode() + b"\r\n\r\n")
    status, body = read_response(sock)
    assert status == 403 and "'manage'" in body["error"]["message"]
    sock.close()


def test_upload_permits_are_taken_from_the_headers_and_shared_across_tenants(server):
    """Tenant a may hold 2 uploads at once (tenant_max_pending_uploads): its third is refused from the
    headers while its first two bodies are still on the wire; tenant b still gets the last of the 3."""
    url, keys = server

    def start_upload(key: str) -> socket.socket:
        sock = connect(url)
        sock.sendall(b"PUT /v1/tasks/t HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: 1000000\r\n\r\n--b\r\n")
        return sock

    held = [start_upload(keys["a"]), start_upload(keys["a"])]
    time.sleep(0.1)
    third = start_upload(keys["a"])
    status, body = read_response(third)
    assert status == 429 and "tenant_max_pending_uploads 2" in body["error"]["message"]
    third.close()
    other = start_upload(keys["b"])  # b has its own share of the 3
    time.sleep(0.1)
    fourth = start_upload(keys["b"])
    status, body = read_response(fourth)
    assert status == 429 and "max_pending_uploads 3" in body["error"]["message"]
    for sock in (*held, other, fourth):
        sock.close()
    time.sleep(0.2)  # the stalled bodies end; their permits come back
    r = httpx.put(f"{url}/v1/tasks/t", headers={"Authorization": f"Bearer {keys['a']}"},
                  files=[("files", ("a.safetensors", b"not safetensors at all"))])
    assert r.status_code == 422, r.text


def test_unusual_methods_share_one_metrics_label(server):
    url, _ = server
    with httpx.Client() as client:
        for i in range(20):
            client.request(f"X{i}METHOD", f"{url}/v1/tasks")
    text = httpx.get(f"{url}/metrics").text
    assert "X3METHOD" not in text


def test_health_answers_while_many_bad_connections_are_refused(server):
    url, _ = server
    slowest, stop = 0.0, threading.Event()

    def watch() -> None:
        nonlocal slowest
        while not stop.is_set():
            start = time.monotonic()
            assert healthy(url)
            slowest = max(slowest, time.monotonic() - start)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(5):
            sock = connect(url)
            send_slowly(sock, b"GET / HTTP/1.1\r\nX-Big: " + b"a" * (1 << 20))
            sock.close()
    finally:
        stop.set()
        watcher.join()
    assert slowest < 1.0
