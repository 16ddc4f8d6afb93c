"""The prompt optimizer's Python API (PromptOptimizer, re-ranking) and its HTTP API over a real socket."""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

from diffpo.prompt.optimizer import Candidate, PromptOptimizer, Reranker
from diffpo.prompt.server import ServerLimits, add_serve_command, create_app

FAST = {"max_new_tokens": 8}


@pytest.fixture(scope="module")
def optimizer():
    return PromptOptimizer.from_pretrained("tiny")


@pytest.fixture(scope="module")
def tiny_pipe():
    from diffpo.models.loading import load_stack

    return load_stack("tiny").pipeline()


# --- Python API -----------------------------------------------------------------------------------------


def test_one_prompt_gives_n_candidates(optimizer):
    out = optimizer.optimize("a red circle on a blue background", n=3, seed=0, **FAST)
    assert len(out) == 3
    assert all(isinstance(c, Candidate) and isinstance(c.text, str) and c.score is None for c in out)


def test_a_list_gives_n_candidates_per_prompt(optimizer):
    out = optimizer.optimize(["a red circle", "a green square", "a cat"], n=2, seed=0, **FAST)
    assert [len(cands) for cands in out] == [2, 2, 2]
    assert all(isinstance(c, Candidate) for cands in out for c in cands)


def test_seed_makes_rewrites_reproducible(optimizer):
    first = optimizer.optimize(["a red circle", "a cat"], n=3, seed=7, **FAST)
    again = optimizer.optimize(["a red circle", "a cat"], n=3, seed=7, **FAST)
    assert [[c.text for c in cands] for cands in first] == [[c.text for c in cands] for cands in again]


def test_include_original_puts_the_prompt_first(optimizer):
    out = optimizer.optimize("  a red circle ", n=2, seed=0, include_original=True, **FAST)
    assert len(out) == 3 and out[0].text == "a red circle"


@pytest.mark.parametrize("prompt, options, message", [
    ("", {}, "prompt 0 is empty"),
    ("   ", {}, "prompt 0 is empty"),
    ([], {}, "list of prompts is empty"),
    (["a cat", ""], {}, "prompt 1 is empty"),
    (["a cat", 3], {}, "prompt 1 is a int"),
    (3, {}, "pass a prompt"),
    ("a cat", {"n": 0}, "n=0 must be"),
    ("a cat", {"temperature": -1.0}, "temperature=-1.0"),
    ("a cat", {"top_p": 1.5}, "top_p=1.5"),
    ("a cat", {"max_new_tokens": 0}, "max_new_tokens=0"),
])
def test_bad_input_raises_one_line_errors(optimizer, prompt, options, message):
    with pytest.raises(ValueError, match=message) as error:
        optimizer.optimize(prompt, **options)
    assert "\n" not in str(error.value)


def test_reranking_sorts_by_reward_on_shared_seeds(optimizer, tiny_pipe):
    from diffpo.eval.generate import generate
    from diffpo.rewards import load

    reward = load("jpeg-compressibility")
    reranker = Reranker(tiny_pipe, reward, seeds=(0, 1), num_inference_steps=4, guidance_scale=1.0)  # no CFG: faster
    prompt = "a red circle on a blue background"
    ranked = optimizer.optimize(prompt, n=3, seed=0, include_original=True, reranker=reranker, **FAST)
    assert len(ranked) == 4 and all(c.score is not None for c in ranked)
    scores = [c.score for c in ranked]
    assert scores == sorted(scores, reverse=True)
    # a score is the seed-mean reward of that text rendered on the shared seeds, judged against the prompt
    images = generate(tiny_pipe, [ranked[-1].text] * 2, [0, 1], num_inference_steps=4, guidance_scale=1.0)
    assert ranked[-1].score == pytest.approx(float(reward(images, [prompt] * 2).mean()), abs=1e-5)
    # rank() on plain strings, through the keyword form, gives the same order and scores
    again = optimizer.rank(prompt, [c.text for c in reversed(ranked)], pipeline=tiny_pipe, reward=reward,
                           seeds=(0, 1), num_inference_steps=4, guidance_scale=1.0)
    assert [(c.text, round(c.score, 5)) for c in again] == [(c.text, round(c.score, 5)) for c in ranked]


