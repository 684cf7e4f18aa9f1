"""`chatpipe serve`: the OpenAI-compatible API, spoken to over real HTTP."""

from __future__ import annotations

import http.client
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from pipeline.apps.batching import BatchScheduler, Job
from pipeline.apps.chat import SamplingSettings, load_chat_model, prompt_ids, reply, resolve_policy
from pipeline.apps.serve import make_server
from pipeline.cli import main
from pipeline.models.generation import Sampling
from tests.conftest import REPO_ROOT
from tests.pipeline.test_chat import damaged_copy, end_of_turn_model, save_tiny_run

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
    # found by the fault probe: each a 500, or accepted and crashing the batch
    ("temperature", 2.5), ("temperature", 10**400), ("temperature", [1]), ("temperature", True),
    ("top_p", 0), ("top_p", -0.5), ("top_p", "0.9"), ("top_k", -1), ("top_k", 1.5), ("top_k", "5"), ("top_k", 10**400),
    ("max_tokens", -3), ("max_tokens", 10**400), ("max_completion_tokens", 0), ("n", 1.5), ("n", "2"),
    ("seed", 2**63), ("seed", 1.5), ("seed", "7"), ("top_logprobs", -1),
], ids=lambda value: repr(value)[:12])
def test_bad_parameters_are_400(port, field, value):
    status, payload = post_chat(port, {"model": MODEL_NAME, "messages": HELLO, field: value})
    assert_error(status, payload, 400, "invalid_parameter")
    assert f"'{field}'" in payload["error"]["message"]


@pytest.mark.parametrize("field", ["temperature", "top_p", "top_k", "max_tokens", "n", "seed"])
@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_400(port, field, number):
    body = b'{"messages": [{"role": "user", "content": "hi"}], "%s": %s}' % (field.encode(), number.encode())
    status, payload = post_chat(port, body)
    assert_error(status, payload, 400, "invalid_parameter")
    assert f"'{field}'" in payload["error"]["message"]


def test_a_number_too_long_to_read_is_400(port):
    body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 5000 + b"}"
    assert_error(*post_chat(port, body), 400, "invalid_json")


def test_range_errors_say_what_is_accepted(port):
    message = post_chat(port, {"messages": HELLO, "temperature": 7})[1]["error"]["message"]
    assert "'temperature'" in message and "0" in message and "2" in message
    message = post_chat(port, {"messages": HELLO, "top_p": 0})[1]["error"]["message"]
    assert "'top_p'" in message and "1" in message


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


def test_serve_command_announces_its_address_and_serves(tiny_run, tmp_path):
    # SIGUSR1 dumps every thread's stack, so a shutdown that hangs says where. SIGINT gets Python's
    # own handler back: a suite started as a background job (`make test &`) hands its children SIGINT
    # ignored, and Python then installs no KeyboardInterrupt for it (the old flake: serve never stopped).
    script = (
        "import faulthandler, signal, sys\nfaulthandler.register(signal.SIGUSR1)\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from pipeline.apps.serve import serve_command\nsys.exit(serve_command(sys.argv[1], port=0))\n"
    )
    with open(tmp_path / "stderr.txt", "w+") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", script, str(tiny_run)], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
        try:
            line = process.stdout.readline()
            assert line.startswith("chatpipe: serving tiny-sft "), (line, (tmp_path / "stderr.txt").read_text())
            port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
            status, completion = post_chat(port, {"model": "tiny-sft", "messages": HELLO, "max_tokens": 4})
            assert status == 200 and 1 <= completion["usage"]["completion_tokens"] <= 4
            os.kill(process.pid, signal.SIGINT)
            try:
                assert process.wait(timeout=60) == 0
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGUSR1)
                time.sleep(1)
                pytest.fail("serve did not stop on Ctrl-C:\n" + (tmp_path / "stderr.txt").read_text()[-6000:])
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stdout.close()


# ---------------------------------------------------------------------------------------------
# Robustness: lone surrogates, broken request lines, many clients, long conversations


