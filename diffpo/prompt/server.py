"""The HTTP inference API: ``diffpo ... serve MODEL`` -> POST /v1/optimize, GET /healthz, /docs.

    curl -s localhost:8000/v1/optimize -H 'content-type: application/json' \\
         -d '{"prompt": "a cat on a sofa", "n": 4, "seed": 0}'
    -> {"model": ..., "seed": 0, "results": [{"prompt": ..., "candidates": [{"text": ..., "score": null}]}]}

The model loads once; requests are served from FastAPI's thread pool but pass one lock around the
model, so concurrent requests queue instead of running the LM in parallel (one LM on a CPU or GPU
gains nothing from parallel calls and could run out of memory). Bad requests get a 4xx
``{"error": "..."}`` that names the limit and the allowed value.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations at runtime,
# and the request models are local to create_app (fastapi/pydantic load only when serving).

import argparse
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from fastapi import FastAPI

    from diffpo.prompt.optimizer import PromptOptimizer

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
logger = logging.getLogger("diffpo.prompt.server")


@dataclass(frozen=True)
class ServerLimits:
    """Per-request limits; a request beyond one is refused with 400/413 naming it."""

    max_prompt_chars: int = 500
    max_n: int = 16
    max_prompts: int = 32
    max_new_tokens: int = 256
    max_body_bytes: int = 1 << 20  # far above max_prompts * max_prompt_chars of JSON

    def __post_init__(self):
        for name in ("max_prompt_chars", "max_n", "max_prompts", "max_new_tokens", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerLimits.{name}={getattr(self, name)} must be >= 1")


class RequestError(ValueError):
    """A request the server refuses: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, message: str, status: int = 400):
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
                           "split the request", status=413)
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise RequestError(f"prompt {i} is empty: pass a non-empty text-to-image prompt")
        if len(prompt) > limits.max_prompt_chars:
            raise RequestError(f"prompt {i} has {len(prompt)} characters: the limit is "
                               f"max_prompt_chars={limits.max_prompt_chars}", status=413)
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