class _Embedder:
    """Texts containing "circle" point one way, the rest another: cosine 1 or 0 to the prompt."""

    def encode(self, texts):
        return torch.tensor([[1.0, 0.0] if "circle" in t else [0.0, 1.0] for t in texts])


def test_faithfulness_term_and_weights(optimizer, tiny_pipe):
    from diffpo.rewards import load

    texts = ["a square", "a circle", "a triangle"]
    ranked = optimizer.rank("a red circle", texts, pipeline=tiny_pipe, reward=load("jpeg-compressibility"),
                            seeds=(0,), num_inference_steps=2, guidance_scale=1.0, faithfulness=_Embedder(),
                            weights=(0.0, 1.0))
    assert ranked[0].text == "a circle" and ranked[0].score == pytest.approx(1.0)
    assert [c.score for c in ranked[1:]] == pytest.approx([0.0, 0.0])
    with pytest.raises(ValueError, match="needs pipeline= and reward="):
        optimizer.rank("a red circle", texts)


def test_jobs_batched_together_equal_one_by_one_calls(optimizer):
    from diffpo.prompt.optimizer import OptimizeJob

    jobs = [OptimizeJob(["a red circle", "a cat on a mat"], n=3, temperature=0.9, max_new_tokens=6, seed=3),
            OptimizeJob(["x"], n=2, temperature=0.0, max_new_tokens=9, seed=4),
            OptimizeJob(["a much longer prompt about a green square on a white background"], n=1, top_p=0.5,
                        max_new_tokens=5, seed=5)]
    batched = optimizer.optimize_jobs(jobs, max_rows=4)  # rows of different jobs share forward batches
    for job, got in zip(jobs, batched):
        alone = optimizer.optimize(job.prompts, n=job.n, temperature=job.temperature, top_p=job.top_p,
                                   max_new_tokens=job.max_new_tokens, seed=job.seed)
        assert [[c.text for c in cands] for cands in got] == [[c.text for c in cands] for cands in alone]
    assert batched[1][0][0].text == batched[1][0][1].text  # greedy: n copies of the one decode


def test_configured_reranker_is_used_unless_turned_off(tiny_pipe):
    from diffpo.rewards import load

    reward = load("brightness")
    reranker = Reranker(tiny_pipe, reward, seeds=(0,), num_inference_steps=2, guidance_scale=1.0, against="candidate")
    configured = PromptOptimizer.from_pretrained("tiny", reranker=reranker)
    ranked = configured.optimize("a red circle", n=3, seed=1, **FAST)
    assert all(c.score is not None for c in ranked) and [c.score for c in ranked] == sorted(
        [c.score for c in ranked], reverse=True)
    plain = configured.optimize("a red circle", n=3, seed=1, rerank=False, **FAST)
    assert all(c.score is None for c in plain) and sorted(c.text for c in plain) == sorted(c.text for c in ranked)
    with pytest.raises(ValueError, match="configured reranker"):
        PromptOptimizer.from_pretrained("tiny").optimize("a red circle", n=2, rerank=True, **FAST)


def test_reranking_against_the_candidate_orders_renderable_captions_first(tiny_pipe):
    """meaning-match scores each image with the text rendered: a caption the tiny model understands
    gets a finite score; free text that is no shapes caption gets NaN and sorts last."""
    from diffpo.rewards import load

    reranker = Reranker(tiny_pipe, load("meaning-match"), seeds=(0, 1), num_inference_steps=10, against="candidate")
    optimizer = PromptOptimizer.from_pretrained("tiny")
    texts = ["please paint me a lovely crimson ball", "a red circle on a blue background", "a white square on a black background"]
    ranked = optimizer.rank("please draw a crimson ball on navy", texts, reranker=reranker)
    assert ranked[-1].text == texts[0] and ranked[-1].score != ranked[-1].score  # NaN last
    assert ranked[0].score >= ranked[1].score
    scores = {c.text: c.score for c in ranked}
    from diffpo.eval.generate import generate

    images = generate(tiny_pipe, [texts[1]] * 2, [0, 1], num_inference_steps=10, guidance_scale=5.0)
    assert scores[texts[1]] == pytest.approx(float(load("meaning-match")(images, [texts[1]] * 2).mean()), abs=1e-6)