def test_lone_surrogate_is_400_naming_the_field(port):
    body = b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}], "max_tokens": 2}'
    status, payload = post_chat(port, body)
    assert_error(status, payload, 400, "invalid_messages")
    assert "messages[0].content" in payload["error"]["message"]
    status, payload = post_chat(port, b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\udc00"]}')
    assert_error(status, payload, 400, "invalid_parameter")
    assert "stop" in payload["error"]["message"]


def test_garbage_request_line_gets_json(port):
    import socket

    for line in (b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"FROB /v1/models HTTP/1.1\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
            connection.sendall(line)
            data = b""
            while chunk := connection.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert b"application/json" in head, data
        payload = json.loads(body)
        assert set(payload["error"]) == {"message", "type", "code"} and payload["error"]["message"]


def test_many_concurrent_clients_all_succeed(port):
    body = {"model": MODEL_NAME, "messages": HELLO, "max_tokens": 3, "temperature": 1.0}
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: post_chat(port, body), range(48)))
    assert [status for status, _ in results] == [200] * 48
    # Every reply ran to max_tokens or ended at a sampled EOS (temperature 1 on a tiny model draws it at times).
    for _, completion in results:
        tokens, reason = completion["usage"]["completion_tokens"], completion["choices"][0]["finish_reason"]
        assert (tokens, reason) == (3, "length") or (tokens <= 3 and reason == "stop"), (tokens, reason)


def test_too_many_messages_is_400(loaded):
    model, tokenizer = loaded
    with running(make_server(model, tokenizer, MODEL_NAME, max_messages=10)) as port:
        messages = [{"role": "user", "content": "hi"}] * 11
        status, payload = post_chat(port, {"messages": messages})
        assert_error(status, payload, 400, "too_many_messages")
        assert "'messages'" in payload["error"]["message"]


def test_long_conversation_does_not_hold_up_other_clients(loaded):
    """2,000 short turns took 40 s to truncate, inside the generation lock, while a short request waited."""
    model, tokenizer = loaded
    long_chat = [{"role": ("user", "assistant")[i % 2], "content": f"message {i}: hi there"} for i in range(2001)]
    with running(make_server(model, tokenizer, MODEL_NAME, max_request_bytes=1_000_000, max_messages=4096)) as port:
        with ThreadPoolExecutor(2) as pool:
            started = time.perf_counter()
            long_one = pool.submit(post_chat, port, {"messages": long_chat, "max_tokens": 2})
            time.sleep(0.05)
            short_status, _ = post_chat(port, {"messages": HELLO, "max_tokens": 2})
            short_wait = time.perf_counter() - started
            long_status, completion = long_one.result()
    assert short_status == 200 and long_status == 200
    assert completion["usage"]["prompt_tokens"] <= model.config.max_position_embeddings
    assert short_wait < 10, short_wait


# ---------------------------------------------------------------------------------------------
# OpenAI surface: stop, n, logprobs, unsupported fields


def greedy_text(port, **fields) -> dict:
    status, completion = post_chat(port, {"messages": HELLO, "temperature": 0, "max_tokens": 24, **fields})
    assert status == 200, completion
    return completion


def test_stop_sequence_ends_the_reply_without_the_stop_text(port):
    full = greedy_text(port)["choices"][0]["message"]["content"]
    assert len(full) > 6
    stop = full[3:5]
    first = full.index(stop)
    for stop_field in (stop, [stop], ["never-appears", stop]):
        completion = greedy_text(port, stop=stop_field)
        [choice] = completion["choices"]
        assert choice["message"]["content"] == full[:first]
        assert choice["finish_reason"] == "stop"
        assert completion["usage"]["completion_tokens"] < 24


def test_stop_sequence_in_a_stream(port):
    full = greedy_text(port)["choices"][0]["message"]["content"]
    stop = full[4:7]
    status, _, data = request(port, "POST", "/v1/chat/completions",
                              {"messages": HELLO, "temperature": 0, "max_tokens": 24, "stop": stop, "stream": True})
    events = [json.loads(block[len("data: "):]) for block in data.decode().strip().split("\n\n")[:-1]]
    assert status == 200
    content = "".join(event["choices"][0]["delta"].get("content", "") for event in events)
    assert content == full[:full.index(stop)]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_n_choices_are_separate_seeded_samples(port):
    body = {"messages": HELLO, "temperature": 1.0, "max_tokens": 12, "n": 3, "seed": 5}
    status, completion = post_chat(port, body)
    assert status == 200
    assert [choice["index"] for choice in completion["choices"]] == [0, 1, 2]
    texts = [choice["message"]["content"] for choice in completion["choices"]]
    assert len(set(texts)) > 1  # each choice its own sample
    assert post_chat(port, body)[1]["choices"] == completion["choices"]  # and reproducible
    alone = post_chat(port, {**body, "n": 1})[1]["choices"][0]["message"]["content"]
    assert alone == texts[0]  # choice 0 is what the seed gives on its own
    assert completion["usage"]["completion_tokens"] == 36


