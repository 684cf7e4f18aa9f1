"""Aggregate tokens/s of `chatpipe serve` for 1 and 16 concurrent clients, with and without batching.

    python bench/serve_concurrency.py [--hidden 32 --layers 2] [--tokens 32] [--requests 32]

A random Llama sized to a BPE tokenizer trained on the Shakespeare sample is served in this
process (the server's threads) and called over real HTTP by client threads. "Unbatched" is the
same server with max_batch_rows=1, i.e. one request per engine call as before the scheduler.
Each client asks for `--tokens` tokens at temperature 1 (a random model rarely ends its turn).
Prints one JSON line per setting: aggregate completion tokens/s and mean request latency.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SHAKESPEARE  # noqa: E402


def build(hidden: int, layers: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from stages.tokenizer.bpe import train_bpe

    tokenizer = train_bpe([[SHAKESPEARE.read_text()[:200_000]]], vocab_size=400)
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


def call(port: int, tokens: int, index: int) -> tuple[float, int]:
    body = {"messages": [{"role": "user", "content": f"Speak, friend number {index}, of the king."}],
            "max_tokens": tokens, "temperature": 1.0}
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    completion = json.loads(response.read())
    connection.close()
    assert response.status == 200, completion
    return time.perf_counter() - started, completion["usage"]["completion_tokens"]


def measure(port: int, clients: int, requests: int, tokens: int) -> dict:
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: call(port, tokens, i), range(requests)))
    elapsed = time.perf_counter() - started
    return {"tokens_per_s": round(sum(n for _, n in results) / elapsed, 1),
            "mean_latency_s": round(statistics.mean(t for t, _ in results), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=32)
    args = parser.parse_args()

    from pipeline.apps.serve import make_server

    model, tokenizer = build(args.hidden, args.layers)
    for label, rows in (("batched", 32), ("unbatched", 1)):
        server = make_server(model, tokenizer, "bench", max_batch_rows=rows)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        port = server.server_address[1]
        try:
            call(port, 4, 0)  # warm up
            for clients in (1, 16):
                requests = args.requests if clients > 1 else max(4, args.requests // 4)
                result = measure(port, clients, requests, args.tokens)
                print(json.dumps({"server": label, "hidden": args.hidden, "layers": args.layers, "clients": clients,
                                  "requests": requests, "max_tokens": args.tokens, **result}), flush=True)
        finally:
            server.shutdown()
            server.server_close()


if __name__ == "__main__":
    main()
