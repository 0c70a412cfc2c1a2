//! Finding NVIDIA GPUs, and choosing the backend a command runs on.
//!
//! m40-llm says which device it uses, always. `--device auto` tries each device in order (the
//! GPUs, a Tesla M40 first, then the CPU): it builds the device's [`Target`], compiles the model
//! for it, checks the fit in its memory, and runs on the first that accepts the plan, holds it
//! and has an executor; every device passed over is logged with the reason ([`PassedOver`]),
//! so there is no silent fallback. `--gpu N` narrows the GPUs to that one.

use super::cpu::CpuBackend;
use super::target::{Target, TargetKind};
use super::{Backend, BackendError, KvGeometry};
use crate::gguf::GgufFile;
use crate::plan::Plan;
use std::fmt;
use std::sync::Arc;

/// The device a command asks for (`--device`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The first device (GPUs, a Tesla M40 first, then the CPU) that accepts the plan, holds it
    /// and has an executor; every device passed over is logged with the reason.
    #[default]
    Auto,
    Cpu,
    /// A GPU only: the first that accepts and holds the plan.
    Cuda,
}

/// An NVIDIA GPU found through the CUDA driver.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor): (5, 2) for the Tesla M40.
    pub compute_capability: (i32, i32),
    pub total_memory: usize,
}

impl GpuInfo {
    /// True for a Tesla M40 (the first-class target; not a Quadro M4000).
    pub fn is_m40(&self) -> bool {
        self.name.contains("Tesla M40")
    }

    /// Whether m40-llm's kernels can run on it (sm_52 and newer).
    pub fn is_supported(&self) -> bool {
        self.compute_capability >= (5, 2)
    }
}

impl fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cuda:{} {} (sm_{}{}, {:.1} GiB)",
            self.ordinal,
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.total_memory as f64 / (1u64 << 30) as f64
        )
    }
}

/// Why no GPU can be used when the driver library is missing, and how to get it.
pub const NO_DRIVER: &str = "no NVIDIA driver found (libcuda could not be loaded); install the \
    NVIDIA driver (R580 is the branch for the Tesla M40) to run on a GPU, or use --device cpu";

/// The GPUs of this machine, or why none can be listed (no driver, no CUDA support built in).
pub fn probe_gpus() -> Result<Vec<GpuInfo>, String> {
    #[cfg(feature = "cuda")]
    {
        cuda_probe::probe()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err("this build of m40-llm has no CUDA support (built without the `cuda` feature)".into())
    }
}

#[cfg(feature = "cuda")]
mod cuda_probe {
    use super::GpuInfo;
    use cudarc::driver::{result, sys};

    pub fn probe() -> Result<Vec<GpuInfo>, String> {
        // SAFETY: only tries to load the driver library; no driver call is made if it is absent.
        if !unsafe { sys::is_culib_present() } {
            return Err(super::NO_DRIVER.into());
        }
        result::init().map_err(|e| format!("the CUDA driver did not initialize: {e}"))?;
        let count = result::device::get_count().map_err(|e| e.to_string())?;
        (0..count)
            .map(|i| {
                let dev = result::device::get(i).map_err(|e| e.to_string())?;
                let name = result::device::get_name(dev).map_err(|e| e.to_string())?;
                let attr = |a| {
                    // SAFETY: `dev` is a valid device handle from the driver.
                    unsafe { result::device::get_attribute(dev, a) }.map_err(|e| e.to_string())
                };
                let major =
                    attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
                let minor =
                    attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
                // SAFETY: as above.
                let total_memory =
                    unsafe { result::device::total_mem(dev) }.map_err(|e| e.to_string())?;
                Ok(GpuInfo {
                    ordinal: i as usize,
                    name,
                    compute_capability: (major, minor),
                    total_memory,
                })
            })
            .collect()
    }
}

/// The GPU `auto` would prefer: a Tesla M40 first, then the supported GPU with the most memory.
pub fn preferred_gpu(gpus: &[GpuInfo]) -> Option<&GpuInfo> {
    gpus.iter()
        .filter(|g| g.is_supported())
        .max_by_key(|g| (g.is_m40(), g.total_memory, std::cmp::Reverse(g.ordinal)))
}

/// The supported GPUs in the order `auto` tries them: a Tesla M40 first, then by memory (most
/// first), then by ordinal; the first is [`preferred_gpu`].
pub fn gpu_order(gpus: &[GpuInfo]) -> Vec<&GpuInfo> {
    let mut order: Vec<&GpuInfo> = gpus.iter().filter(|g| g.is_supported()).collect();
    order.sort_by_key(|g| (std::cmp::Reverse((g.is_m40(), g.total_memory)), g.ordinal));
    order
}

