"""A reward head that scores through an HTTP endpoint: a VLM judge behind an OpenAI-compatible
chat-completions server (vLLM, SGLang, ...) or a plain JSON scoring server.

Standard library only (urllib + a thread pool). Every request is retried on its own (timeouts,
refused connections, HTTP 429/5xx) with exponential backoff, so one failing request never costs
the scores of the others; a call either returns one score per image, in order, or raises one line
naming the endpoint and what to do.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import re
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from diffpo.rewards.base import RewardHead

DEFAULT_SCORE_PROMPT = (
    "You are judging an AI-generated image for the prompt: \"{prompt}\".\n"
    "Rate how well the image matches the prompt and how good it looks, from 0 (worst) to 10 (best). "
    "Answer with the number only."
)
DEFAULT_YES_NO_PROMPT = (
    "Does this image show \"{prompt}\" with good visual quality? Answer yes or no."
)
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
NUMBER = r"[-+]?\d+(?:\.\d+)?"


class RemoteRewardError(RuntimeError):
    """A request to the scoring endpoint failed for good (after its retries) or its reply was unusable."""


class _Retryable(Exception):
    """A failure worth another try (timeout, refused connection, 429/5xx)."""


def encode_png(image: torch.Tensor) -> str:
    """One (3, H, W) image in [0, 1] as a base64 PNG (8-bit, as saved files are)."""
    from PIL import Image

    array = (image.detach().clamp(0, 1).permute(1, 2, 0).float().cpu().numpy() * 255).round().astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class RemoteReward(RewardHead):
    """Scores from an HTTP endpoint; not differentiable.

    ``url``: for ``protocol="chat"`` the server's OpenAI base URL (e.g. ``http://127.0.0.1:8000/v1``;
    ``/chat/completions`` is appended unless already there), for ``protocol="json"`` the scoring URL
    itself. ``model``: the served model name (chat).

    Chat protocol, one request per image (the image as a PNG data URL, then the text of ``prompt``
    with ``{prompt}`` replaced by the caption), greedy decoding:

    - ``mode="score"`` (pointwise): the first number in the reply (``score_pattern``, a regex whose
      first group, or whole match, is the number) is the score.
    - ``mode="yes-no"``: one generated token with ``top_logprobs``; the score is
      P(yes) / (P(yes) + P(no)), summing the probability of every top token that reads ``yes`` /
      ``no`` once stripped and lower-cased (VQAScore's yes-probability, Lin et al. 2024, arXiv 2404.01291).

    JSON protocol, one request per batch: ``POST url`` with ``{"prompts": [...], "images": [base64
    PNG, ...]}``, answered by ``{"scores": [...]}`` of the same length.

    ``batch_size`` images per JSON request (chat sends one request per image and leaves batching to
    the server), at most ``concurrency`` requests in flight, ``timeout`` seconds per request,
    ``retries`` extra tries per request with ``backoff`` · 2^k seconds between them.
    The API key is read from the environment variable named by ``api_key_env`` (sent as a Bearer
    token) and never from a config file.
    """

    name = "remote"

    def __init__(self, url: str | None = None, protocol: str = "chat", model: str | None = None,
                 mode: str = "score", prompt: str | None = None, score_pattern: str = NUMBER,
                 api_key_env: str | None = None, concurrency: int = 4, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 0.5, max_tokens: int = 16, top_logprobs: int = 20,
                 batch_size: int | None = 8, frame_stride: int = 1, api_key: str | None = None):
        super().__init__(batch_size=batch_size, frame_stride=frame_stride)
        if api_key is not None:  # accepted only to refuse it with the reason
            raise ValueError("remote: api_key is never read from a config; put the key in an environment "
                             "variable and pass api_key_env=ITS_NAME")
        if not url:
            raise ValueError("remote needs url= (e.g. --reward-option remote.url=http://127.0.0.1:8000/v1)")
        if protocol not in ("chat", "json"):
            raise ValueError(f"remote: protocol={protocol!r} is unknown; use 'chat' (OpenAI-compatible) or 'json'")
        if mode not in ("score", "yes-no"):
            raise ValueError(f"remote: mode={mode!r} is unknown; use 'score' (a number in the reply) or 'yes-no' (log-probabilities)")
        if protocol == "chat" and not model:
            raise ValueError("remote: protocol='chat' needs model= (the name the server serves, e.g. from GET /v1/models)")
        if concurrency < 1 or retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError("remote: concurrency >= 1, retries >= 0, timeout > 0 and backoff >= 0 are required")
        if prompt is not None and "{prompt}" not in prompt:
            raise ValueError("remote: prompt= must contain {prompt} (where the caption goes)")
        self.protocol, self.mode, self.model = protocol, mode, model
        self.url = url.rstrip("/")
        if protocol == "chat" and not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions"
        self.prompt = prompt or (DEFAULT_YES_NO_PROMPT if mode == "yes-no" else DEFAULT_SCORE_PROMPT)
        self.score_pattern = re.compile(score_pattern)
        self.concurrency, self.timeout, self.retries, self.backoff = concurrency, timeout, retries, backoff
        self.max_tokens, self.top_logprobs = max_tokens, top_logprobs
        self.headers = {"Content-Type": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env, "").strip()
            if not key:
                raise ValueError(f"remote: api_key_env={api_key_env!r} but ${api_key_env} is empty: export the key first")
            self.headers["Authorization"] = f"Bearer {key}"

    # ---- transport -------------------------------------------------------------------------
    def _post_once(self, body: bytes) -> dict:
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read()[:200].decode("utf-8", "replace").replace("\n", " ")
            message = f"reward endpoint {self.url} answered HTTP {error.code}: {detail}"
            if error.code in RETRY_STATUS:
                raise _Retryable(message) from None
            raise RemoteRewardError(message + " (check url=, model= and api_key_env=)") from None
        except (TimeoutError, socket.timeout):
            raise _Retryable(f"reward endpoint {self.url} did not answer within timeout={self.timeout:g} s") from None
        except urllib.error.URLError as error:
            reason = error.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"reward endpoint {self.url} did not answer within timeout={self.timeout:g} s") from None
            raise _Retryable(f"reward endpoint {self.url} is unreachable ({reason})") from None
        except (ConnectionError, http.client.HTTPException) as error:
            raise _Retryable(f"reward endpoint {self.url} dropped the connection ({error.__class__.__name__})") from None
        try:
            return json.loads(raw)
        except ValueError:
            snippet = raw[:120].decode("utf-8", "replace").replace("\n", " ")
            raise RemoteRewardError(f"reward endpoint {self.url} answered malformed JSON: {snippet!r}") from None

    def _post(self, payload: dict) -> dict:
        body = json.dumps(payload).encode("utf-8")
        for attempt in range(self.retries + 1):
            try:
                return self._post_once(body)
            except _Retryable as error:
                if attempt == self.retries:
                    tries = f"{self.retries + 1} tries" if self.retries else "1 try"
                    raise RemoteRewardError(f"{error} ({tries}): start the server, fix url= or raise timeout=/retries=") from None
                time.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("unreachable")

    # ---- protocols ---------------------------------------------------------------------------
    def _chat_payload(self, image: torch.Tensor, caption: str) -> dict:
        content = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encode_png(image)}"}},
                   {"type": "text", "text": self.prompt.replace("{prompt}", caption)}]
        payload = {"model": self.model, "messages": [{"role": "user", "content": content}], "temperature": 0.0}
        if self.mode == "yes-no":
            payload.update(max_tokens=1, logprobs=True, top_logprobs=self.top_logprobs)
        else:
            payload["max_tokens"] = self.max_tokens
        return payload

    def _chat_score(self, reply: dict) -> float:
        try:
            choice = reply["choices"][0]
            if self.mode == "yes-no":
                return self._yes_probability(choice["logprobs"]["content"][0]["top_logprobs"])
            text = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            what = "choices[0].logprobs.content[0].top_logprobs (does the server support logprobs?)" if self.mode == "yes-no" \
                else "choices[0].message.content"
            raise RemoteRewardError(f"reward endpoint {self.url} replied without {what}: {json.dumps(reply)[:120]}") from None
        match = self.score_pattern.search(text or "")
        if match is None:
            raise RemoteRewardError(f"reward endpoint {self.url} replied {text!r}, which has no score matching "
                                    f"{self.score_pattern.pattern!r}: make prompt= ask for a number or set score_pattern=")
        return float(match.group(1) if match.groups() else match.group(0))

    def _yes_probability(self, top: list) -> float:
        mass = {"yes": 0.0, "no": 0.0}
        for entry in top:
            token = str(entry["token"]).strip().lower()
            if token in mass:
                mass[token] += math.exp(float(entry["logprob"]))
        if mass["yes"] + mass["no"] == 0.0:
            raise RemoteRewardError(f"reward endpoint {self.url}: neither 'yes' nor 'no' among the top "
                                    f"{len(top)} tokens: make prompt= ask a yes/no question or raise top_logprobs=")
        return mass["yes"] / (mass["yes"] + mass["no"])

    def _json_scores(self, images: torch.Tensor, prompts: list[str]) -> list[float]:
        reply = self._post({"prompts": prompts, "images": [encode_png(image) for image in images]})
        scores = reply.get("scores") if isinstance(reply, dict) else None
        if not isinstance(scores, list) or len(scores) != len(prompts):
            got = f"{len(scores)} scores" if isinstance(scores, list) else f"no 'scores' list ({json.dumps(reply)[:80]})"
            raise RemoteRewardError(f"reward endpoint {self.url} answered {got} for {len(prompts)} images: "
                                    "it must reply {\"scores\": [one number per image]}")
        try:
            return [float(s) for s in scores]
        except (TypeError, ValueError):
            raise RemoteRewardError(f"reward endpoint {self.url} answered non-numeric scores: {scores[:4]}") from None

    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self._batched(images, prompts, None)

    def _batched(self, images, prompts, score_fn) -> torch.Tensor:
        """All requests of a call through one pool of ``concurrency`` workers, results in order:
        one per image (chat) or one per ``batch_size`` images (json)."""
        if self.protocol == "json":
            size = self.batch_size or max(len(prompts), 1)
            tasks = [(lambda i=i: self._json_scores(images[i : i + size], prompts[i : i + size]))
                     for i in range(0, len(prompts), size)]
        else:
            tasks = [(lambda i=i: [self._chat_score(self._post(self._chat_payload(images[i], prompts[i])))])
                     for i in range(len(prompts))]
        if not tasks:
            return torch.zeros(0)
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(tasks))) as pool:
            results = list(pool.map(lambda task: task(), tasks))
        return torch.tensor([score for chunk in results for score in chunk], dtype=torch.float32)
