#!/usr/bin/env python3
"""llama.cpp's perplexity of the default model over a text, as a reference for `m40-llm perplexity`.

Uses llama-cpp-python 0.3.36 (the llama.cpp of tests/data/smollm2, CPU build, f16 KV cache, flash
attention off) and reproduces llama-perplexity's computation (tools/perplexity/perplexity.cpp,
`perplexity()`): tokenize the whole text with add_special=True, cut it into windows of CTX tokens,
evaluate each window from an empty cache (first token replaced by BOS if the vocabulary adds
one), score positions CTX/2 .. CTX-2 by -log softmax(logits)[next token], PPL = exp(mean).
llama-perplexity evaluates several windows as parallel sequences of one batch; this script runs
one window per llama_decode, which gives the same numbers up to float reordering.

    python3 tools/llama_perplexity_reference.py MODEL.gguf TEXT CTX [CTX ...] > OUT.json
"""
import json
import math
import sys

import llama_cpp as L
import numpy as np


def main():
    model_path, text_path, ctxs = sys.argv[1], sys.argv[2], [int(c) for c in sys.argv[3:]]
    L.llama_backend_init()
    model = L.llama_model_load_from_file(model_path.encode(), L.llama_model_default_params())
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    add_bos = L.llama_vocab_get_add_bos(vocab)
    text = open(text_path, encoding="utf-8").read().encode()
    buf = (L.llama_token * (len(text) + 16))()
    n = L.llama_tokenize(vocab, text, len(text), buf, len(buf), True, False)
    tokens = list(buf[:n])
    results = []
    for ctx_len in ctxs:
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = ctx_len, ctx_len, min(512, ctx_len)
        cp.n_threads = cp.n_threads_batch = 2
        cp.flash_attn_type = 0
        cp.type_k = cp.type_v = 1
        ctx = L.llama_init_from_model(model, cp)
        first = ctx_len // 2
        nll = nll2 = 0.0
        count = 0
        chunks = []
        for i in range(len(tokens) // ctx_len):
            window = tokens[i * ctx_len:(i + 1) * ctx_len]
            if add_bos:
                window[0] = L.llama_vocab_bos(vocab)
            L.llama_memory_clear(L.llama_get_memory(ctx), True)
            batch = L.llama_batch_init(ctx_len, 0, 1)
            batch.n_tokens = ctx_len
            for k, t in enumerate(window):
                batch.token[k], batch.pos[k], batch.n_seq_id[k] = t, k, 1
                batch.seq_id[k][0] = 0
                batch.logits[k] = k >= first
            assert L.llama_decode(ctx, batch) == 0
            L.llama_batch_free(batch)
            for j in range(first, ctx_len - 1):
                logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, j), shape=(n_vocab,))
                mx = float(logits.max())
                sum_exp = float(np.sum(np.exp(logits.astype(np.float64) - mx)))
                lp = float(logits[tokens[i * ctx_len + j + 1]]) - mx - math.log(sum_exp)
                nll -= lp
                nll2 += lp * lp
                count += 1
            chunks.append(math.exp(nll / count))
        mean = nll / count
        var = nll2 / count - mean * mean
        err = math.sqrt(var / (count - 1)) * math.exp(mean) if var > 0 else 0.0
        results.append({"ctx": ctx_len, "n_tokens": len(tokens), "chunks": chunks,
                        "ppl": math.exp(mean), "ppl_error": err})
        L.llama_free(ctx)
    json.dump({"description": __doc__.strip().splitlines()[0],
               "llama_cpp_python_version": L.__version__, "text": text_path,
               "results": results}, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
