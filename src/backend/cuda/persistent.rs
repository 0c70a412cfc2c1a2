//! A persistent chain of matvecs (feature `persistent`): the prototype of a decode step in one
//! launch. The decode step is a few hundred short kernels replayed as one CUDA graph; what the
//! graph still pays is a launch boundary between kernels (the last block of one drains, the
//! next kernel's blocks start). A persistent kernel keeps one grid resident and replaces each
//! boundary with a grid barrier. This prototype runs the step's bulk, its one-row matvecs, that
//! way, so the two can be measured against each other on real shapes before anyone builds a
//! whole step around it (docs/perf.md, "Issue 12, a persistent matvec chain").
//!
//! `mmv_chain_q4_0_r1` and `mmv_chain_q4_k_r1_wc` (kernels/matvec.cu) take a table of phases
//! `y_i = x_i W_iᵀ`; each block runs, for every phase, the blocks `b, b + grid, ...` of what
//! `mmv_q4_0_r1` or `mmv_q4_k_r1_wc` computes, with the same device code: the same bits as the
//! separate launches (tests/gpu_kernels.rs checks it).
//!
//! What the host guarantees ([`MatvecChain::new`] checks it): the grid is resident at once (at
//! most the occupancy times the multiprocessors; a block that never ran would hold every other
//! at the barrier), and no phase writes memory that it or an earlier phase read or wrote (the
//! activations are read through the non-coherent read-only cache, which the barrier does not
//! invalidate: a rewritten buffer could be read stale).
//!
//! The result on the H200: slower than the same kernels replayed as a CUDA graph on every shape
//! measured (1-8 µs more a phase boundary; docs/perf.md), so the executor does not use it.

use super::matmul::DeviceWeight;
use super::{CudaError, KernelSet};
use crate::gguf::GgmlType;
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use std::marker::PhantomData;
use std::sync::Arc;

/// Threads a block (kernels/matvec.cu `MMV_THREADS`); the chains' kernels emulate these blocks.
const THREADS: u32 = 128;
/// Output columns a block of both chain kernels (mmv_impl's C, wc_impl's warps).
const COLUMNS: usize = 4;
/// Bytes of one `ChainPhase` in the kernel's table: w, x, y, row_bytes (8 each), n, k (4 each).
const PHASE_BYTES: usize = 40;
/// The barrier's words (kernels/matvec.cu `BAR_WORDS`: the generation and the count, each on
/// its own 128-byte line).
const BAR_WORDS: usize = 64;

/// One phase of a chain: `y = x wᵀ` for one row of activations (`x` at least `w.k` floats, `y`
/// at least `w.n`; `y` is written by the launch).
pub struct Phase<'a> {
    pub w: &'a DeviceWeight,
    pub x: &'a CudaSlice<f32>,
    pub y: &'a CudaSlice<f32>,
}

/// A device range: start address and bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub at: u64,
    pub bytes: u64,
}

impl Range {
    fn overlaps(self, o: Range) -> bool {
        self.at < o.at + o.bytes && o.at < self.at + self.bytes
    }
}

/// What [`check_phases`] looks at in a phase: its shape and buffers.
#[derive(Debug, Clone, Copy)]
pub struct PhaseShape {
    pub ty: GgmlType,
    pub n: usize,
    pub k: usize,
    pub x: Range,
    pub y: Range,
}

/// The chain kernel for weights of `ty`, if there is one.
pub fn chain_kernel(ty: GgmlType) -> Option<&'static str> {
    match ty {
        GgmlType::Q4_0 => Some("mmv_chain_q4_0_r1"),
        GgmlType::Q4_K => Some("mmv_chain_q4_k_r1_wc"),
        _ => None,
    }
}

