//! The CUDA kernels on the host, no GPU needed: kernels/*.cu compiled as C++ with kernels/host.h
//! (`-DM40LLM_HOST`). tests/host/units.cpp checks the reference decoders (`T::at`) and the unit
//! kernels' decoders (`U::unit`, their element layout included) against the CPU backend's
//! dequantization of the same quantized rows, for every weight type the CUDA kernels read;
//! tests/host/kernels.cpp runs whole kernels (the unit matvecs, the tiled matmuls, attention)
//! thread by thread (`host_launch`: a fiber a CUDA thread, real barriers and shuffles) against
//! f64 references, the grouped decode attention kernels against the per-head one (and the
//! lane-a-position ones against their G = 1, merging in their last blocks against
//! attention_combine) and the fused
//! rope + q/k/v write against the two kernels it replaces, bit for bit, and the FP16
//! dequantization and activation conversion of the FP16 GEMM bit for bit against `T::at`
//! rounded to the nearest FP16. The GPU
//! tests (tests/gpu_kernels.rs) check the kernels on the device and their speed is the bench's.
//!
//! Needs a C++ compiler (`$CXX`, else `c++`): without one the test skips, saying so, and fails
//! under M40LLM_REQUIRE_TESTDATA=1 (CI installs one).

mod common;

