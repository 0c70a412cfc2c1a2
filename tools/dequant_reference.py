#!/usr/bin/env python3
"""Reference vectors for m40-llm's dequantization and quantization (tests/dequant.rs).

The reference is independent of our Rust code: the `gguf` Python package (llama.cpp's gguf-py),
whose `gguf.quants.dequantize` / `gguf.quants.quantize` are numpy ports of ggml's C reference.

It writes tests/data/dequant/:
  manifest.json   what every file is, the generator's versions, the model's sha256, and
                  gguf.constants.GGML_QUANT_SIZES (to cross-check our type table);
  model/*.f32     some rows of real tensors of the default model, dequantized (f32, LE);
  *.in / *.f32    random and edge-case blocks for every type we dequantize: the input bytes
                  and the expected f32 output (LE);
  *.x / *.q       random and edge-case f32 inputs (.x) and the expected quantized bytes (.q):
                  from gguf-py's quantizers, and for the k-quants (which gguf-py cannot make)
                  from ggml's own C reference, built from llama.cpp's sources with
                  tools/ggml_kquant_oracle.c.
For every tensor of the default model the manifest also holds the sha256 of its whole f32 and
f16 dequantization, so the tests check all 135M weights without committing them.

Usage (from the repository root; the model comes from `m40-llm fetch` or scripts/test.sh; GGML
is the ggml/ folder of llama.cpp's sources, e.g. vendor/llama.cpp/ggml in the llama_cpp_python
sdist; gcc builds the oracle):
  python3 -m venv .cache/venv && .cache/venv/bin/pip install 'gguf==0.19.0' numpy
  .cache/venv/bin/python tools/dequant_reference.py --ggml-src GGML [--model PATH] [--out DIR]
The output is deterministic (fixed seed): regenerating with the same versions changes nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES

SEED = 20240611
DEFAULT_MODEL = "models/SmolLM2-135M-Instruct.Q4_1.gguf"

# Types m40-llm dequantizes, and where each block keeps its f16 scale fields (byte offsets).
DEQUANT_TYPES: dict[Q, list[int]] = {
    Q.F32: [],
    Q.F16: [],
    Q.BF16: [],
    Q.Q4_0: [0],
    Q.Q4_1: [0, 2],
    Q.Q5_0: [0],
    Q.Q5_1: [0, 2],
    Q.Q8_0: [0],
    Q.Q4_K: [0, 2],
    Q.Q5_K: [0, 2],
    Q.Q6_K: [208],
}
# Types m40-llm quantizes to and gguf-py can quantize (F32 is a plain copy and is left out).
QUANT_TYPES = [Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
# Types whose quantization reference is ggml's C code (tools/ggml_kquant_oracle.c).
KQUANT_TYPES = [Q.Q4_K, Q.Q5_K, Q.Q6_K]

# Rows of real tensors whose values are committed (the digests cover every tensor in full).
MODEL_ROWS = {
    "token_embd.weight": [0, 1, 2, 100, 49151],  # Q8_0
    "blk.0.attn_q.weight": [0, 1, 575],  # Q4_1, rows of 576
    "blk.29.ffn_down.weight": [0, 300, 575],  # Q4_1, rows of 1536
    "blk.0.attn_norm.weight": [0],  # F32
    "output_norm.weight": [0],  # F32
}

F16_MAX = 0x7BFF
F16_NEG_MAX = 0xFBFF
F16_INF = 0x7C00
F16_MIN_SUBNORMAL = 0x0001
F16_NEG_ZERO = 0x8000


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def f32_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<f4").tobytes()


def f16_bytes(a: np.ndarray) -> bytes:
    with np.errstate(all="ignore"):
        return np.ascontiguousarray(a.astype("<f2")).tobytes()


def dequantize(raw: np.ndarray, ty: Q) -> np.ndarray:
    """gguf-py's dequantization of uint8 rows of `ty` to float32."""
    with np.errstate(all="ignore"):
        out = gguf.quants.dequantize(np.ascontiguousarray(raw, dtype=np.uint8), ty)
    return np.asarray(out, dtype=np.float32)


