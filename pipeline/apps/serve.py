"""Serve a run's policy over an OpenAI-compatible HTTP API, so existing chat clients can talk to it.

    chatpipe serve RUN_DIR [--stage ppo|dpo|sft|pretrain] [--host 127.0.0.1] [--port 8000]

    POST /v1/chat/completions   {"model", "messages", "temperature"?, "top_p"?, "top_k"?, "max_tokens"?,
                                 "stream"?, "seed"?, "n"?, "stop"?, "logprobs"?, "top_logprobs"?}:
                                 a chat.completion, or with "stream": true server-sent
                                 chat.completion.chunk events ending in `data: [DONE]`
    GET  /v1/models             the one model served

The standard library's ThreadingHTTPServer is enough for one model: each connection gets a
thread that parses its request and renders its prompt (truncated to fit the context), then hands
it to the batch scheduler (pipeline/apps/batching.py), which generates the requests that arrive
together in one batched engine call and takes newcomers into a running batch between steps.
Every bad request gets a 4xx JSON error `{"error": {"message", "type", "code"}}` naming the field
to fix, even a request line too broken to route; an unexpected failure is a 500 of the same
shape, logged, never a traceback sent to the client, and never sent to a request batched with
the one that failed. A field of OpenAI's API that this server does not implement is refused,
never ignored.

Sampling fields are checked here, each against the range its 400 states: `temperature` 0 to 2
(OpenAI's range; below 1e-5 it is greedy, as 0), `top_p` above 0 up to 1, `top_k` 0 (off) or
more, `max_tokens` 1 or more (cut to fit the context), `n` 1 to 16, `seed` 0 to 2**63 - 1, each
a JSON number of the right kind: not a string, a bool, NaN or an infinity.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import sys
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.apps.batching import MAX_TOP_LOGPROBS, BatchScheduler, Job
from pipeline.apps.chat import SamplingSettings, checkpoint_warning, fit_prompt, load_policy, resolve_policy_stage
from pipeline.errors import ConfigError
from pipeline.orchestration.manifest import read_manifest

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
CHAT_PATH = "/v1/chat/completions"
# A refused body is still read (up to this much) before answering: closing a socket with unread
# data resets the connection, and the client could lose our error response with it.
DRAIN_LIMIT_BYTES = 64 << 20
MODELS_PATH = "/v1/models"
MAX_CHOICES = 16  # 'n' at most
MAX_TEMPERATURE = 2.0  # 'temperature' at most, as OpenAI's API (below 1e-5 it is greedy, as 0)
MAX_STOPS = 4  # as OpenAI: up to 4 stop sequences
# Fields accepted when they ask for nothing (OpenAI's defaults); any other value is refused.
NEUTRAL_FIELDS = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "tools": ([],),
    "functions": ([],), "response_format": ({"type": "text"},), "store": (False,), "parallel_tool_calls": (True, False),
}
SUPPORTED_FIELDS = {
    "model", "messages", "temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens", "stream",
    "stream_options", "seed", "n", "stop", "logprobs", "top_logprobs", "user",
}


class RequestError(Exception):
    """A request we refuse: its HTTP status, OpenAI error type and code, and what to fix."""

    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind


class ChatServer(ThreadingHTTPServer):
    """An HTTP server holding one model, its tokenizer and the scheduler that batches generation."""

    daemon_threads = True  # a stuck client never keeps the process alive
    # The default backlog of 5 reset 1 of 400 connections from 16 concurrent clients.
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        model_name: str,
        max_request_bytes: int,
        max_messages: int,
        batch_window_s: float,
        max_batch_rows: int,
    ):
        super().__init__(address, ChatRequestHandler)
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.max_request_bytes, self.max_messages = max_request_bytes, max_messages
        self.scheduler = BatchScheduler(model, tokenizer, batch_window_s, max_batch_rows)
        self.created = int(time.time())

    def server_close(self) -> None:
        super().server_close()
        self.scheduler.close()

    def handle_error(self, request, client_address) -> None:
        # The default prints a traceback to stderr; the handler already answered what it could.
        logger.exception("chatpipe serve: error while handling a request from %s", client_address)


def make_server(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 0,
    max_request_bytes: int = 1_000_000,
    max_messages: int = 1024,
    batch_window_s: float = 0.005,
    max_batch_rows: int = 32,
) -> ChatServer:
    """A server bound to host:port (0 = any free port, see `server.server_address`), not yet serving.

    Requests arriving within `batch_window_s` of each other (or while a batch runs) are generated
    together, up to `max_batch_rows` rows (a request with n choices is n rows, dealt a fair share).
    Run it with `serve_forever()` (in a thread, for tests), stop it with `shutdown()` and `server_close()`.
    """
    model.eval()
    return ChatServer((host, port), model, tokenizer, model_name, max_request_bytes, max_messages,
                      batch_window_s, max_batch_rows)


# ---------------------------------------------------------------------------------------------
# Requests


def check_text(text: str, where: str, code: str) -> str:
    """`text`, refused if it holds a lone surrogate (JSON allows "\\ud800"; no tokenizer can encode it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RequestError(400, f"{where} holds an unpaired surrogate {text[error.start]!r} at character "
                                f"{error.start}; send valid Unicode text", code) from None
    return text


def parse_messages(value: Any, max_messages: int | None = None) -> list[dict[str, str]]:
    """OpenAI chat messages as role/content dicts; text content parts are joined."""
    if not isinstance(value, list) or not value:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects", "invalid_messages")
    if max_messages is not None and len(value) > max_messages:
        raise RequestError(400, f"'messages' has {len(value)} entries; this server takes at most {max_messages}: "
                                f"drop or summarise early turns", "too_many_messages")
    messages = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(400, f"{where} must be an object with 'role' and 'content'", "invalid_messages")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RequestError(
                400, f"{where}.role is {role!r}; use one of {', '.join(ROLES)}", "invalid_role"
            )
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                       for part in content):
                raise RequestError(400, f"{where}.content parts must all be {{'type': 'text', 'text': str}}",
                                   "invalid_messages")
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise RequestError(400, f"{where}.content must be a string", "invalid_messages")
        check_text(content, f"{where}.content", "invalid_messages")
        messages.append({"role": role, "content": content})
    return messages


