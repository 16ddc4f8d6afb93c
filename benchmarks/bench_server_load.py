"""Load on the two diffpo servers, each a real process on 127.0.0.1 with the API key and the rate
limiter on (the limit set above the load): CLIENTS concurrent clients x REQUESTS requests each, one
keep-alive connection per client. Three scenarios:

* ``prompt-healthz``: GET /healthz of ``diffpo prompt serve`` (HTTP, key and limiter, no model);
* ``prompt-optimize``: POST /v1/optimize, real rewrites by the rewriter (default the tiny random LM,
  n=1, max_new_tokens=4); one model thread batches the requests waiting, so latency grows with the
  clients waiting by batches, not by requests;
* ``label``: ``diffpo label`` with a mix of POST /api/label (fsynced), GET /api/next, an image, the page.

Every answer is checked (status 200; rewrites equal to the serial ones for the same prompt and seed;
image bytes equal to the file; every posted label in labels.jsonl). Not a timed test: run
``python benchmarks/bench_server_load.py [--clients 50 --requests 20 --out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from collections import Counter
from pathlib import Path
import sys
from threading import Lock

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the load harness lives with the tests
from loadtest import ServerProcess, run_load  # noqa: E402

KEY = "bench-key"
NO_LIMIT_FOR_THE_LOAD = ["--rate-limit", "6000000", "--rate-burst", "100000"]


def bench_prompt(args, folder: Path) -> dict:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    bodies = [json.dumps({"prompt": f"a red circle number {k}", "n": args.n, "max_new_tokens": args.max_new_tokens,
                          "seed": k}) for k in range(10)]
    results = {}
    with ServerProcess(["prompt", "serve", args.model, "--port", "0", "--device", args.device, *NO_LIMIT_FOR_THE_LOAD],
                       folder / "prompt.log", env={"DIFFPO_API_KEY": KEY}) as server:
        results["prompt-healthz"] = run_load(
            server.host, server.port, lambda c, i: ("GET", "/healthz", None, {}),
            lambda c, i, status, data: None if status == 200 and b'"ok"' in data else f"status {status}",
            args.clients, args.requests, timeout=args.timeout, deadline=args.deadline).summary()
        reference = {}

        def keep(c, i, status, data):
            reference[i] = data
            return None if status == 200 else f"status {status}: {data[:200]!r}"

        serial = run_load(server.host, server.port, lambda c, i: ("POST", "/v1/optimize", bodies[i], headers), keep,
                          clients=1, requests_per_client=len(bodies), timeout=args.timeout)
        if serial.failures:
            raise RuntimeError(f"the serial reference requests failed: {serial.failures[:3]}")

        def check(c, i, status, data):
            if status != 200:
                return f"status {status}: {data[:200]!r}"
            return None if data == reference[(c + i) % 10] else "answer differs from the serial one"

        results["prompt-optimize"] = run_load(
            server.host, server.port, lambda c, i: ("POST", "/v1/optimize", bodies[(c + i) % 10], headers), check,
            args.clients, args.requests, timeout=args.timeout, deadline=args.deadline).summary()
        results["prompt-optimize"].update(model=args.model, n=args.n, max_new_tokens=args.max_new_tokens)
        code = server.stop()
    if code != 0:
        raise RuntimeError(f"the prompt server exited {code}: {server.log_tail()}")
    return results


def bench_label(args, folder: Path) -> dict:
    from diffpo.data.rounds import LABELS
    from loadtest import write_synthetic_round

    run_dir = folder / "run"
    manifest = write_synthetic_round(run_dir, size=64)
    pairs, choices = manifest.pairs, ("a", "b", "tie")
    posted, lock = Counter(), Lock()
    files = {(g, s): manifest.image_path(g, s).read_bytes() for g in range(20) for s in range(3)}

    def request(c, i):
        headers = {"X-API-Key": KEY}
        if i % 4 == 0:
            group, a, b = pairs[(7 * c + i) % len(pairs)]
            body = json.dumps({"round": 0, "group": group, "a": a, "b": b, "choice": choices[(c + i) % 3]})
            return "POST", "/api/label", body, headers | {"Content-Type": "application/json"}
        return ("GET", {1: "/api/next", 2: f"/image/{(c + i) % 20}/{i % 3}", 3: "/"}[i % 4], None, headers)

    def check(c, i, status, data):
        if status != 200:
            return f"status {status}: {data[:200]!r}"
        if i % 4 == 0:
            with lock:
                posted[(*pairs[(7 * c + i) % len(pairs)], choices[(c + i) % 3])] += 1
        if i % 4 == 2 and data != files[((c + i) % 20, i % 3)]:
            return "image bytes differ from the file"
        return None

    with ServerProcess(["label", str(run_dir), "--port", "0", *NO_LIMIT_FOR_THE_LOAD], folder / "label.log",
                       env={"DIFFPO_API_KEY": KEY}) as server:
        summary = run_load(server.host, server.port, request, check, args.clients, args.requests,
                           timeout=args.timeout, deadline=args.deadline).summary()
        code = server.stop()
    lines = (manifest.folder / LABELS).read_text().splitlines()
    written = Counter((r["group"], r["a"], r["b"], r["choice"]) for r in map(json.loads, lines))
    summary.update(labels_posted=sum(posted.values()), labels_in_file=len(lines), labels_match=written == posted,
                   exit_code=code)
    return {"label": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (default 50)")
    parser.add_argument("--requests", type=int, default=20, help="requests per client (default 20)")
    parser.add_argument("--server", choices=["prompt", "label", "both"], default="both")
    parser.add_argument("--model", default="tiny", help="rewriter for the prompt API (default tiny)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=1, help="rewrites per request (default 1)")
    parser.add_argument("--max-new-tokens", type=int, default=4, help="tokens per rewrite (default 4)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds one request may take (default 60)")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds a scenario may take (default 300)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "server_load.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    scenarios = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.server in ("prompt", "both"):
            scenarios |= bench_prompt(args, Path(tmp))
        if args.server in ("label", "both"):
            scenarios |= bench_label(args, Path(tmp))
    result = {"clients": args.clients, "requests_per_client": args.requests, "machine": platform.machine(),
              "cpus": os.cpu_count(), "python": platform.python_version(), "scenarios": scenarios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, summary in scenarios.items():
        latency = summary["latency_ms"]
        print(f"{name:16s} {summary['ok']}/{summary['requests']} ok, {summary['failed']} failed, "
              f"{summary['requests_per_s']} req/s, p50 {latency.get('p50')} ms, p95 {latency.get('p95')} ms, "
              f"p99 {latency.get('p99')} ms")
    print(f"written to {args.out}")
    if any(s["failed"] for s in scenarios.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