def finite_f16_bits(rng: np.random.Generator, n: int) -> np.ndarray:
    """Uniformly random finite f16 bit patterns (zeros, subnormals, normals up to ±65504)."""
    bits = rng.integers(0, 0x10000, size=n, dtype=np.uint32)
    inf_or_nan = (bits & 0x7C00) == 0x7C00
    bits = np.where(inf_or_nan, bits & ~np.uint32(0x4000), bits)  # exponent 31 -> 15
    return bits.astype(np.uint16)


def put_f16(blocks: np.ndarray, offset: int, bits) -> None:
    v = np.asarray(bits, dtype=np.uint16)
    blocks[:, offset] = (v & 0xFF).astype(np.uint8)
    blocks[:, offset + 1] = (v >> 8).astype(np.uint8)


def random_blocks(rng: np.random.Generator, ty: Q, n: int) -> np.ndarray:
    _, type_size = GGML_QUANT_SIZES[ty]
    if ty == Q.F16:
        return finite_f16_bits(rng, n).astype("<u2").view(np.uint8).reshape(n, 2)
    if ty == Q.BF16:
        # Finite bf16: a random f32 exponent below 255 and random mantissa bits.
        bits = rng.integers(0, 0x10000, size=n, dtype=np.uint32)
        bits = np.where((bits & 0x7F80) == 0x7F80, bits & ~np.uint32(0x4000), bits)
        return bits.astype("<u2").view(np.uint8).reshape(n, 2)
    if ty == Q.F32:
        x = rng.standard_normal(n).astype(np.float32) * np.float32(10.0) ** rng.integers(-8, 8, n)
        return x.astype("<f4").view(np.uint8).reshape(n, 4)
    blocks = rng.integers(0, 256, size=(n, type_size), dtype=np.uint8)
    for off in DEQUANT_TYPES[ty]:
        put_f16(blocks, off, finite_f16_bits(rng, n))
    return blocks


def edge_blocks(rng: np.random.Generator, ty: Q) -> np.ndarray:
    """Hand-picked blocks: zeros, extreme quants and scales, subnormal, negative zero and
    infinite scales (their NaN outputs are compared as NaN, not bit for bit)."""
    _, type_size = GGML_QUANT_SIZES[ty]
    if ty == Q.F16:
        bits = [0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x3C00, 0xBC00, 0x3555,
                F16_MAX, F16_NEG_MAX, F16_INF, 0xFC00, 0x7E00, 0xFE00, 0x7FFF]
        return np.array(bits, dtype="<u2").view(np.uint8).reshape(-1, 2)
    if ty == Q.BF16:
        bits = [0x0000, 0x8000, 0x0001, 0x007F, 0x0080, 0x3F80, 0xBF80, 0x7F7F, 0xFF7F,
                0x7F80, 0xFF80, 0x7FC0, 0xFFC0, 0x7F81, 0x7FFF]
        return np.array(bits, dtype="<u2").view(np.uint8).reshape(-1, 2)
    if ty == Q.F32:
        bits = [0x00000000, 0x80000000, 0x00000001, 0x007FFFFF, 0x7F7FFFFF, 0xFF7FFFFF,
                0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x3F800000]
        return np.array(bits, dtype="<u4").view(np.uint8).reshape(-1, 4)

    offs = DEQUANT_TYPES[ty]
    scale_bytes = set()
    for off in offs:
        scale_bytes |= {off, off + 1}
    quant_cols = [i for i in range(type_size) if i not in scale_bytes]
    cases = []

    def block(fill, scales):
        b = np.full((1, type_size), fill, dtype=np.uint8) if np.isscalar(fill) else fill.copy()
        for off, s in zip(offs, scales):
            put_f16(b, off, [s])
        return b

    rnd = lambda: rng.integers(0, 256, size=(1, type_size), dtype=np.uint8)  # noqa: E731
    second = [F16_NEG_MAX] if len(offs) == 2 else []
    cases.append(np.zeros((1, type_size), dtype=np.uint8))  # all zero
    cases.append(block(0xFF, [F16_MAX] + second))  # max quants, max scale, min offset
    cases.append(block(0x00, [F16_NEG_MAX] + [F16_MAX] * len(second)))  # min quants
    cases.append(block(rnd(), [F16_MIN_SUBNORMAL] * len(offs)))  # subnormal scales
    cases.append(block(rnd(), [F16_NEG_ZERO] * len(offs)))  # negative zero scales
    cases.append(block(rnd(), [F16_INF] + [0x3C00] * len(second)))  # infinite scale
    if ty == Q.Q8_0:
        cases.append(block(0x80, [F16_MAX]))  # i8 -128 everywhere
        cases.append(block(0x7F, [F16_NEG_MAX]))
    if ty == Q.Q6_K:
        b = block(0xFF, [F16_MAX])
        b[0, 192:208] = 0x80  # scales -128
        cases.append(b)
        b = block(0x00, [F16_MAX])
        b[0, 192:208] = 0x7F  # scales 127, quants -32
        cases.append(b)
    # The quant bytes only, in both extremes, with ordinary scales.
    for fill in (0x00, 0xFF):
        b = rnd()
        b[0, quant_cols] = fill
        cases.append(block(b, [0x3C00] * len(offs)))
    return np.concatenate(cases, axis=0)