/// Why a chain of these phases cannot run, if it cannot: one weight type with a chain kernel,
/// shapes the kernel takes (K a whole number of 32-element blocks for Q4_0, of 256-element
/// super-blocks for Q4_K), activations 16-byte aligned and long enough, and no phase's `y`
/// overlapping its own or an earlier phase's `x` or `y`.
pub fn check_phases(phases: &[PhaseShape]) -> Result<(), String> {
    let first = phases.first().ok_or("a chain needs at least one phase")?;
    if chain_kernel(first.ty).is_none() {
        return Err(format!(
            "no chain kernel for {:?} weights (Q4_0, Q4_K)",
            first.ty
        ));
    }
    if i32::try_from(phases.len()).is_err() {
        return Err(format!("{} phases", phases.len()));
    }
    let unit = if first.ty == GgmlType::Q4_K { 256 } else { 32 };
    for (i, p) in phases.iter().enumerate() {
        if p.ty != first.ty {
            return Err(format!(
                "phase {i}: {:?} weights in a {:?} chain",
                p.ty, first.ty
            ));
        }
        if p.n == 0 || p.k == 0 || p.k % unit != 0 || i32::try_from(p.n.max(p.k)).is_err() {
            return Err(format!(
                "phase {i}: a [{}, {}] weight (K must be a positive multiple of {unit})",
                p.n, p.k
            ));
        }
        if p.x.at % 16 != 0 || p.y.at % 4 != 0 {
            return Err(format!(
                "phase {i}: x must be 16-byte aligned and y 4-byte aligned"
            ));
        }
        if p.x.bytes < 4 * p.k as u64 || p.y.bytes < 4 * p.n as u64 {
            return Err(format!(
                "phase {i}: x holds {} floats for K = {}, y {} for N = {}",
                p.x.bytes / 4,
                p.k,
                p.y.bytes / 4,
                p.n
            ));
        }
        let y = Range {
            at: p.y.at,
            bytes: 4 * p.n as u64,
        };
        for (j, e) in phases[..=i].iter().enumerate() {
            let x = Range {
                at: e.x.at,
                bytes: 4 * e.k as u64,
            };
            let ey = Range {
                at: e.y.at,
                bytes: 4 * e.n as u64,
            };
            if y.overlaps(x) || (j < i && y.overlaps(ey)) {
                return Err(format!(
                    "phase {i} writes memory phase {j} {} (a chain writes each buffer once, \
                     and nothing it has read: the read-only cache is not coherent)",
                    if y.overlaps(x) { "reads" } else { "writes" }
                ));
            }
        }
    }
    Ok(())
}

/// A chain of one-row matvecs in one launch, on one stream. Holds the buffers' addresses, so
/// it borrows them for its life.
pub struct MatvecChain<'a> {
    kernel: &'static str,
    func: CudaFunction,
    table: CudaSlice<u8>,
    bar: CudaSlice<u32>,
    phases: i32,
    grid: u32,
    resident: u32,
    _buffers: PhantomData<&'a CudaSlice<f32>>,
}

impl<'a> MatvecChain<'a> {
    /// Checks the phases ([`check_phases`]), uploads their table and sizes the grid: every
    /// block resident at once (the kernel's occupancy times the device's multiprocessors),
    /// and no more blocks than the largest phase has.
    pub fn new(
        ks: &KernelSet,
        stream: &Arc<CudaStream>,
        phases: &[Phase<'a>],
    ) -> Result<MatvecChain<'a>, CudaError> {
        let kernel = phases
            .first()
            .and_then(|p| chain_kernel(p.w.ty))
            .unwrap_or("mmv_chain");
        let bad = |reason: String| CudaError::Launch {
            kernel: kernel.to_string(),
            reason,
        };
        let range = |s: &CudaSlice<f32>| Range {
            at: s.device_ptr(stream).0,
            bytes: 4 * s.len() as u64,
        };
        let shapes: Vec<PhaseShape> = phases
            .iter()
            .map(|p| PhaseShape {
                ty: p.w.ty,
                n: p.w.n,
                k: p.w.k,
                x: range(p.x),
                y: range(p.y),
            })
            .collect();
        check_phases(&shapes).map_err(bad)?;
        let mut table = Vec::with_capacity(PHASE_BYTES * phases.len());
        for (p, s) in phases.iter().zip(&shapes) {
            table.extend_from_slice(&p.w.data.device_ptr(stream).0.to_le_bytes());
            table.extend_from_slice(&s.x.at.to_le_bytes());
            table.extend_from_slice(&s.y.at.to_le_bytes());
            table.extend_from_slice(&(p.w.row_bytes as i64).to_le_bytes());
            table.extend_from_slice(&(p.w.n as i32).to_le_bytes());
            table.extend_from_slice(&(p.w.k as i32).to_le_bytes());
        }
        let func = ks.function("matvec", kernel)?;
        let resident = func
            .occupancy_max_active_blocks_per_multiprocessor(THREADS, 0, None)
            .map_err(CudaError::driver(format!("the occupancy of {kernel}")))?;
        let sms = ks
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(CudaError::driver("the multiprocessor count"))?;
        if resident == 0 {
            return Err(bad("not one block fits on a multiprocessor".into()));
        }
        let widest = shapes
            .iter()
            .map(|s| s.n.div_ceil(COLUMNS))
            .max()
            .unwrap_or(1);
        let grid = (resident as usize * sms.max(1) as usize).min(widest) as u32;
        let upload = |what: &str| CudaError::driver(format!("{kernel}: uploading the {what}"));
        Ok(MatvecChain {
            kernel,
            func,
            table: stream.clone_htod(&table).map_err(upload("phase table"))?,
            bar: stream.alloc_zeros(BAR_WORDS).map_err(upload("barrier"))?,
            phases: phases.len() as i32,
            grid,
            resident,
            _buffers: PhantomData,
        })
    }

