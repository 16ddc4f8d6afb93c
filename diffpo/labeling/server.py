"""``diffpo label RUN_DIR``: a local web page that shows the pending pairs of one sampling round and
appends every judgement to the round's ``labels.jsonl`` (see :mod:`diffpo.data.rounds`).

Standard library only. The page asks ``GET /api/next`` for the next pending pair, posts
``{round, group, a, b, choice}`` to ``POST /api/label`` and shows ``GET /image/<group>/<sample>``.
Nothing is written but ``labels.jsonl``; labelled pairs are read back from it, so a restarted
server continues where the last one stopped.

It listens on 127.0.0.1 unless told otherwise and serves only the image files the round's manifest
lists, and only when they lie inside the run dir (a ``..`` or absolute name, or a symlink out of it:
403). With an API key, the printed URL carries it once (``/?key=KEY``); the page then holds it in an
HttpOnly, SameSite=Strict cookie. SIGTERM or Ctrl-C stops it gracefully: requests already received
(a label being saved) finish first, and every label is fsynced before it is answered.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import mimetypes
import re
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from diffpo.data.rounds import (CHOICES, LABELS, RoundManifest, append_label, list_rounds, pending_pairs, read_labels,
                                read_manifest, round_dir)
from diffpo.serving import (InFlight, RateLimiter, exposure_warning, host_header_allowed, key_matches,
                            missing_key_message, presented_key)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
MAX_BODY_BYTES = 4096  # a label is ~60 bytes; anything much larger is not from the page
# A page load is 4 requests and a label 3 (the label, two images): 600 a minute outpaces any labeller.
RATE_LIMIT = 600.0
RATE_BURST = 120
SHUTDOWN_TIMEOUT = 10.0  # a label takes milliseconds; only a client stalled mid-body waits this long
IMAGE_ROUTE = re.compile(r"/image/(\d{1,6})/(\d{1,6})")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"})


class LabelRequestError(ValueError):
    """A request the page should not have sent: answered ``status`` (400 unless said) with the message."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


def choose_round(run_dir: str | Path, round_index: int | None = None) -> RoundManifest:
    """The requested round, else the latest round that still has pending pairs, else the latest."""
    rounds = list_rounds(run_dir)
    if not rounds:
        where = "does not exist" if not Path(run_dir).is_dir() else "has no sampling rounds (no rounds/round-NNNN/round.json)"
        raise FileNotFoundError(f"{run_dir} {where}: pass the output_dir of a D3PO run with online.preference=human "
                                "after it has sampled a round")
    if round_index is not None:
        folder = round_dir(run_dir, round_index)
        if folder not in rounds:
            names = ", ".join(str(read_manifest(p).index) for p in rounds)
            raise FileNotFoundError(f"round {round_index} does not exist in {run_dir}: pass --round with one of {names}")
        return read_manifest(folder)
    manifests = [read_manifest(p) for p in rounds]
    unfinished = [m for m in manifests if pending_pairs(m, read_labels(m.folder))]
    return (unfinished or manifests)[-1]


