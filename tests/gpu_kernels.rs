//! The CUDA kernels (kernels/*.cu): compiled by NVRTC for sm_52 (the Tesla M40) and sm_90, and,
//! where a GPU is present, launched on seeded random inputs and compared with the CPU reference
//! (the CPU backend's kernels, or `gguf::quants` dequantization and f64 math) within 1e-3
//! relative. One test target, so one executable to stage for the GPU machine (../shared/gpu).
//!
//! Without NVRTC the compile test skips, saying why, and fails under M40LLM_REQUIRE_TESTDATA=1
//! (CI installs `nvidia-cuda-nvrtc-cu12==12.4.*`); without a GPU the launch tests skip.
#![cfg(feature = "cuda")]

use m40_llm::backend::cuda::{kernels, nvrtc};

fn required() -> bool {
    std::env::var("M40LLM_REQUIRE_TESTDATA").is_ok_and(|v| v == "1")
}

#[test]
fn every_kernel_compiles_for_sm52_and_sm90() {
    for arch in [52, 90] {
        let nv = match nvrtc::find_for_arch(arch) {
            Ok(n) => n,
            Err(e) => {
                assert!(
                    !required(),
                    "{e}; M40LLM_REQUIRE_TESTDATA=1 makes a missing NVRTC a failure"
                );
                eprintln!("SKIPPED: {e}");
                continue;
            }
        };
        let mut failures = Vec::new();
        for (name, r) in kernels::compile_all(&nv, arch, None) {
            match r {
                Ok(f) => {
                    assert!(!f.cubin.is_empty(), "{name}: empty cubin");
                    assert!(
                        !f.functions.is_empty(),
                        "{name}: no ptxas report:\n{}",
                        f.log
                    );
                    for func in &f.functions {
                        assert!(func.registers.is_some(), "{name}: {func:?}");
                        // Nothing spills on the M40 (local memory is slow there).
                        assert_eq!(
                            func.spill_store_bytes.unwrap_or(0),
                            0,
                            "{name}: {} spills for sm_{arch}",
                            func.name
                        );
                    }
                    eprintln!(
                        "sm_{arch} NVRTC {} {name}: {} kernels in {:.2} s",
                        nv.version_string(),
                        f.functions.len(),
                        f.seconds
                    );
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}

#[test]
fn a_compile_error_names_the_kernel_and_carries_the_diagnostics() {
    let Ok(nv) = nvrtc::find_for_arch(52).or_else(|_| nvrtc::find_for_arch(90)) else {
        assert!(!required(), "no NVRTC found");
        eprintln!("SKIPPED: no NVRTC found");
        return;
    };
    let arch = if nv.supports(52) { 52 } else { 90 };
    let err = nv
        .compile(
            "broken",
            "extern \"C\" __global__ void k() { undefined_thing(); }",
            &[],
            arch,
            &[],
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("kernels/broken.cu"), "{err}");
    assert!(err.contains("undefined_thing"), "{err}");
}

#[test]
fn an_nvrtc_override_that_does_not_exist_fails_with_the_advice() {
    // find_for_arch reads M40LLM_NVRTC; a child process keeps this process's environment clean.
    if std::env::var_os("M40LLM_GPU_KERNELS_CHILD").is_some() {
        let e = nvrtc::find_for_arch(52).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/libnvrtc.so"), "{e}");
        assert!(e.contains("nvidia-cuda-nvrtc-cu12==12.4"), "{e}");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([
            "an_nvrtc_override_that_does_not_exist_fails_with_the_advice",
            "--exact",
            "--nocapture",
        ])
        .env("M40LLM_GPU_KERNELS_CHILD", "1")
        .env("M40LLM_NVRTC", "/nonexistent/libnvrtc.so")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