    /// Launches the chain on `stream` (the stream whose work wrote the phases' first `x`).
    pub fn launch(&mut self, stream: &Arc<CudaStream>) -> Result<(), CudaError> {
        let cfg = LaunchConfig {
            grid_dim: (self.grid, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&self.func);
        b.arg(&self.table).arg(&self.phases).arg(&mut self.bar);
        // SAFETY: the arguments are mmv_chain_<ty>'s (a table of `phases` ChainPhase records
        // whose buffers `new` checked and this chain borrows, their count, the BAR_WORDS
        // barrier words);
        // the grid is at most what the device holds at once, so every barrier is reached.
        unsafe { b.launch(cfg) }
            .map_err(CudaError::driver(format!("launching {}", self.kernel)))?;
        Ok(())
    }

    /// Runs on `blocks` blocks instead (at least 1, at most the grid `new` chose: fewer blocks
    /// take more of each phase's work a block and meet at cheaper barriers).
    pub fn set_grid(&mut self, blocks: u32) {
        self.grid = blocks.clamp(1, self.grid.max(1));
    }

    /// The kernel, its blocks, and how many of them a multiprocessor holds.
    pub fn kernel(&self) -> &'static str {
        self.kernel
    }
    pub fn grid(&self) -> u32 {
        self.grid
    }
    pub fn resident_per_sm(&self) -> u32 {
        self.resident
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(ty: GgmlType, n: usize, k: usize, x: u64, y: u64) -> PhaseShape {
        PhaseShape {
            ty,
            n,
            k,
            x: Range {
                at: x,
                bytes: 4 * k as u64,
            },
            y: Range {
                at: y,
                bytes: 4 * n as u64,
            },
        }
    }

    #[test]
    fn a_chain_of_fresh_buffers_passes() {
        let q = GgmlType::Q4_K;
        let ok = [
            shape(q, 512, 1024, 0x1000, 0x10000),
            shape(q, 1024, 512, 0x10000, 0x20000),
            shape(q, 7, 1024, 0x20000, 0x30000),
        ];
        assert_eq!(check_phases(&ok), Ok(()));
    }

    #[test]
    fn rewriting_what_the_chain_read_or_wrote_is_refused() {
        let q = GgmlType::Q4_0;
        // Ping-pong: phase 2 writes phase 0's x, which the read-only cache may still hold.
        let ping_pong = [
            shape(q, 64, 64, 0x1000, 0x2000),
            shape(q, 64, 64, 0x2000, 0x3000),
            shape(q, 64, 64, 0x3000, 0x1000),
        ];
        let e = check_phases(&ping_pong).unwrap_err();
        assert!(e.contains("phase 2 writes memory phase 0 reads"), "{e}");
        // Two phases writing one buffer.
        let twice = [
            shape(q, 64, 64, 0x1000, 0x2000),
            shape(q, 64, 64, 0x1000, 0x2080),
        ];
        let e = check_phases(&twice).unwrap_err();
        assert!(e.contains("phase 1 writes memory phase 0 writes"), "{e}");
        // A phase writing its own input.
        let e = check_phases(&[shape(q, 64, 64, 0x1000, 0x1040)]).unwrap_err();
        assert!(e.contains("phase 0 writes memory phase 0 reads"), "{e}");
    }

    #[test]
    fn shapes_and_types_the_kernels_do_not_take_are_refused() {
        let e = check_phases(&[]).unwrap_err();
        assert!(e.contains("at least one phase"), "{e}");
        let e = check_phases(&[shape(GgmlType::F16, 64, 64, 0x1000, 0x2000)]).unwrap_err();
        assert!(e.contains("no chain kernel for F16"), "{e}");
        let e = check_phases(&[shape(GgmlType::Q4_K, 64, 512 + 32, 0x1000, 0x9000)]).unwrap_err();
        assert!(e.contains("multiple of 256"), "{e}");
        let mixed = [
            shape(GgmlType::Q4_0, 256, 256, 0x1000, 0x2000),
            shape(GgmlType::Q4_K, 256, 256, 0x2000, 0x3000),
        ];
        let e = check_phases(&mixed).unwrap_err();
        assert!(e.contains("Q4_K weights in a Q4_0 chain"), "{e}");
        let e = check_phases(&[shape(GgmlType::Q4_0, 64, 64, 0x1004, 0x2000)]).unwrap_err();
        assert!(e.contains("16-byte aligned"), "{e}");
        let mut short = shape(GgmlType::Q4_0, 64, 64, 0x1000, 0x2000);
        short.y.bytes = 4 * 63;
        let e = check_phases(&[short]).unwrap_err();
        assert!(e.contains("y 63 for N = 64"), "{e}");
    }
}