def _number(body: dict, key: str, kind: type, default, accepted: str, valid: Callable[[Any], bool] = lambda value: True):
    """body[key] (or `default` when absent or null), refused with a 400 naming the key and `accepted`
    unless it is an integer (any finite number when `kind` is float) for which `valid` holds."""
    value = body.get(key)
    if value is None:
        return default
    allowed = (int, float) if kind is float else (int,)
    # A float NaN or infinity (JSON's NaN, Infinity, 1e400) fails every comparison or bound; a huge
    # int is compared exactly, never converted to float first (10**400 made math.isfinite raise).
    if (isinstance(value, bool) or not isinstance(value, allowed)
            or (isinstance(value, float) and not math.isfinite(value)) or not valid(value)):
        raise RequestError(400, f"'{key}' is {_shown(value)}; send {accepted}", "invalid_parameter")
    return kind(value)


def _shown(value: Any) -> str:
    """A request value as JSON, cut short: a field's error message never echoes a whole huge value."""
    try:
        text = json.dumps(value)
    except ValueError:  # an int too long for str() (over 4,300 digits)
        return "a number too large"
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class ChatRequest:
    """A chat completion request, checked."""

    messages: list[dict]
    settings: SamplingSettings
    stream: bool = False
    seed: int | None = None
    include_usage: bool = False
    n: int = 1
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no logprobs


def parse_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(stop, str) for stop in stops):
        raise RequestError(400, "'stop' must be a string or a list of strings", "invalid_parameter")
    if len(stops) > MAX_STOPS:
        raise RequestError(400, f"'stop' has {len(stops)} sequences; send at most {MAX_STOPS}", "invalid_parameter")
    for index, stop in enumerate(stops):
        check_text(stop, f"'stop'[{index}]", "invalid_parameter")
    return tuple(stop for stop in stops if stop)


