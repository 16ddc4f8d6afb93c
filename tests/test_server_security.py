"""The two servers stay local and refuse what they should: loopback by default (a real process is
not reachable on the machine's other address), the API key (401), the body limit (413), prompt count
and length limits (422), the per-client rate limit (429, a second client address unaffected), the
Host check, the labelling page's path traversal (each way in: 403/404), and the graceful stop of
both as real processes (a request in progress at SIGTERM is answered and its label kept)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace
from urllib.parse import quote

import pytest
from conftest import label_server_thread

from loadtest import ServerProcess
from diffpo.serving import (InFlight, RateLimiter, exposure_warning, host_header_allowed, is_loopback, key_matches,
                            presented_key, resolve_api_key)

KEY = "correct horse battery staple"


# --------------------------------------------------------------------------------------------
# The shared pieces, with hand-computed values
# --------------------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_rate_limiter_token_bucket_by_hand():
    clock = Clock()
    limiter = RateLimiter(per_minute=60, burst=3, clock=clock)  # 1 token per second, 3 at once
    assert [limiter.retry_after("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.retry_after("a") == pytest.approx(1.0)  # empty: the next token in 1 s
    assert limiter.retry_after("b") == 0.0  # per client
    clock.now = 0.5
    assert limiter.retry_after("a") == pytest.approx(0.5)  # half a token refilled
    clock.now = 1.0
    assert limiter.retry_after("a") == 0.0 and limiter.retry_after("a") == pytest.approx(1.0)
    clock.now = 100.0  # refills to the burst, never beyond
    assert [limiter.retry_after("a") for _ in range(4)] == [0.0, 0.0, 0.0, pytest.approx(1.0)]
    off = RateLimiter(per_minute=0, burst=1, clock=clock)
    assert all(off.retry_after("a") == 0.0 for _ in range(100)) and len(off) == 0
    message = limiter.message(1.0)
    assert "60 requests per minute per client (burst 3)" in message and "--rate-limit" in message


def test_rate_limiter_forgets_clients_to_stay_bounded():
    clock = Clock()
    limiter = RateLimiter(per_minute=60, burst=2, max_clients=10, clock=clock)
    for client in range(100):
        clock.now += 0.01
        limiter.retry_after(f"10.0.0.{client}")
        assert len(limiter) <= 10
    with pytest.raises(ValueError, match="must be >= 0"):
        RateLimiter(per_minute=-1, burst=1)
    with pytest.raises(ValueError, match="burst 0 must be >= 1"):
        RateLimiter(per_minute=1, burst=0)


def test_key_comparison_and_where_a_key_is_read(monkeypatch):
    assert key_matches(KEY, KEY) and not key_matches(KEY[:-1], KEY) and not key_matches(KEY + "x", KEY)
    assert not key_matches(None, KEY) and not key_matches("", KEY)
    assert presented_key(f"Bearer {KEY}", None) == KEY and presented_key(f"bearer   {KEY} ", None) == KEY
    assert presented_key("Basic abc", None) is None and presented_key("Bearer", None) is None
    assert presented_key(None, "k1") == "k1" and presented_key(None, None) is None
    monkeypatch.delenv("DIFFPO_API_KEY", raising=False)
    assert resolve_api_key(None) is None
    monkeypatch.setenv("DIFFPO_API_KEY", "from-env")
    assert resolve_api_key(None) == "from-env" and resolve_api_key("from-flag") == "from-flag"
    monkeypatch.setenv("DIFFPO_API_KEY", "")
    assert resolve_api_key(None) is None
    with pytest.raises(ValueError, match="--api-key is empty"):
        resolve_api_key("  ")


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("example.org", False),
])
def test_loopback_and_the_exposure_warning(host, loopback):
    assert is_loopback(host) is loopback
    warning = exposure_warning(host, api_key=None)
    assert (warning is None) is loopback
    if warning:
        assert host in warning and "--api-key" in warning and "DIFFPO_API_KEY" in warning
    assert exposure_warning(host, api_key="k") is None


@pytest.mark.parametrize("header, allowed", [
    ("127.0.0.1:8000", True), ("localhost:8000", True), ("LOCALHOST", True), ("[::1]:8000", True),
    ("127.0.0.1", True), (None, True),
    ("evil.example:8000", False), ("evil.example", False), ("192.0.2.2:8000", False), ("localhost.evil.example", False),
])
def test_host_header_check_on_loopback(header, allowed):
    assert host_header_allowed(header, "127.0.0.1") is allowed
    assert host_header_allowed(header, "0.0.0.0") is True  # bound beyond loopback: the operator's choice


def test_in_flight_count_and_close():
    flight = InFlight()
    assert flight.enter() and flight.enter() and flight.count == 2
    flight.leave()
    threading.Timer(0.05, flight.leave).start()
    assert flight.close_and_wait(timeout=10) == 0
    assert flight.enter() is False  # closing: new requests are refused


# --------------------------------------------------------------------------------------------
# HTTP helpers
# --------------------------------------------------------------------------------------------


def call(port, method, path, body=None, headers=None, source="127.0.0.1", chunked=False):
    """(status, headers, JSON or bytes) of one request on a fresh connection from ``source``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        headers = dict(headers or {})
        if data is not None:
            headers.setdefault("Content-Type", "application/json")
        if chunked:
            connection.request(method, path, body=iter([data[:100], data[100:]]), headers=headers, encode_chunked=True)
        else:
            connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        raw = response.read()
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = raw
        return response.status, {k.lower(): v for k, v in response.getheaders()}, answer
    finally:
        connection.close()


