"""Both servers under load, as real processes on 127.0.0.1: 50 concurrent clients x 20 requests,
each client on its own keep-alive connection, with the API key and the rate limiter switched on
(the limit set above the load), bounded by a deadline. No request may fail and every answer must be
the right one; the p95 latency is printed (benchmarks/bench_server_load.py records it).

The prompt API is loaded with real rewrites by the tiny random LM (n=1, max_new_tokens=4: ~4 ms of
generation each, so 1,000 of them take seconds batched by the one model thread)."""

from __future__ import annotations

import json
import threading
from collections import Counter

import pytest

from loadtest import ServerProcess, run_load

CLIENTS, PER_CLIENT = 50, 20
KEY = "load-test-key"
NO_LIMIT_FOR_THE_LOAD = ["--rate-limit", "600000", "--rate-burst", "10000"]


def test_prompt_api_answers_50_concurrent_clients_correctly(tmp_path):
    server = ServerProcess(["prompt", "serve", "tiny", "--port", "0", *NO_LIMIT_FOR_THE_LOAD],
                           tmp_path / "server.log", env={"DIFFPO_API_KEY": KEY})
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    bodies = [json.dumps({"prompt": f"a red circle number {k}", "n": 1, "max_new_tokens": 4, "seed": k})
              for k in range(10)]
    with server:
        # the answers to expect: the same prompt and seed must give the same rewrite under load
        reference = {}

        def keep(c, i, status, data):
            reference[i] = data
            return None if status == 200 else f"status {status}"

        serial = run_load(server.host, server.port, lambda c, i: ("POST", "/v1/optimize", bodies[i], headers), keep,
                          clients=1, requests_per_client=len(bodies))
        assert not serial.failures and len(reference) == 10
        assert all(json.loads(reference[k])["results"][0]["prompt"] == f"a red circle number {k}" for k in range(10))

        def request(c, i):
            return "POST", "/v1/optimize", bodies[(c + i) % 10], headers

        def check(c, i, status, data):
            if status != 200:
                return f"status {status}: {data[:200]!r}"
            if data != reference[(c + i) % 10]:
                return f"answer differs from the serial one for prompt {(c + i) % 10}: {data[:200]!r}"
            return None

        result = run_load(server.host, server.port, request, check, CLIENTS, PER_CLIENT, timeout=60, deadline=150)
        summary = result.summary()
        print("prompt API load:", json.dumps(summary))
        assert result.failures == [], summary
        assert summary["ok"] == CLIENTS * PER_CLIENT
        code = server.stop()
    assert code == 0, server.log_tail()
    assert f"stopped after {CLIENTS * PER_CLIENT + 10} requests" in server.output()


@pytest.fixture
def big_round(tmp_path):
    """A round of 20 groups x 3 samples (60 pairs) with small PNGs."""
    from loadtest import write_synthetic_round

    return write_synthetic_round(tmp_path / "run")


def test_labelling_page_answers_50_concurrent_clients_and_keeps_every_label(tmp_path, big_round):
    from diffpo.data.rounds import LABELS

    manifest = big_round
    run_dir = manifest.folder.parent.parent
    server = ServerProcess(["label", str(run_dir), "--port", "0", *NO_LIMIT_FOR_THE_LOAD], tmp_path / "server.log",
                           env={"DIFFPO_API_KEY": KEY})
    pairs = manifest.pairs
    choices = ("a", "b", "tie")
    posted, posted_lock = Counter(), threading.Lock()

    def request(c, i):
        kind = i % 4
        headers = {"X-API-Key": KEY}
        if kind == 0:  # a label: every fourth request writes one line of labels.jsonl
            group, a, b = pairs[(7 * c + i) % len(pairs)]
            body = json.dumps({"round": 0, "group": group, "a": a, "b": b, "choice": choices[(c + i) % 3]})
            return "POST", "/api/label", body, headers | {"Content-Type": "application/json"}
        if kind == 1:
            return "GET", "/api/next", None, headers
        if kind == 2:
            return "GET", f"/image/{(c + i) % 20}/{i % 3}", None, headers
        return "GET", "/", None, headers

    def check(c, i, status, data):
        if status != 200:
            return f"status {status}: {data[:200]!r}"
        kind = i % 4
        if kind == 0:
            group, a, b = pairs[(7 * c + i) % len(pairs)]
            with posted_lock:
                posted[(group, a, b, choices[(c + i) % 3])] += 1
            return None if json.loads(data)["total"] == 60 else f"label answer {data[:200]!r}"
        if kind == 1:
            return None if json.loads(data)["total"] == 60 else f"next answer {data[:200]!r}"
        if kind == 2:
            expected = manifest.image_path((c + i) % 20, i % 3).read_bytes()
            return None if data == expected else "image bytes differ from the file"
        return None if b'id="choose-a"' in data else "not the page"

    with server:
        result = run_load(server.host, server.port, request, check, CLIENTS, PER_CLIENT, timeout=60, deadline=120)
        summary = result.summary()
        print("labelling page load:", json.dumps(summary))
        assert result.failures == [], summary
        assert summary["ok"] == CLIENTS * PER_CLIENT
        code = server.stop()
    assert code == 0, server.log_tail()
    # every label answered 200 is in the file, whole, once: no line lost, torn or interleaved
    lines = (manifest.folder / LABELS).read_text().splitlines()
    written = Counter((r["group"], r["a"], r["b"], r["choice"]) for r in map(json.loads, lines))
    assert len(lines) == CLIENTS * PER_CLIENT // 4 and written == posted
