"""`chatpipe serve`: the OpenAI-compatible API, spoken to over real HTTP."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from pipeline.apps.chat import SamplingSettings, load_chat_model, reply, resolve_policy
from pipeline.apps.serve import make_server
from tests.conftest import REPO_ROOT
from tests.pipeline.test_chat import end_of_turn_model, save_tiny_run

MODEL_NAME = "tiny-sft"
HELLO = [{"role": "user", "content": "Good morrow, how fares the king?"}]


@contextmanager
def running(server):
    """Serve in a thread; always shut down and release the port."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, bpe_tokenizer):
    return save_tiny_run(tmp_path_factory.mktemp("run"), bpe_tokenizer)


@pytest.fixture(scope="module")
def loaded(tiny_run):
    return load_chat_model(resolve_policy(tiny_run), device="cpu")


@pytest.fixture(scope="module")
def port(loaded):
    model, tokenizer = loaded
    with running(make_server(model, tokenizer, MODEL_NAME, max_request_bytes=20_000)) as port:
        yield port


def request(port: int, method: str, path: str, body: bytes | dict | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request; errors are returned, not raised."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def post_chat(port: int, body: bytes | dict) -> tuple[int, dict]:
    status, _, data = request(port, "POST", "/v1/chat/completions", body)
    return status, json.loads(data)


def read_events(response) -> list[str]:
    """The `data:` payloads of a server-sent event stream, in order."""
    events, text = [], response.read().decode()
    for block in text.split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            events.append(block[len("data: "):])
    assert text.endswith("\n\n")
    return events


def assert_error(status: int, payload: dict, expected_status: int, code: str) -> None:
    assert status == expected_status, payload
    assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "code"}
    assert payload["error"]["code"] == code and payload["error"]["message"]


# ---------------------------------------------------------------------------------------------
# Happy paths


def test_lists_the_one_model(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as response:
        assert response.status == 200
        listing = json.load(response)
    assert listing["object"] == "list"
    assert [(model["id"], model["object"]) for model in listing["data"]] == [(MODEL_NAME, "model")]
    status, _, data = request(port, "GET", f"/v1/models/{MODEL_NAME}")
    assert status == 200 and json.loads(data)["id"] == MODEL_NAME


def test_chat_completion(port, loaded):
    model, tokenizer = loaded
    body = {"model": MODEL_NAME, "messages": HELLO, "temperature": 0, "max_tokens": 12}
    http_request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(http_request, timeout=60) as response:
        assert response.status == 200 and response.headers["Content-Type"] == "application/json"
        completion = json.load(response)
    assert completion["id"].startswith("chatcmpl-") and completion["object"] == "chat.completion"
    assert isinstance(completion["created"], int) and completion["model"] == MODEL_NAME
    [choice] = completion["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == reply(model, tokenizer, HELLO, SamplingSettings(temperature=0, max_new_tokens=12))
    assert choice["finish_reason"] == "length"  # a random model never ends its turn in 12 tokens
    usage = completion["usage"]
    assert usage["completion_tokens"] == 12 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_streamed_chunks_reassemble_the_reply(port):
    body = {"model": MODEL_NAME, "messages": HELLO, "temperature": 0, "max_tokens": 12}
    status, whole = post_chat(port, body)
    assert status == 200

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
        events = read_events(response)
    finally:
        connection.close()

    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk["id"] for chunk in chunks}) == 1 and chunks[0]["model"] == MODEL_NAME
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len(chunks) > 3  # streamed in pieces, not one blob
    content = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert content == whole["choices"][0]["message"]["content"]
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks][-1] == "length"
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-1])


def test_stream_can_end_with_usage(port):
    body = {"messages": HELLO, "temperature": 0, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    status, _, data = request(port, "POST", "/v1/chat/completions", body)
    events = data.decode().strip().split("\n\n")
    assert status == 200 and events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: "):])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4


def test_reply_that_ends_its_turn_finishes_by_stop(bpe_tokenizer):
    with running(make_server(end_of_turn_model(bpe_tokenizer), bpe_tokenizer, "eos")) as port:
        status, completion = post_chat(port, {"model": "eos", "messages": HELLO, "temperature": 0})
        assert status == 200
        assert completion["choices"][0]["message"]["content"] == ""
        assert completion["choices"][0]["finish_reason"] == "stop"
        assert completion["usage"]["completion_tokens"] == 1


def test_seeded_requests_agree(port):
    body = {"model": MODEL_NAME, "messages": HELLO, "temperature": 1.0, "max_tokens": 8, "seed": 11}
    assert post_chat(port, body)[1]["choices"] == post_chat(port, body)[1]["choices"]


def test_concurrent_requests_are_all_answered(port):
    body = {"model": MODEL_NAME, "messages": HELLO, "temperature": 0, "max_tokens": 6}
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: post_chat(port, body), range(4)))
    assert {status for status, _ in results} == {200}
    assert len({completion["choices"][0]["message"]["content"] for _, completion in results}) == 1