# --------------------------------------------------------------------------------------------
# Prompt API (in process, real sockets)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def optimizer(single_thread):
    from diffpo.prompt.optimizer import PromptOptimizer

    return PromptOptimizer.from_pretrained("tiny")


@contextmanager
def prompt_server(optimizer, api_key=None, **limits):
    import uvicorn

    from diffpo.prompt.server import ServerLimits, create_app

    app = create_app(optimizer, ServerLimits(**limits), api_key=api_key)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield SimpleNamespace(port=server.servers[0].sockets[0].getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(timeout=10)


OPTIMIZE = {"prompt": "a red circle", "n": 1, "max_new_tokens": 3, "seed": 0}


def test_prompt_api_key(optimizer):
    with prompt_server(optimizer, api_key=KEY, rate_limit=0) as server:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": KEY[:-1]}, {"Authorization": KEY}):
            status, response_headers, answer = call(server.port, "POST", "/v1/optimize", OPTIMIZE, headers)
            assert status == 401 and response_headers["www-authenticate"] == "Bearer", headers
            assert "requires an API key" in answer["error"] and "DIFFPO_API_KEY" in answer["error"]
        # refused before the body is parsed: a malformed body without the key is a 401, not a 422
        assert call(server.port, "POST", "/v1/optimize", b"{not json")[0] == 401
        for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}):
            status, _, answer = call(server.port, "POST", "/v1/optimize", OPTIMIZE, headers)
            assert status == 200 and len(answer["results"][0]["candidates"]) == 1
        # the probe and the docs run no model and stay open; the schema declares the key
        assert call(server.port, "GET", "/healthz")[0] == 200 and call(server.port, "GET", "/docs")[0] == 200
        schema = call(server.port, "GET", "/openapi.json")[2]
        assert schema["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
        assert schema["paths"]["/v1/optimize"]["post"]["security"] == [{"apiKey": []}]


def test_prompt_api_body_limit(optimizer):
    with prompt_server(optimizer, rate_limit=0, max_body_bytes=1000, max_prompt_chars=5000) as server:
        big = {"prompt": "a" * 1200}
        status, _, answer = call(server.port, "POST", "/v1/optimize", big)  # Content-Length says too much
        assert status == 413 and "max_body_bytes=1000" in answer["error"] and "--max-body-bytes" in answer["error"]
        status, _, answer = call(server.port, "POST", "/v1/optimize", big, chunked=True)  # no Content-Length
        assert status == 413 and "over 1000 bytes" in answer["error"]
        small = dict(OPTIMIZE, prompt="a" * 900)  # just under the limit: answered
        assert len(json.dumps(small)) < 1000 and call(server.port, "POST", "/v1/optimize", small)[0] == 200
        assert call(server.port, "POST", "/v1/optimize", small, chunked=True)[0] == 200


def test_prompt_api_count_and_length_limits_are_422(optimizer):
    with prompt_server(optimizer, rate_limit=0, max_prompts=3, max_prompt_chars=40) as server:
        status, _, answer = call(server.port, "POST", "/v1/optimize", {"prompts": ["a cat"] * 4})
        assert status == 422 and answer["error"] == ("4 prompts in one request: the limit is max_prompts=3; "
                                                     "split the request")
        status, _, answer = call(server.port, "POST", "/v1/optimize", {"prompts": ["a cat", "b" * 41]})
        assert status == 422 and answer["error"] == ("prompt 1 has 41 characters: the limit is max_prompt_chars=40; "
                                                     "shorten it")
        assert call(server.port, "POST", "/v1/optimize", dict(OPTIMIZE, prompts=["a cat"] * 3, prompt=None))[0] == 200


def test_prompt_api_rate_limit_per_client(optimizer):
    with prompt_server(optimizer, rate_limit=60, rate_burst=3) as server:
        assert [call(server.port, "GET", "/healthz")[0] for _ in range(3)] == [200, 200, 200]
        status, headers, answer = call(server.port, "GET", "/healthz")
        assert status == 429 and headers["retry-after"] == "1"
        assert "rate limit of 60 requests per minute per client (burst 3) exceeded" in answer["error"]
        assert call(server.port, "POST", "/v1/optimize", OPTIMIZE)[0] == 429  # every path of that client
        assert call(server.port, "GET", "/healthz", source="127.0.0.2")[0] == 200  # another client is not limited


def test_prompt_api_refuses_a_foreign_host_header(optimizer):
    with prompt_server(optimizer, rate_limit=0) as server:
        status, _, answer = call(server.port, "GET", "/healthz", headers={"Host": "evil.example"})
        assert status == 421 and "'evil.example'" in answer["error"]
        assert call(server.port, "GET", "/healthz", headers={"Host": f"localhost:{server.port}"})[0] == 200


def test_prompt_serve_warns_when_exposed_without_a_key(optimizer, monkeypatch, capsys):
    import uvicorn

    from diffpo.prompt.server import serve

    monkeypatch.delenv("DIFFPO_API_KEY", raising=False)
    seen = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: seen.append(sockets[0].getsockname()))
    serve(optimizer, host="0.0.0.0", port=0)
    assert seen[0][0] == "0.0.0.0"
    assert "warning: listening on 0.0.0.0" in capsys.readouterr().err
    serve(optimizer, host="0.0.0.0", port=0, api_key=KEY)
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "API key required" in captured.out


