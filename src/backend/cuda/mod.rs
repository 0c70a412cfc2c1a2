//! The CUDA side of m40-llm (the `cuda` feature): NVRTC discovery and kernel compilation
//! ([`nvrtc`], [`kernels`]), loading compiled kernels onto a device ([`KernelSet`]), and what
//! `m40-llm doctor` reports about the driver and cuBLAS, and the matvec kernels' instruction
//! counts against the M40's budget ([`isa`]); the launchers ([`ops`], [`matmul`])
//! over device memory ([`mem`]); and the executor that runs a plan with them
//! ([`CudaBackend`]), its step's inputs and results packed into one copy each way
//! ([`stepio`]).
//!
//! Everything is loaded at run time: a binary built here runs on a machine without CUDA, and
//! says what is missing when asked to use it.

pub mod backend;
pub mod isa;
pub mod kernels;
pub mod matmul;
pub mod mem;
pub mod nvrtc;
pub mod ops;
#[cfg(feature = "persistent")]
pub mod persistent;
pub mod stepio;

pub use backend::CudaBackend;

use super::BackendError;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, DriverError};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Why a CUDA operation failed, naming the kernel or call.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error(transparent)]
    Nvrtc(#[from] nvrtc::NvrtcError),
    #[error("CUDA driver: {what}: {source}")]
    Driver {
        what: String,
        #[source]
        source: DriverError,
    },
    #[error("no kernel `{name}` in kernels/{family}.cu")]
    NoKernel { family: String, name: String },
    #[error("kernel `{kernel}`: {reason}")]
    Launch { kernel: String, reason: String },
}

impl CudaError {
    /// A driver error with what was being done.
    pub fn driver(what: impl Into<String>) -> impl FnOnce(DriverError) -> CudaError {
        let what = what.into();
        move |source| CudaError::Driver { what, source }
    }
}

impl From<CudaError> for BackendError {
    fn from(e: CudaError) -> BackendError {
        BackendError::Kernel(e.to_string())
    }
}

/// The suffix of the kernels that read weights of type `ty` (`matvec_q4_k`, `embedding_f16`,
/// `dequantize_bf16`); `None` for a type the kernels cannot read.
pub fn weight_kernel_suffix(ty: crate::gguf::GgmlType) -> Option<&'static str> {
    use crate::gguf::GgmlType as T;
    Some(match ty {
        T::F32 => "f32",
        T::F16 => "f16",
        T::BF16 => "bf16",
        T::Q4_0 => "q4_0",
        T::Q4_1 => "q4_1",
        T::Q5_0 => "q5_0",
        T::Q5_1 => "q5_1",
        T::Q8_0 => "q8_0",
        T::Q4_K => "q4_k",
        T::Q5_K => "q5_k",
        T::Q6_K => "q6_k",
        _ => return None,
    })
}

/// The CUDA driver's version as `(major, minor)` (`cuDriverGetVersion`), or why it is unknown.
pub fn driver_version() -> Result<(i32, i32), String> {
    // SAFETY: only checks whether the library can be loaded.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(crate::backend::device::NO_DRIVER.into());
    }
    let mut v = 0;
    // SAFETY: a valid out-pointer; cuDriverGetVersion may be called before cuInit.
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if r != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        return Err(format!("cuDriverGetVersion failed: {r:?}"));
    }
    Ok((v / 1000, (v % 1000) / 10))
}

/// Whether cuBLAS can be loaded.
pub fn cublas_present() -> bool {
    // SAFETY: only tries to load the library.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

/// Every kernel family compiled for one device and loaded into its context; functions are
/// looked up by name once and kept.
pub struct KernelSet {
    ctx: Arc<CudaContext>,
    arch: u32,
    nvrtc_version: String,
    modules: HashMap<String, Arc<CudaModule>>,
    functions: std::sync::Mutex<HashMap<String, CudaFunction>>,
    /// Per family: compile (or cache read) seconds, and whether it came from the cache.
    pub compiled: Vec<(String, f64, bool)>,
}

impl KernelSet {
    /// Finds an NVRTC for the context's device, compiles (or reads from `cache`) every family
    /// and loads them.
    pub fn load(ctx: Arc<CudaContext>, cache: Option<&Path>) -> Result<KernelSet, CudaError> {
        let (major, minor) = ctx
            .compute_capability()
            .map_err(CudaError::driver("compute capability"))?;
        let arch = (major * 10 + minor) as u32;
        let nvrtc = nvrtc::find_for_arch(arch)?;
        let mut modules = HashMap::new();
        let mut compiled = Vec::new();
        for (name, fam) in kernels::compile_all(&nvrtc, arch, cache) {
            let fam = fam?;
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(fam.cubin.clone()))
                .map_err(CudaError::driver(format!("loading kernels/{name}.cu")))?;
            compiled.push((name.to_string(), fam.seconds, fam.cached));
            modules.insert(name.to_string(), module);
        }
        Ok(KernelSet {
            ctx,
            arch,
            nvrtc_version: nvrtc.version_string(),
            modules,
            functions: Default::default(),
            compiled,
        })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The arch the kernels were compiled for (`52`).
    pub fn arch(&self) -> u32 {
        self.arch
    }

    /// The NVRTC version that compiled them.
    pub fn nvrtc_version(&self) -> &str {
        &self.nvrtc_version
    }

    /// The entry point `name` of kernels/`family`.cu.
    pub fn function(&self, family: &str, name: &str) -> Result<CudaFunction, CudaError> {
        let key = format!("{family}/{name}");
        let mut cache = self
            .functions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(f) = cache.get(&key) {
            return Ok(f.clone());
        }
        let no_kernel = || CudaError::NoKernel {
            family: family.to_string(),
            name: name.to_string(),
        };
        let module = self.modules.get(family).ok_or_else(no_kernel)?;
        let f = module.load_function(name).map_err(|_| no_kernel())?;
        cache.insert(key, f.clone());
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_type_gguf_dequantizes_has_weight_kernels() {
        for ty in crate::gguf::quants::DEQUANTIZE_TYPES {
            let suffix = super::weight_kernel_suffix(ty).unwrap();
            let (_, src) = super::kernels::KERNEL_HEADERS
                .iter()
                .find(|(n, _)| *n == "common.cuh")
                .unwrap();
            assert!(src.contains(&format!("MACRO({suffix},")), "{suffix}");
        }
    }
}