# ---------------------------------------------------------------------------------------------
# Bad requests: a JSON error saying what to fix, and the server stays up


def test_malformed_json_is_400(port):
    assert_error(*post_chat(port, b'{"messages": ['), 400, "invalid_json")
    assert_error(*post_chat(port, b"\xff\xfe"), 400, "invalid_json")
    assert_error(*post_chat(port, b"[1, 2]"), 400, "invalid_body")
    assert_error(*post_chat(port, b"[" * 15_000), 400, "invalid_json")  # too deep to parse, not a crash


def test_unknown_model_is_404(port):
    status, payload = post_chat(port, {"model": "gpt-4", "messages": HELLO})
    assert_error(status, payload, 404, "model_not_found")
    assert MODEL_NAME in payload["error"]["message"]
    assert_error(*(lambda s, h, d: (s, json.loads(d)))(*request(port, "GET", "/v1/models/gpt-4")), 404, "model_not_found")


def test_oversize_request_is_413(port):
    status, payload = post_chat(port, {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x" * 30_000}]})
    assert_error(status, payload, 413, "request_too_large")


@pytest.mark.parametrize("messages, code", [
    (None, "invalid_messages"),
    ([], "invalid_messages"),
    ("hello", "invalid_messages"),
    (["hello"], "invalid_messages"),
    ([{"role": "wizard", "content": "hi"}], "invalid_role"),
    ([{"content": "hi"}], "invalid_role"),
    ([{"role": "user", "content": 5}], "invalid_messages"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "invalid_messages"),
])
def test_bad_messages_are_400(port, messages, code):
    body = {"model": MODEL_NAME} if messages is None else {"model": MODEL_NAME, "messages": messages}
    assert_error(*post_chat(port, body), 400, code)


@pytest.mark.parametrize("field, value", [
    ("temperature", -1), ("temperature", "hot"), ("top_p", 2), ("max_tokens", 0), ("max_tokens", 1.5),
    ("stream", "yes"), ("seed", True), ("seed", -1), ("n", 0), ("n", 17), ("stop", 5), ("stop", ["a"] * 5),
    ("logprobs", "yes"), ("top_logprobs", 21), ("top_logprobs", 2),
])
def test_bad_parameters_are_400(port, field, value):
    status, payload = post_chat(port, {"model": MODEL_NAME, "messages": HELLO, field: value})
    assert_error(status, payload, 400, "invalid_parameter")
    assert field in payload["error"]["message"]


def test_non_finite_numbers_are_400(port):
    body = b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
    assert_error(*post_chat(port, body), 400, "invalid_parameter")


def test_text_content_parts_are_accepted(port):
    parts = [{"role": "user", "content": [{"type": "text", "text": HELLO[0]["content"]}]}]
    status, completion = post_chat(port, {"model": MODEL_NAME, "messages": parts, "temperature": 0, "max_tokens": 12})
    assert status == 200
    assert completion["choices"][0]["message"]["content"] == post_chat(
        port, {"model": MODEL_NAME, "messages": HELLO, "temperature": 0, "max_tokens": 12}
    )[1]["choices"][0]["message"]["content"]


def test_unknown_path_and_wrong_method(port):
    for method, path, expected, code in [
        ("GET", "/v1/completions", 404, "not_found"),
        ("POST", "/", 404, "not_found"),
        ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
        ("POST", "/v1/models", 405, "method_not_allowed"),
        ("DELETE", "/v1/chat/completions", 405, "method_not_allowed"),
        ("OPTIONS", "/v1/models", 405, "method_not_allowed"),
    ]:
        status, headers, data = request(port, method, path, {} if method == "POST" else None)
        assert_error(status, json.loads(data), expected, code)
        if expected == 405:
            assert headers["Allow"] in ("GET", "POST")


def test_errors_print_nothing(port, capfd):
    post_chat(port, b"not json")
    post_chat(port, {"model": "nope", "messages": HELLO})
    request(port, "GET", "/nowhere")
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


# ---------------------------------------------------------------------------------------------
# The command


def test_serve_command_announces_its_address_and_serves(tiny_run):
    script = "import sys\nfrom pipeline.apps.serve import serve_command\nsys.exit(serve_command(sys.argv[1], port=0))\n"
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(tiny_run)], cwd=REPO_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("chatpipe: serving tiny-sft "), (line, process.stderr.read() if process.poll() is not None else "")
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        status, completion = post_chat(port, {"model": "tiny-sft", "messages": HELLO, "max_tokens": 4})
        assert status == 200 and completion["usage"]["completion_tokens"] == 4
        os.kill(process.pid, signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()
