//! `m40-llm doctor`: what this machine offers m40-llm's CUDA path (driver, NVRTC, cuBLAS, GPUs),
//! and a compile of every kernel for each target architecture. Works without a GPU (`--arch`).

use anyhow::bail;

#[derive(clap::Args)]
pub struct Args {
    /// Compile for this architecture (`sm_52`, `52`); repeatable. Default: each GPU present.
    #[arg(long = "arch", value_parser = parse_arch)]
    pub archs: Vec<u32>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

fn parse_arch(s: &str) -> Result<u32, String> {
    let digits = s
        .strip_prefix("sm_")
        .or_else(|| s.strip_prefix("compute_"))
        .unwrap_or(s);
    match digits.parse::<u32>() {
        Ok(a) if (10..=200).contains(&a) => Ok(a),
        _ => Err(format!("`{s}` is not an architecture like sm_52")),
    }
}

#[cfg(not(feature = "cuda"))]
pub fn run(_args: Args) -> anyhow::Result<()> {
    bail!("this build of m40-llm has no CUDA support (built without the `cuda` feature)")
}

#[cfg(feature = "cuda")]
pub fn run(args: Args) -> anyhow::Result<()> {
    use super::io::outln;
    use m40_llm::backend::cuda::{cublas_present, driver_version, kernels, nvrtc};
    use m40_llm::backend::device::probe_gpus;
    use serde_json::json;

    let json_out = args.json;
    let say = |line: String| -> anyhow::Result<()> {
        if !json_out {
            outln!("{line}")?;
        }
        Ok(())
    };

    let driver = driver_version();
    match &driver {
        Ok((ma, mi)) => say(format!("driver: CUDA {ma}.{mi}"))?,
        Err(why) => say(format!("driver: none ({why})"))?,
    }
    let cublas = cublas_present();
    say(format!(
        "cuBLAS: {}",
        if cublas { "found" } else { "not found" }
    ))?;

    let probed = nvrtc::probe_all();
    let mut nvrtc_json = Vec::new();
    if probed.is_empty() {
        say(format!("NVRTC: none found; {}", nvrtc::NVRTC_ADVICE))?;
    }
    for (c, r) in &probed {
        match r {
            Ok(n) => {
                say(format!(
                    "NVRTC {}: {} ({}): {}",
                    n.version_string(),
                    c.path,
                    c.origin,
                    arch_range(n.archs())
                ))?;
                nvrtc_json.push(json!({"path": c.path, "origin": c.origin,
                    "version": n.version_string(), "archs": n.archs()}));
            }
            Err(e) => {
                say(format!("NVRTC: {} ({}): {e}", c.path, c.origin))?;
                nvrtc_json
                    .push(json!({"path": c.path, "origin": c.origin, "error": e.to_string()}));
            }
        }
    }

    let gpus = probe_gpus();
    // The prefill GEMM precision each GPU would run (M40LLM_GEMM, M40LLM_TF32=1); a request
    // that cannot be had fails the doctor as it would fail every load.
    let gemm_request = m40_llm::backend::target::gemm_request_from_env();
    let mut gemm_ok = true;
    let mut gemm_json = Vec::new();
    if let Err(e) = &gemm_request {
        gemm_ok = false;
        say(format!("prefill GEMM: {e}"))?;
    }
    match &gpus {
        Ok(g) if g.is_empty() => say("GPUs: none".into())?,
        Ok(g) => {
            for gpu in g {
                let support = if gpu.is_supported() {
                    "supported"
                } else {
                    "too old (m40-llm needs sm_52 or newer)"
                };
                say(format!("GPU {gpu}: {support}"))?;
                let (Ok(target), Ok(asked)) = (
                    m40_llm::backend::target::Target::for_gpu(gpu),
                    &gemm_request,
                ) else {
                    continue;
                };
                match target.gemm_summary(*asked) {
                    Ok(line) => {
                        say(format!("  {line}"))?;
                        gemm_json.push(json!({"gpu": gpu.ordinal, "summary": line,
                            "precision": target.gemm_precision(*asked).ok(),
                            "available": target.gemm_precisions}));
                    }
                    Err(e) => {
                        gemm_ok = false;
                        say(format!("  prefill GEMM refused: {e}"))?;
                        gemm_json.push(json!({"gpu": gpu.ordinal, "error": e.to_string(),
                            "available": target.gemm_precisions}));
                    }
                }
            }
        }
        Err(why) => say(format!("GPUs: none ({why})"))?,
    }

    let mut archs = args.archs.clone();
    if archs.is_empty()
        && let Ok(g) = &gpus
    {
        for gpu in g.iter().filter(|g| g.is_supported()) {
            let a = (gpu.compute_capability.0 * 10 + gpu.compute_capability.1) as u32;
            if !archs.contains(&a) {
                archs.push(a);
            }
        }
    }
    let mut ok = !archs.is_empty();
    if archs.is_empty() {
        say("no architecture to compile for: no supported GPU here; pass --arch sm_52".into())?;
    }
    let mut targets = Vec::new();
    for arch in archs {
        let nv = match nvrtc::find_for_arch(arch) {
            Ok(n) => n,
            Err(e) => {
                ok = false;
                say(format!("sm_{arch}: {e}"))?;
                targets.push(json!({"arch": arch, "error": e.to_string()}));
                continue;
            }
        };
        say(format!(
            "compiling every kernel for sm_{arch} with NVRTC {} ({}):",
            nv.version_string(),
            nv.path()
        ))?;
        // A GPU of this arch, to load the images on and ask the driver what ptxas did not say.
        let device = gpus
            .as_ref()
            .ok()
            .and_then(|g| {
                g.iter()
                    .find(|g| m40_llm::backend::device::arch_of(g) == arch)
            })
            .and_then(|g| cudarc::driver::CudaContext::new(g.ordinal).ok());
        let mut fams = Vec::new();
        for (name, r) in kernels::compile_all(&nv, arch, None) {
            match r {
                Ok(mut f) => {
                    let mut source = "ptxas";
                    if f.functions.iter().any(|f| f.registers.is_none()) {
                        source = "no report";
                        if let Some(ctx) = &device {
                            match kernels::device_function_info(ctx, &f.cubin, &mut f.functions) {
                                Ok(()) => source = "driver",
                                Err(e) => {
                                    ok = false;
                                    say(format!("  {name:<12} FAILED to load on the GPU: {e}"))?;
                                }
                            }
                        }
                    }
                    say(format!(
                        "  {name:<12} ok   {:>6.2} s  {} kernels, {} KiB cubin (resources: {source})",
                        f.seconds,
                        f.functions.len(),
                        f.cubin.len().div_ceil(1024)
                    ))?;
                    for func in &f.functions {
                        say(format!("    {}", describe(func)))?;
                    }
                    fams.push(
                        json!({"name": name, "ok": true, "seconds": f.seconds, "resources": source,
                        "cubin_bytes": f.cubin.len(), "functions": f.functions}),
                    );
                }
                Err(e) => {
                    ok = false;
                    say(format!("  {name:<12} FAILED: {e}"))?;
                    fams.push(json!({"name": name, "ok": false, "error": e.to_string()}));
                }
            }
        }
        let precisions = m40_llm::backend::target::gemm_precisions(arch);
        say(format!(
            "  prefill GEMMs for sm_{arch}: {}",
            precisions
                .iter()
                .map(|p| p.name())
                .collect::<Vec<_>>()
                .join(", ")
        ))?;
        let mut target = json!({"arch": arch, "nvrtc": {"path": nv.path(),
            "version": nv.version_string()}, "families": fams, "gemm_precisions": precisions});
        if arch == 52 {
            target["m40_instruction_counts"] = m40_instruction_counts(&nv, arch, &say)?;
        }
        targets.push(target);
    }

    if json_out {
        let out = json!({
            "driver": driver.as_ref().ok().map(|(a, b)| format!("{a}.{b}")),
            "driver_error": driver.as_ref().err(),
            "cublas": cublas,
            "nvrtc": nvrtc_json,
            "gpus": gpus.as_ref().ok(),
            "gpu_error": gpus.as_ref().err(),
            "gemm": gemm_json,
            "gemm_error": gemm_request.as_ref().err().map(|e| e.to_string()),
            "targets": targets,
            "ok": ok && gemm_ok,
        });
        outln!("{out}")?;
    }
    if !ok {
        bail!("doctor: the kernels could not be compiled for every architecture asked for");
    }
    if !gemm_ok {
        bail!("doctor: the prefill GEMM asked for (M40LLM_GEMM, M40LLM_TF32) cannot run here");
    }
    say("doctor: ok".into())?;
    Ok(())
}

/// The unit matvec kernels' PTX instruction counts against the M40's budget: a table, and its
/// JSON. Over budget is a warning (the kernels still work), not a failure.
#[cfg(feature = "cuda")]
fn m40_instruction_counts(
    nv: &m40_llm::backend::cuda::nvrtc::Nvrtc,
    arch: u32,
    say: &dyn Fn(String) -> anyhow::Result<()>,
) -> anyhow::Result<serde_json::Value> {
    use m40_llm::backend::cuda::isa;
    use serde_json::json;

    let per_byte = isa::m40_budget_per_byte();
    say(format!(
        "M40 instruction counts (unit matvec inner loop, PTX for compute_{arch} before ptxas; \
         budget {per_byte:.1} instructions per byte of weights = {:.1e} lane-instructions/s / {:.0} GB/s):",
        isa::M40_LANE_INSTRUCTIONS_PER_S,
        isa::M40_BYTES_PER_S / 1e9
    ))?;
    let ptx = match isa::matvec_ptx(nv, arch) {
        Ok(p) => p,
        Err(e) => {
            say(format!("  FAILED to compile kernels/matvec.cu to PTX: {e}"))?;
            return Ok(json!({"budget_per_byte": per_byte, "error": e.to_string()}));
        }
    };
    let counts = isa::m40_counts(&ptx);
    for line in m40_table(&counts) {
        say(line)?;
    }
    Ok(json!({"budget_per_byte": per_byte,
        "lane_instructions_per_s": isa::M40_LANE_INSTRUCTIONS_PER_S,
        "bytes_per_s": isa::M40_BYTES_PER_S, "types": counts}))
}

/// The lines of the instruction-count table, and the verdict: the types over budget at decode
/// (r1), or that every one is under.
#[cfg(feature = "cuda")]
fn m40_table(counts: &[m40_llm::backend::cuda::isa::TypeCount]) -> Vec<String> {
    use m40_llm::backend::cuda::isa;
    let mut lines = Vec::new();
    let mut header = format!(
        "  {:<6} {:<8} {:>7} {:>7}",
        "type", "decoder", "B/w", "budget"
    );
    for rows in isa::REPORTED_ROWS {
        header.push_str(&format!("  {:>14}", format!("r{rows} instr/w")));
    }
    header.push_str(&format!("  {:>14}", "r1 wc instr/w"));
    lines.push(header);
    let mut over = Vec::new();
    let mut wc_over = Vec::new();
    for t in counts {
        let mut line = format!(
            "  {:<6} {:<12} {:>7.3} {:>7.1}",
            t.ty, t.decoder, t.bytes_per_weight, t.budget
        );
        let mut errors = Vec::new();
        let rows = t.kernels.iter().map(|k| (k, false));
        for (k, is_wc) in rows.chain(t.wc.iter().map(|k| (k, true))) {
            let over = if is_wc { &mut wc_over } else { &mut over };
            match &k.count {
                Some(c) => {
                    let verdict = if c.under_budget { "under" } else { "OVER" };
                    line.push_str(&format!("  {:>8.2} {verdict:<5}", c.per_weight));
                    if !c.under_budget && k.rows == 1 {
                        over.push(t.ty.clone());
                    }
                }
                None => {
                    line.push_str(&format!("  {:>14}", "not counted"));
                    if k.rows == 1 {
                        over.push(format!("{} (not counted)", t.ty));
                    }
                    let why = k.error.as_deref().unwrap_or("no count");
                    errors.push(format!("    {}: {why}", k.kernel));
                }
            }
        }
        if t.wc.is_none() {
            line.push_str(&format!("  {:>8}", "-"));
        }
        lines.push(line.trim_end().to_string());
        lines.extend(errors);
    }
    if !wc_over.is_empty() {
        lines.push(format!(
            "  OVER the M40 budget at decode with K >= 1024 (r1 wc, what real models run): {}",
            wc_over.join(", ")
        ));
    }
    lines.push(if over.is_empty() {
        "  every decode (r1) matvec is under the M40 budget".into()
    } else {
        format!(
            "  OVER the M40 budget at decode (r1): {}: these matvecs issue more instructions \
             than an M40 retires while it streams their weights (compute-bound there)",
            over.join(", ")
        )
    });
    lines
}

#[cfg(feature = "cuda")]
fn describe(f: &m40_llm::backend::cuda::kernels::FunctionInfo) -> String {
    let mut s = format!("{:<28}", f.name);
    if let Some(r) = f.registers {
        s.push_str(&format!(" {r:>3} regs"));
    }
    if let Some(b) = f.shared_bytes {
        s.push_str(&format!(", {b} B smem"));
    }
    if let Some(b) = f.stack_bytes.filter(|&b| b > 0) {
        s.push_str(&format!(", {b} B stack"));
    }
    let spills = f.spill_store_bytes.unwrap_or(0) + f.spill_load_bytes.unwrap_or(0);
    if spills > 0 {
        s.push_str(&format!(", {spills} B spilled"));
    }
    s
}

/// `sm_50..sm_90 (12 archs)`.
#[cfg(feature = "cuda")]
fn arch_range(archs: &[u32]) -> String {
    match (archs.iter().min(), archs.iter().max()) {
        (Some(lo), Some(hi)) => format!("sm_{lo}..sm_{hi} ({} archs)", archs.len()),
        _ => "no architectures".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_arch;

    #[cfg(feature = "cuda")]
    #[test]
    fn the_m40_table_says_which_types_are_over_budget() {
        use m40_llm::backend::cuda::isa::{
            ClassCounts, KernelCount, KernelResult, PtxLoop, TypeCount,
        };
        let kernel = |ty: &str, rows: u32, per_weight: f64, budget: f64| KernelResult {
            kernel: format!("mmv_{ty}_r{rows}"),
            rows,
            count: Some(KernelCount {
                kernel: format!("mmv_{ty}_r{rows}"),
                rows,
                unit_loop: PtxLoop {
                    label: "$L__BB0_3".into(),
                    instructions: (per_weight * 32.0) as u32,
                    x_loads: 8 * rows,
                    classes: ClassCounts::default(),
                },
                unit_weights: 32,
                cols: 1,
                weights_per_iteration: 32,
                units_per_iteration: 1,
                per_weight,
                budget,
                under_budget: per_weight <= budget,
            }),
            error: None,
        };
        let ty = |name: &str, budget: f64, r1: f64, r8: Option<f64>| TypeCount {
            ty: name.into(),
            decoder: format!("U{}", name.to_uppercase()),
            tuned: true,
            bytes_per_weight: budget / 11.8,
            budget,
            kernels: vec![
                kernel(name, 1, r1, budget),
                match r8 {
                    Some(r8) => kernel(name, 8, r8, budget),
                    None => KernelResult {
                        kernel: format!("mmv_{name}_r8"),
                        rows: 8,
                        count: None,
                        error: Some("no loop".into()),
                    },
                },
            ],
            wc: (name == "q4_k").then(|| {
                let mut k = kernel(name, 1, 7.2, budget);
                k.kernel = format!("mmv_{name}_r1_wc");
                k
            }),
        };
        let lines = super::m40_table(&[
            ty("q4_0", 6.6, 5.97, Some(16.7)),
            ty("q4_k", 6.6, 8.81, None),
        ]);
        let q4_0 = lines.iter().find(|l| l.contains("q4_0 ")).unwrap();
        assert!(
            q4_0.contains("5.97 under") && q4_0.contains("16.70 OVER"),
            "{q4_0}"
        );
        let q4_k = lines.iter().find(|l| l.contains("q4_k ")).unwrap();
        assert!(
            q4_k.contains("8.81 OVER")
                && q4_k.contains("not counted")
                && q4_k.ends_with("7.20 OVER"),
            "{q4_k}"
        );
        assert!(q4_0.ends_with(" -"), "no wc kernel: {q4_0}");
        assert!(
            lines.iter().any(
                |l| l.contains("OVER the M40 budget at decode with K >= 1024 (r1 wc")
                    && l.ends_with(": q4_k")
            ),
            "{lines:?}"
        );
        assert!(
            lines.iter().any(|l| l.contains("mmv_q4_k_r8: no loop")),
            "{lines:?}"
        );
        let last = lines.last().unwrap();
        assert!(
            last.contains("OVER the M40 budget at decode (r1): q4_k:"),
            "{last}"
        );
        let under = super::m40_table(&[ty("q4_0", 6.6, 5.97, Some(16.7))]);
        assert!(
            under
                .last()
                .unwrap()
                .contains("every decode (r1) matvec is under")
        );
    }

    #[test]
    fn archs_are_read_with_or_without_prefix() {
        assert_eq!(parse_arch("sm_52"), Ok(52));
        assert_eq!(parse_arch("90"), Ok(90));
        assert_eq!(parse_arch("compute_61"), Ok(61));
        assert!(parse_arch("sm_x").is_err());
        assert!(parse_arch("5").is_err());
    }
}