use common::required;
use m40_llm::gguf::GgmlType;
use m40_llm::gguf::quants::{DEQUANTIZE_TYPES, dequantize_row_f32, quantize_row};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `n` rows of `k` random normal-ish values quantized to `ty`, in the harness's file format:
/// u32 n, k, row_bytes; the blocks; the CPU backend's dequantized values as f32.
fn rows_file(ty: GgmlType, n: usize, k: usize, seed: u64) -> Vec<u8> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let vals: Vec<f32> = (0..n * k)
        .map(|_| {
            let u: f32 = r.random_range(-1.0f32..1.0);
            // Heavier tails than uniform: some blocks with large scales, some outliers.
            u * u * u * 3.0 + u
        })
        .collect();
    let bytes = quantize_row(ty, &vals).unwrap();
    let mut deq = vec![0f32; n * k];
    dequantize_row_f32(ty, &bytes, &mut deq).unwrap();
    let mut out = Vec::new();
    for v in [n, k, bytes.len() / n] {
        out.extend_from_slice(&(v as u32).to_le_bytes());
    }
    out.extend_from_slice(&bytes);
    for v in deq {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

#[test]
fn the_kernels_decoders_match_the_cpu_dequantization_on_the_host() {
    let Some((dir, exe)) = build("tests/host/units.cpp", "kernel_host") else {
        return;
    };
    let mut names = Vec::new();
    for (i, ty) in DEQUANTIZE_TYPES.into_iter().enumerate() {
        // Rows of 17 blocks of 32 (so every other row of the 18- and 34-byte types starts
        // 2 bytes off a word) or 3 super-blocks of 256.
        let k = if ty.block_size() == 256 { 768 } else { 544 };
        let name = format!("{ty:?}").to_lowercase();
        std::fs::write(
            dir.join(format!("{name}.bin")),
            rows_file(ty, 4, k, 40 + i as u64),
        )
        .unwrap();
        names.push(name);
    }
    assert!(
        names.iter().any(|n| n == "q4_k") && names.len() >= 11,
        "{names:?}"
    );
    let run = Command::new(&exe).arg(&dir).args(&names).output().unwrap();
    let report = String::from_utf8_lossy(&run.stdout);
    eprintln!("{report}");
    assert!(
        run.status.success(),
        "the host decoders disagree:\n{report}"
    );
    for name in &names {
        assert!(
            report.contains(&format!("{name}: 4 rows")),
            "{name} was not checked"
        );
    }
}

/// Compiles `src` (under tests/host/) into an executable in the test's own scratch directory
/// `dir` (under the target's tmp); `(dir, executable)`, or `None` (skip, saying why) without a
/// C++ compiler unless M40LLM_REQUIRE_TESTDATA=1.
fn build(src: &str, dir: &str) -> Option<(PathBuf, PathBuf)> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("harness");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    let built = Command::new(&cxx)
        .args([
            "-std=c++14",
            "-O1",
            "-DM40LLM_HOST",
            "-Wall",
            "-Wno-unknown-pragmas",
        ])
        // A misaligned dereference (which faults on a GPU) stops the harness.
        .args(["-fsanitize=alignment", "-fno-sanitize-recover=alignment"])
        .args(["-Werror", "-I", "kernels", src, "-o"])
        .arg(&exe)
        .output();
    let built = match built {
        Ok(b) => b,
        Err(e) => {
            assert!(
                !required(),
                "no C++ compiler ({cxx}: {e}); M40LLM_REQUIRE_TESTDATA=1 makes it a failure"
            );
            eprintln!("SKIPPED: no C++ compiler ({cxx}: {e})");
            return None;
        }
    };
    assert!(
        built.status.success(),
        "{src} does not compile with kernels/host.h:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    Some((dir, exe))
}

#[test]
fn whole_kernels_run_thread_by_thread_on_the_host_match_f64_math() {
    let Some((_, exe)) = build("tests/host/kernels.cpp", "kernel_host_kernels") else {
        return;
    };
    let run = Command::new(&exe).output().unwrap();
    let report = String::from_utf8_lossy(&run.stdout);
    eprintln!("{report}");
    assert!(
        run.status.success(),
        "kernels disagree on the host:\n{report}"
    );
    // Every family the harness covers, so that a case silently dropped shows.
    for what in [
        "mmv q4_0 rows 8",
        "gate_up q8_0 rows 4",
        "mmv q6_k c1 rows 1",
        "mmv q6_k rows 8 cols 2 9x1280",
        "gate_up q5_k rows 8",
        "mmv3 q4_k cols 4 of 3 matrix 2",
        "same bits q4_0 K 4096 (r1, r1 c1, r2 row 0; matvec and gate/up): ok",
        "same bits q4_k K 4096 (r1, r1 c1, r2 row 0, r1 c1 at 128 threads, r1 wc, wc2, wc4; \
         matvec and gate/up): ok",
        "same bits q6_k K 5120 (r1, r1 c1, r2 row 0, r1 c1 at 128 threads, r1 wc, wc2, wc4; \
         matvec and gate/up): ok",
        "same bits q5_k K 256 (r1, r1 c1, r2 row 0, r1 c1 at 128 threads, r1 wc, wc2, wc4; \
         matvec and gate/up): ok",
        "same bits q6_k K 3584 (r1, r1 c1, r2 row 0, r1 c1 at 128 threads, r1 wc, wc2, wc4; \
         matvec and gate/up): ok",
        "mmv q5_k wc rows 1 cols 4 9x3584",
        "gate_up q6_k wc rows 1",
        "mmv q6_k wc2 rows 1 cols 2 9x1280",
        "gate_up q4_k wc4 rows 1",
        "mmv3 q6_k wc cols 4 of 2 matrix 1",
        "mmv3 q5_k wc2 cols 2 of 3 matrix 2",
        "mmv3 q4_k wc4 cols 1 of 2 matrix 1",
        "mmv3 q4_1 cols 1 of 2 matrix 1",
        "attention decode H16/1 D256",
        "attn_decode_chunk: ok",
        "attention combine H3 D96 2 tokens 13 splits: bit for bit ok",
        "attention combine H3 D96 2 tokens 131 splits: bit for bit ok",
        "attention decode G8 H16/1 D256 window 0, 2 tokens to 600, 5 splits: bit for bit ok",
        "attention decode G4 H8/2 D128 window 33, 9 tokens to 108, 1 splits: bit for bit ok",
        "attention decode G3 H6/2 D128 window 0, 15 tokens to 300, 3 splits: bit for bit ok",
        "attention decode G1 H2/2 D64 window 33, 15 tokens to 300, 1 splits: bit for bit ok",
        "attention decode G5 H40/2 D32",
        "attention decode G7 H14/2 D128 window 0, 3 tokens to 200, 7 splits: bit for bit ok",
        "attention decode G2 H12/2 D64 window 0, 3 tokens to 200, 4 splits: bit for bit ok",
        "attention decode G6 H12/2 D64 window 0, 3 tokens to 200, 4 splits: bit for bit ok",
        "attention decode G8 H16/2 D64 window 50, 3 tokens to 200, 4 splits: bit for bit ok",
        "attention decode one launch split H8/1 D64 window 0, 2 tokens to 1000, 3 splits: ok",
        "attention decode G4 H4/1 D32 window 0, 1 tokens to 600, 1 splits: bit for bit ok",
        "attention decode lanes H2/2 D64 window 0, 15 tokens to 300, 3 splits: ok",
        "attention decode lanes G4 H8/2 D128 window 33, 9 tokens to 108, 1 splits: bit for bit ok",
        "attention decode lanes G7 H14/2 D128 window 0, 3 tokens to 200, 7 splits: bit for bit ok",
        "attention decode lanes G8 H16/2 D64 window 50, 3 tokens to 200, 4 splits: bit for bit ok",
        "attention decode lanes G5 H10/2 D128 window 0, 3 tokens to 200, 4 splits: bit for bit ok",
        "attention decode lanes one launch split H8/1 D64 window 0, 2 tokens to 1000, 3 splits: ok",
        "attention decode lanes G2 H4/2 D64 window 0, 2 tokens to 700, 1 splits: bit for bit ok",
        "attention decode lanes merged G1 H8/1 D64 window 0, 2 tokens to 1000, 3 splits: bit for bit ok",
        "attention decode lanes merged G7 H14/2 D128 window 0, 3 tokens to 200, 7 splits: bit for bit ok",
        "attention decode lanes merged G4 H16/2 D64 window 50, 3 tokens to 200, 4 splits: bit for bit ok",
        "attention prefill H8/2 D128 window 33",
        "mmq q4_k rows 33 tile 64 splits 3",
        "gate_up_mmq q8_0 rows 17 tile 32 splits 2",
        "rope_qkv_write H6/2 D64 rot 64 neox 0 ff 0, 15 tokens to 300: ok",
        "rope_qkv_write H6/2 D64 rot 32 neox 1 ff 1, 15 tokens to 300: ok",
        "rope_qkv_write H9/3 D128 rot 128 neox 1 ff 0, 9 tokens to 2048: ok",
        "dequantize_to_f16 bf16 7x768: ok",
        "dequantize_to_f16 q4_0 7x768: ok",
        "dequantize_to_f16 q6_k 7x768: ok",
        "f32_to_f16 4024 values: ok",
    ] {
        assert!(report.contains(what), "no case `{what}` in:\n{report}");
    }
    assert!(report.contains("\n0 failed"), "{report}");
}

#[test]
fn a_barrier_no_thread_reaches_stops_the_harness_with_a_message() {
    let Some((_, exe)) = build("tests/host/barriers.cpp", "kernel_host_barriers") else {
        return;
    };
    let good = Command::new(&exe).output().unwrap();
    let out = String::from_utf8_lossy(&good.stdout);
    assert!(good.status.success(), "{out}");
    assert!(out.contains("sums 2016 2016"), "{out}");
    // Without the check the run would hang: give it 60 s, then fail.
    let mut child = Command::new(&exe)
        .arg("skip")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("a barrier no thread reaches hung the harness");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let stuck = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&stuck.stderr);
    assert!(!stuck.status.success(), "{err}");
    assert!(
        err.contains("host_launch: 64 threads wait at barriers no other reaches"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&stuck.stdout).contains("skips finished"));
}

#[test]
fn the_harness_fails_a_decoder_that_disagrees() {
    // The same harness on rows whose values were changed after dequantization: it must say so.
    let Some((dir, exe)) = build("tests/host/units.cpp", "kernel_host_bad") else {
        return;
    };
    let mut file = rows_file(GgmlType::Q4_0, 2, 544, 7);
    let last = file.len() - 4;
    let v = f32::from_le_bytes(file[last..].try_into().unwrap());
    file[last..].copy_from_slice(&(v + 0.5).to_le_bytes());
    std::fs::write(dir.join("q4_0.bin"), file).unwrap();
    let run = Command::new(&exe).arg(&dir).arg("q4_0").output().unwrap();
    let report = String::from_utf8_lossy(&run.stdout);
    assert!(!run.status.success(), "{report}");
    assert!(report.contains("q4_0: 2 rows of 544, FAILED"), "{report}");
}
