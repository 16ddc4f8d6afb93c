"""What diffpo's two HTTP servers (``diffpo prompt serve``, ``diffpo label``) share: loopback binding
by default, an optional API key, a per-client rate limit, a Host check against DNS rebinding, and a
count of requests in progress for the graceful stop. Standard library only; no global state.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import socket
import threading
import time
from dataclasses import dataclass

from diffpo.ranges import argument

API_KEY_ENV = "DIFFPO_API_KEY"


def resolve_api_key(flag: str | None) -> str | None:
    """The key from ``--api-key``, else from ``$DIFFPO_API_KEY``, else None (no key required)."""
    if flag is not None:
        if not flag.strip():
            raise ValueError(f"--api-key is empty: pass a secret (e.g. python -c 'import secrets; "
                             f"print(secrets.token_urlsafe(32))') or leave it out, or set {API_KEY_ENV}")
        return flag.strip()
    return os.environ.get(API_KEY_ENV, "").strip() or None


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, 'localhost')."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning to print when a server listens beyond this machine without a key, else None."""
    if is_loopback(host) or api_key:
        return None
    return (f"warning: listening on {host}, reachable from other machines, without an API key: anyone who can "
            f"reach this port can use the server; pass --api-key or set {API_KEY_ENV} (or --host 127.0.0.1)")


def key_matches(presented: str | None, expected: str) -> bool:
    """Constant-time comparison: both sides are hashed first, so neither content nor length leaks."""
    if presented is None:
        return False
    digest = lambda text: hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()  # noqa: E731
    return hmac.compare_digest(digest(presented), digest(expected))


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key a client sent as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``."""
    if x_api_key:
        return x_api_key.strip()
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return None


def missing_key_message(header_hint: str = 'send "Authorization: Bearer KEY" or "X-API-Key: KEY"') -> str:
    return (f"this server requires an API key: {header_hint} with the key the server was started with "
            f"(--api-key or {API_KEY_ENV})")


def host_header_allowed(host_header: str | None, bound_host: str) -> bool:
    """Whether a request's Host header names this machine. A server bound to loopback answers only
    requests addressed to a loopback name, so a web page whose domain was re-pointed at 127.0.0.1
    (DNS rebinding) cannot talk to it. A server bound elsewhere accepts any Host."""
    if not is_loopback(bound_host) or not host_header:  # no Host: not a browser, which always sends one
        return True
    host = host_header.strip().lower()
    if host.startswith("[") and "]" in host:  # [::1]:8000
        name = host[1:host.index("]")]
    elif host.count(":") == 1:  # localhost:8000
        name = host.partition(":")[0]
    else:  # no port (or an unbracketed IPv6 address)
        name = host
    return is_loopback(name) or name == bound_host.lower()


def add_network_arguments(parser, default_port: int, rate_limit: float, rate_burst: int, max_body_bytes: int) -> None:
    """``--host --port --api-key --rate-limit --rate-burst --max-body-bytes``, as both servers take them."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only). Another address, e.g. "
                             "0.0.0.0 (every interface), exposes the server to the network: set an API key then")
    parser.add_argument("--port", type=argument(int, "[0, 65535]"), default=default_port,
                        help=f"port to listen on (default {default_port}; 0: any free port)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help=f"require this key on every request (Authorization: Bearer KEY or X-API-Key: KEY); "
                             f"default: ${API_KEY_ENV} if set, else no key. Prefer the environment variable: a key "
                             "on the command line is visible to other users of the machine")
    parser.add_argument("--rate-limit", type=argument(float, ">= 0"), default=rate_limit, metavar="PER_MINUTE",
                        help=f"requests per minute per client address, past the burst (default {rate_limit:g}; "
                             "0: no limit); beyond it: 429 with Retry-After")
    parser.add_argument("--rate-burst", type=argument(int, ">= 1"), default=rate_burst,
                        help=f"requests a client may send at once before --rate-limit applies (default {rate_burst})")
    parser.add_argument("--max-body-bytes", type=argument(int, ">= 1"), default=max_body_bytes,
                        help=f"largest request body accepted (default {max_body_bytes}); beyond it: 413")


def listen(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free port), or an OSError naming the fix."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    try:
        return socket.create_server((host.strip("[]"), port), family=family, backlog=backlog)
    except OSError as error:
        raise OSError(f"cannot listen on {host}:{port} ({error.strerror or error}): pass --port with a free port "
                      "(0: any) or stop the other server") from None


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per client: ``burst`` requests at once, refilled at ``per_minute`` / 60 per
    second. ``per_minute=0`` turns the limit off. Thread-safe; the table of clients stays bounded."""

    def __init__(self, per_minute: float, burst: int, max_clients: int = 10_000, clock=time.monotonic):
        if not per_minute >= 0:
            raise ValueError(f"rate limit {per_minute} requests per minute must be >= 0 (0: no limit; --rate-limit)")
        if burst < 1:
            raise ValueError(f"rate burst {burst} must be >= 1 (requests a client may send at once; --rate-burst)")
        self.per_minute, self.burst, self.max_clients, self.clock = float(per_minute), int(burst), max_clients, clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    def __len__(self) -> int:
        """Clients tracked now."""
        with self._lock:
            return len(self._buckets)

    def retry_after(self, client: str) -> float:
        """0 if ``client`` may send this request now (one token is taken), else the seconds to wait."""
        if not self.enabled:
            return 0.0
        rate = self.per_minute / 60.0
        with self._lock:
            now = self.clock()
            bucket = self._buckets.get(client)
            if bucket is None:
                self._forget_idle(now, rate)
                bucket = self._buckets[client] = _Bucket(float(self.burst), now)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / rate

    def _forget_idle(self, now: float, rate: float) -> None:
        """Drop clients whose bucket has refilled (forgetting them changes nothing), then the oldest."""
        if len(self._buckets) < self.max_clients:
            return
        for client, bucket in list(self._buckets.items()):
            if bucket.tokens + (now - bucket.updated) * rate >= self.burst:
                del self._buckets[client]
        oldest_first = sorted(self._buckets, key=lambda c: self._buckets[c].updated)
        for client in oldest_first[:len(self._buckets) - self.max_clients + 1]:
            del self._buckets[client]

    def message(self, wait: float) -> str:
        return (f"rate limit of {self.per_minute:g} requests per minute per client (burst {self.burst}) exceeded: "
                f"retry in {wait:.1f} s, or start the server with a higher --rate-limit")


class InFlight:
    """Requests in progress. ``close_and_wait`` refuses new ones and waits for the running ones to
    finish: what a graceful stop needs."""

    def __init__(self):
        self._condition = threading.Condition()
        self._count = 0
        self._closing = False

    def enter(self) -> bool:
        """Count a request that starts now; False once closing (answer it 503)."""
        with self._condition:
            if self._closing:
                return False
            self._count += 1
            return True

    def leave(self) -> None:
        with self._condition:
            self._count -= 1
            self._condition.notify_all()

    @property
    def count(self) -> int:
        with self._condition:
            return self._count

    def close_and_wait(self, timeout: float | None) -> int:
        """Refuse new requests, wait up to ``timeout`` s for the running ones; the number still running."""
        with self._condition:
            self._closing = True
            self._condition.wait_for(lambda: self._count == 0, timeout)
            return self._count


__all__ = ["API_KEY_ENV", "InFlight", "RateLimiter", "add_network_arguments", "exposure_warning", "host_header_allowed",
           "is_loopback", "key_matches", "listen", "missing_key_message", "presented_key", "resolve_api_key"]
