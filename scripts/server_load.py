#!/usr/bin/env python3
"""The server under a sustained load (issue 11's longer run): C streaming clients with mixed
prompt lengths for S seconds, then checks. Standard library only; bounded in time.

Usage: server_load.py M40LLM_BINARY MODEL.gguf [CLIENTS [SECONDS]]   (default: 32 60)
Environment: DEVICE (cpu unless set), DISCONNECT (fraction of streams dropped after their first
event, default 0.1).

Starts `serve --device $DEVICE --parallel CLIENTS --queue CLIENTS --ctx-size 1024` on a free
port. Each client loops until the time is up: a `/v1/chat/completions` stream (`stream_options:
{include_usage: true}`) with a prompt of 1 to 400 words and `max_tokens` 8 to 96; some streams
are dropped after their first event on purpose. Every stream that is not dropped must be
well-formed SSE: `data:` lines that parse as JSON chunks, one usage chunk, `data: [DONE]` last.
At the end /metrics must show no page held but the prompt cache's (none leaked by the drops).
A clean 503 `queue_full` is counted as refused and the client backs off 0.25 s before its next
request. Prints requests, refusals, failures, generated tokens, aggregate tokens/s and client-side
time to first event; exits 1 on any malformed or lost stream, any other error, or a leak.
"""
import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

binary, model = sys.argv[1], sys.argv[2]
clients = int(sys.argv[3]) if len(sys.argv) > 3 else 32
seconds = float(sys.argv[4]) if len(sys.argv) > 4 else 60.0
disconnect = float(os.environ.get("DISCONNECT", "0.1"))
WORDS = ("the ocean ships history sailed wind harbour lighthouse storm map star compass tide "
         "island rope anchor deck captain crew night morning").split()

server = subprocess.Popen(
    [binary, "serve", "--model", model, "--device", os.environ.get("DEVICE", "cpu"), "--port",
     "0", "--ctx-size", "1024", "--parallel", str(clients), "--queue", str(clients)],
    stderr=subprocess.PIPE, text=True)
lock = threading.Lock()
stats = {"ok": 0, "dropped": 0, "refused": 0, "failed": 0, "tokens": 0, "ttft": [],
         "errors": []}


def metrics(host, port):
    c = http.client.HTTPConnection(host, port, timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^m40llm_(\w+) ([0-9.e+-]+)$", text, re.M)}


def one(host, port, rng):
    words = rng.randint(1, 400)
    prompt = " ".join(rng.choice(WORDS) for _ in range(words))
    body = {"messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": rng.randint(8, 96), "temperature": 0.7, "seed": rng.randint(0, 1 << 30),
            "stream_options": {"include_usage": True}}
    drop = rng.random() < disconnect
    c = http.client.HTTPConnection(host, port, timeout=120)
    t0 = time.perf_counter()
    c.request("POST", "/v1/chat/completions", json.dumps(body),
              {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status == 503:
        body = json.loads(r.read())
        if body.get("error", {}).get("code") != "queue_full":
            raise RuntimeError(f"an unexpected 503: {body}")
        return "refused", 0, None
    if r.status != 200:
        raise RuntimeError(f"status {r.status}: {r.read()[:200]!r}")
    first, usage, done, events = None, None, False, 0
    for raw in r:
        line = raw.decode().rstrip("\r\n")
        if not line or line.startswith(":"):
            continue  # event separators and SSE comments (keep-alives)
        if not line.startswith("data: "):
            raise RuntimeError(f"not an SSE data line: {line[:80]!r}")
        if done:
            raise RuntimeError("an event after [DONE]")
        data = line[len("data: "):]
        if first is None:
            first = time.perf_counter() - t0
        if drop:
            c.close()
            return "dropped", 0, first
        if data == "[DONE]":
            done = True
            continue
        chunk = json.loads(data)
        events += 1
        if chunk.get("usage"):
            usage = chunk["usage"]
    if not done or usage is None:
        raise RuntimeError(f"stream ended without {'[DONE]' if not done else 'usage'}")
    return "ok", usage["completion_tokens"], first


try:
    host = port = None
    for line in server.stderr:
        m = re.search(r"at http://([\d.]+):(\d+)", line)
        if m:
            host, port = m.group(1), int(m.group(2))
            break
    assert port, "the server did not start"
    threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
    # Wait until the model is loaded (/health 200).
    for _ in range(600):
        try:
            c = http.client.HTTPConnection(host, port, timeout=5)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                break
        except OSError:
            pass
        time.sleep(0.1)
    deadline = time.perf_counter() + seconds

    def client(i):
        rng = random.Random(i)
        while time.perf_counter() < deadline:
            try:
                kind, tokens, ttft = one(host, port, rng)
                if kind == "refused":
                    time.sleep(0.25)  # a clean 503: back off, as the openai client does
                with lock:
                    stats[kind] += 1
                    stats["tokens"] += tokens
                    if ttft is not None:
                        stats["ttft"].append(ttft)
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                with lock:
                    stats["failed"] += 1
                    stats["errors"].append(str(e)[:200])

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    time.sleep(1.0)  # dropped streams are freed at the next step
    m = metrics(host, port)
    leaked = m.get("kv_pages_used", 0) - m.get("kv_pages_cached", 0)
    ttft = sorted(stats["ttft"])
    pct = lambda q: ttft[min(len(ttft) - 1, int(q * len(ttft)))] if ttft else float("nan")
    for e in stats["errors"][:5]:
        print("error:", e)
    print(f"clients {clients}, {wall:.1f} s: {stats['ok']} streams complete, "
          f"{stats['dropped']} dropped on purpose, {stats['refused']} refused (503 queue_full), "
          f"{stats['failed']} failed; "
          f"{stats['tokens']} tokens generated, {stats['tokens'] / wall:.1f} tokens/s; "
          f"time to first event p50 {pct(0.5):.3f} s, p95 {pct(0.95):.3f} s; "
          f"KV pages used {m.get('kv_pages_used', 0):.0f} (prompt cache "
          f"{m.get('kv_pages_cached', 0):.0f})")
    bad = stats["failed"] > 0 or leaked != 0 or stats["ok"] == 0
    sys.exit(1 if bad else 0)
finally:
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
