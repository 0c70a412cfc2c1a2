#!/usr/bin/env python3
"""Reference renders of chat templates with Python jinja2, configured as Hugging Face
transformers configures it, for tests/chat_templates.rs to compare m40-llm's minijinja renders
against.

    python3 tools/chat_reference.py \
        --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --templates .cache/templates NAME... > tests/data/chat/expected.json

Each template renders each conversation of tests/data/chat/conversations.json with
add_generation_prompt=True. The default model's template comes from its GGUF (with its own BOS
and EOS texts); llama.cpp's templates (scripts/fetch-testdata.sh) get bos_token "<s>" and
eos_token "</s>". strftime_now sees the fixed date 2024-07-26 (the Rust side pins the same).
Without NAMEs every template of --templates is tried and the ones jinja2 renders are written.

Needs jinja2 (pip install jinja2); HF's settings: see transformers' chat_template_utils.py.
"""
import argparse
import datetime
import json
import pathlib
import struct
import sys

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

DATE = datetime.datetime(2024, 7, 26, 0, 0, 0)


def hf_environment():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return DATE.strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def gguf_metadata(path, wanted):
    """The string values of the keys in `wanted`, and the token texts (for BOS/EOS)."""
    fmt = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    with open(path, "rb") as f:
        def rd(t):
            return struct.unpack("<" + t, f.read(struct.calcsize(t)))[0]

        def rstr():
            return f.read(rd("Q")).decode("utf-8")

        def rval(t):
            if t == 8:
                return rstr()
            if t == 9:
                et, n = rd("I"), rd("Q")
                return [rval(et) for _ in range(n)]
            return rd(fmt[t])

        assert f.read(4) == b"GGUF", f"{path} is not a GGUF file"
        rd("I"), rd("Q")
        out = {}
        for _ in range(rd("Q")):
            key, t = rstr(), rd("I")
            value = rval(t)
            if key in wanted:
                out[key] = value
        return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", help="the default model: its tokenizer.chat_template")
    ap.add_argument("--templates", help="folder of llama.cpp's *.jinja templates")
    ap.add_argument("--conversations", default="tests/data/chat/conversations.json")
    ap.add_argument("names", nargs="*", help="template names (file stems) to include")
    args = ap.parse_args()

    conversations = json.loads(pathlib.Path(args.conversations).read_text(encoding="utf-8"))
    env = hf_environment()
    sources = []
    if args.gguf:
        meta = gguf_metadata(args.gguf, {"tokenizer.chat_template", "tokenizer.ggml.tokens",
                                         "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"})
        tokens = meta["tokenizer.ggml.tokens"]
        sources.append(("default-model", meta["tokenizer.chat_template"],
                        tokens[meta["tokenizer.ggml.bos_token_id"]],
                        tokens[meta["tokenizer.ggml.eos_token_id"]]))
    if args.templates:
        folder = pathlib.Path(args.templates)
        names = args.names or sorted(p.stem for p in folder.glob("*.jinja"))
        for name in names:
            sources.append((name, (folder / f"{name}.jinja").read_text(encoding="utf-8"), "<s>", "</s>"))

    renders = []
    for name, source, bos, eos in sources:
        for conv_name, messages in conversations.items():
            try:
                out = env.from_string(source).render(messages=messages, add_generation_prompt=True,
                                                     bos_token=bos, eos_token=eos)
            except Exception as e:  # a template jinja2 itself cannot render is left out
                if args.names:
                    sys.exit(f"{name} / {conv_name}: jinja2 fails: {e}")
                print(f"skipped {name} / {conv_name}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            renders.append({"template": name, "conversation": conv_name, "bos_token": bos,
                            "eos_token": eos, "output": out})
    json.dump({"generator": "tools/chat_reference.py", "jinja2": jinja2.__version__,
               "date": DATE.strftime("%Y-%m-%d"), "renders": renders},
              sys.stdout, ensure_ascii=False, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