def test_n_choices_stream(port):
    status, _, data = request(port, "POST", "/v1/chat/completions",
                              {"messages": HELLO, "temperature": 1.0, "max_tokens": 6, "n": 2, "seed": 3, "stream": True})
    events = [json.loads(block[len("data: "):]) for block in data.decode().strip().split("\n\n")[:-1]]
    whole = post_chat(port, {"messages": HELLO, "temperature": 1.0, "max_tokens": 6, "n": 2, "seed": 3})[1]
    for index in (0, 1):
        mine = [event["choices"][0] for event in events if event["choices"][0]["index"] == index]
        assert "".join(choice["delta"].get("content", "") for choice in mine) == \
            whole["choices"][index]["message"]["content"]
        assert mine[-1]["finish_reason"] == "length"


def test_logprobs_are_the_models_own(port, loaded):
    """Each token's logprob is log softmax of the raw logits (not the tempered ones), as OpenAI reports them."""
    import torch

    from pipeline.apps.batching import byte_symbols
    from pipeline.apps.chat import prompt_ids

    model, tokenizer = loaded
    symbols = byte_symbols()

    def token_id(entry: dict) -> int:
        return tokenizer.convert_tokens_to_ids("".join(symbols[byte] for byte in entry["bytes"]))

    completion = greedy_text(port, logprobs=True, top_logprobs=3, max_tokens=6)
    [choice] = completion["choices"]
    entries = choice["logprobs"]["content"]
    assert len(entries) == 6
    text = b"".join(bytes(entry["bytes"]) for entry in entries).decode("utf-8", errors="replace")
    assert text == choice["message"]["content"]
    # Recompute with full forward passes (no KV cache, no batching): greedy tokens and their logprobs.
    ids = prompt_ids(tokenizer, HELLO, None)
    for entry in entries:
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
        best = int(log_probs.argmax())
        assert token_id(entry) == best
        assert entry["logprob"] == pytest.approx(log_probs[best].item(), abs=1e-4)
        assert len(entry["top_logprobs"]) == 3
        assert [token_id(top) for top in entry["top_logprobs"]] == log_probs.topk(3).indices.tolist()
        assert [top["logprob"] for top in entry["top_logprobs"]] == pytest.approx(log_probs.topk(3).values.tolist(), abs=1e-4)
        ids.append(best)
    # Sampled hot and filtered: the logprob is still the model's own, not the tempered one.
    first = greedy_text(port, logprobs=True, temperature=1.5, top_p=0.5, seed=1, max_tokens=1)
    entry = first["choices"][0]["logprobs"]["content"][0]
    prompt = prompt_ids(tokenizer, HELLO, None)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), dim=-1)
    assert entry["logprob"] == pytest.approx(log_probs[token_id(entry)].item(), abs=1e-4)
    assert entry["top_logprobs"] == []  # logprobs without top_logprobs: none listed
    assert greedy_text(port)["choices"][0]["logprobs"] is None


def test_logprobs_in_a_stream(port):
    status, _, data = request(port, "POST", "/v1/chat/completions", {
        "messages": HELLO, "temperature": 0, "max_tokens": 5, "logprobs": True, "stream": True})
    events = [json.loads(block[len("data: "):]) for block in data.decode().strip().split("\n\n")[:-1]]
    entries = [entry for event in events if event["choices"][0].get("logprobs")
               for entry in event["choices"][0]["logprobs"]["content"]]
    whole = greedy_text(port, logprobs=True, max_tokens=5)["choices"][0]["logprobs"]["content"]
    assert status == 200 and [e["token"] for e in entries] == [e["token"] for e in whole]
    assert [e["logprob"] for e in entries] == pytest.approx([e["logprob"] for e in whole])


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("frequency_penalty", 0.5),
    ("logit_bias", {"5": 10}), ("response_format", {"type": "json_object"}), ("best_of", 2), ("echo", True),
])
def test_unsupported_fields_are_400_not_ignored(port, field, value):
    status, payload = post_chat(port, {"messages": HELLO, field: value})
    assert_error(status, payload, 400, "unsupported_parameter")
    assert field in payload["error"]["message"]
    assert greedy_text(port, frequency_penalty=0, user="someone", max_tokens=1)["choices"]