# --------------------------------------------------------------------------------------------
# Labelling page (in process, real sockets)
# --------------------------------------------------------------------------------------------


def make_round(run_dir, names):
    """Round 0 of ``run_dir`` with one group whose samples are ``names``; images/sN.png are written."""
    import re

    from PIL import Image

    from diffpo.data.rounds import round_dir, write_manifest

    folder = round_dir(run_dir, 0)
    (folder / "images").mkdir(parents=True)
    for i, name in enumerate(names):
        if re.fullmatch(r"images/s\d\.png", name):
            Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(folder / name)
    return write_manifest(folder, 0, ["a prompt"], samples_per_prompt=len(names), images=[names])


@pytest.fixture
def small_run(tmp_path):
    run_dir = tmp_path / "run"
    make_round(run_dir, ["images/s0.png", "images/s1.png", "images/s2.png"])
    return run_dir


def test_label_server_binds_loopback_by_default(small_run):
    from diffpo.cli import build_parser

    with label_server_thread(small_run) as server:
        assert server.server_address[0] == "127.0.0.1"
    assert build_parser().parse_args(["label", "run"]).host == "127.0.0.1"
    assert build_parser().parse_args(["prompt", "serve", "tiny"]).host == "127.0.0.1"


@pytest.mark.parametrize("names, sample, status", [
    (["images/s0.png", "../../../outside.png"], 1, 403),           # ".." out of the run dir
    (["images/s0.png", "{outside}"], 1, 403),                       # an absolute path outside
    (["images/s0.png", "images/link-out.png"], 1, 403),             # a symlink pointing outside
    (["images/s0.png", "round.json"], 1, 403),                      # inside, but not an image
    (["images/s0.png", "images/link-in.png"], 1, 200),              # a symlink to an image inside
    (["images/s0.png", "images/../images/s0.png"], 1, 200),         # ".." that stays inside
    (["images/s0.png", "images/missing.png"], 1, 404),
])
def test_label_images_outside_the_run_dir_are_refused(tmp_path, names, sample, status):
    from PIL import Image

    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(outside)
    run_dir = tmp_path / "run"
    manifest = make_round(run_dir, [n.replace("{outside}", str(outside)) for n in names])
    if "images/link-out.png" in names:
        (manifest.folder / "images" / "link-out.png").symlink_to(outside)
    if "images/link-in.png" in names:
        (manifest.folder / "images" / "link-in.png").symlink_to(manifest.folder / "images" / "s0.png")
    with label_server_thread(run_dir) as server:
        got, _, body = call(server.server_address[1], "GET", f"/image/0/{sample}")
    assert got == status, body
    assert body != outside.read_bytes()
    if status == 403:
        assert "not served" in body["error"]
    if status == 200:
        assert body == (manifest.folder / "images" / "s0.png").read_bytes()


