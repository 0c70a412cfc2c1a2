//! Device memory as the executor addresses it: a [`Span`] is a typed address and a length in
//! elements, taken from a [`CudaSlice`] the executor owns (its arena, KV cache, weights) or from
//! a part of one. Kernels get raw addresses, so a step can hand one kernel an input and an output
//! that live in the same allocation (the activation arena) without Rust's borrows of the slice
//! getting in the way; the plan guarantees that they do not overlap (`cpu::arena::check_disjoint`,
//! checked again at load).
//!
//! Everything runs on one stream, in order, so no event tracking is needed between kernels;
//! a span is valid as long as the slice it came from, which the executor keeps for its life.

use super::CudaError;
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DeviceRepr, PinnedHostSlice, ValidAsZeroBits,
};
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;

/// `len` elements of `T` at device address `ptr`.
pub struct Span<T> {
    ptr: CUdeviceptr,
    len: usize,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for Span<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Span<T> {}

impl<T> std::fmt::Debug for Span<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Span({:#x}, {})", self.ptr, self.len)
    }
}

impl<T> Span<T> {
    /// The whole of `s`.
    pub fn of(s: &CudaSlice<T>) -> Span<T> {
        let stream = s.stream().clone();
        let (ptr, _sync) = s.device_ptr(&stream);
        Span {
            ptr,
            len: s.len(),
            _t: PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address, to push as a kernel argument.
    pub fn ptr(&self) -> &CUdeviceptr {
        &self.ptr
    }

    /// Elements `start..start + len`, or an error naming `what` when they are not inside.
    pub fn sub(&self, start: usize, len: usize, what: &str) -> Result<Span<T>, CudaError> {
        match start.checked_add(len) {
            Some(end) if end <= self.len => Ok(Span {
                ptr: self.ptr + (start * std::mem::size_of::<T>()) as CUdeviceptr,
                len,
                _t: PhantomData,
            }),
            _ => Err(CudaError::Launch {
                kernel: what.into(),
                reason: format!(
                    "elements {start}..{} are outside a buffer of {}",
                    start.saturating_add(len),
                    self.len
                ),
            }),
        }
    }

    /// The first `len` elements.
    pub fn prefix(&self, len: usize, what: &str) -> Result<Span<T>, CudaError> {
        self.sub(0, len, what)
    }

    /// The same memory as elements of `U`, which must have `T`'s size (an `i32` buffer read
    /// as `f32` bits), or an error.
    pub fn cast<U>(self) -> Result<Span<U>, CudaError> {
        if std::mem::size_of::<U>() != std::mem::size_of::<T>() {
            return Err(CudaError::Launch {
                kernel: "a buffer cast".into(),
                reason: format!(
                    "{} bytes per element read as {}",
                    std::mem::size_of::<T>(),
                    std::mem::size_of::<U>()
                ),
            });
        }
        Ok(Span {
            ptr: self.ptr,
            len: self.len,
            _t: PhantomData,
        })
    }

    fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }
}

/// Device memory a launcher accepts: a [`CudaSlice`] (tests, scratch) or a [`Span`] (the
/// executor's arena).
pub trait DeviceSpan<T> {
    fn span(&self) -> Span<T>;
}

impl<T> DeviceSpan<T> for CudaSlice<T> {
    fn span(&self) -> Span<T> {
        Span::of(self)
    }
}

impl<T> DeviceSpan<T> for Span<T> {
    fn span(&self) -> Span<T> {
        *self
    }
}

/// Asynchronous copy of `src` into the start of `dst` (`dst` at least as long).
pub fn upload<T: DeviceRepr>(
    stream: &Arc<CudaStream>,
    src: &[T],
    dst: Span<T>,
    what: &str,
) -> Result<(), CudaError> {
    let dst = dst.prefix(src.len(), what)?;
    if src.is_empty() {
        return Ok(());
    }
    // SAFETY: `dst` holds `src.len()` elements of T (checked above) and lives as long as the
    // executor; a copy from pageable host memory has read `src` when the call returns.
    unsafe {
        cudarc::driver::result::memcpy_htod_async(dst.ptr, src, stream.cu_stream())
            .map_err(CudaError::driver(format!("copying {what} to the device")))
    }
}

/// Asynchronous copy of the elements `range` of pinned `src` into the start of `dst` (`dst` at
/// least as long): one driver call, no staging copy.
///
/// # Safety
/// The copy engine reads `src` after this returns: `src[range]` must not be written, and `src`
/// not freed, until the copy has completed (a synchronize of `stream`, or an event recorded on
/// it after this call, has returned).
pub unsafe fn upload_pinned<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    src: &PinnedHostSlice<T>,
    range: Range<usize>,
    dst: Span<T>,
    what: &str,
) -> Result<(), CudaError> {
    let host = src
        .as_slice()
        .map_err(CudaError::driver(format!("pinned host memory of {what}")))?;
    let len = host.len();
    let host = host.get(range.clone()).ok_or_else(|| CudaError::Launch {
        kernel: what.into(),
        reason: format!(
            "elements {}..{} are outside a host buffer of {len}",
            range.start, range.end
        ),
    })?;
    let dst = dst.prefix(host.len(), what)?;
    if host.is_empty() {
        return Ok(());
    }
    // SAFETY: `dst` holds `host.len()` elements of T (checked above); the caller keeps `host`
    // unchanged and alive until the copy has completed.
    unsafe {
        cudarc::driver::result::memcpy_htod_async(dst.ptr, host, stream.cu_stream())
            .map_err(CudaError::driver(format!("copying {what} to the device")))
    }
}

/// Copy of `src` into the first `len` elements of pinned `dst` (one driver call, no staging
/// copy); waits for the stream, so `dst` holds the values when it returns and any earlier
/// failure of the stream's work is reported here.
pub fn download_pinned<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    src: Span<T>,
    dst: &mut PinnedHostSlice<T>,
    len: usize,
    what: &str,
) -> Result<(), CudaError> {
    let src = src.prefix(len, what)?;
    let host = dst
        .as_mut_slice()
        .map_err(CudaError::driver(format!("pinned host memory of {what}")))?;
    let cap = host.len();
    let host = host.get_mut(..len).ok_or_else(|| CudaError::Launch {
        kernel: what.into(),
        reason: format!("{len} elements into a host buffer of {cap}"),
    })?;
    if !host.is_empty() {
        // SAFETY: `src` holds `len` elements of T (checked above); `host` stays borrowed until
        // the synchronize below has returned, so the copy has completed (or the stream failed,
        // and it will not run) before anyone reads or frees it.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(host, src.ptr, stream.cu_stream())
                .map_err(CudaError::driver(format!("copying {what} from the device")))?;
        }
    }
    stream
        .synchronize()
        .map_err(CudaError::driver(format!("finishing the step ({what})")))
}

