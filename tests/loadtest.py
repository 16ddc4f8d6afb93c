"""Load on diffpo's HTTP servers from the standard library: ``clients`` threads, each on one
keep-alive connection, start together and send ``requests_per_client`` requests each; every answer
is checked, and latencies are summarised (p50 / p95 / p99). Used by tests/test_server_load.py and
benchmarks/bench_server_load.py; ``ServerProcess`` starts a real ``diffpo`` server subprocess.
A test harness, so it lives with the tests (not in the installed package).
"""

from __future__ import annotations

import http.client
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

# (client, index) -> (method, path, body or None, headers)
RequestMaker = Callable[[int, int], tuple]
# (client, index, status, body) -> None if the answer is right, else what is wrong with it
AnswerCheck = Callable[[int, int, int, bytes], Optional[str]]


def write_synthetic_round(run_dir: Path, groups: int = 20, samples: int = 3, size: int = 16):
    """A labelling round of ``groups`` prompts x ``samples`` flat-colour PNGs in ``run_dir``, for
    loading the labelling page; returns its manifest."""
    from PIL import Image

    from diffpo.data.rounds import round_dir, write_manifest

    folder = round_dir(run_dir, 0)
    (folder / "images").mkdir(parents=True)
    images = []
    for group in range(groups):
        names = [f"images/g{group:04d}-s{sample}.png" for sample in range(samples)]
        for sample, name in enumerate(names):
            Image.new("RGB", (size, size), (12 * group % 256, 80 * sample % 256, 100)).save(folder / name)
        images.append(names)
    return write_manifest(folder, 0, [f"prompt {g}" for g in range(groups)], samples_per_prompt=samples, images=images)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class LoadResult:
    clients: int
    requests_per_client: int
    seconds: float
    latencies: list[float] = field(default_factory=list)  # seconds, one per answered request
    failures: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        ms = [1000 * t for t in self.latencies]
        latency = ({name: round(percentile(ms, q), 2) for name, q in (("p50", 50), ("p95", 95), ("p99", 99))}
                   | {"max": round(max(ms), 2), "mean": round(sum(ms) / len(ms), 2)}) if ms else {}
        return {"clients": self.clients, "requests_per_client": self.requests_per_client,
                "requests": self.clients * self.requests_per_client, "ok": len(self.latencies) - self.failed_answers,
                "failed": len(self.failures), "seconds": round(self.seconds, 3),
                "requests_per_s": round(len(self.latencies) / self.seconds, 1) if self.seconds else None,
                "latency_ms": latency, "first_failures": self.failures[:5]}

    @property
    def failed_answers(self) -> int:
        return sum(1 for f in self.failures if f.startswith("answer "))


def run_load(host: str, port: int, make_request: RequestMaker, check: AnswerCheck, clients: int = 50,
             requests_per_client: int = 20, timeout: float = 30.0, deadline: float = 120.0) -> LoadResult:
    """Send ``clients`` x ``requests_per_client`` requests, ``clients`` at a time. A request that
    errors, times out (``timeout`` s) or is not sent before ``deadline`` s is a failure, as is an
    answer ``check`` rejects."""
    result = LoadResult(clients, requests_per_client, 0.0)
    lock = threading.Lock()
    start_together = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(c: int) -> None:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
        start_together.wait()
        for i in range(requests_per_client):
            if time.perf_counter() > stop_at[0]:
                with lock:
                    result.failures.append(f"client {c}: {requests_per_client - i} requests not sent before the "
                                           f"{deadline:g} s deadline")
                break
            method, path, body, headers = make_request(c, i)
            sent = time.perf_counter()
            try:
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as error:
                with lock:
                    result.failures.append(f"client {c} request {i}: {type(error).__name__}: {error}")
                connection.close()  # the next request opens a fresh connection
                continue
            latency = time.perf_counter() - sent
            problem = check(c, i, response.status, data)
            with lock:
                result.latencies.append(latency)
                if problem:
                    result.failures.append(f"answer {c}/{i}: {problem}")
        connection.close()

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for thread in threads:
        thread.start()
    started = time.perf_counter()
    stop_at[0] = started + deadline
    start_together.wait()
    for thread in threads:
        thread.join(max(0.0, stop_at[0] + timeout - time.perf_counter()))
    result.seconds = time.perf_counter() - started
    hung = sum(thread.is_alive() for thread in threads)
    if hung:
        result.failures.append(f"{hung} clients still waiting after the deadline")
    return result


class ServerProcess:
    """A ``python -m diffpo ...`` server subprocess; ``start()`` waits for the line with its URL.
    The server's stderr (one log line per request) goes to ``log`` so that no pipe fills up."""

    URL = re.compile(r"http://(\[[0-9a-f:]+\]|[\w.-]+):(\d+)/?(\S*)")

    def __init__(self, args: list[str], log: str | Path, env: dict | None = None, ready_timeout: float = 120.0):
        self.args, self.log, self.ready_timeout = args, Path(log), ready_timeout
        self.env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
        self.process: subprocess.Popen | None = None
        self.lines: queue.Queue[str] = queue.Queue()
        self.host, self.port, self.first_line = "", 0, ""

    def start(self) -> "ServerProcess":
        log = self.log.open("w")
        self.process = subprocess.Popen([sys.executable, "-m", "diffpo", *self.args], stdout=subprocess.PIPE,
                                        stderr=log, text=True, env=self.env)
        log.close()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            match = self.URL.search(line)
            if match:
                self.first_line, self.host, self.port = line, match[1].strip("[]"), int(match[2])
                return self
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"diffpo {' '.join(self.args)} did not print its URL within {self.ready_timeout:g} s; "
                           f"its log: {self.log_tail()}")

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)

    def output(self) -> str:
        """Everything it printed since start() returned (call after it exited)."""
        out = []
        while not self.lines.empty():
            out.append(self.lines.get())
        return "".join(out)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig`` and wait for the exit; the exit code (killed if it does not exit in time)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop(signal.SIGKILL, timeout=10)


__all__ = ["LoadResult", "ServerProcess", "percentile", "run_load"]
