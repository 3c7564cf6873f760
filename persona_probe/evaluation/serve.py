"""A small OpenAI-compatible chat-completions server over a local HF model (standard library only).

    POST /v1/chat/completions   model, messages, max_tokens, temperature, top_p, logprobs, top_logprobs, seed
    GET  /v1/models

Loopback by default; one generation at a time. Lets the OpenAI judge (or any OpenAI client) run against a
local model, and `persona-probe serve` expose one.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from persona_probe.core.errors import PersonaProbeError
from persona_probe.evaluation.judges.hf_judge import pad_token_id, render_chat
from persona_probe.models.loading import ModelHandle

DEFAULT_MAX_TOKENS = 256
MAX_TOP_LOGPROBS = 20


class RequestError(Exception):
    """A bad request: answered with HTTP `status` and an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


# ----------------------------------------------------------------------------- request parsing


def _message_text(content: Any) -> str:
    """A message's content as text (plain string, or a list of {"type": "text", "text": ...} parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    if content is None:
        return ""
    raise RequestError("message content must be a string or a list of text parts", param="messages")


def parse_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    out = []
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError("each message needs a 'role' and 'content'", param="messages")
        out.append({"role": m["role"], "content": _message_text(m.get("content"))})
    return out


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise RequestError(f"'{key}' must be a number in [{lo}, {hi}]", param=key)
    return float(value)


def parse_options(body: dict[str, Any]) -> dict[str, Any]:
    """Sampling options with OpenAI defaults, validated."""
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError("'max_tokens' must be a positive integer", param="max_tokens")
    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported", param="n")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError("'seed' must be an integer", param="seed")
    return {
        "max_tokens": max_tokens,
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _number(body, "top_p", 1.0, 0.0, 1.0),
        "logprobs": bool(body.get("logprobs", False)),
        "top_logprobs": int(_number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)),
        "seed": seed,
    }


# ----------------------------------------------------------------------------- generation


def _token_entry(tokenizer: Any, token_id: int, logprob: float) -> dict[str, Any]:
    text = tokenizer.decode([token_id])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _logprob_content(tokenizer: Any, ids: list[int], logits: list[torch.Tensor], k: int) -> list[dict[str, Any]]:
    """OpenAI `logprobs.content`: per generated token its logprob and the top-k alternatives."""
    content = []
    for tid, step in zip(ids, logits):
        lp = torch.log_softmax(step.float(), dim=-1)
        entry = _token_entry(tokenizer, tid, float(lp[tid]))
        top = lp.topk(k) if k > 0 else None
        entry["top_logprobs"] = [] if top is None else [
            _token_entry(tokenizer, int(t), float(v)) for v, t in zip(top.values.tolist(), top.indices.tolist())]
        content.append(entry)
    return content


def _eos_ids(handle: ModelHandle) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(handle.model, "generation_config", None), handle.tokenizer):
        eos = getattr(src, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
    return ids


@torch.inference_mode()
def complete(handle: ModelHandle, messages: list[dict[str, str]], opts: dict[str, Any]) -> dict[str, Any]:
    """Generate one reply: {"content", "finish_reason", "logprobs", "prompt_tokens", "completion_tokens"}."""
    tok = handle.tokenizer
    prompt_ids = tok(render_chat(tok, messages), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=handle.device)
    greedy = opts["temperature"] == 0.0
    sampling = {} if greedy else {"temperature": opts["temperature"], "top_p": opts["top_p"], "top_k": 0}
    if opts["seed"] is not None:
        torch.manual_seed(opts["seed"])
    eos = _eos_ids(handle)
    out = handle.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=not greedy,
                                max_new_tokens=opts["max_tokens"], pad_token_id=pad_token_id(tok),
                                eos_token_id=sorted(eos) or None, return_dict_in_generate=True,
                                output_logits=opts["logprobs"], **sampling)
    new = out.sequences[0, len(prompt_ids):].tolist()
    finished = bool(new) and new[-1] in eos
    content_ids = new[:-1] if finished else new
    logprobs = None
    if opts["logprobs"]:
        steps = [lg[0] for lg in out.logits][: len(content_ids)]
        logprobs = {"content": _logprob_content(tok, content_ids, steps, opts["top_logprobs"])}
    return {"content": tok.decode(content_ids, skip_special_tokens=True), "logprobs": logprobs,
            "finish_reason": "stop" if finished else "length",
            "prompt_tokens": len(prompt_ids), "completion_tokens": len(new)}


def completion_response(model_name: str, result: dict[str, Any]) -> dict[str, Any]:
    """The standard chat.completion JSON for one generated reply."""
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": result["content"]},
                              "finish_reason": result["finish_reason"], "logprobs": result["logprobs"]}
    pt, ct = result["prompt_tokens"], result["completion_tokens"]
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name, "choices": [choice],
            "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}}


# ----------------------------------------------------------------------------- HTTP


class ChatServer(ThreadingHTTPServer):
    """HTTP server holding the model; `request_count` counts every request received."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handle: ModelHandle, model_name: str | None = None,
                 verbose: bool = False) -> None:
        super().__init__(address, ChatHandler)
        self.handle = handle
        self.model_name = model_name or handle.info.model_id
        self.verbose = verbose
        self.request_count = 0
        self.generate_lock = threading.Lock()
        self._count_lock = threading.Lock()

    def count_request(self) -> None:
        with self._count_lock:
            self.request_count += 1

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