@dataclass
class LabellingSession:
    """One round being labelled. The labels file is the only state, re-read on every request, so
    judgements from an earlier server (or a second tab) are always counted."""

    manifest: RoundManifest
    run_dir: Path
    lock: threading.Lock = field(default_factory=threading.Lock)  # one append + re-read at a time

    def next_pair(self) -> dict:
        labels = read_labels(self.manifest.folder)
        pending = pending_pairs(self.manifest, labels)
        total = len(self.manifest.pairs)
        progress = {"round": self.manifest.index, "labelled": total - len(pending), "total": total}
        if not pending:
            return {"done": True, **progress, "labels_file": str(self.manifest.folder / LABELS),
                    "resume_command": f"diffpo train {self.run_dir / 'config.yaml'} resume_from=latest"}
        group, a, b = pending[0]
        return {"done": False, **progress, "group": group, "a": a, "b": b, "prompt": self.manifest.prompts[group],
                "image_a": f"/image/{group}/{a}", "image_b": f"/image/{group}/{b}"}

    def label(self, body: object) -> dict:
        """Validate one judgement from the page, append it durably, and return the next pair."""
        group, a, b, choice = self.parse_label(body)
        with self.lock:
            append_label(self.manifest.folder, group, a, b, choice)
            return self.next_pair()

    def parse_label(self, body: object) -> tuple[int, int, int, str]:
        if not isinstance(body, dict):
            raise LabelRequestError('expected a JSON object {"group", "a", "b", "choice"}')
        values = [body.get(key) for key in ("group", "a", "b")]
        if not all(type(v) is int for v in values):  # type(), not isinstance: JSON true is not a sample index
            raise LabelRequestError('"group", "a" and "b" must be integers')
        # The page sends its round so that a tab left open from an earlier round cannot label this one.
        if "round" in body and body["round"] != self.manifest.index:
            raise LabelRequestError(f"this server labels round {self.manifest.index}, not round {body['round']}: reload the page")
        pair = tuple(values)
        if pair not in set(self.manifest.pairs):
            raise LabelRequestError(f"pair {list(pair)} is not a pair of round {self.manifest.index}")
        choice = body.get("choice")
        if choice not in CHOICES:
            raise LabelRequestError(f"choice {choice!r} must be one of {', '.join(CHOICES)}")
        return (*pair, choice)

    def image_file(self, group: int, sample: int) -> Path | None:
        """The resolved file of an image the manifest lists, None if there is none; a name that
        leaves the run dir (``..``, an absolute path, a symlink out) or is not an image is a 403
        LabelRequestError. The request path is never joined to a folder."""
        images = self.manifest.images
        if group >= len(images) or sample >= len(images[group]):
            return None
        path = self.manifest.image_path(group, sample).resolve()  # follows every symlink on the way
        if not path.is_relative_to(self.run_dir.resolve()):
            raise LabelRequestError(f"image {group}/{sample} of round {self.manifest.index} lies outside the run dir "
                                    "(round.json names a path or symlink out of it): not served", HTTPStatus.FORBIDDEN)
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise LabelRequestError(f"image {group}/{sample} of round {self.manifest.index} is not an image file "
                                    f"({path.suffix or 'no suffix'}): not served", HTTPStatus.FORBIDDEN)
        return path if path.is_file() else None


class LabelServer(ThreadingHTTPServer):
    # Handler threads are daemons so that an idle keep-alive connection never keeps the process
    # alive; requests in progress are counted (in_flight) and a graceful stop waits for them.
    daemon_threads = True
    request_queue_size = 128  # dozens of clients connecting at once must not overflow the accept queue

    def __init__(self, address: tuple[str, int], session: LabellingSession, page: bytes, api_key: str | None = None,
                 limiter: RateLimiter | None = None, max_body_bytes: int = MAX_BODY_BYTES):
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes={max_body_bytes} must be >= 1 (--max-body-bytes)")
        self.session = session
        self.page = page
        self.api_key = api_key
        self.limiter = limiter if limiter is not None else RateLimiter(RATE_LIMIT, RATE_BURST)
        self.max_body_bytes = max_body_bytes
        self.in_flight = InFlight()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, LabelRequestHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    @property
    def login_url(self) -> str:
        """The URL to open: with an API key, it carries the key once (the page then keeps a cookie)."""
        return self.url + (f"?key={quote(self.api_key, safe='')}" if self.api_key else "")

    @property
    def cookie_name(self) -> str:
        return f"diffpo_label_{self.server_address[1]}"  # cookies ignore ports: one name per server

    @property
    def session_token(self) -> str:
        """What the cookie holds: derived from the key, so the key itself is not stored by the browser."""
        return hmac.new(self.api_key.encode(), b"diffpo label page", hashlib.sha256).hexdigest()


