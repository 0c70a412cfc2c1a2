#!/usr/bin/env python3
"""Make llama.cpp reference outputs for the default model, for prompts beyond tests/data/smollm2.

Uses llama-cpp-python 0.3.36 (llama.cpp 0c1e57098, the version behind tests/data/smollm2) built on
the CPU with CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DLLAMA_CURL=OFF', and reproduces the
configuration of tests/data/smollm2/greedy.json exactly: n_ctx 2048, n_batch 2048, n_ubatch 512,
2 threads, flash attention off, f16 KV cache, no BOS added, special tokens parsed; the prompt is
evaluated in one llama_decode (logits for the last position only), then 48 greedy tokens one
llama_decode each (argmax, first index on ties; EOG does not stop).

    python3 tools/llama_reference.py MODEL.gguf OUT.json

Writes the same per-prompt fields as greedy.json (prompt_ids, new_ids, step_top5,
top1_top2_margin, ...) plus top20 at the last prompt position (as logits.json).
"""
import ctypes
import json
import sys

import llama_cpp as L
import numpy as np

N_NEW = 48

PROMPTS = [
    ("r1", "raw", "Once upon a time, in a small village by the sea,"),
    ("r2", "raw", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
    ("r3", "raw", "The three primary colors are"),
    ("r4", "raw", "Water boils at a temperature of"),
    ("r5", "raw", "Le chat est sur la table. The cat is on the"),
    ("r6", "raw", "1, 2, 3, 4, 5,"),
    ("c1", "chatml",
     "<|im_start|>system\nYou are a concise assistant.<|im_end|>\n"
     "<|im_start|>user\nName a planet in our solar system.<|im_end|>\n<|im_start|>assistant\n"),
    ("c2", "chatml",
     "<|im_start|>user\nWrite a haiku about the ocean.<|im_end|>\n<|im_start|>assistant\n"),
    ("long", "raw",
     " ".join(["The history of computing is a story of people, machines and ideas."] * 3)
     + " In the beginning there were mechanical calculators. Later came vacuum tubes, transistors"
     " and integrated circuits, and with each step the machines became smaller, faster and"
     " cheaper. Today a phone holds more computing power than the computers that guided the"
     " first missions to the Moon. In this essay we look at"),
]


def main():
    model_path, out_path = sys.argv[1], sys.argv[2]
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(model_path.encode(), mp)
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)

    def new_ctx():
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = 2048, 2048, 512
        cp.n_threads = cp.n_threads_batch = 2
        cp.flash_attn_type = 0
        cp.type_k = cp.type_v = 1
        return L.llama_init_from_model(model, cp)

    def tokenize(text):
        b = text.encode()
        buf = (L.llama_token * (len(b) + 16))()
        n = L.llama_tokenize(vocab, b, len(b), buf, len(buf), False, True)
        assert n >= 0
        return list(buf[:n])

    def piece(tok):
        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(vocab, tok, buf, 64, 0, True)
        return buf.raw[:n].decode("utf-8", errors="replace")

    def decode(ctx, toks, pos0):
        batch = L.llama_batch_init(len(toks), 0, 1)
        batch.n_tokens = len(toks)
        for i, t in enumerate(toks):
            batch.token[i] = t
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(toks) - 1
        assert L.llama_decode(ctx, batch) == 0
        L.llama_batch_free(batch)
        ptr = L.llama_get_logits_ith(ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()

    def top(logits, k):
        order = np.lexsort((np.arange(len(logits)), -logits))[:k]
        return [[int(i), float(logits[i])] for i in order]

    out = {
        "description": "llama.cpp reference made by tools/llama_reference.py (see its docstring)",
        "llama_cpp_python_version": L.__version__,
        "n_new": N_NEW,
        "prompts": [],
    }
    for pid, kind, prompt in PROMPTS:
        ctx = new_ctx()
        ids = tokenize(prompt)
        logits = decode(ctx, ids, 0)
        entry = {"id": pid, "kind": kind, "prompt": prompt, "prompt_ids": ids,
                 "position": len(ids) - 1, "top20": top(logits, 20)}
        new_ids, step_top5, margins = [], [], []
        pos = len(ids)
        for _ in range(N_NEW):
            t5 = top(logits, 5)
            tok = t5[0][0]
            new_ids.append(tok)
            step_top5.append(t5)
            margins.append(t5[0][1] - t5[1][1])
            logits = decode(ctx, [tok], pos)
            pos += 1
        entry.update({"new_ids": new_ids, "pieces": [piece(t) for t in new_ids],
                      "step_top5": step_top5, "top1_top2_margin": margins})
        out["prompts"].append(entry)
        L.llama_free(ctx)
        print(pid, len(ids), "".join(entry["pieces"])[:80].replace("\n", "\\n"), file=sys.stderr)
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