class ChatHandler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if self.server.verbose:
            super().log_message(format, *args)

    def _send_json(self, status: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self.server.count_request()
        if self._path() in ("/v1/models", "/models"):
            model = {"id": self.server.model_name, "object": "model", "created": 0, "owned_by": "persona_probe"}
            self._send_json(200, {"object": "list", "data": [model]})
        else:
            self._send_json(404, error_body(f"unknown path {self.path}"))

    def _read_body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        try:
            body = json.loads(raw)
        except ValueError:
            raise RequestError("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError("request body must be a JSON object")
        return body

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        self.server.count_request()
        if self._path() not in ("/v1/chat/completions", "/chat/completions"):
            self._send_json(404, error_body(f"unknown path {self.path}"))
            return
        try:
            body = self._read_body()
            messages, opts = parse_messages(body), parse_options(body)
            with self.server.generate_lock:
                result = complete(self.server.handle, messages, opts)
        except RequestError as e:
            self._send_json(e.status, error_body(str(e), param=e.param))
            return
        except PersonaProbeError as e:
            self._send_json(400, error_body(str(e)))
            return
        except Exception as e:  # noqa: BLE001 - the client gets a 500, the server keeps running
            self._send_json(500, error_body(f"{type(e).__name__}: {e}", kind="server_error"))
            return
        self._send_json(200, completion_response(self.server.model_name, result))


def start_server(handle: ModelHandle, host: str = "127.0.0.1", port: int = 0,
                 model_name: str | None = None, verbose: bool = False) -> tuple[ChatServer, str]:
    """Start the server in a daemon thread; returns (server, base URL like http://127.0.0.1:PORT/v1).
    Stop it with `server.shutdown(); server.server_close()`."""
    server = ChatServer((host, port), handle, model_name=model_name, verbose=verbose)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="persona-probe-serve",
                     daemon=True).start()
    return server, server.url


def serve(handle: ModelHandle, port: int = 8000, host: str = "127.0.0.1", model_name: str | None = None) -> None:
    """Serve until Ctrl-C (for `persona-probe serve`)."""
    try:
        server = ChatServer((host, port), handle, model_name=model_name, verbose=True)
    except OSError as e:
        raise PersonaProbeError(f"cannot listen on {host}:{port} ({e.strerror or e}): pick another --port") from None
    print(f"persona_probe: serving {server.model_name} at {server.url} (OPENAI_BASE_URL={server.url})",
          file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