@pytest.mark.parametrize("path", [
    "/image/0/%2e%2e", "/image/%2e%2e/0", "/image/0/0/../../../outside.png", "/../outside.png",
    "/%2e%2e/%2e%2e/outside.png", "/%2E%2E%2Foutside.png", "//etc/passwd", "/image/0/0%00.png",
    "/image/../../etc/passwd", "/rounds/round-0000/round.json", "/image/0/1/", "/images/s0.png",
])
def test_label_request_paths_never_reach_files(small_run, path):
    with label_server_thread(small_run) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        connection.putrequest("GET", path, skip_accept_encoding=True)  # byte for byte, no normalising
        connection.endheaders()
        assert connection.getresponse().status == 404
        connection.close()


def test_label_api_key_with_the_url_then_a_cookie(small_run):
    from diffpo.data.rounds import LABELS

    with label_server_thread(small_run, api_key=KEY) as server:
        port = server.server_address[1]
        assert server.login_url == f"http://127.0.0.1:{port}/?key=correct%20horse%20battery%20staple"
        for method, path, body in (("GET", "/", None), ("GET", "/api/next", None), ("GET", "/image/0/0", None),
                                   ("POST", "/api/label", {"group": 0, "a": 0, "b": 1, "choice": "a"}),
                                   ("GET", "/?key=wrong", None), ("GET", f"/api/next?key={quote(KEY)}", None)):
            status, headers, answer = call(port, method, path, body)
            assert status == 401 and "?key=" in answer["error"], path
        assert not (server.session.manifest.folder / LABELS).exists()
        status, headers, _ = call(port, "GET", "/?key=" + server.login_url.split("?key=")[1])
        assert status == 303 and headers["location"] == "/"
        cookie = headers["set-cookie"]
        assert cookie.startswith(f"diffpo_label_{port}=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert KEY.split()[0] not in cookie  # the browser keeps a token derived from the key, not the key
        jar = {"Cookie": cookie.split(";")[0]}
        assert call(port, "GET", "/api/next", headers=jar)[0] == 200
        assert call(port, "GET", "/image/0/0", headers=jar)[0] == 200
        assert call(port, "POST", "/api/label", {"group": 0, "a": 0, "b": 1, "choice": "a"}, headers=jar)[0] == 200
        assert call(port, "GET", "/api/next", headers={"Cookie": f"diffpo_label_{port}=0123abcd"})[0] == 401
        assert call(port, "GET", "/api/next", headers={"X-API-Key": KEY})[0] == 200
        assert call(port, "GET", "/api/next", headers={"Authorization": f"Bearer {KEY}"})[0] == 200
    assert len((server.session.manifest.folder / LABELS).read_text().splitlines()) == 1


def test_label_body_limit_is_413_and_writes_nothing(small_run):
    from diffpo.data.rounds import LABELS

    label = {"group": 0, "a": 0, "b": 1, "choice": "a"}
    with label_server_thread(small_run) as server:  # default 4096 bytes
        status, _, answer = call(server.server_address[1], "POST", "/api/label", dict(label, pad="x" * 5000))
        assert status == 413 and "limit is 4096 bytes" in answer["error"]
    with label_server_thread(small_run, max_body_bytes=100) as server:
        status, _, answer = call(server.server_address[1], "POST", "/api/label", dict(label, pad="x" * 100))
        assert status == 413 and "limit is 100 bytes" in answer["error"]
        assert not (server.session.manifest.folder / LABELS).exists()
        assert call(server.server_address[1], "POST", "/api/label", label)[0] == 200


def test_label_rate_limit_per_client_and_host_check(small_run):
    with label_server_thread(small_run, rate_limit=60, rate_burst=2) as server:
        port = server.server_address[1]
        assert [call(port, "GET", "/api/next")[0] for _ in range(2)] == [200, 200]
        status, headers, answer = call(port, "GET", "/api/next")
        assert status == 429 and headers["retry-after"] == "1" and "burst 2" in answer["error"]
        assert call(port, "GET", "/api/next", source="127.0.0.2")[0] == 200
        status, _, answer = call(port, "GET", "/api/next", source="127.0.0.3", headers={"Host": "rebound.example"})
        assert status == 421 and "rebound.example" in answer["error"]


# --------------------------------------------------------------------------------------------
# Real processes: default bind, exposure warning, graceful stop
# --------------------------------------------------------------------------------------------


def other_local_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


def refuses(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return False
    except ConnectionRefusedError:
        return True


def wait_until_refused(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not refuses("127.0.0.1", port):
        assert time.monotonic() < deadline, "the port still accepts connections after SIGTERM"
        time.sleep(0.02)


def test_prompt_server_process_is_local_and_stops_gracefully(tmp_path):
    """Default bind 127.0.0.1; on SIGTERM the port closes at once, but the 8 requests it had received
    (some generating in a batch, the rest queued for the model thread) are all answered; then exit 0."""
    server = ServerProcess(["prompt", "serve", "tiny", "--port", "0", "--rate-limit", "0"], tmp_path / "log",
                           env={"DIFFPO_API_KEY": ""})
    body = {"prompt": "a red circle", "n": 16, "max_new_tokens": 128, "temperature": 1.0}
    answers = []
    with server:
        assert server.first_line.startswith(f"serving tiny on http://127.0.0.1:{server.port} ")
        other = other_local_address()
        if other is not None:  # not listening on the machine's network address
            assert refuses(other, server.port)

        threads = [threading.Thread(target=lambda i=i: answers.append(call(server.port, "POST", "/v1/optimize",
                                                                             dict(body, seed=i))))
                   for i in range(8)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while True:  # every request is at the server: answered, or generating / waiting for the model
            answered = len(answers)
            optimizing = call(server.port, "GET", "/healthz")[2]["optimizing"]
            if answered + optimizing == 8 and optimizing >= 3:
                break
            assert time.monotonic() < deadline and answered < 6, (answered, optimizing)
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        wait_until_refused(server.port)
        unanswered_when_closed = 8 - len(answers)
        for thread in threads:
            thread.join(timeout=60)
        code = server.process.wait(timeout=60)
    assert unanswered_when_closed >= 1  # the port closed while requests were still running
    assert [status for status, _, _ in answers] == [200] * 8
    assert all(len(answer["results"][0]["candidates"]) == 16 for _, _, answer in answers)
    assert code == 0, server.log_tail()
    assert "stopped after" in server.output() and "Traceback" not in server.log_tail()


def test_label_process_finishes_a_label_in_progress_at_sigterm(tmp_path, small_run):
    """A label whose headers are in (the server answered 100 Continue) when SIGTERM comes is still
    received, saved and answered after the port has closed; then the process exits 0."""
    from diffpo.data.rounds import LABELS, read_labels

    server = ServerProcess(["label", str(small_run), "--port", "0"], tmp_path / "log", env={"DIFFPO_API_KEY": ""})
    with server:
        assert f": http://127.0.0.1:{server.port}/ " in server.first_line
        body = json.dumps({"round": 0, "group": 0, "a": 1, "b": 2, "choice": "b"}).encode()
        connection = socket.create_connection(("127.0.0.1", server.port), timeout=20)
        connection.sendall(f"POST /api/label HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                           "Expect: 100-continue\r\n\r\n".encode())
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            interim += connection.recv(1)
        assert interim.startswith(b"HTTP/1.1 100")
        server.process.send_signal(signal.SIGTERM)
        wait_until_refused(server.port)
        assert server.process.poll() is None  # still running: it waits for this request
        connection.sendall(body)
        response = http.client.HTTPResponse(connection)
        response.begin()
        answer = json.loads(response.read())
        connection.close()
        code = server.process.wait(timeout=20)
    assert response.status == 200 and answer["labelled"] == 1
    assert code == 0, server.log_tail()
    assert read_labels(small_run / "rounds" / "round-0000") == {(0, 1, 2): "b"}
    assert len((small_run / "rounds" / "round-0000" / LABELS).read_text().splitlines()) == 1
    assert "1 of 3 pairs labelled" in server.output()


def test_label_command_warns_when_exposed_without_a_key(small_run):
    def first_lines(env_key):
        process = subprocess.Popen([sys.executable, "-m", "diffpo", "label", str(small_run), "--host", "0.0.0.0",
                                    "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "DIFFPO_API_KEY": env_key})
        try:
            out = process.stdout.readline()
            process.send_signal(signal.SIGTERM)
            rest, err = process.communicate(timeout=20)
        finally:
            process.kill()
        return process.returncode, out, err

    code, out, err = first_lines("")
    assert code == 0 and "http://0.0.0.0:" in out
    assert "warning: listening on 0.0.0.0, reachable from other machines, without an API key" in err
    code, out, err = first_lines(KEY)
    assert code == 0 and "warning" not in err and "/?key=correct%20horse%20battery%20staple" in out
