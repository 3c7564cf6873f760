"""Judge through any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp, `persona-probe serve`).

Scores are the literature's logprob-weighted mean over number tokens (one token, top-20 logprobs); where
a server gives no logprobs, or the judge does not answer with a number, one short text reply is parsed
instead. Every result is appended to a JSONL cache as it arrives, so a rerun never pays twice.
Only the standard library is used for HTTP.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from persona_probe.core.errors import PersonaProbeError
from persona_probe.core.paths import checkpoints_dir
from persona_probe.evaluation.judges.base import DEFAULT_JUDGE_PROMPTS, Judge, JudgeScore, metric_value, prompt_keys
from persona_probe.evaluation.judges.logprob import parse_score, weighted_score

OPENAI_URL = "https://api.openai.com/v1"
CACHE_FILE = "openai_judge.jsonl"
KEYS: tuple[str, ...] = ("aligned", "coherent")


class _RetryableError(Exception):
    """A transient failure (connection, 429, 5xx, malformed JSON): worth retrying."""

    retry_after: float = 0.0  # seconds the server asked us to wait (HTTP 429/503 Retry-After)


class _HTTPStatusError(Exception):
    """A non-retryable HTTP error (4xx other than 429)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


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


def _content(resp: Any) -> tuple[dict[str, Any], str]:
    """(choices[0], its message content); raises _RetryableError on a malformed response."""
    try:
        choice = resp["choices"][0]
        content = choice["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise _RetryableError(f"malformed response (no choices[0].message): {_one_line(json.dumps(resp))}") from e
    return choice, str(content)


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
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                data[row["key"]] = row["result"]
            except (ValueError, KeyError, TypeError):  # a torn last line after a crash is skipped
                continue
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
    """Scores with an OpenAI-compatible chat model (logprob-weighted 0-100), cached on disk."""

    name = "openai"

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None,
                 cache_dir: str | Path | None = None, max_retries: int = 4, backoff: float = 1.0,
                 timeout: float = 60, concurrency: int = 4) -> None:
        self.model = model
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        if not self.api_key and self.base_url == OPENAI_URL:
            raise PersonaProbeError("the openai judge needs an API key for api.openai.com: set OPENAI_API_KEY "
                                    "(or point OPENAI_BASE_URL at a local server)")
        self.max_retries = max(0, int(max_retries))
        self.backoff = float(backoff)
        self.timeout = float(timeout)
        self.concurrency = max(1, int(concurrency))
        cache_root = Path(cache_dir) if cache_dir is not None else checkpoints_dir() / "judge_cache"
        self.cache = JudgeCache(cache_root / CACHE_FILE)
        self._logprobs_ok = True

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def describe(self) -> dict[str, Any]:
        return {"judge": "openai", "model": self.model, "base_url": self.base_url, "method": "logprob-weighted 0-100"}

    # ------------------------------------------------------------------ HTTP

    def _request_once(self, payload: dict[str, Any]) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(payload).encode("utf-8"), headers=headers,
                                     method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            detail = _one_line(e.read().decode("utf-8", "replace") or e.reason)
            if e.code == 429 or e.code >= 500:
                err = _RetryableError(f"HTTP {e.code}: {detail}")
                try:  # rate limits: wait as long as the server asks (capped), not only our backoff
                    err.retry_after = min(float(e.headers.get("Retry-After") or 0), 120.0)
                except ValueError:
                    pass
                raise err from e
            raise _HTTPStatusError(e.code, detail) from e
        except (OSError, http.client.HTTPException) as e:  # URLError, refused/reset, timeouts
            raise _RetryableError(f"connection failed: {_one_line(getattr(e, 'reason', e))}") from e
        try:
            return json.loads(body)
        except ValueError as e:
            raise _RetryableError(f"malformed JSON: {_one_line(body.decode('utf-8', 'replace'), 80)}") from e

    def _post(self, payload: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """POST with retries; returns (choices[0], content). Raises PersonaProbeError when retries run out
        and lets _HTTPStatusError (non-retryable 4xx) through."""
        last, wait = "", 0.0
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(max(self.backoff * 2 ** (attempt - 1), wait))
            try:
                return _content(self._request_once(payload))
            except _RetryableError as e:
                last, wait = str(e), e.retry_after
        raise PersonaProbeError(
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
        payload = {"model": self.model, "messages": self._messages(prompt), "max_tokens": 1, "temperature": 0,
                   "logprobs": True, "top_logprobs": 20}
        try:
            choice, text = self._post(payload)
        except _HTTPStatusError as e:
            if e.status not in (400, 422):
                raise
            self._logprobs_ok = False  # e.g. a server without logprobs support: parse text replies instead
            return None
        top = _top_logprobs(choice)
        score, mass = weighted_score(top) if top else (None, 0.0)
        return {"method": "logprob", "score": score, "mass": mass, "flag": None, "text": text,
                "top_logprobs": top}

    def _text_result(self, prompt: str) -> dict[str, Any]:
        """Short greedy text reply, parsed: a number 0..100, a flag, or None (text kept)."""
        payload = {"model": self.model, "messages": self._messages(prompt), "max_tokens": 8, "temperature": 0}
        _, text = self._post(payload)
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
        except _HTTPStatusError as e:
            raise self._fatal(e.status, e.message) from None
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

        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(missing))) as pool:
            futures = [pool.submit(task, prompt, key) for key, prompt in missing.items()]
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
            print(f"persona_probe: judge {self.model} at {self.base_url}: {len(missing)} requests ({n_all - len(missing)} "
                  f"cached), {self.concurrency} at a time", file=sys.stderr)
        self._run_missing(missing)
        return [self._to_score({k: dict(self.cache.get(row[k]) or {}) for k in names}) for row in keys]

    @staticmethod
    def _to_score(results: dict[str, dict[str, Any]]) -> JudgeScore:
        flags = {results[k].get("flag") for k in KEYS}
        return JudgeScore(
            aligned=results["aligned"].get("score"), coherent=results["coherent"].get("score"),
            refusal="REFUSAL" in flags, code="CODE" in flags, raw=results,
            metrics={k: metric_value(r) for k, r in results.items() if k not in KEYS})