def quant_inputs(rng: np.random.Generator, ty: Q, random: bool) -> np.ndarray:
    """f32 rows to quantize: random blocks of varied magnitude, or edge cases."""
    block = GGML_QUANT_SIZES[ty][0]
    width = max(block, 32)
    if random:
        n_blocks = 24 if width <= 32 else 8
        scale = np.float32(10.0) ** rng.uniform(-3, 3, size=(n_blocks, 1)).astype(np.float32)
        x = rng.standard_normal((n_blocks, width)).astype(np.float32) * scale
        # Some blocks lopsided (all positive or with one outlier), as real weights can be.
        x[::5] = np.abs(x[::5])
        x[1::7, 3] *= 50
        return x.astype(np.float32)
    rows = []
    rows.append(np.zeros(width, np.float32))
    rows.append(np.full(width, 1.5, np.float32))  # constant: zero range for the _1 formats
    r = np.arange(width, dtype=np.float32) - width / 2 + 0.5  # exact ties for many formats
    rows.append(r)
    q8 = np.arange(width, dtype=np.float32) - np.float32(15.5)
    q8[0] = 127.0
    rows.append(q8)  # Q8_0 scale 1: every other value a tie, rounded away from zero
    rows.append(np.where(np.arange(width) == 5, 4.0, np.where(np.arange(width) == 9, -4.0, 0.1))
                .astype(np.float32))  # equal-magnitude extremes: the first wins
    rows.append(np.linspace(-1e6, 1e6, width, dtype=np.float32))  # scale past f16's range
    rows.append(np.linspace(-1e-7, 3e-7, width, dtype=np.float32))  # scale below f16's range
    rows.append(np.linspace(-70000, 70000, width, dtype=np.float32))  # f16 overflow
    rows.append(np.float32(2.0) ** -np.arange(width, dtype=np.float32))  # f16 subnormals
    x = np.stack(rows).astype(np.float32)
    if ty == Q.BF16:
        # BF16 keeps NaNs (made quiet) and rounds ties to even; give it some of each.
        bits = np.array([0x7FA00001, 0xFFC01234, 0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x00008000],
                        dtype=np.uint32)
        x[0, : bits.size] = bits.view(np.float32)
    return x


def quantize(x: np.ndarray, ty: Q) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.asarray(gguf.quants.quantize(x, ty)).view(np.uint8)


def build_oracle(ggml: Path, workdir: Path) -> Path:
    """Builds tools/ggml_kquant_oracle.c against ggml's sources, without FMA contraction."""
    exe = workdir / "ggml_kquant_oracle"
    src = Path(__file__).with_name("ggml_kquant_oracle.c")
    subprocess.run(
        ["gcc", "-O2", "-std=gnu11", "-DNDEBUG", "-mno-fma", "-ffp-contract=off",
         f"-I{ggml / 'include'}", f"-I{ggml / 'src'}", str(src), str(ggml / "src" / "ggml-quants.c"),
         "-lm", "-o", str(exe)],
        check=True,
    )
    return exe


