#!/usr/bin/env python3
"""The official `openai` Python client, unchanged, against `m40-llm serve` on the CPU.

Usage: openai_client_test.py M40LLM_BINARY MODEL.gguf
Run by tests/server.rs (`openai_python_client_works`); scripts/test.sh installs the pinned client.
Starts the server on a free port, checks chat and completions (streaming and not), stop, seed, n = 2,
logprobs and usage with short generations, then stops it with SIGTERM and expects exit status 0.
"""
import re
import signal
import subprocess
import sys

import openai

binary, model = sys.argv[1], sys.argv[2]
server = subprocess.Popen(
    [binary, "serve", "--model", model, "--device", "cpu", "--port", "0", "--ctx-size", "512",
     "--parallel", "2", "--api-key", "test-key", "--model-name", "smollm2"],
    stderr=subprocess.PIPE, text=True,
)
try:
    base = None
    for line in server.stderr:
        sys.stderr.write(line)
        m = re.search(r"at (http://\S+)", line)
        if m:
            base = m.group(1)
            break
    assert base, "the server did not say where it listens"
    client = openai.OpenAI(base_url=base + "/v1", api_key="test-key", max_retries=0, timeout=120)

    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2"], models

    c = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=5,
                                  temperature=0)
    assert c.choices[0].text == " Paris.\n\nThe", c
    assert c.choices[0].finish_reason == "length", c
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (5, 5, 10)

    c = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=5,
                                  temperature=0, stop=["."])
    assert c.choices[0].text == " Paris" and c.choices[0].finish_reason == "stop", c

    pieces = [ch.choices[0].text for ch in client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=5, temperature=0,
        stream=True) if ch.choices]
    assert "".join(pieces) == " Paris.\n\nThe", pieces

    messages = [{"role": "user", "content": "Name a fruit."}]
    r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8,
                                       temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and text, r
    assert r.usage.completion_tokens <= 8, r

    chunks = list(client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text, (streamed, text)
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == r.usage.total_tokens

    # n = 2: two choices, forked from one prefill.
    c = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=5,
                                  temperature=0, n=2)
    assert [(ch.index, ch.text) for ch in c.choices] == [(0, " Paris.\n\nThe"), (1, " Paris.\n\nThe")], c
    assert c.usage.completion_tokens == 10, c

    # logprobs, both shapes.
    c = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=5,
                                  temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == " Paris.\n\nThe", lp
    assert len(lp.token_logprobs) == 5 and all(x <= 0 for x in lp.token_logprobs), lp
    r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8,
                                       temperature=0, logprobs=True, top_logprobs=2, user="ci")
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens, r
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token for t in content), r
    assert r.choices[0].message.content == text, r

    # A seeded sampled request repeats itself.
    sampled = [client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=8, temperature=1.0, seed=42,
    ).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1], sampled

    # Errors arrive as the client's exceptions.
    try:
        client.completions.create(model="smollm2", prompt="x", max_tokens=5, temperature="hot")
        raise AssertionError("a bad temperature was accepted")
    except openai.BadRequestError as e:
        assert "temperature" in str(e), e
    bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
    try:
        bad.models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError:
        pass
    print("openai client: all checks passed")
finally:
    server.send_signal(signal.SIGTERM)
    try:
        code = server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        raise
    rest = server.stderr.read()
    sys.stderr.write(rest)
assert code == 0, f"the server exited with {code}"
