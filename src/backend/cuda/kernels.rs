//! The kernel sources (kernels/*.cu, embedded by build.rs), their compilation by NVRTC for one
//! architecture, the on-disk cache of the results, and ptxas's resource report.

use super::nvrtc::{Compiled, Nvrtc, NvrtcError};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Instant;

include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));

/// Options every compilation uses besides the architecture. `--ptxas-options=-v` makes NVRTC's
/// log carry ptxas's registers / shared memory / spill report.
pub const COMPILE_OPTIONS: &[&str] = &["--std=c++14", "--ptxas-options=-v"];

/// The source of the kernel family `name` (`matvec` for kernels/matvec.cu).
pub fn family_source(name: &str) -> Option<&'static str> {
    KERNEL_FAMILIES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
}

/// The family names, in file order.
pub fn family_names() -> impl Iterator<Item = &'static str> {
    KERNEL_FAMILIES.iter().map(|(n, _)| *n)
}

/// The hash of everything that determines a family's compiled image: its source, the headers,
/// the options, the arch and the NVRTC version.
pub fn cache_key(name: &str, source: &str, arch: u32, nvrtc_version: (i32, i32)) -> String {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([0]);
    h.update(source.as_bytes());
    for (n, s) in KERNEL_HEADERS {
        h.update([0]);
        h.update(n.as_bytes());
        h.update([0]);
        h.update(s.as_bytes());
    }
    for o in COMPILE_OPTIONS {
        h.update([0]);
        h.update(o.as_bytes());
    }
    h.update(format!("\0sm_{arch}\0nvrtc {}.{}", nvrtc_version.0, nvrtc_version.1).as_bytes());
    let digest = h.finalize();
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The kernel cache directory: `$M40LLM_KERNEL_CACHE`, else `$XDG_CACHE_HOME/m40-llm/kernels`,
/// else `~/.cache/m40-llm/kernels`; `None` when none of these can be formed.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("M40LLM_KERNEL_CACHE") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))?;
    Some(base.join("m40-llm").join("kernels"))
}

/// ptxas's report for one kernel entry point.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FunctionInfo {
    pub name: String,
    pub registers: Option<u32>,
    /// Static shared memory, bytes.
    pub shared_bytes: Option<u32>,
    pub stack_bytes: Option<u32>,
    pub spill_store_bytes: Option<u32>,
    pub spill_load_bytes: Option<u32>,
}

/// One compiled kernel family.
#[derive(Clone, Debug)]
pub struct CompiledFamily {
    pub name: String,
    pub arch: u32,
    pub cubin: Vec<u8>,
    pub log: String,
    /// Wall time of the compilation (or of reading the cache).
    pub seconds: f64,
    pub cached: bool,
    pub functions: Vec<FunctionInfo>,
}

/// Compiles the family `name` for `sm_{arch}`, or reads it from the cache (`cache`: the
/// directory, `None` to neither read nor write it).
pub fn compile_family(
    nvrtc: &Nvrtc,
    name: &str,
    arch: u32,
    cache: Option<&Path>,
) -> Result<CompiledFamily, NvrtcError> {
    let source = family_source(name).ok_or_else(|| NvrtcError::Compile {
        name: name.to_string(),
        arch,
        version: nvrtc.version_string(),
        log: "no such kernel family".into(),
    })?;
    let key = cache_key(name, source, arch, nvrtc.version());
    let stem = format!("{name}-sm_{arch}-nvrtc{}-{key}", nvrtc.version_string());
    let start = Instant::now();
    if let Some(dir) = cache
        && let (Ok(cubin), Ok(log)) = (
            std::fs::read(dir.join(format!("{stem}.cubin"))),
            std::fs::read_to_string(dir.join(format!("{stem}.log"))),
        )
        && !cubin.is_empty()
    {
        return Ok(CompiledFamily {
            name: name.to_string(),
            arch,
            functions: function_report(&cubin, &log),
            cubin,
            log,
            seconds: start.elapsed().as_secs_f64(),
            cached: true,
        });
    }
    let options: Vec<String> = COMPILE_OPTIONS.iter().map(|s| s.to_string()).collect();
    let Compiled { cubin, log } = nvrtc.compile(name, source, KERNEL_HEADERS, arch, &options)?;
    let seconds = start.elapsed().as_secs_f64();
    if let Some(dir) = cache
        && let Err(e) = write_cache(dir, &stem, &cubin, &log)
    {
        tracing::warn!("kernel cache {}: {e}; continuing without it", dir.display());
    }
    Ok(CompiledFamily {
        name: name.to_string(),
        arch,
        functions: function_report(&cubin, &log),
        cubin,
        log,
        seconds,
        cached: false,
    })
}