/// Copy of `src` into `dst` (same length); waits for the stream, so `dst` holds the values when
/// it returns and any earlier failure of the stream's work is reported here.
pub fn download<T: DeviceRepr>(
    stream: &Arc<CudaStream>,
    src: Span<T>,
    dst: &mut [T],
    what: &str,
) -> Result<(), CudaError> {
    let src = src.prefix(dst.len(), what)?;
    if !dst.is_empty() {
        // SAFETY: `src` holds `dst.len()` elements of T (checked above).
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(dst, src.ptr, stream.cu_stream())
                .map_err(CudaError::driver(format!("copying {what} from the device")))?;
        }
    }
    stream
        .synchronize()
        .map_err(CudaError::driver(format!("finishing the step ({what})")))
}

/// Asynchronous device-to-device copy of `src` into `dst` (same length, not overlapping).
pub fn copy<T>(
    stream: &Arc<CudaStream>,
    src: Span<T>,
    dst: Span<T>,
    what: &str,
) -> Result<(), CudaError> {
    if src.len != dst.len {
        return Err(CudaError::Launch {
            kernel: what.into(),
            reason: format!("copy of {} elements into {}", src.len, dst.len),
        });
    }
    // SAFETY: both spans are inside live allocations of `len` elements; the caller keeps them
    // apart.
    unsafe {
        cudarc::driver::result::memcpy_dtod_async(dst.ptr, src.ptr, src.bytes(), stream.cu_stream())
            .map_err(CudaError::driver(what.to_string()))
    }
}