def test_concurrent_requests_are_generated_in_one_batch(loaded):
    """Requests arriving together share engine calls, and each still gets its own reply and length."""
    model, tokenizer = loaded
    prompts = [[{"role": "user", "content": f"Tell me of {name}"}] for name in ("Rome", "the king", "a ghost", "love")]
    server = make_server(model, tokenizer, MODEL_NAME, batch_window_s=0.2)
    with running(server) as port:
        alone = [post_chat(port, {"messages": p, "temperature": 0, "max_tokens": 4 + i})[1] for i, p in enumerate(prompts)]
        server.scheduler.batch_sizes.clear()
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda i: post_chat(port, {"messages": prompts[i], "temperature": 0,
                                                                 "max_tokens": 4 + i})[1], range(4)))
        assert max(server.scheduler.batch_sizes) > 1, server.scheduler.batch_sizes
    for solo, batched, length in zip(alone, together, range(4, 8)):
        assert batched["usage"]["completion_tokens"] == length
        assert batched["choices"][0]["message"]["content"] == solo["choices"][0]["message"]["content"]


# ---------------------------------------------------------------------------------------------
# One request never reaches another's response: bad settings, a failing row, a large request


def test_a_tiny_temperature_is_greedy_and_fails_no_neighbour(loaded):
    """temperature 1e-300 drew a token past the vocabulary: a 500 for it and for 11 of 24 batched with it."""
    model, tokenizer = loaded
    server = make_server(model, tokenizer, MODEL_NAME, batch_window_s=0.3)
    with running(server) as port:
        greedy = greedy_text(port, max_tokens=8)["choices"][0]["message"]["content"]
        bodies = [{"messages": HELLO, "max_tokens": 8, "temperature": tiny} for tiny in (1e-300, 5e-324)]
        bodies += [{"messages": HELLO, "max_tokens": 8, "temperature": 1.0, "seed": seed} for seed in range(8)]
        with ThreadPoolExecutor(len(bodies)) as pool:
            results = list(pool.map(lambda body: post_chat(port, body), bodies))
        alone = [post_chat(port, body)[1] for body in bodies[2:]]
        assert max(server.scheduler.batch_sizes) > 2, server.scheduler.batch_sizes
    assert [status for status, _ in results] == [200] * len(bodies), results
    assert [completion["choices"][0]["message"]["content"] for _, completion in results[:2]] == [greedy, greedy]
    assert [completion["choices"] for _, completion in results[2:]] == [completion["choices"] for completion in alone]


class LoggedQueue(queue.Queue):
    """A job's event queue that also appends (name, event) to a shared log, in the order events come."""

    def __init__(self, log: list, name: str):
        super().__init__()
        self.log, self.name = log, name

    def put(self, item, block=True, timeout=None):
        self.log.append((self.name, item))
        super().put(item, block, timeout)


def job_text(job: Job) -> list[str]:
    """Each choice's whole text, after the job has finished."""
    texts = [""] * job.n
    for delta in job:
        texts[delta.choice] += delta.text
    return texts


def poisoned(sampling: Sampling) -> Sampling:
    """Settings no request can send any more (a NaN temperature), as a stand-in for any settings that break a step."""
    object.__setattr__(sampling, "temperature", float("nan"))
    return sampling


@contextmanager
def held_at_forward(model, number: int):
    """Hold the batcher inside its `number`th forward pass until the returned event is set."""
    calls, reached, release = [0], threading.Event(), threading.Event()

    def hold(module, args, kwargs):
        calls[0] += 1
        if calls[0] == number:
            reached.set()
            assert release.wait(60)

    handle = model.register_forward_pre_hook(hold, with_kwargs=True)
    try:
        yield reached, release
    finally:
        release.set()
        handle.remove()


@pytest.mark.parametrize("bad", ["settings", "prompt"])
def test_a_request_that_breaks_generation_fails_alone(loaded, bad):
    """A failing engine call answered every request in it with the failure; now only the one that causes it."""
    model, tokenizer = loaded
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": f"Tell me of {name}"}], None)
               for name in ("Rome", "the king", "a ghost", "love")]
    settings = [Sampling(0), Sampling(1.0), Sampling(0.7, top_p=0.9), Sampling(0, top_k=3)]
    alone_scheduler = BatchScheduler(model, tokenizer)
    try:
        alone = [job_text(alone_scheduler.submit(Job(prompt, 6, sampling, n=2, seed=9)))
                 for prompt, sampling in zip(prompts, settings)]
    finally:
        alone_scheduler.close()
    scheduler = BatchScheduler(model, tokenizer, window_s=0.5)
    try:
        jobs = [Job(prompt, 6, sampling, n=2, seed=9) for prompt, sampling in zip(prompts, settings)]
        if bad == "settings":
            culprit = Job(prompts[0], 6, poisoned(Sampling(1.0)))
        else:  # a token id past the vocabulary: the embedding raises IndexError for the whole batch
            culprit = Job(prompts[0] + [len(tokenizer) + 5], 6, Sampling(0))
        for job in jobs[:2] + [culprit] + jobs[2:]:
            scheduler.submit(job)
        with pytest.raises(Exception):
            job_text(culprit)
        assert [job_text(job) for job in jobs] == alone
        assert scheduler.batch_sizes[0] == 9  # they did share a call
    finally:
        scheduler.close()