/// Writes atomically (a temporary file renamed into place), so a concurrent reader never sees a
/// partial image.
fn write_cache(dir: &Path, stem: &str, cubin: &[u8], log: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = |ext: &str| dir.join(format!(".{stem}.{}.{ext}", std::process::id()));
    std::fs::write(tmp("log"), log)?;
    std::fs::write(tmp("cubin"), cubin)?;
    std::fs::rename(tmp("log"), dir.join(format!("{stem}.log")))?;
    std::fs::rename(tmp("cubin"), dir.join(format!("{stem}.cubin")))
}

/// Compiles every family for `sm_{arch}`, in file order; each result on its own, so one failure
/// does not hide the others. The families compile side by side on up to
/// `available_parallelism` threads (NVRTC's calls are thread-safe on distinct programs), the
/// longest sources first: a first run on a device compiles them all, which took 150 s one after
/// another on the H200's host and is bounded now by the longest family.
pub fn compile_all(
    nvrtc: &Nvrtc,
    arch: u32,
    cache: Option<&Path>,
) -> Vec<(&'static str, Result<CompiledFamily, NvrtcError>)> {
    let names: Vec<&'static str> = family_names().collect();
    let mut order: Vec<usize> = (0..names.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(family_source(names[i]).map_or(0, str::len)));
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .clamp(1, names.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<Option<Result<CompiledFamily, NvrtcError>>> =
        (0..names.len()).map(|_| None).collect();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&i) = order.get(k) else { break };
                        done.push((i, compile_family(nvrtc, names[i], arch, cache)));
                    }
                    done
                })
            })
            .collect();
        for w in workers {
            // A panic in a worker is a bug in this crate: pass it on as it is.
            let done = w.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            for (i, r) in done {
                results[i] = Some(r);
            }
        }
    });
    names
        .into_iter()
        .zip(results)
        .map(|(n, r)| (n, r.expect("every family is taken by a worker")))
        .collect()
}

/// The report for a compiled image: ptxas's (from `log`) where NVRTC gave one, else the entry
/// points listed in the CUBIN with nothing measured (NVRTC 13 was seen returning an empty log for
/// a program it had compiled before: its own cache). [`device_function_info`] fills the numbers
/// in from a loaded module.
pub fn function_report(cubin: &[u8], log: &str) -> Vec<FunctionInfo> {
    let from_log = parse_ptxas_log(log);
    if !from_log.is_empty() {
        return from_log;
    }
    cubin_entry_points(cubin)
        .into_iter()
        .map(|name| FunctionInfo {
            name,
            ..Default::default()
        })
        .collect()
}