def parse_request(body: Any, model_name: str, max_messages: int | None = None) -> ChatRequest:
    """A checked ChatRequest from a chat completion request body."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object", "invalid_body")
    for key, value in body.items():
        if key in SUPPORTED_FIELDS or value is None:
            continue
        if key in NEUTRAL_FIELDS:
            if value not in NEUTRAL_FIELDS[key]:
                raise RequestError(400, f"'{key}' is not supported by this server; leave it out", "unsupported_parameter")
            continue
        raise RequestError(400, f"'{check_text(key, 'a field name', 'invalid_parameter')}' is not a field this server "
                                f"supports; leave it out", "unsupported_parameter")
    model = body.get("model", model_name)
    if not isinstance(model, str):
        raise RequestError(400, "'model' must be a string", "invalid_parameter")
    if model != model_name:
        raise RequestError(
            404, f"model {model!r} is not served here; this server serves {model_name!r}", "model_not_found"
        )
    messages = parse_messages(body.get("messages"), max_messages)
    defaults = SamplingSettings()
    length_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    # Every sampling field is checked here, so a request the engine cannot sample is a 400 naming its field.
    max_tokens = _number(body, length_key, int, defaults.max_new_tokens,
                         "an integer from 1 to 2**63 - 1 (a reply is cut to fit the context)", lambda v: 1 <= v < 2**63)
    temperature = _number(body, "temperature", float, defaults.temperature,
                          f"a number from 0 (greedy) to {MAX_TEMPERATURE}", lambda v: 0 <= v <= MAX_TEMPERATURE)
    top_p = _number(body, "top_p", float, defaults.top_p, "a number above 0 and at most 1 (1 = off)", lambda v: 0 < v <= 1)
    top_k = _number(body, "top_k", int, defaults.top_k, "an integer from 0 (off) to 2**63 - 1", lambda v: 0 <= v < 2**63)
    try:
        settings = SamplingSettings(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_tokens)
    except ConfigError as error:
        raise RequestError(400, str(error), "invalid_parameter") from None
    n = _number(body, "n", int, 1, f"an integer from 1 to {MAX_CHOICES} (choices)", lambda v: 1 <= v <= MAX_CHOICES)
    stop = parse_stop(body.get("stop"))
    logprobs = body.get("logprobs", False)
    if not isinstance(logprobs, bool) and logprobs is not None:
        raise RequestError(400, "'logprobs' must be true or false", "invalid_parameter")
    top_logprobs = _number(body, "top_logprobs", int, None, f"an integer from 0 to {MAX_TOP_LOGPROBS}",
                           lambda v: 0 <= v <= MAX_TOP_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise RequestError(400, "'top_logprobs' needs 'logprobs': true", "invalid_parameter")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be true or false", "invalid_parameter")
    seed = _number(body, "seed", int, None, "an integer from 0 to 2**63 - 1", lambda v: 0 <= v < 2**63)
    options = body.get("stream_options") or {}
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return ChatRequest(messages, settings, stream, seed, include_usage, n, stop,
                       (top_logprobs or 0) if logprobs else None)


# ---------------------------------------------------------------------------------------------
# Handler


class ChatRequestHandler(BaseHTTPRequestHandler):
    server: ChatServer
    server_version = "chatpipe"
    timeout = 300  # seconds a client may stall a read or write before its connection is dropped

    def log_message(self, format: str, *args) -> None:
        logger.info("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a garbage request line, headers too long, an unknown method) as JSON."""
        self.response_started, self.body_read = False, True  # nothing routed: no body is known to follow
        if self.request_version == "HTTP/0.9":  # a line without a version: still send the JSON's headers
            self.request_version = "HTTP/1.0"
        reason = message or self.responses.get(code, ("error",))[0]
        self.send_error_json(RequestError(code, f"{reason}: the request line or headers could not be read "
                                                f"({(self.requestline or '')[:200]!r})", "invalid_request"))

    # Every method goes through one dispatcher, so a wrong method is a JSON 405, not a 501 page.
    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_POST(self) -> None:
        self.dispatch("POST")

    def do_PUT(self) -> None:
        self.dispatch("PUT")

    def do_DELETE(self) -> None:
        self.dispatch("DELETE")

    def do_PATCH(self) -> None:
        self.dispatch("PATCH")

    def do_OPTIONS(self) -> None:
        self.dispatch("OPTIONS")

    def dispatch(self, method: str) -> None:
        self.response_started = False
        self.body_read = False
        try:
            path = urlsplit(self.path).path.rstrip("/")
            routes = {CHAT_PATH: ("POST", self.chat_completions), MODELS_PATH: ("GET", self.list_models)}
            if path.startswith(MODELS_PATH + "/"):
                routes[path] = ("GET", lambda: self.get_model(path[len(MODELS_PATH) + 1:]))
            if path not in routes:
                raise RequestError(404, f"no route {method} {path or '/'}; use POST {CHAT_PATH} or GET {MODELS_PATH}",
                                   "not_found")
            allowed, handler = routes[path]
            if method != allowed:
                raise RequestError(405, f"{path} accepts {allowed}, not {method}", "method_not_allowed")
            handler()
        except RequestError as error:
            self.send_error_json(error)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left; nothing to answer
        except Exception:
            logger.exception("chatpipe serve: %s %s failed", method, self.path)
            self.send_error_json(RequestError(500, "the server failed on this request; see its log",
                                              "internal_error", "server_error"))

    # -- responses --------------------------------------------------------------------------

    def send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.response_started = True
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 405:
            self.send_header("Allow", "POST" if urlsplit(getattr(self, "path", "")).path.rstrip("/") == CHAT_PATH else "GET")
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, error: RequestError) -> None:
        if self.response_started:  # a stream already begun can only be cut short
            self.close_connection = True
            return
        self.close_connection = True
        try:
            self.discard_body()
            self.send_json(error.status, {"error": {"message": error.message, "type": error.kind, "code": error.code}})
        except OSError:  # the client left (or stalled past the timeout)
            pass

    def discard_body(self) -> None:
        if self.body_read:
            return
        self.body_read = True
        try:
            remaining = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return
        if remaining > DRAIN_LIMIT_BYTES:
            return
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                break
            remaining -= len(chunk)

    # -- routes ------------------------------------------------------------------------------

    def model_card(self) -> dict:
        return {"id": self.server.model_name, "object": "model", "created": self.server.created, "owned_by": "chatpipe"}

    def list_models(self) -> None:
        self.send_json(200, {"object": "list", "data": [self.model_card()]})

    def get_model(self, name: str) -> None:
        if name != self.server.model_name:
            raise RequestError(404, f"model {name!r} is not served here; this server serves "
                                    f"{self.server.model_name!r}", "model_not_found")
        self.send_json(200, self.model_card())

    def read_body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "send the request body with a Content-Length header", "length_required")
        try:
            length = int(length)
        except ValueError:
            raise RequestError(400, f"Content-Length {length!r} is not a number", "invalid_body") from None
        if length < 0:
            raise RequestError(400, f"Content-Length {length} is negative", "invalid_body")
        if length > self.server.max_request_bytes:
            raise RequestError(413, f"request body of {length} bytes is over this server's limit of "
                                    f"{self.server.max_request_bytes} bytes; shorten the conversation",
                               "request_too_large")
        raw = self.rfile.read(length)
        self.body_read = True
        try:
            return json.loads(raw.decode("utf-8"))
        # ValueError covers JSONDecodeError, UnicodeDecodeError and an int of over 4,300 digits.
        except (ValueError, RecursionError) as error:
            raise RequestError(400, f"the request body is not valid JSON ({error})", "invalid_json") from None

    def chat_completions(self) -> None:
        request = parse_request(self.read_body(), self.server.model_name, self.server.max_messages)
        # Rendering and truncating the prompt happens here, in this request's thread: a long
        # conversation never holds up the batch that other clients are waiting for.
        prompt, max_new_tokens = fit_prompt(self.server.model, self.server.tokenizer, request.messages,
                                            request.settings.max_new_tokens)
        job = self.server.scheduler.submit(Job(
            prompt, max_new_tokens, request.settings, request.n, request.seed, request.stop, request.top_logprobs,
        ))
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        try:
            if request.stream:
                self.stream_completion(job, request, completion_id, created, len(prompt))
                return
            contents, entries = [""] * request.n, [[] for _ in range(request.n)]
            finish_reasons, generated = [None] * request.n, [0] * request.n
            for delta in job:
                contents[delta.choice] += delta.text
                entries[delta.choice] += delta.logprobs
                if delta.finish_reason is not None:
                    finish_reasons[delta.choice], generated[delta.choice] = delta.finish_reason, delta.completion_tokens
        finally:
            job.cancel()  # a no-op once finished; stops the rows of a client that left
        self.send_json(200, {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": self.server.model_name,
            "choices": [{
                "index": index,
                "message": {"role": "assistant", "content": contents[index]},
                "logprobs": {"content": entries[index], "refusal": None} if request.top_logprobs is not None else None,
                "finish_reason": finish_reasons[index],
            } for index in range(request.n)],
            "usage": usage(len(prompt), sum(generated)),
        })

    def stream_completion(self, job: Job, request: ChatRequest, completion_id: str, created: int,
                          prompt_tokens: int) -> None:
        def chunk(index: int, delta: dict, finish_reason: str | None = None, logprobs: list | None = None) -> dict:
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
            if request.top_logprobs is not None:
                choice["logprobs"] = {"content": logprobs or [], "refusal": None} if logprobs is not None else None
            return {
                "id": completion_id, "object": "chat.completion.chunk", "created": created,
                "model": self.server.model_name, "choices": [choice],
            }

        deltas = iter(job)
        # Wait for the first output before committing to 200, so a failure to start is still a JSON error.
        first = next(deltas, None)
        self.response_started = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True  # the end of the stream is the end of the connection
        for index in range(request.n):
            self.send_event(chunk(index, {"role": "assistant", "content": ""}))
        generated = 0
        for delta in itertools.chain([first] if first is not None else [], deltas):
            if delta.text or delta.logprobs:
                self.send_event(chunk(delta.choice, {"content": delta.text}, None, delta.logprobs))
            if delta.finish_reason is not None:
                generated += delta.completion_tokens
                self.send_event(chunk(delta.choice, {}, delta.finish_reason))
        if request.include_usage:
            self.send_event({**chunk(0, {}), "choices": [], "usage": usage(prompt_tokens, generated)})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def send_event(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# ---------------------------------------------------------------------------------------------
# Command


def serve_command(
    run_dir: str | Path,
    stage: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
) -> int:
    """`chatpipe serve`: load the run's policy and answer requests until Ctrl-C."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a TCP port; choose one from 1 to 65535 (0: any free port)")
    stage, folder = resolve_policy_stage(run_dir, stage)
    warning = checkpoint_warning(run_dir, stage)
    model_name = model_name or f"{read_manifest(run_dir).run_name or Path(run_dir).name}-{stage}"
    model, tokenizer = load_policy(run_dir, stage, folder)  # a checkpoint that cannot load stops here, unwarned
    if warning:
        print(warning, file=sys.stderr, flush=True)
    try:
        server = make_server(model, tokenizer, model_name, host, port)
    except OSError as error:
        raise ConfigError(f"cannot listen on {host}:{port} ({error.strerror or error}); choose another --port") from None
    bound_host, bound_port = server.server_address[:2]
    print(
        f"chatpipe: serving {model_name} ({folder}) at http://{bound_host}:{bound_port}/v1 "
        f"(POST /v1/chat/completions, GET /v1/models); Ctrl-C to stop",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0