def test_a_request_that_breaks_a_running_batch_costs_the_others_nothing(loaded):
    """A bad request joining a running batch: the others resume where they were, nothing sent twice."""
    model, tokenizer = loaded
    prompt = prompt_ids(tokenizer, HELLO, None)
    scheduler = BatchScheduler(model, tokenizer, window_s=0.0)
    try:
        expected = job_text(scheduler.submit(Job(prompt, 24, Sampling(1.0), n=3, seed=4)))
        with held_at_forward(model, 6) as (reached, release):
            running_job = scheduler.submit(Job(prompt, 24, Sampling(1.0), n=3, seed=4))
            assert reached.wait(60)
            culprit = scheduler.submit(Job(prompt + [len(tokenizer) + 5], 4, Sampling(0)))
            release.set()
            with pytest.raises(Exception):
                job_text(culprit)
            assert job_text(running_job) == expected
        assert scheduler.batch_sizes[-3:] == [4, 3, 1]  # joined, failed together, then each alone
    finally:
        scheduler.close()


def test_a_small_request_is_not_stuck_behind_a_large_one(loaded):
    """A 1-token request waited 4.3 s behind a 16-choice one: a running batch took no one until it ended."""
    model, tokenizer = loaded
    prompt = prompt_ids(tokenizer, HELLO, None)
    log: list = []
    scheduler = BatchScheduler(model, tokenizer, window_s=0.0)
    try:
        small_alone = job_text(scheduler.submit(Job(prompt, 3, Sampling(0))))
        with held_at_forward(model, 3) as (reached, release):
            large = scheduler.submit(Job(prompt, 48, Sampling(0), n=16, events=LoggedQueue(log, "large")))
            assert reached.wait(60)  # the large request is generating
            small = scheduler.submit(Job(prompt, 3, Sampling(0), events=LoggedQueue(log, "small")))
            release.set()
            assert job_text(small) == small_alone
            large_texts = job_text(large)
    finally:
        scheduler.close()
    finishes = [name for name, event in log if event.finish_reason is not None]
    assert finishes[0] == "small" and finishes.count("large") == 16
    # It joined within a few steps: by its end the large request had sent at most a dozen tokens per choice.
    small_end = next(at for at, (name, event) in enumerate(log) if name == "small" and event.finish_reason is not None)
    large_deltas_before = sum(1 for name, _ in log[:small_end] if name == "large")
    assert large_deltas_before <= 16 * 12, large_deltas_before
    assert len(set(large_texts)) == 1 and len(large_texts[0]) > len(small_alone[0])


def test_one_request_holds_at_most_its_share_of_a_full_batch(loaded):
    """With the batch full of one request's choices, a newcomer still gets a row at once."""
    model, tokenizer = loaded
    prompt = prompt_ids(tokenizer, HELLO, None)
    log: list = []
    scheduler = BatchScheduler(model, tokenizer, window_s=0.0, max_batch_rows=4)
    try:
        with held_at_forward(model, 3) as (reached, release):
            large = scheduler.submit(Job(prompt, 40, Sampling(1.0), n=4, seed=1, events=LoggedQueue(log, "large")))
            assert reached.wait(60)
            small = scheduler.submit(Job(prompt, 2, Sampling(0), events=LoggedQueue(log, "small")))
            release.set()
            job_text(small)
            job_text(large)
    finally:
        scheduler.close()
    assert max(scheduler.batch_sizes) <= 4
    finishes = [name for name, event in log if event.finish_reason is not None]
    assert finishes[0] == "small", finishes


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_serve_command_stops_on_a_damaged_checkpoint_with_one_message(tiny_run, tmp_path, capsys, damage):
    """A truncated or deleted model.safetensors warned, then crashed in transformers with a traceback."""
    run_dir = damaged_copy(tiny_run, tmp_path, damage)
    assert main(["serve", str(run_dir), "--port", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.strip().splitlines()
    assert line.startswith("chatpipe: ") and "model.safetensors" in line and f"--run-dir {run_dir}" in line


@pytest.mark.parametrize("port_number", ["70000", "-1"])
def test_serve_command_refuses_a_port_out_of_range(tiny_run, capsys, port_number):
    assert main(["serve", str(tiny_run), f"--port={port_number}"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("chatpipe: ") and "--port" in captured.err and "Traceback" not in captured.err