/// The global function symbols of a 64-bit little-endian ELF image (a CUBIN): its kernels.
/// Malformed input gives an empty list, never a panic.
pub fn cubin_entry_points(elf: &[u8]) -> Vec<String> {
    let u16_at = |o: usize| {
        elf.get(o..o.saturating_add(2))
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| {
        elf.get(o..o.saturating_add(4))
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        elf.get(o..o.saturating_add(8))
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    let mut names = Vec::new();
    // ELFCLASS64, little-endian.
    if elf.get(0..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return names;
    }
    let (Some(shoff), Some(shentsize), Some(shnum)) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c))
    else {
        return names;
    };
    let (shoff, shentsize) = (shoff as usize, usize::from(shentsize));
    let section = |i: usize| -> Option<(u32, u32, usize, usize, usize)> {
        let base = shoff.checked_add(i.checked_mul(shentsize)?)?;
        // (type, link, offset, size, entsize)
        Some((
            u32_at(base.saturating_add(4))?,
            u32_at(base.saturating_add(40))?,
            u64_at(base.saturating_add(24))? as usize,
            u64_at(base.saturating_add(32))? as usize,
            u64_at(base.saturating_add(56))? as usize,
        ))
    };
    for i in 0..usize::from(shnum) {
        let Some((2, link, off, size, entsize)) = section(i) else {
            continue; // not SHT_SYMTAB
        };
        let Some((_, _, str_off, str_size, _)) = section(link as usize) else {
            continue;
        };
        if entsize < 24 {
            continue;
        }
        for j in 0..size / entsize {
            let sym = off.saturating_add(j.saturating_mul(entsize));
            let (Some(name), Some(&info)) = (u32_at(sym), elf.get(sym.saturating_add(4))) else {
                break;
            };
            // STT_FUNC with STB_GLOBAL.
            if info & 0xf != 2 || info >> 4 != 1 {
                continue;
            }
            let start = str_off.saturating_add(name as usize);
            let Some(strtab) = elf.get(start..str_off.saturating_add(str_size)) else {
                continue;
            };
            let end = strtab.iter().position(|&b| b == 0).unwrap_or(strtab.len());
            if let Ok(n) = std::str::from_utf8(&strtab[..end])
                && !n.is_empty()
            {
                names.push(n.to_string());
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

/// Fills registers and static shared memory of `functions` from the driver
/// (`cuFuncGetAttribute`) after loading `cubin` into `ctx`.
pub fn device_function_info(
    ctx: &std::sync::Arc<cudarc::driver::CudaContext>,
    cubin: &[u8],
    functions: &mut [FunctionInfo],
) -> Result<(), cudarc::driver::DriverError> {
    let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin.to_vec()))?;
    for f in functions {
        let func = module.load_function(&f.name)?;
        f.registers = u32::try_from(func.num_regs()?).ok();
        f.shared_bytes = u32::try_from(func.shared_size_bytes()?).ok();
        let local = func.get_attribute(
            cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES,
        )?;
        f.stack_bytes = u32::try_from(local).ok();
    }
    Ok(())
}

/// Reads ptxas's `-v` report:
/// ```text
/// ptxas info    : Compiling entry function 'rms_norm_f32' for 'sm_52'
/// ptxas info    : Function properties for rms_norm_f32
///     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 14 registers, 128 bytes smem, 344 bytes cmem[0]
/// ```
pub fn parse_ptxas_log(log: &str) -> Vec<FunctionInfo> {
    let mut out: Vec<FunctionInfo> = Vec::new();
    let number_before = |text: &str, unit: &str| -> Option<u32> {
        let idx = text.find(unit)?;
        text[..idx].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            if !out.iter().any(|f| f.name == name) {
                out.push(FunctionInfo {
                    name,
                    ..Default::default()
                });
            }
            continue;
        }
        if let Some(rest) = line.split("Function properties for ").nth(1) {
            let name = rest.trim().to_string();
            if let Some(pos) = out.iter().position(|f| f.name == name) {
                // Move it last so the next lines apply to it.
                let f = out.remove(pos);
                out.push(f);
            }
            continue;
        }
        let Some(cur) = out.last_mut() else { continue };
        if line.contains("stack frame") {
            cur.stack_bytes = number_before(line, "bytes stack frame");
            cur.spill_store_bytes = number_before(line, "bytes spill stores");
            cur.spill_load_bytes = number_before(line, "bytes spill loads");
        } else if line.contains("Used ") && line.contains("registers") {
            cur.registers = number_before(line, "registers");
            cur.shared_bytes = number_before(line, "bytes smem").or(Some(0));
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_file_is_embedded() {
        let names: Vec<_> = family_names().collect();
        for want in [
            "attention",
            "dequant",
            "elementwise",
            "gather",
            "matvec",
            "norm",
            "rope",
            "sample",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        assert!(KERNEL_HEADERS.iter().any(|(n, _)| *n == "common.cuh"));
    }

    /// The best-path families (newer GPUs only) and the macro that gates their code: it is
    /// defined only for `__CUDA_ARCH__ >= 800` (and the host harness), so for sm_52 the
    /// kernels compile empty.
    const GATED: &[(&str, &str)] = &[("mmqt", "MMQT_TENSOR_CORES")];

    /// The lines of `src` (comments cut) outside `#if`/`#ifdef` regions opened on `gate`
    /// (their `#else` branches count as outside).
    fn ungated_code(src: &str, gate: Option<&str>) -> Vec<String> {
        // (this directive opened the gate, the region is gated)
        let mut stack: Vec<(bool, bool)> = Vec::new();
        let mut out = Vec::new();
        for line in src.lines() {
            let code = line.split("//").next().unwrap_or("").trim();
            let gated = stack.last().is_some_and(|&(_, g)| g);
            if code.starts_with("#if") {
                let opens = gate.is_some_and(|g| code.contains(g));
                stack.push((opens, gated || opens));
            } else if code.starts_with("#else") || code.starts_with("#elif") {
                let parent = stack.len() >= 2 && stack[stack.len() - 2].1;
                if let Some(top) = stack.last_mut()
                    && top.0
                {
                    top.1 = parent;
                }
            } else if code.starts_with("#endif") {
                stack.pop();
            } else if !gated {
                out.push(code.to_string());
            }
        }
        out
    }

    #[test]
    fn kernels_use_nothing_past_sm52() {
        // FP16 is storage only: no half arithmetic types, no dp4a, no tensor cores; the
        // best-path families only inside their arch gate.
        for (name, src) in KERNEL_FAMILIES.iter().chain(KERNEL_HEADERS) {
            let gate = GATED.iter().find(|(n, _)| n == name).map(|&(_, g)| g);
            if let Some(g) = gate {
                let defined = format!(
                    "#if defined(M40LLM_HOST) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= \
                     800)\n#define {g} 1"
                );
                assert!(src.contains(&defined), "{name}: {g} is not gated on sm_80");
            }
            for line in ungated_code(src, gate) {
                for banned in [
                    "__half",
                    "half2",
                    "__dp4a",
                    "wmma",
                    "mma.sync",
                    "cvt.rna.tf32",
                    "cuda_fp16.h",
                    "__hadd",
                    "__hmul",
                ] {
                    assert!(!line.contains(banned), "{name} uses {banned}: {line}");
                }
            }
        }
    }

    #[test]
    fn the_gate_scan_sees_tensor_core_code_outside_its_gate() {
        let src = "#ifdef G\nmma.sync a;\n#else\nmma.sync b;\n#endif\nmma.sync c; // mma.sync\n";
        assert_eq!(ungated_code(src, Some("G")), ["mma.sync b;", "mma.sync c;"]);
        let nested = "#ifdef G\n#ifdef H\nx\n#else\ny\n#endif\n#endif\nz\n";
        assert_eq!(ungated_code(nested, Some("G")), ["z"]);
        assert_eq!(ungated_code(nested, None), ["x", "y", "z"]);
    }

    #[test]
    fn the_cache_key_changes_with_arch_version_and_source() {
        let k = cache_key("norm", "a", 52, (12, 4));
        assert_eq!(k.len(), 16);
        assert_ne!(k, cache_key("norm", "a", 90, (12, 4)));
        assert_ne!(k, cache_key("norm", "a", 52, (13, 0)));
        assert_ne!(k, cache_key("norm", "b", 52, (12, 4)));
        assert_eq!(k, cache_key("norm", "a", 52, (12, 4)));
    }

    #[test]
    fn malformed_cubins_list_no_entry_points() {
        assert!(cubin_entry_points(b"").is_empty());
        assert!(cubin_entry_points(b"\x7fELF\x02\x01garbage").is_empty());
        let mut header = vec![0u8; 64];
        header[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        header[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        header[0x3a] = 64;
        header[0x3c] = 100;
        assert!(cubin_entry_points(&header).is_empty());
    }

    #[test]
    fn ptxas_reports_are_read_per_function() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'b_kernel' for 'sm_52'\n\
ptxas info    : Function properties for b_kernel\n\
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n\
ptxas info    : Used 40 registers, 2048 bytes smem, 344 bytes cmem[0]\n\
ptxas info    : Compiling entry function 'a_kernel' for 'sm_52'\n\
ptxas info    : Function properties for a_kernel\n\
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 12 registers, 344 bytes cmem[0]\n";
        let f = parse_ptxas_log(log);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].name, "a_kernel");
        assert_eq!(f[0].registers, Some(12));
        assert_eq!(f[0].shared_bytes, Some(0));
        assert_eq!(f[1].registers, Some(40));
        assert_eq!(f[1].shared_bytes, Some(2048));
        assert_eq!(f[1].stack_bytes, Some(8));
        assert_eq!(f[1].spill_store_bytes, Some(4));
    }
}
