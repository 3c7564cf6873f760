"""Judge through any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp, `persona-probe serve`).

Scores are the literature's logprob-weighted mean over number tokens (one token, top-20 logprobs); where
a server gives no logprobs, or the judge does not answer with a number, one short text reply is parsed
instead. Every result is appended to a JSONL cache as it arrives, so a rerun never pays twice.
HTTP goes through the `openai` client: it retries connection errors, timeouts, 408/409/429 and 5xx with
exponential backoff and honours the server's Retry-After; a 200 whose body is not a chat completion (which the
client does not retry) is retried here.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
from tqdm.auto import tqdm

from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.jsonl import iter_jsonl
from persona_probe.core.paths import checkpoints_dir
from persona_probe.evaluation.judges.base import DEFAULT_JUDGE_PROMPTS, Judge, JudgeScore, metric_value, prompt_keys
from persona_probe.evaluation.judges.logprob import parse_score, weighted_score

OPENAI_URL = "https://api.openai.com/v1"
CACHE_FILE = "openai_judge.jsonl"
KEYS: tuple[str, ...] = ("aligned", "coherent")
RETRIED_STATUS = (408, 409, 429)  # besides 5xx: the statuses the openai client retries


class _MalformedReply(Exception):
    """A 200 whose body is not a chat completion: worth another try."""


def _one_line(text: str, limit: int = 200) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def cache_key(base_url: str, model: str, prompt: str) -> str:
    """sha256 of (base_url, model, prompt text): the judge cache's key."""
    return hashlib.sha256(json.dumps([base_url, model, prompt]).encode("utf-8")).hexdigest()


def _top_logprobs(choice: dict[str, Any]) -> list[tuple[str, float]] | None:
    """choices[0].logprobs.content[0].top_logprobs as (token, logprob) pairs, or None if absent."""
    try:
        entries = choice["logprobs"]["content"][0]["top_logprobs"]
        pairs = [(str(e["token"]), float(e["logprob"])) for e in entries]
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return pairs or None


