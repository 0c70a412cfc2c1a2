//! GPU discovery through the CUDA driver: runs for real where an NVIDIA GPU is present, and
//! says that it skips where none is.

mod common;

use m40_llm::backend::device::{preferred_gpu, probe_gpus};
use std::process::Command;

#[test]
fn gpus_are_found_and_described_or_the_reason_is_given() {
    let gpus = match probe_gpus() {
        Ok(g) if !g.is_empty() => g,
        Ok(_) => {
            eprintln!("SKIPPED: the CUDA driver reports no GPU");
            return;
        }
        Err(why) => {
            eprintln!("SKIPPED: no GPU: {why}");
            assert!(!why.is_empty());
            return;
        }
    };
    for g in &gpus {
        assert!(!g.name.is_empty());
        assert!(g.compute_capability.0 >= 1, "{g}");
        assert!(g.total_memory > 0, "{g}");
    }
    let out = Command::new(common::bin()).arg("devices").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for g in &gpus {
        assert!(text.contains(&g.name), "{text}");
    }
    if let Some(p) = preferred_gpu(&gpus) {
        assert!(
            text.contains(&format!("preferred GPU: cuda:{}", p.ordinal)),
            "{text}"
        );
    }
    eprintln!("{text}");
}

#[test]
fn devices_reports_json_on_any_machine() {
    let out = Command::new(common::bin())
        .args(["devices", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The preferred GPU when there is one, else the CPU.
    let want = match v["preferred_gpu"]["ordinal"].as_u64() {
        Some(n) => format!("cuda:{n}"),
        None => "cpu".to_string(),
    };
    assert_eq!(v["auto"], want.as_str(), "{v}");
    // Either a list of GPUs or the reason there is none.
    assert!(v["gpus"].is_array() || v["error"].is_string(), "{v}");
}
