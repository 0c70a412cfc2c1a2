//! Embeds the CUDA C sources of kernels/ into the binary: writes `$OUT_DIR/kernel_sources.rs`
//! with one `include_str!` per file, so adding a kernel file needs no Rust change. NVRTC
//! compiles them at run time (src/backend/cuda/), so the build needs no CUDA toolkit.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    commit();
    println!("cargo:rerun-if-changed=kernels");
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let dir = Path::new(&manifest).join("kernels");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    let mut families = String::new();
    let mut headers = String::new();
    for path in &files {
        println!("cargo:rerun-if-changed={}", path.display());
        let (Some(stem), Some(ext)) = (
            path.file_stem().and_then(|s| s.to_str()),
            path.extension().and_then(|s| s.to_str()),
        ) else {
            continue;
        };
        let name = path.file_name().and_then(|s| s.to_str()).unwrap_or(stem);
        let entry = format!(
            "    ({stem:?}, include_str!({:?})),\n",
            path.display().to_string()
        );
        let header = format!(
            "    ({name:?}, include_str!({:?})),\n",
            path.display().to_string()
        );
        match ext {
            "cu" => families.push_str(&entry),
            "cuh" => headers.push_str(&header),
            _ => {}
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "/// The kernel families (kernels/NAME.cu): (NAME, source).\n\
         pub const KERNEL_FAMILIES: &[(&str, &str)] = &[\n{families}];\n\
         /// The headers they include (kernels/NAME.cuh): (file name, source).\n\
         pub const KERNEL_HEADERS: &[(&str, &str)] = &[\n{headers}];"
    );
    let out_dir = std::env::var("OUT_DIR").unwrap_or_else(|_| ".".into());
    if let Err(e) = std::fs::write(Path::new(&out_dir).join("kernel_sources.rs"), out) {
        panic!("cannot write kernel_sources.rs: {e}");
    }
}

/// `M40LLM_COMMIT`: `git describe --always --dirty` of the source tree (what `m40-llm bench`
/// reports), or `unknown` outside a git checkout. Rebuilt when HEAD or the index moves.
fn commit() {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    for path in ["HEAD", "index"] {
        if let Some(p) = git(&["rev-parse", "--git-path", path]) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    let described = git(&["describe", "--always", "--dirty", "--abbrev=12"])
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=M40LLM_COMMIT={described}");
}
