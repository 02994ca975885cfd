"""Serving benchmark: `python -m minillm.serve` under 1, 4 and 16 concurrent streaming clients, beside the same
prompts through `minillm.generate` in one batch (the ceiling: no HTTP, no joining, every row from step 0).

The server runs as its own process (the real command, on a free port); each client thread sends its requests
one after another to /v1/chat/completions with stream: true and greedy decoding, over plain HTTP (no client
package). Per concurrency: throughput = generated tokens (the usage counts) / wall time from the first request
to the last answer, and time to first token (TTFT: from sending a request to its first text chunk), p50 and
p95 over all requests. The ceiling: the same chat prompts rendered the same way, generated in one batch of
--ceiling-batch rows with the same max_tokens, tokens / wall time. Then the server's log line for each phase.

    python bench/bench_serve.py --model runs/demo/orpo/model
    python bench/bench_serve.py --model DIR --clients 1 4 16 --requests 32 --max-tokens 64
"""
from __future__ import annotations

import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minillm.chat_format import render, resolve_template  # noqa: E402
from minillm.generate import generate  # noqa: E402
from minillm.hf import load_pretrained  # noqa: E402
from minillm.options import parse_options  # noqa: E402
from minillm.tokenizer import load_tokenizer  # noqa: E402

QUESTIONS = [
    "Tõlgi inglise keelde: punane kass", "Translate to Estonian: the red cat", "Kus elab Mari?",
    "Mis värvi on koer?", "Kirjuta lühike lause päikesest.", "What colour has the dog?", "Tere! Kuidas läheb?",
    "Translate to Estonian: three cows", "Kirjelda oma kodu.", "Name two animals.", "Kes on Mari?",
    "Tõlgi eesti keelde: the river is long", "Write one sentence about a town.", "Mis on õun?",
    "Translate to English: väike maja", "Miks on taevas sinine?",
]


@dataclass(kw_only=True)
class BenchOptions:
    model: str  # the model directory to serve
    clients: list[int] = field(default_factory=lambda: [1, 4, 16])  # concurrent streaming clients per phase
    requests: int = 32  # requests per phase, shared among its clients
    max_tokens: int = 64  # reply length asked for (a reply may end earlier, at an end token)
    ceiling_batch: int = 16  # rows of the one-batch minillm.generate ceiling


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def start_server(model: str) -> tuple[subprocess.Popen, str, int]:
    proc = subprocess.Popen([sys.executable, "-m", "minillm.serve", "--model", model, "--port", "0", "--name", "bench"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    for line in proc.stdout:
        found = re.search(r"http://([\d.]+):(\d+)/", line)
        if found:
            return proc, found.group(1), int(found.group(2))
    raise RuntimeError("the server stopped before printing its URL")


def one_request(host: str, port: int, question: str, max_tokens: int) -> tuple[float, int]:
    """(seconds to the first text chunk, tokens generated) of one streamed greedy chat request."""
    body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": question}], "stream": True,
                       "max_tokens": max_tokens, "temperature": 0, "stream_options": {"include_usage": True}})
    connection = http.client.HTTPConnection(host, port, timeout=600)
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    reply = connection.getresponse()
    first, tokens = None, 0
    for line in reply:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        elif first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
            first = time.perf_counter() - start
    connection.close()
    return (first if first is not None else time.perf_counter() - start), tokens


def phase(host: str, port: int, clients: int, requests: int, max_tokens: int) -> dict:
    todo = list(range(requests))
    lock, ttfts, tokens = threading.Lock(), [], []

    def client():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            ttft, n = one_request(host, port, QUESTIONS[i % len(QUESTIONS)], max_tokens)
            with lock:
                ttfts.append(ttft)
                tokens.append(n)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": requests, "tokens": sum(tokens), "seconds": wall,
            "tokens_per_s": sum(tokens) / wall, "ttft_p50_ms": 1000 * percentile(ttfts, 0.5),
            "ttft_p95_ms": 1000 * percentile(ttfts, 0.95)}


def ceiling(model_dir: str, rows: int, max_tokens: int) -> dict:
    model, tok = load_pretrained(model_dir).eval(), load_tokenizer(model_dir)
    template = resolve_template("auto", tok)
    prompts = [render([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], tok, template=template,
                      add_generation_prompt=True)[0] for i in range(rows)]
    stops = sorted({*tok.eos_ids, *tok.control_ids})
    generate(model, prompts[:2], max_new_tokens=4, eos_id=stops)  # warm-up
    start = time.perf_counter()
    out = generate(model, prompts, max_new_tokens=max_tokens, eos_id=stops)
    wall = time.perf_counter() - start
    return {"rows": rows, "tokens": sum(map(len, out)), "seconds": wall, "tokens_per_s": sum(map(len, out)) / wall}


def main(argv=None):
    args = parse_options(BenchOptions, argv, prog="python bench/bench_serve.py", description=__doc__.split("\n\n")[0])
    proc, host, port = start_server(args.model)
    try:
        one_request(host, port, QUESTIONS[0], 4)  # warm-up
        results = [phase(host, port, c, args.requests, args.max_tokens) for c in args.clients]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    top = ceiling(args.model, args.ceiling_batch, args.max_tokens)
    print(f"| clients | requests | tokens | seconds | tokens/s | TTFT p50 ms | TTFT p95 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | "
              f"{r['ttft_p50_ms']:.0f} | {r['ttft_p95_ms']:.0f} |")
    print(f"| generate, one batch of {top['rows']} | {top['rows']} | {top['tokens']} | {top['seconds']:.1f} | "
          f"{top['tokens_per_s']:.0f} | — | — |")
    print(json.dumps({"serve": results, "generate_one_batch": top}))


if __name__ == "__main__":
    main()