/// The GPU a CUDA run uses: `requested` (`--gpu N`) when given, else [`preferred_gpu`]; a GPU
/// older than sm_52, an ordinal that does not exist, or no supported GPU at all is an error that
/// says so.
pub fn choose_gpu(gpus: &[GpuInfo], requested: Option<usize>) -> Result<&GpuInfo, String> {
    let listed = || {
        if gpus.is_empty() {
            "no NVIDIA GPU was found".to_string()
        } else {
            format!(
                "found: {}",
                gpus.iter()
                    .map(|g| g.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    };
    match requested {
        Some(n) => {
            let g = gpus
                .iter()
                .find(|g| g.ordinal == n)
                .ok_or_else(|| format!("there is no GPU cuda:{n} ({})", listed()))?;
            if !g.is_supported() {
                return Err(format!(
                    "{g} is too old: m40-llm's kernels need sm_52 (Maxwell, the Tesla M40) or newer"
                ));
            }
            Ok(g)
        }
        None => preferred_gpu(gpus)
            .ok_or_else(|| format!("no GPU m40-llm can use (sm_52 or newer): {}", listed())),
    }
}

/// The compute capability as the arch number NVRTC takes (`52` for sm_52).
pub fn arch_of(gpu: &GpuInfo) -> u32 {
    let (major, minor) = gpu.compute_capability;
    (major.max(0) as u32) * 10 + minor.max(0) as u32
}

/// Devices tried and passed over while choosing where to run, each with its reason; every one
/// is logged as it is recorded (there is no silent fallback).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassedOver(pub Vec<(String, String)>);

impl PassedOver {
    /// Records (and logs) that `device` is not used, and why.
    pub fn pass(&mut self, device: &str, reason: impl Into<String>) {
        let reason = reason.into();
        tracing::warn!("passed over {device}: {reason}");
        self.0.push((device.to_string(), reason));
    }

    /// `device: reason; device: reason`.
    pub fn summary(&self) -> String {
        self.0
            .iter()
            .map(|(d, r)| format!("{d}: {r}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// The targets `choice` may run on, in the order they are tried: the supported GPUs in
/// [`gpu_order`] (for `auto` and `cuda`; only GPU `gpu` when given), then the CPU (for `auto`
/// and `cpu`). GPUs that cannot be targets at all (too old, or none found) are recorded in
/// `passed`.
pub fn candidate_targets(
    choice: DeviceChoice,
    gpu: Option<usize>,
    passed: &mut PassedOver,
) -> Vec<Target> {
    let mut targets = Vec::new();
    if choice != DeviceChoice::Cpu {
        match probe_gpus() {
            Ok(gpus) if gpus.is_empty() => passed.pass("cuda", "no CUDA GPU: none was found"),
            Ok(gpus) if gpu.is_some() => match choose_gpu(&gpus, gpu) {
                Ok(g) => match Target::for_gpu(g) {
                    Ok(t) => targets.push(t),
                    Err(e) => passed.pass(&g.to_string(), e.to_string()),
                },
                Err(why) => passed.pass(&format!("cuda:{}", gpu.unwrap_or(0)), why),
            },
            Ok(gpus) => {
                for g in gpus.iter().filter(|g| !g.is_supported()) {
                    let why = Target::for_gpu(g)
                        .err()
                        .map_or_else(|| "not supported".to_string(), |e| e.to_string());
                    passed.pass(&g.to_string(), why);
                }
                for g in gpu_order(&gpus) {
                    match Target::for_gpu(g) {
                        Ok(t) => targets.push(t),
                        Err(e) => passed.pass(&g.to_string(), e.to_string()),
                    }
                }
            }
            Err(why) => passed.pass("cuda", format!("no CUDA GPU: {why}")),
        }
    }
    if choice != DeviceChoice::Cuda {
        targets.push(Target::cpu());
    }
    targets
}

/// Opens the backend of `target` on `plan` (compiled for it), with a KV cache of `kv`'s pages.
pub fn open_on(
    target: &Target,
    plan: Plan,
    file: Arc<GgufFile>,
    kv: KvGeometry,
) -> Result<Box<dyn Backend>, BackendError> {
    match target.kind {
        TargetKind::Cpu => Ok(Box::new(CpuBackend::new(plan, file, kv)?)),
        TargetKind::Cuda { .. } => open_cuda(target, plan, file, kv),
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(
    target: &Target,
    plan: Plan,
    file: Arc<GgufFile>,
    kv: KvGeometry,
) -> Result<Box<dyn Backend>, BackendError> {
    let gpu = target
        .gpu
        .as_ref()
        .ok_or_else(|| BackendError::Unsupported {
            backend: target.name.clone(),
            reason: "a compile-only target names no GPU to run on".into(),
        })?;
    // The prefill GEMM precision the loader chose for this target (`Target::gemm`).
    Ok(Box::new(super::cuda::CudaBackend::with_gemm(
        plan,
        file,
        kv,
        gpu,
        super::cuda::matmul::cublas_enabled_by_env(),
        target.gemm,
    )?))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(
    target: &Target,
    _plan: Plan,
    _file: Arc<GgufFile>,
    _kv: KvGeometry,
) -> Result<Box<dyn Backend>, BackendError> {
    Err(BackendError::Unsupported {
        backend: target.name.clone(),
        reason: "this build of m40-llm has no CUDA support (built without the `cuda` feature)"
            .into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(ordinal: usize, name: &str, cc: (i32, i32), gib: usize) -> GpuInfo {
        GpuInfo {
            ordinal,
            name: name.into(),
            compute_capability: cc,
            total_memory: gib << 30,
        }
    }

    #[test]
    fn an_m40_is_preferred_over_bigger_newer_gpus() {
        let gpus = [
            gpu(0, "NVIDIA H200", (9, 0), 141),
            gpu(1, "Tesla M40 24GB", (5, 2), 24),
        ];
        assert_eq!(preferred_gpu(&gpus).unwrap().ordinal, 1);
    }

    #[test]
    fn a_quadro_m4000_is_not_an_m40() {
        let gpus = [
            gpu(0, "Quadro M4000", (5, 2), 8),
            gpu(1, "GeForce GTX 1080 Ti", (6, 1), 11),
        ];
        assert!(!gpus[0].is_m40());
        assert_eq!(preferred_gpu(&gpus).unwrap().ordinal, 1);
    }

    #[test]
    fn gpu_n_picks_that_gpu_and_refuses_old_or_missing_ones() {
        let gpus = [
            gpu(0, "Tesla K80", (3, 7), 12),
            gpu(1, "NVIDIA H200", (9, 0), 141),
            gpu(2, "Tesla M40 24GB", (5, 2), 24),
        ];
        assert_eq!(choose_gpu(&gpus, Some(1)).unwrap().ordinal, 1);
        assert_eq!(choose_gpu(&gpus, None).unwrap().ordinal, 2);
        let old = choose_gpu(&gpus, Some(0)).unwrap_err();
        assert!(old.contains("too old") && old.contains("sm_52"), "{old}");
        let missing = choose_gpu(&gpus, Some(7)).unwrap_err();
        assert!(
            missing.contains("cuda:7") && missing.contains("Tesla K80"),
            "{missing}"
        );
        let none = choose_gpu(&gpus[..1], None).unwrap_err();
        assert!(none.contains("sm_52"), "{none}");
        assert!(choose_gpu(&[], None).unwrap_err().contains("no NVIDIA GPU"));
        assert_eq!(arch_of(&gpus[2]), 52);
        assert_eq!(arch_of(&gpus[1]), 90);
    }

    #[test]
    fn gpus_older_than_sm52_are_never_picked() {
        let gpus = [gpu(0, "Tesla K80", (3, 7), 12)];
        assert_eq!(preferred_gpu(&gpus), None);
        let gpus = [
            gpu(0, "Tesla K80", (3, 7), 12),
            gpu(1, "GTX 1080", (6, 1), 8),
        ];
        assert_eq!(preferred_gpu(&gpus).unwrap().ordinal, 1);
    }

    #[test]
    fn gpus_are_tried_m40_first_then_by_memory() {
        let gpus = [
            gpu(0, "GTX 1080", (6, 1), 8),
            gpu(1, "Tesla K80", (3, 7), 12),
            gpu(2, "NVIDIA H200", (9, 0), 141),
            gpu(3, "Tesla M40 24GB", (5, 2), 24),
            gpu(4, "GTX 1080", (6, 1), 8),
        ];
        let order: Vec<usize> = gpu_order(&gpus).iter().map(|g| g.ordinal).collect();
        assert_eq!(order, [3, 2, 0, 4]);
        for n in 1..=gpus.len() {
            let some = &gpus[..n];
            assert_eq!(gpu_order(some).first().copied(), preferred_gpu(some));
        }
    }

    #[test]
    fn a_compile_only_cuda_target_names_no_gpu_to_open() {
        let file = Arc::new(crate::lower::TinyModel::qwen3().open().unwrap());
        let target = Target::parse("cuda:sm_52").unwrap();
        let plan = crate::compile(&file, &crate::CompileOptions::default(), &target)
            .unwrap()
            .plan;
        let kv = KvGeometry::new(16, 4, 1, 4).unwrap();
        let err = open_on(&target, plan, file, kv).err().unwrap();
        assert!(err.to_string().contains("names no GPU"), "{err}");
    }
}
