"""``diffpo label RUN_DIR``: a local web page that shows the pending pairs of one sampling round and
appends every judgement to the round's ``labels.jsonl`` (see :mod:`diffpo.data.rounds`).

Standard library only. The page asks ``GET /api/next`` for the next pending pair, posts
``{round, group, a, b, choice}`` to ``POST /api/label`` and shows ``GET /image/<group>/<sample>``.
Nothing is written but ``labels.jsonl``; labelled pairs are read back from it, so a restarted
server continues where the last one stopped.
"""

from __future__ import annotations

import json
import mimetypes
import re
import threading
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from diffpo.data.rounds import (CHOICES, LABELS, RoundManifest, append_label, list_rounds, pending_pairs, read_labels,
                                read_manifest, round_dir)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
MAX_BODY_BYTES = 4096  # a label is ~60 bytes; anything much larger is not from the page
IMAGE_ROUTE = re.compile(r"/image/(\d{1,6})/(\d{1,6})")


class LabelRequestError(ValueError):
    """A request the page should not have sent: answered 400 with the message."""


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
        """Only files the manifest lists are served; the request path is never joined to a folder."""
        images = self.manifest.images
        if group >= len(images) or sample >= len(images[group]):
            return None
        path = self.manifest.image_path(group, sample)
        return path if path.is_file() else None


class LabelServer(ThreadingHTTPServer):
    daemon_threads = True  # an open keep-alive connection must not keep Ctrl-C from exiting

    def __init__(self, address: tuple[str, int], session: LabellingSession, page: bytes):
        self.session = session
        self.page = page
        super().__init__(address, LabelRequestHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class LabelRequestHandler(BaseHTTPRequestHandler):
    server: LabelServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
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
            raise LabelRequestError("a Content-Length header is required") from None
        if not 0 <= length <= MAX_BODY_BYTES:
            raise LabelRequestError(f"a label body is at most {MAX_BODY_BYTES} bytes")
        try:
            return json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LabelRequestError("the body is not JSON") from None

    def answer(self, respond) -> None:
        try:
            self.send_json(HTTPStatus.OK, respond())
        except LabelRequestError as error:
            self.send_json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
        except ValueError as error:  # a malformed labels.jsonl: the page shows how to fix it
            self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(error)})

    def send_image(self, group: int, sample: int) -> None:
        path = self.server.session.image_file(group, sample)
        if path is None:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"round {self.server.session.manifest.index} has no image {group}/{sample}"})
            return
        self.send_body(HTTPStatus.OK, path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream")

    def send_json(self, status: HTTPStatus, data: dict) -> None:
        self.send_body(status, json.dumps(data).encode(), "application/json")

    def send_body(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        # Every round has the same image URLs: a cached image could show a pair of another round.
        self.send_header("Cache-Control", "no-store")
        if status != HTTPStatus.OK:  # a rejected POST body may be unread: never parse it as the next request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        """Quiet: the terminal shows the URL, not one line per image."""


def page_html() -> bytes:
    return resources.files("diffpo.labeling").joinpath("page.html").read_bytes()


def make_server(run_dir: str | Path, round_index: int | None = None, host: str = DEFAULT_HOST,
                port: int = DEFAULT_PORT) -> LabelServer:
    """A bound, not yet serving, labelling server (port 0: any free port, see ``.server_address``)."""
    manifest = choose_round(run_dir, round_index)
    session = LabellingSession(manifest, Path(run_dir))
    session.next_pair()  # a malformed labels.jsonl is a one-line error now, not a broken page later
    try:
        return LabelServer((host, port), session, page_html())
    except OSError as error:
        raise OSError(f"cannot listen on {host}:{port} ({error.strerror or error}): pass --port with a free port "
                      "or stop the other server") from None


def serve(run_dir: str | Path, round_index: int | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> dict:
    """Serve the labelling page until Ctrl-C; returns the final progress."""
    server = make_server(run_dir, round_index, host, port)
    session = server.session
    print(f"labelling round {session.manifest.index} of {run_dir}: {server.url} (Ctrl-C to stop; every click is saved)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    progress = session.next_pair()
    print(f"\n{progress['labelled']} of {progress['total']} pairs labelled in {session.manifest.folder / LABELS}", flush=True)
    if progress["done"]:
        print(f"continue training: {progress['resume_command']}", flush=True)
    return progress
