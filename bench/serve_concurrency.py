"""Aggregate tokens/s of `chatpipe serve` for 1 and 16 concurrent clients, with and without batching.

    python bench/serve_concurrency.py [--hidden 32 --layers 2] [--tokens 32] [--requests 32] [--rounds 3]

A random Llama sized to a BPE tokenizer trained on the Shakespeare sample is served in this
process (the server's threads) and called over real HTTP by client threads. "Unbatched" is the
same server with max_batch_rows=1, i.e. one request per engine call as before the scheduler.
Each client asks for `--tokens` tokens at temperature 1 (a random model rarely ends its turn).
Prints one JSON line per setting and round (aggregate completion tokens/s, mean request latency),
then the ratios measured within each round: what 16 clients get against one client, what batching
gives 16 clients, and what it costs a single client (the scheduler's collection window).
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
    parser.add_argument("--rounds", type=int, default=3, help="Settings alternate within each round; ratios are per round.")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the model (default: torch's).")
    args = parser.parse_args()

    import torch

    from pipeline.apps.serve import make_server

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = build(args.hidden, args.layers)
    servers = {}
    for label, rows in (("batched", 32), ("unbatched", 1)):
        server = make_server(model, tokenizer, "bench", max_batch_rows=rows)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[label] = server
        call(server.server_address[1], 4, 0)  # warm up
    ratios = {"batched 16 / batched 1": [], "batched 16 / unbatched 16": [], "batched 1 / unbatched 1": []}
    try:
        for round_index in range(args.rounds):
            rates = {}
            for clients in (1, 16):
                for label, server in servers.items():
                    requests = args.requests if clients > 1 else max(4, args.requests // 4)
                    result = measure(server.server_address[1], clients, requests, args.tokens)
                    rates[label, clients] = result["tokens_per_s"]
                    print(json.dumps({"round": round_index, "server": label, "hidden": args.hidden, "layers": args.layers,
                                      "threads": torch.get_num_threads(), "clients": clients, "requests": requests,
                                      "max_tokens": args.tokens, **result}), flush=True)
            ratios["batched 16 / batched 1"].append(rates["batched", 16] / rates["batched", 1])
            ratios["batched 16 / unbatched 16"].append(rates["batched", 16] / rates["unbatched", 16])
            ratios["batched 1 / unbatched 1"].append(rates["batched", 1] / rates["unbatched", 1])
    finally:
        for server in servers.values():
            server.shutdown()
            server.server_close()
    for name, values in ratios.items():
        print(f"{name:>26}: median {statistics.median(values):.2f}x  (per round: {', '.join(f'{v:.2f}x' for v in values)})")


if __name__ == "__main__":
    main()
