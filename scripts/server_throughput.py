#!/usr/bin/env python3
"""Aggregate generated tokens/s of `m40-llm serve` at several numbers of concurrent greedy
requests (continuous batching). Standard library only; bounded (each request is short).

Usage: server_throughput.py M40LLM_BINARY MODEL.gguf [CONCURRENCY ...]   (default: 1 4 16)
Starts `serve --device $DEVICE --parallel MAX --ctx-size 512` (DEVICE: cpu unless set) on a
free port, warms up, then for each concurrency C sends C requests at once (`max_tokens` 48, temperature 0, different prompts) and
prints: C, requests, generated tokens, seconds, tokens/s. Numbers go to docs/perf.md.
"""
import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import os
import time

binary, model = sys.argv[1], sys.argv[2]
levels = [int(x) for x in sys.argv[3:]] or [1, 4, 16]
MAX_TOKENS = 48
PROMPTS = ["Once upon a time", "The capital of France is", "Here is a list of fruits:",
           "In the beginning", "My favourite animal is", "The weather today"]

server = subprocess.Popen(
    [binary, "serve", "--model", model, "--device", os.environ.get("DEVICE", "cpu"), "--port", "0", "--ctx-size", "512",
     "--parallel", str(max(levels))], stderr=subprocess.PIPE, text=True)
try:
    host = port = None
    for line in server.stderr:
        m = re.search(r"at http://([\d.]+):(\d+)", line)
        if m:
            host, port = m.group(1), int(m.group(2))
            break
    assert port, "the server did not start"

    def complete(i, out):
        c = http.client.HTTPConnection(host, port, timeout=600)
        body = {"prompt": PROMPTS[i % len(PROMPTS)] + f" ({i})", "max_tokens": MAX_TOKENS,
                "temperature": 0, "cache_prompt": False}
        c.request("POST", "/v1/completions", json.dumps(body),
                  {"Content-Type": "application/json"})
        r = c.getresponse()
        v = json.loads(r.read())
        assert r.status == 200, v
        out[i] = v["usage"]["completion_tokens"]

    complete(0, {})  # warm-up
    print("concurrency requests tokens seconds tokens_per_s")
    for n in levels:
        out = {}
        threads = [threading.Thread(target=complete, args=(i, out)) for i in range(n)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        dt = time.perf_counter() - t
        tokens = sum(out.values())
        assert len(out) == n, out
        print(f"{n} {n} {tokens} {dt:.2f} {tokens / dt:.1f}", flush=True)
finally:
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=60)