def oracle_quantize(exe: Path, x: np.ndarray, ty: Q) -> np.ndarray:
    data = np.ascontiguousarray(x, dtype="<f4").tobytes()
    out = subprocess.run([str(exe), ty.name.lower(), str(x.size)], input=data, capture_output=True, check=True)
    return np.frombuffer(out.stdout, dtype=np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", default="tests/data/dequant")
    ap.add_argument("--ggml-src", required=True, type=Path,
                    help="llama.cpp's ggml/ folder (with include/ and src/ggml-quants.c)")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="dequant-reference-"))
    oracle = build_oracle(args.ggml_src, workdir)

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    (out / "model").mkdir(parents=True)
    rng = np.random.default_rng(SEED)
    manifest: dict = {
        "generator": "tools/dequant_reference.py",
        "gguf_py": importlib.metadata.version("gguf"),
        "numpy": np.__version__,
        "seed": SEED,
        "type_sizes": [
            {"name": t.name, "id": int(t.value), "block_size": bs, "type_size": ts}
            for t, (bs, ts) in sorted(GGML_QUANT_SIZES.items(), key=lambda kv: kv[0].value)
        ],
    }

    # (a) The real default model: every tensor's digest, some rows' values.
    model = Path(args.model)
    reader = gguf.GGUFReader(model)
    model_entry: dict = {"file": model.name, "sha256": sha256(model.read_bytes()), "tensors": [], "rows": []}
    for t in reader.tensors:
        ty = Q(t.tensor_type)
        raw = np.asarray(t.data)
        ne = [int(d) for d in t.shape]
        rows = raw.reshape(-1, raw.shape[-1]) if raw.ndim > 1 else raw.reshape(1, -1)
        values = dequantize(rows.view(np.uint8), ty).reshape(-1, ne[0])
        model_entry["tensors"].append({
            "name": t.name,
            "type": ty.name,
            "ne": ne,
            "f32_sha256": sha256(f32_bytes(values)),
            "f16_sha256": sha256(f16_bytes(values)),
        })
        if t.name in MODEL_ROWS:
            picked = MODEL_ROWS[t.name]
            path = f"model/{t.name}.rows.f32"
            (out / path).write_bytes(f32_bytes(values[picked]))
            model_entry["rows"].append({"tensor": t.name, "type": ty.name, "rows": picked, "expected_f32": path})
    manifest["model"] = model_entry

    # (b) Random and edge-case blocks of every type we dequantize.
    manifest["dequantize"] = []
    for ty in DEQUANT_TYPES:
        block_size, _ = GGML_QUANT_SIZES[ty]
        for case, blocks in (("random", random_blocks(rng, ty, 16 if block_size > 1 else 512)),
                             ("edge", edge_blocks(rng, ty))):
            name = f"{ty.name.lower()}.{case}"
            expected = dequantize(blocks.reshape(1, -1), ty).reshape(-1)
            (out / f"{name}.in").write_bytes(blocks.tobytes())
            (out / f"{name}.f32").write_bytes(f32_bytes(expected))
            manifest["dequantize"].append({
                "type": ty.name, "case": case, "n_elements": int(expected.size),
                "input": f"{name}.in", "expected_f32": f"{name}.f32",
            })

    # (c) Quantization of random and edge-case f32 rows.
    manifest["quantize"] = []
    for ty in QUANT_TYPES:
        for case in ("random", "edge"):
            x = quant_inputs(rng, ty, case == "random")
            q = quantize(x, ty)
            name = f"{ty.name.lower()}.{case}"
            (out / f"{name}.x").write_bytes(f32_bytes(x))
            (out / f"{name}.q").write_bytes(q.tobytes())
            manifest["quantize"].append({
                "type": ty.name, "case": case, "n_elements": int(x.size),
                "input_f32": f"{name}.x", "expected": f"{name}.q", "reference": "gguf-py",
            })
    for ty in KQUANT_TYPES:
        for case in ("random", "edge"):
            x = quant_inputs(rng, ty, case == "random")
            q = oracle_quantize(oracle, x, ty)
            name = f"{ty.name.lower()}.{case}"
            (out / f"{name}.x").write_bytes(f32_bytes(x))
            (out / f"{name}.q").write_bytes(q.tobytes())
            manifest["quantize"].append({
                "type": ty.name, "case": case, "n_elements": int(x.size),
                "input_f32": f"{name}.x", "expected": f"{name}.q", "reference": "ggml C",
            })
    shutil.rmtree(workdir)

    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total} bytes)")


if __name__ == "__main__":
    main()