def _content(body: str) -> tuple[dict[str, Any], str]:
    """(choices[0], its message content) of a response body; _MalformedReply when it is not a chat completion."""
    try:
        resp = json.loads(body)
    except ValueError:
        raise _MalformedReply(f"malformed JSON: {_one_line(body, 80)}") from None
    try:
        choice = resp["choices"][0]
        content = choice["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError):
        raise _MalformedReply(f"malformed response (no choices[0].message): {_one_line(body)}") from None
    return choice, str(content)


def _status_detail(e: openai.APIStatusError) -> str:
    """The server's error body (or the client's message) of an HTTP error, on one line."""
    return _one_line(e.response.text or e.message)


class JudgeCache:
    """Append-only JSONL map key -> raw result; loaded once, each new result written as it arrives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._data: dict[str, dict[str, Any]] = self._load(path)

    @staticmethod
    def _load(path: Path) -> dict[str, dict[str, Any]]:
        data: dict[str, dict[str, Any]] = {}
        if not path.exists():
            return data
        for _, row in iter_jsonl(path, errors=[], what="judge cache"):  # a torn last line after a crash is skipped
            if isinstance(row, dict) and "key" in row and "result" in row:
                data[row["key"]] = row["result"]
        return data

    def get(self, key: str) -> dict[str, Any] | None:
        return self._data.get(key)

    def put(self, key: str, result: dict[str, Any], meta: dict[str, Any]) -> None:
        line = json.dumps({"key": key, **meta, "result": result}, default=str)
        result = json.loads(line)["result"]  # what a reload would give (tuples become lists)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
            self._data[key] = result

    def __len__(self) -> int:
        return len(self._data)


class OpenAIJudge(Judge):
    """Scores with an OpenAI-compatible chat model (logprob-weighted 0-100), cached on disk.

    `max_retries` and `timeout` go to the openai client (per request); `backoff` is the base wait between
    attempts at a reply that came back malformed (the client does not retry those)."""

    name = "openai"

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None,
                 cache_dir: str | Path | None = None, max_retries: int = 4, backoff: float = 1.0,
                 timeout: float = 60, concurrency: int = 4, progress: bool = True) -> None:
        self.model = model
        self.progress = progress  # a bar over the HTTP requests of each batch (they take seconds each)
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        if not self.api_key and self.base_url == OPENAI_URL:
            raise PersonaProbeError("the openai judge needs an API key for api.openai.com: set OPENAI_API_KEY "
                                    "(or point OPENAI_BASE_URL at a local server)")
        self.max_retries = max(0, int(max_retries))
        self.backoff = float(backoff)
        self.timeout = float(timeout)
        self.concurrency = max(1, int(concurrency))
        # without a key (a local server) the client gets a placeholder and each request omits Authorization
        self.client = openai.OpenAI(base_url=self.base_url, api_key=self.api_key or "no-key",
                                    max_retries=self.max_retries, timeout=self.timeout)
        self._headers = None if self.api_key else {"Authorization": openai.Omit()}
        cache_root = Path(cache_dir) if cache_dir is not None else checkpoints_dir() / "judge_cache"
        self.cache = JudgeCache(cache_root / CACHE_FILE)
        self._logprobs_ok = True

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def describe(self) -> dict[str, Any]:
        return {"judge": "openai", "model": self.model, "base_url": self.base_url, "method": "logprob-weighted 0-100"}

    # ------------------------------------------------------------------ HTTP

    def _post(self, prompt: str, **params: Any) -> tuple[dict[str, Any], str]:
        """One chat completion of `prompt` -> (choices[0], content). Raises PersonaProbeError when the attempts
        run out and lets openai.APIStatusError for a status the client does not retry (4xx) through."""
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                raw = self.client.chat.completions.with_raw_response.create(
                    model=self.model, messages=self._messages(prompt), extra_headers=self._headers, **params)
                return _content(raw.text)
            except _MalformedReply as e:
                last = str(e)
            except openai.APIConnectionError as e:  # refused / reset / timed out, after the client's retries
                raise self._gave_up(f"connection failed: {e.__cause__ or e}") from None
            except openai.APIStatusError as e:
                if e.status_code in RETRIED_STATUS or e.status_code >= 500:  # the client's retries ran out
                    raise self._gave_up(f"HTTP {e.status_code}: {_status_detail(e)}") from None
                raise
        raise self._gave_up(last)

    def _gave_up(self, last: str) -> PersonaProbeError:
        return PersonaProbeError(
            f"judge server {self.url} failed after {self.max_retries + 1} attempts ({_one_line(last, 160)}): "
            f"check the server is up and the judge base URL (OPENAI_BASE_URL) is right, then rerun "
            f"(judged items are cached in {self.cache.path})")

    def _fatal(self, status: int, message: str) -> PersonaProbeError:
        fix = {401: "set OPENAI_API_KEY to a valid key", 403: "check the API key's permissions",
               404: f"check the base URL and that model {self.model!r} exists"}.get(status, "check the request")
        return PersonaProbeError(f"judge server {self.url} answered HTTP {status} ({_one_line(message, 160)}): "
                                 f"{fix}, then rerun (judged items are cached in {self.cache.path})")

    # ------------------------------------------------------------------ one prompt

    def _messages(self, prompt: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": prompt}]

    def _logprob_result(self, prompt: str) -> dict[str, Any] | None:
        """One-token request with top-20 logprobs; None if the server refuses logprobs (HTTP 400/422)."""
        try:
            choice, text = self._post(prompt, max_tokens=1, temperature=0, logprobs=True, top_logprobs=20)
        except openai.APIStatusError as e:
            if e.status_code not in (400, 422):
                raise
            self._logprobs_ok = False  # e.g. a server without logprobs support: parse text replies instead
            return None
        top = _top_logprobs(choice)
        score, mass = weighted_score(top) if top else (None, 0.0)
        return {"method": "logprob", "score": score, "mass": mass, "flag": None, "text": text,
                "top_logprobs": top}

    def _text_result(self, prompt: str) -> dict[str, Any]:
        """Short greedy text reply, parsed: a number 0..100, a flag, or None (text kept)."""
        _, text = self._post(prompt, max_tokens=8, temperature=0)
        score, flag = parse_score(text)
        return {"method": "text", "score": score, "flag": flag, "text": text}

    def _judge_prompt(self, prompt: str) -> dict[str, Any]:
        """Raw result for one prompt text: logprob-weighted where possible, else the parsed text reply."""
        first = self._logprob_result(prompt) if self._logprobs_ok else None
        if first is not None and first["score"] is not None:
            return first
        result = self._text_result(prompt)
        if first is not None:
            result.update(mass=first["mass"], top_logprobs=first["top_logprobs"])
        return result

    def _judge_and_cache(self, prompt: str, key: str) -> None:
        try:
            result = self._judge_prompt(prompt)
        except openai.APIStatusError as e:
            raise self._fatal(e.status_code, _status_detail(e)) from None
        self.cache.put(key, result, {"base_url": self.base_url, "model": self.model})

    # ------------------------------------------------------------------ batch

    def _run_missing(self, missing: dict[str, str]) -> None:
        """Judge uncached prompts concurrently; after the first failure no new prompt starts, the ones in
        flight finish (and land in the cache), and the failure is raised."""
        if not missing:
            return
        stop = threading.Event()

        def task(prompt: str, key: str) -> None:
            if stop.is_set():
                return
            try:
                self._judge_and_cache(prompt, key)
            except BaseException:
                stop.set()
                raise

        bar = tqdm(total=len(missing), desc=f"judge requests ({self.model})", unit="request", leave=False,
                   disable=not self.progress or len(missing) < 2)
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(missing))) as pool:
            futures = [pool.submit(task, prompt, key) for key, prompt in missing.items()]
            for f in futures:
                f.add_done_callback(lambda _f: bar.update(1))
        bar.close()
        for f in futures:
            if f.exception() is not None:
                raise f.exception()  # type: ignore[misc]

    def score(self, items: Sequence[tuple[str, str]],
              judge_prompts: dict[str, str] | None = None) -> list[JudgeScore]:
        templates = {**DEFAULT_JUDGE_PROMPTS, **(judge_prompts or {})}
        names = prompt_keys(judge_prompts)  # every judge prompt of the question is scored
        keys: list[dict[str, str]] = []
        missing: dict[str, str] = {}
        for question, answer in items:
            row: dict[str, str] = {}
            for k in names:
                prompt = templates[k].format(question=question, answer=answer)
                row[k] = cache_key(self.base_url, self.model, prompt)
                if self.cache.get(row[k]) is None:
                    missing[row[k]] = prompt
            keys.append(row)
        if len(missing) >= 20:  # say what a large run costs before it starts
            n_all = len(items) * len(names)
            print(f"persona_probe: judge {self.model} at {self.base_url}: {len(missing)} requests "
                  f"({n_all - len(missing)} cached), {self.concurrency} at a time", file=sys.stderr)
        self._run_missing(missing)
        return [self._to_score({k: dict(self.cache.get(row[k]) or {}) for k in names}) for row in keys]

    @staticmethod
    def _to_score(results: dict[str, dict[str, Any]]) -> JudgeScore:
        flags = {results[k].get("flag") for k in KEYS}
        return JudgeScore(
            aligned=results["aligned"].get("score"), coherent=results["coherent"].get("score"),
            refusal="REFUSAL" in flags, code="CODE" in flags, raw=results,
            metrics={k: metric_value(r) for k, r in results.items() if k not in KEYS})