def test_http_rerank_returns_scores(tiny_pipe):
    from fastapi.testclient import TestClient

    from diffpo.rewards import load

    reranker = Reranker(tiny_pipe, load("jpeg-compressibility"), seeds=(0,), num_inference_steps=2, guidance_scale=1.0)
    app = create_app(PromptOptimizer.from_pretrained("tiny", reranker=reranker), LIMITS)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        answer = client.post("/v1/optimize", json={"prompt": "a red circle", "n": 3, "seed": 0, "max_new_tokens": 4})
    assert answer.status_code == 200
    scores = [c["score"] for c in answer.json()["results"][0]["candidates"]]
    assert all(isinstance(x, float) for x in scores) and scores == sorted(scores, reverse=True)


# --- HTTP API over a real socket ------------------------------------------------------------------------


class _Spy:
    """Wraps an optimizer and records how many batches ever ran at once, and how many requests each held."""

    def __init__(self, inner):
        self.inner, self.name, self.reranker = inner, inner.name, None
        self.active = self.most_active = self.calls = self.jobs = 0
        self.guard = threading.Lock()

    def optimize_jobs(self, jobs, max_rows=64):
        with self.guard:
            self.active += 1
            self.calls += 1
            self.jobs += len(jobs)
            self.most_active = max(self.most_active, self.active)
        try:
            time.sleep(0.005)  # widen the window in which two batches at once would show up
            return self.inner.optimize_jobs(jobs, max_rows=max_rows)
        finally:
            with self.guard:
                self.active -= 1


# rate_limit=0: this module sends dozens of requests at once; tests/test_server_security.py tests the limit
LIMITS = ServerLimits(max_prompt_chars=100, max_n=5, max_prompts=4, max_new_tokens=16, rate_limit=0)


@pytest.fixture(scope="module")
def server(optimizer):
    import uvicorn

    spy = _Spy(optimizer)
    config = uvicorn.Config(create_app(spy, LIMITS), host="127.0.0.1", port=0, log_level="warning", access_log=False)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", spy=spy)
    srv.should_exit = True
    thread.join(timeout=10)
    assert not thread.is_alive(), "uvicorn did not shut down"


def _request(url: str, body: dict | None = None, raw: bytes | None = None) -> tuple[int, dict | str]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                     method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def test_http_valid_request(server, caplog):
    caplog.set_level(logging.INFO, logger="diffpo.prompt.server")
    body = {"prompt": "a red circle", "n": 3, "max_new_tokens": 6, "seed": 1}
    status, answer = _request(server.url + "/v1/optimize", body)
    assert status == 200, answer
    assert answer["seed"] == 1 and answer["model"] == "tiny"
    (result,) = answer["results"]
    assert result["prompt"] == "a red circle" and len(result["candidates"]) == 3
    assert all(isinstance(c["text"], str) and c["score"] is None for c in result["candidates"])
    assert _request(server.url + "/v1/optimize", body)[1] == answer  # same seed, same rewrites
    assert any("POST /v1/optimize 200 prompts=1 n=3" in r.getMessage() for r in caplog.records)