class LabelRequestHandler(BaseHTTPRequestHandler):
    server: LabelServer
    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds an idle or stalled connection is kept before its thread ends

    def handle_one_request(self) -> None:
        self.counted = False
        try:
            super().handle_one_request()
        finally:
            if self.counted:
                self.server.in_flight.leave()

    def parse_request(self) -> bool:
        """Count the request as soon as its headers are in (a graceful stop waits for it), then
        refuse what the Host check, the rate limit or the key refuse."""
        self.counted = self.server.in_flight.enter()
        if not super().parse_request():
            return False
        if not self.counted:
            self.send_json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "the labelling server is stopping: start it "
                                                                     "again with diffpo label"})
            return False
        refusal = self.refusal()
        if refusal is not None:
            status, message, headers = refusal
            self.send_json(status, {"error": message}, headers)
            return False
        return True

    def refusal(self) -> tuple[HTTPStatus, str, list] | None:
        bound = self.server.server_address[0]
        if not host_header_allowed(self.headers.get("Host"), bound):
            return (HTTPStatus.MISDIRECTED_REQUEST, f"this server listens on {bound} and answers only requests "
                    f"addressed to this machine (127.0.0.1 or localhost), not to {self.headers.get('Host')!r}", [])
        wait = self.server.limiter.retry_after(self.client_address[0])
        if wait > 0:
            return (HTTPStatus.TOO_MANY_REQUESTS, self.server.limiter.message(wait),
                    [("Retry-After", str(math.ceil(wait)))])
        if self.server.api_key is not None and not self.authorized():
            return (HTTPStatus.UNAUTHORIZED, missing_key_message("open the URL `diffpo label` printed (it ends in "
                                                                 "?key=...), or send X-API-Key: KEY"),
                    [("WWW-Authenticate", "Bearer")])
        return None

    def authorized(self) -> bool:
        key = presented_key(self.headers.get("Authorization"), self.headers.get("X-API-Key"))
        if key is None and urlsplit(self.path).path in ("/", "/index.html"):
            key = (parse_qs(urlsplit(self.path).query).get("key") or [None])[0]
        if key is not None:
            return key_matches(key, self.server.api_key)
        try:
            cookie = SimpleCookie(self.headers.get("Cookie", "")).get(self.server.cookie_name)
        except CookieError:
            return False
        return cookie is not None and key_matches(cookie.value, self.server.session_token)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        path = url.path
        if path in ("/", "/index.html"):
            if self.server.api_key is not None and "key" in parse_qs(url.query):
                # the key was right (refusal() checked it): keep it in a cookie, drop it from the address bar
                cookie = f"{self.server.cookie_name}={self.server.session_token}; HttpOnly; SameSite=Strict; Path=/"
                self.send_body(HTTPStatus.SEE_OTHER, b"", "text/plain", [("Location", "/"), ("Set-Cookie", cookie)])
            else:
                self.send_body(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
        elif path == "/api/next":
            self.answer(self.server.session.next_pair)
        elif match := IMAGE_ROUTE.fullmatch(path):
            self.send_image(int(match[1]), int(match[2]))
        else:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

    def do_POST(self) -> None:
        if urlsplit(self.path).path != "/api/label":
            self.send_json(HTTPStatus.NOT_FOUND, {"error": "POST only to /api/label"})
            return
        self.answer(lambda: self.server.session.label(self.read_json()))

    def read_json(self) -> object:
        # Requiring a JSON content type makes a cross-site form or no-cors fetch unable to post labels.
        if self.headers.get_content_type() != "application/json":
            raise LabelRequestError("send the label as Content-Type: application/json")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise LabelRequestError("a Content-Length header is required", HTTPStatus.LENGTH_REQUIRED) from None
        if length < 0:
            raise LabelRequestError(f"Content-Length {length} is negative")
        if length > self.server.max_body_bytes:
            raise LabelRequestError(f"a label body of {length} bytes: the limit is {self.server.max_body_bytes} "
                                    "bytes (--max-body-bytes)", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        try:
            return json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LabelRequestError("the body is not JSON") from None

    def answer(self, respond) -> None:
        try:
            self.send_json(HTTPStatus.OK, respond())
        except LabelRequestError as error:
            self.send_json(error.status, {"error": str(error)})
        except ValueError as error:  # a malformed labels.jsonl: the page shows how to fix it
            self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(error)})

    def send_image(self, group: int, sample: int) -> None:
        try:
            path = self.server.session.image_file(group, sample)
            body = path.read_bytes() if path is not None else None
        except LabelRequestError as error:
            self.send_json(error.status, {"error": str(error)})
            return
        except OSError:  # gone or unreadable since the check
            body = None
        if body is None:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"round {self.server.session.manifest.index} has no image {group}/{sample}"})
            return
        self.send_body(HTTPStatus.OK, body, mimetypes.guess_type(path.name)[0] or "application/octet-stream")

    def send_json(self, status: HTTPStatus, data: dict, headers: list = ()) -> None:
        self.send_body(status, json.dumps(data).encode(), "application/json", headers)

    def send_body(self, status: HTTPStatus, body: bytes, content_type: str, headers: list = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        # Every round has the same image URLs: a cached image could show a pair of another round.
        self.send_header("Cache-Control", "no-store")
        for name, value in headers:
            self.send_header(name, value)
        if status not in (HTTPStatus.OK, HTTPStatus.SEE_OTHER):
            # a refused request's body may be unread: never parse it as the next request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        """Quiet: the terminal shows the URL, not one line per image."""


def page_html() -> bytes:
    return resources.files("diffpo.labeling").joinpath("page.html").read_bytes()


def make_server(run_dir: str | Path, round_index: int | None = None, host: str = DEFAULT_HOST,
                port: int = DEFAULT_PORT, api_key: str | None = None, rate_limit: float = RATE_LIMIT,
                rate_burst: int = RATE_BURST, max_body_bytes: int = MAX_BODY_BYTES) -> LabelServer:
    """A bound, not yet serving, labelling server (port 0: any free port, see ``.server_address``)."""
    manifest = choose_round(run_dir, round_index)
    session = LabellingSession(manifest, Path(run_dir))
    session.next_pair()  # a malformed labels.jsonl is a one-line error now, not a broken page later
    limiter = RateLimiter(rate_limit, rate_burst)
    try:
        return LabelServer((host, port), session, page_html(), api_key, limiter, max_body_bytes)
    except OSError as error:
        raise OSError(f"cannot listen on {host}:{port} ({error.strerror or error}): pass --port with a free port "
                      "or stop the other server") from None


def serve(run_dir: str | Path, round_index: int | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          api_key: str | None = None, rate_limit: float = RATE_LIMIT, rate_burst: int = RATE_BURST,
          max_body_bytes: int = MAX_BODY_BYTES, shutdown_timeout: float = SHUTDOWN_TIMEOUT) -> dict:
    """Serve the labelling page until SIGTERM or Ctrl-C, then stop gracefully: no new connections,
    the requests already received finish (up to ``shutdown_timeout`` s). Returns the final progress."""
    warning = exposure_warning(host, api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    server = make_server(run_dir, round_index, host, port, api_key, rate_limit, rate_burst, max_body_bytes)
    session = server.session
    stopping = threading.Event()

    def stop(signum, frame) -> None:
        # shutdown() waits for serve_forever() to return, so it runs on its own thread, not this one
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    # printed once the handlers are in place: whoever waits for this line may signal at once
    print(f"labelling round {session.manifest.index} of {run_dir}: {server.login_url} (Ctrl-C to stop; every click "
          "is saved)", flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        for sig, handler in handlers.items():  # a second Ctrl-C while waiting below interrupts as usual
            signal.signal(sig, handler)
        server.server_close()  # the port is closed: no new connections
        try:
            running = server.in_flight.close_and_wait(shutdown_timeout)
        except KeyboardInterrupt:  # a second Ctrl-C: stop now
            running = server.in_flight.count
    if running:
        print(f"{running} requests were still running after {shutdown_timeout:g} s and were dropped "
              "(their labels were not saved)", file=sys.stderr, flush=True)
    progress = session.next_pair()
    print(f"\n{progress['labelled']} of {progress['total']} pairs labelled in {session.manifest.folder / LABELS}", flush=True)
    if progress["done"]:
        print(f"continue training: {progress['resume_command']}", flush=True)
    return progress