def create_app(optimizer: "PromptOptimizer", limits: Optional[ServerLimits] = None) -> "FastAPI":
    """A FastAPI app serving ``optimizer`` (already loaded) under ``limits``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field

    limits = limits or ServerLimits()
    model_lock = threading.Lock()  # one generate() at a time; per app, not global

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

    errors = {code: {"model": ErrorOut} for code in (400, 413, 422)}
    app = FastAPI(title="diffpo prompt optimizer",
                  description="Rewrites text-to-image prompts with a Sem-DPO-trained LM. "
                              f"Limits: max_prompt_chars={limits.max_prompt_chars}, max_n={limits.max_n}, "
                              f"max_prompts={limits.max_prompts}, max_new_tokens={limits.max_new_tokens}.")

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

    @app.middleware("http")
    async def log_request(request, call_next):
        start = time.perf_counter()
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limits.max_body_bytes:
            response = JSONResponse({"error": f"request body of {size} bytes: the limit is "
                                              f"max_body_bytes={limits.max_body_bytes}"}, status_code=413)
        else:
            response = await call_next(request)
        detail = request.scope.get("state", {}).get("log", "")
        logger.info("%s %s %d %s%.3fs", request.method, request.url.path, response.status_code, detail,
                    time.perf_counter() - start)
        return response

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "model": optimizer.name}

    # a plain `def`: FastAPI runs it in its thread pool, so waiting for the lock blocks no event loop
    @app.post("/v1/optimize", response_model=OptimizeResponse, responses=errors)
    def optimize(body: OptimizeRequest, request: Request):
        prompts = check_request(body, limits)
        seed = body.seed if body.seed is not None else random.SystemRandom().randrange(2**31)
        request.state.log = f"prompts={len(prompts)} n={body.n} "
        try:
            with model_lock:
                results = optimizer.optimize(prompts, n=body.n, temperature=body.temperature, top_p=body.top_p,
                                             max_new_tokens=body.max_new_tokens, seed=seed)
        except ValueError as error:  # sampling options the optimizer rejects (temperature, top_p)
            raise RequestError(str(error)) from None
        return {"model": optimizer.name, "seed": seed,
                "results": [{"prompt": p, "candidates": [{"text": c.text, "score": c.score} for c in cands]}
                            for p, cands in zip(prompts, results)]}

    return app


def serve(model, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, device: str = "cpu",
          limits: Optional[ServerLimits] = None, log_level: str = "info") -> None:
    """Load ``model`` (a name/path for PromptOptimizer.from_pretrained, or a PromptOptimizer) once and
    serve it with uvicorn until Ctrl-C."""
    import uvicorn

    from diffpo.prompt.optimizer import PromptOptimizer

    if not logging.getLogger().handlers:  # the CLI has no logging set up: show the request lines
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logger.setLevel(logging.INFO)
    optimizer = model if isinstance(model, PromptOptimizer) else PromptOptimizer.from_pretrained(model, device=device)
    app = create_app(optimizer, limits)
    print(f"serving {optimizer.name} on http://{host}:{port} (POST /v1/optimize, docs at /docs; Ctrl-C to stop)",
          flush=True)
    # access_log off: the middleware already logs one line per request, with n and seconds
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


def _serve_command(args) -> None:
    limits = ServerLimits(max_prompt_chars=args.max_prompt_chars, max_n=args.max_n, max_prompts=args.max_prompts,
                          max_new_tokens=args.max_new_tokens)
    serve(args.model, host=args.host, port=args.port, device=args.device, limits=limits)


def add_serve_command(subparsers) -> argparse.ArgumentParser:
    """Register ``serve MODEL [--host --port --device --max-n --max-prompt-chars --max-prompts --max-new-tokens]``."""
    defaults = ServerLimits()
    parser = subparsers.add_parser(
        "serve", help="serve a prompt rewriter over HTTP (POST /v1/optimize)",
        description="Load a prompt rewriter once and serve it over HTTP. POST /v1/optimize with "
                    '{"prompt": "a cat"} or {"prompts": [...]}, plus optional "n", "temperature", "top_p", '
                    '"max_new_tokens", "seed"; the answer is {"results": [{"prompt", "candidates": [{"text", '
                    '"score"}]}]}. GET /healthz for a health check, /docs for the interactive API docs. '
                    "Requests beyond a limit get a 4xx JSON error naming it; concurrent requests are queued "
                    "(the model runs one request at a time).",
        epilog="example: serve runs/semdpo/final --port 8000   then   curl -s localhost:8000/v1/optimize "
               "-H 'content-type: application/json' -d '{\"prompt\": \"a cat on a sofa\", \"n\": 4}'")
    parser.add_argument("model", metavar="MODEL",
                        help="a prompt-train output folder (final/), 'smollm2' (the packaged SmolLM2-135M-Instruct), "
                             "'tiny' (a random LM for tests), a hub id or a local transformers/GGUF folder")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    parser.add_argument("--device", default="cpu", help="device of the LM, e.g. cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument("--max-n", type=int, default=defaults.max_n,
                        help=f"most rewrites per prompt a request may ask for (default {defaults.max_n})")
    parser.add_argument("--max-prompt-chars", type=int, default=defaults.max_prompt_chars,
                        help=f"longest prompt accepted, in characters (default {defaults.max_prompt_chars})")
    parser.add_argument("--max-prompts", type=int, default=defaults.max_prompts,
                        help=f"most prompts per request (default {defaults.max_prompts})")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                        help=f"largest max_new_tokens a request may ask for (default {defaults.max_new_tokens})")
    parser.set_defaults(func=_serve_command)
    return parser


__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "RequestError", "ServerLimits", "add_serve_command", "check_request",
           "create_app", "serve"]