def test_http_several_prompts(server):
    status, answer = _request(server.url + "/v1/optimize", {"prompts": ["a cat", "a dog"], "n": 2, "max_new_tokens": 4})
    assert status == 200 and [len(r["candidates"]) for r in answer["results"]] == [2, 2]
    assert [r["prompt"] for r in answer["results"]] == ["a cat", "a dog"] and isinstance(answer["seed"], int)


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": ""}, 422, "prompt 0 is empty"),
    ({"prompts": ["a cat", "  "]}, 422, "prompt 1 is empty"),
    ({"prompt": "x" * 101}, 422, "prompt 0 has 101 characters: the limit is max_prompt_chars=100"),
    ({"prompts": ["a cat"] * 5}, 422, "5 prompts in one request: the limit is max_prompts=4"),
    ({"prompts": []}, 422, "empty"),
    ({"prompt": "a cat", "n": 6}, 422, "max_n=5"),
    ({"prompt": "a cat", "n": 0}, 422, "max_n=5"),
    ({"prompt": "a cat", "max_new_tokens": 17}, 422, "max_new_tokens=16"),
    ({"prompt": "a cat", "temperature": -1}, 422, "temperature=-1.0 must be >= 0"),
    ({"prompt": "a cat", "top_p": 0}, 422, "top_p=0.0 must be in (0, 1]"),
    ({"prompt": "a cat", "prompts": ["a dog"]}, 422, "exactly one of"),
    ({}, 422, "exactly one of"),
    ({"prompt": "a cat", "n": "many"}, 422, "n:"),
    ({"prompt": "a cat", "steps": 3}, 422, "steps"),
])
def test_http_bad_requests_get_json_errors(server, body, status, message):
    got, answer = _request(server.url + "/v1/optimize", body)
    assert got == status and isinstance(answer, dict) and message in answer["error"], answer


def test_http_malformed_json(server):
    status, answer = _request(server.url + "/v1/optimize", raw=b"{not json")
    assert status == 422 and "not valid JSON" in answer["error"]


def test_http_healthz_and_docs(server):
    status, health = _request(server.url + "/healthz")
    assert status == 200 and health["status"] == "ok" and health["model"] == "tiny" and health["optimizing"] == 0
    assert health["rerank"] is False and health["batches"]["requests"] >= health["batches"]["batches"]
    status, page = _request(server.url + "/docs")
    assert status == 200 and "swagger" in page.lower()
    status, schema = _request(server.url + "/openapi.json")
    assert status == 200 and "/v1/optimize" in schema["paths"]


def test_http_concurrent_requests_are_batched_and_keep_their_rewrites(server, optimizer):
    before_calls, before_jobs = server.spy.calls, server.spy.jobs
    bodies = [{"prompt": f"prompt number {i}", "n": 1 + i % 3, "max_new_tokens": 4 + i % 5, "seed": i,
               "temperature": 0.0 if i % 7 == 0 else 0.9} for i in range(20)]

    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda body: _request(server.url + "/v1/optimize", body), bodies))
    assert [status for status, _ in answers] == [200] * 20
    assert server.spy.jobs - before_jobs == 20
    assert server.spy.calls - before_calls < 20  # some requests shared an LM batch
    assert server.spy.most_active == 1  # one model thread: never two batches at once
    # each answer is what the same request gets alone, one by one, with its seed
    for body, (_, answer) in zip(bodies, answers):
        alone = optimizer.optimize(body["prompt"], n=body["n"], seed=body["seed"], temperature=body["temperature"],
                                   max_new_tokens=body["max_new_tokens"])
        assert [c["text"] for c in answer["results"][0]["candidates"]] == [c.text for c in alone]


# --- the serve command ----------------------------------------------------------------------------------


def _parser():
    parser = argparse.ArgumentParser(prog="diffpo")
    add_serve_command(parser.add_subparsers(dest="command", required=True))
    return parser


def test_serve_command_help(capsys):
    with pytest.raises(SystemExit) as done:
        _parser().parse_args(["serve", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for word in ("MODEL", "/v1/optimize", "--host", "127.0.0.1", "--port", "--max-n", "--max-prompt-chars",
                 "--max-prompts", "--device"):
        assert word in text


def test_serve_command_loads_once_and_runs_uvicorn(monkeypatch):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: calls.append((self.config, sockets)))
    args = _parser().parse_args(["serve", "tiny", "--port", "0", "--max-n", "3"])
    assert (args.host, args.port, args.device, args.max_n, args.max_prompt_chars, args.max_prompts) == \
        ("127.0.0.1", 0, "cpu", 3, 500, 32)
    args.func(args)
    (config, sockets), = calls
    (sock,) = sockets  # bound by serve() before the model loaded, closed once uvicorn returns
    assert config.host == "127.0.0.1" and config.port > 0 and sock.fileno() == -1
    assert config.timeout_graceful_shutdown == 30 and "max_n=3" in config.app.description
