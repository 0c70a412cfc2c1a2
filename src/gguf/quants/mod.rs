//! CPU dequantization and reference quantization of ggml tensor types.
//!
//! Every function here follows ggml's reference C code (`dequantize_row_*` and
//! `quantize_row_*_ref` in `ggml-quants.c`) including the order of float operations, and Rust
//! never fuses a multiply and an add behind the programmer's back, so results match ggml's
//! reference (and the `gguf` Python package) to the last bit. docs/quants.md describes each
//! block layout and formula.
//!
//! Two levels of API:
//! - row functions ([`dequantize_row_f32`], [`dequantize_row_f16`], [`quantize_row_into`]) work on
//!   caller-owned buffers of one or more whole rows, never allocate, and check every length: this
//!   is what backends call on the fly;
//! - allocating functions ([`dequantize_f32`], [`dequantize_f16`], [`dequantize_rows_f32`],
//!   [`dequantize_rows_f16`], [`quantize_row`]); those that read a tensor name it in their
//!   errors.
//!
//! | type | dequantize | quantize |
//! | --- | --- | --- |
//! | F32, F16, BF16 | yes | yes |
//! | Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 | yes | yes (round to nearest, as ggml's `_ref`) |
//! | Q4_K, Q5_K, Q6_K | yes | yes (ggml's `_ref` scale search, no importance matrix) |

mod float;
mod kquants;
mod legacy;

pub(crate) use legacy::FIFTH_BITS;

use super::{GgmlType, GgufFile, TensorInfo};
use half::f16;
use std::fmt;
use std::ops::Range;

/// Types [`dequantize_row_f32`] and friends accept.
pub const DEQUANTIZE_TYPES: [GgmlType; 11] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Types [`quantize_row`] can produce.
pub const QUANTIZE_TYPES: [GgmlType; 11] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// True when tensors of type `ty` can be dequantized.
pub fn can_dequantize(ty: GgmlType) -> bool {
    DEQUANTIZE_TYPES.contains(&ty)
}

/// True when f32 data can be quantized to `ty`.
pub fn can_quantize(ty: GgmlType) -> bool {
    QUANTIZE_TYPES.contains(&ty)
}

/// A (de)quantization that cannot be done: an unsupported type or buffers of the wrong size.
/// `tensor` names the tensor when the call was about one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuantError {
    pub tensor: Option<String>,
    pub kind: QuantErrorKind,
}

/// What went wrong in a (de)quantization.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QuantErrorKind {
    #[error("cannot dequantize type {0}: m40-llm dequantizes {list}", list = type_list(&DEQUANTIZE_TYPES))]
    UnsupportedDequantize(GgmlType),

    #[error("cannot quantize to type {0}: m40-llm quantizes to {list}", list = type_list(&QUANTIZE_TYPES))]
    UnsupportedQuantize(GgmlType),

    #[error("{elements} elements are not a whole number of {ty} blocks of {block} elements")]
    PartialBlock {
        ty: GgmlType,
        elements: u64,
        block: u64,
    },

    #[error("{elements} elements of {ty} take {expected} bytes, but {found} bytes were given")]
    ByteLength {
        ty: GgmlType,
        elements: u64,
        expected: u64,
        found: u64,
    },

    #[error("rows {start}..{end} are outside the tensor's {n_rows} rows")]
    RowsOutOfRange { start: u64, end: u64, n_rows: u64 },

    #[error("{elements} elements do not fit in this machine's memory")]
    TooLarge { elements: u64 },
}

fn type_list(types: &[GgmlType]) -> String {
    types
        .iter()
        .map(|t| t.name())
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for QuantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.tensor {
            Some(name) => write!(f, "tensor {name:?}: {}", self.kind),
            None => write!(f, "{}", self.kind),
        }
    }
}

impl std::error::Error for QuantError {}

impl From<QuantErrorKind> for QuantError {
    fn from(kind: QuantErrorKind) -> Self {
        QuantError { tensor: None, kind }
    }
}

impl QuantError {
    fn in_tensor(mut self, t: &TensorInfo) -> Self {
        self.tensor = Some(t.name.clone());
        self
    }
}

/// Checks that `n_bytes` bytes hold exactly `elements` elements of `ty`.
fn check_lengths(ty: GgmlType, n_bytes: usize, elements: usize) -> Result<(), QuantError> {
    let elements = elements as u64;
    let block = ty.block_size();
    if !elements.is_multiple_of(block) {
        return Err(QuantErrorKind::PartialBlock {
            ty,
            elements,
            block,
        }
        .into());
    }
    let expected = (elements / block).saturating_mul(ty.type_size());
    if expected != n_bytes as u64 {
        return Err(QuantErrorKind::ByteLength {
            ty,
            elements,
            expected,
            found: n_bytes as u64,
        }
        .into());
    }
    Ok(())
}

/// Dequantizes `dst.len()` elements of type `ty` from `src` into `dst`.
///
/// `src` holds one or more whole rows (any whole number of blocks) and must be exactly
/// `ty.row_bytes(dst.len())` bytes. Never allocates.
pub fn dequantize_row_f32(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    check_lengths(ty, src.len(), dst.len())?;
    use GgmlType as T;
    match ty {
        T::F32 => float::f32_to_f32(src, dst),
        T::F16 => float::f16_to_f32(src, dst),
        T::BF16 => float::bf16_to_f32(src, dst),
        T::Q4_0 => blocks_f32(src, dst, legacy::dequantize_q4_0),
        T::Q4_1 => blocks_f32(src, dst, legacy::dequantize_q4_1),
        T::Q5_0 => blocks_f32(src, dst, legacy::dequantize_q5_0),
        T::Q5_1 => blocks_f32(src, dst, legacy::dequantize_q5_1),
        T::Q8_0 => blocks_f32(src, dst, legacy::dequantize_q8_0),
        T::Q4_K => blocks_f32(src, dst, kquants::dequantize_q4_k),
        T::Q5_K => blocks_f32(src, dst, kquants::dequantize_q5_k),
        T::Q6_K => blocks_f32(src, dst, kquants::dequantize_q6_k),
        _ => return Err(QuantErrorKind::UnsupportedDequantize(ty).into()),
    }
    Ok(())
}

/// Dequantizes like [`dequantize_row_f32`], then rounds each value to f16 (to nearest, ties to
/// even). F16 data is copied unchanged; values beyond f16's range become infinities.
pub fn dequantize_row_f16(ty: GgmlType, src: &[u8], dst: &mut [f16]) -> Result<(), QuantError> {
    check_lengths(ty, src.len(), dst.len())?;
    use GgmlType as T;
    match ty {
        T::F32 => float::f32_to_f16(src, dst),
        T::F16 => float::f16_to_f16(src, dst),
        T::BF16 => float::bf16_to_f16(src, dst),
        T::Q4_0 => blocks_f16(src, dst, legacy::dequantize_q4_0),
        T::Q4_1 => blocks_f16(src, dst, legacy::dequantize_q4_1),
        T::Q5_0 => blocks_f16(src, dst, legacy::dequantize_q5_0),
        T::Q5_1 => blocks_f16(src, dst, legacy::dequantize_q5_1),
        T::Q8_0 => blocks_f16(src, dst, legacy::dequantize_q8_0),
        T::Q4_K => blocks_f16(src, dst, kquants::dequantize_q4_k),
        T::Q5_K => blocks_f16(src, dst, kquants::dequantize_q5_k),
        T::Q6_K => blocks_f16(src, dst, kquants::dequantize_q6_k),
        _ => return Err(QuantErrorKind::UnsupportedDequantize(ty).into()),
    }
    Ok(())
}

/// Quantizes `src` (one or more whole rows) to `ty` into `dst`, which must be exactly
/// `ty.row_bytes(src.len())` bytes, bit for bit as ggml's `quantize_row_*_ref` (for F16: IEEE
/// round to nearest even; for BF16: ggml's rounding, NaNs made quiet). Never allocates. The
/// k-quants search scales per sub-block and are 20 to 30 times slower than the legacy formats.
pub fn quantize_row_into(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    if !can_quantize(ty) {
        return Err(QuantErrorKind::UnsupportedQuantize(ty).into());
    }
    check_lengths(ty, dst.len(), src.len())?;
    use GgmlType as T;
    match ty {
        T::F32 => float::quantize_f32(src, dst),
        T::F16 => float::quantize_f16(src, dst),
        T::BF16 => float::quantize_bf16(src, dst),
        T::Q4_0 => blocks_quantize(src, dst, legacy::quantize_q4_0),
        T::Q4_1 => blocks_quantize(src, dst, legacy::quantize_q4_1),
        T::Q5_0 => blocks_quantize(src, dst, legacy::quantize_q5_0),
        T::Q5_1 => blocks_quantize(src, dst, legacy::quantize_q5_1),
        T::Q8_0 => blocks_quantize(src, dst, legacy::quantize_q8_0),
        T::Q4_K => blocks_quantize(src, dst, kquants::quantize_q4_k),
        T::Q5_K => blocks_quantize(src, dst, kquants::quantize_q5_k),
        T::Q6_K => blocks_quantize(src, dst, kquants::quantize_q6_k),
        _ => return Err(QuantErrorKind::UnsupportedQuantize(ty).into()),
    }
    Ok(())
}

/// Quantizes `src` (a whole number of `ty` blocks) to a new buffer; see [`quantize_row_into`].
pub fn quantize_row(ty: GgmlType, src: &[f32]) -> Result<Vec<u8>, QuantError> {
    if !can_quantize(ty) {
        return Err(QuantErrorKind::UnsupportedQuantize(ty).into());
    }
    let n_bytes = ty
        .row_bytes(src.len() as u64)
        .ok_or(QuantErrorKind::PartialBlock {
            ty,
            elements: src.len() as u64,
            block: ty.block_size(),
        })?;
    let n_bytes = usize::try_from(n_bytes).map_err(|_| QuantErrorKind::TooLarge {
        elements: src.len() as u64,
    })?;
    let mut out = vec![0u8; n_bytes];
    quantize_row_into(ty, src, &mut out)?;
    Ok(out)
}

/// The whole tensor `t` of `file`, dequantized to f32 in ggml order (row after row).
pub fn dequantize_f32(file: &GgufFile, t: &TensorInfo) -> Result<Vec<f32>, QuantError> {
    dequantize_rows_f32(file, t, 0..t.n_rows())
}

/// The whole tensor `t` of `file`, dequantized to f16; see [`dequantize_row_f16`].
pub fn dequantize_f16(file: &GgufFile, t: &TensorInfo) -> Result<Vec<f16>, QuantError> {
    dequantize_rows_f16(file, t, 0..t.n_rows())
}

/// Rows `rows` of tensor `t` (rows of `ne[0]` elements), dequantized to f32. An embedding lookup
/// is `dequantize_rows_f32(file, t, token..token + 1)`.
pub fn dequantize_rows_f32(
    file: &GgufFile,
    t: &TensorInfo,
    rows: Range<u64>,
) -> Result<Vec<f32>, QuantError> {
    let (src, n) = rows_data(file, t, &rows).map_err(|e| e.in_tensor(t))?;
    let mut out = vec![0f32; n];
    dequantize_row_f32(t.ty, src, &mut out).map_err(|e| e.in_tensor(t))?;
    Ok(out)
}

/// Rows `rows` of tensor `t`, dequantized to f16; see [`dequantize_row_f16`].
pub fn dequantize_rows_f16(
    file: &GgufFile,
    t: &TensorInfo,
    rows: Range<u64>,
) -> Result<Vec<f16>, QuantError> {
    let (src, n) = rows_data(file, t, &rows).map_err(|e| e.in_tensor(t))?;
    let mut out = vec![f16::ZERO; n];
    dequantize_row_f16(t.ty, src, &mut out).map_err(|e| e.in_tensor(t))?;
    Ok(out)
}

/// The bytes of rows `rows` of `t` and their number of elements, all checked.
fn rows_data<'f>(
    file: &'f GgufFile,
    t: &TensorInfo,
    rows: &Range<u64>,
) -> Result<(&'f [u8], usize), QuantError> {
    if !can_dequantize(t.ty) {
        return Err(QuantErrorKind::UnsupportedDequantize(t.ty).into());
    }
    let n_rows = t.n_rows();
    if rows.start > rows.end || rows.end > n_rows {
        return Err(QuantErrorKind::RowsOutOfRange {
            start: rows.start,
            end: rows.end,
            n_rows,
        }
        .into());
    }
    let row_len = t.row_len();
    let row_bytes =
        t.ty.row_bytes(row_len)
            .ok_or(QuantErrorKind::PartialBlock {
                ty: t.ty,
                elements: row_len,
                block: t.ty.block_size(),
            })?;
    let data = file.tensor_data(t);
    // The reader validated n_bytes = row_bytes * n_rows; a TensorInfo from elsewhere might not.
    if row_bytes.checked_mul(n_rows) != Some(data.len() as u64) {
        return Err(QuantErrorKind::ByteLength {
            ty: t.ty,
            elements: t.n_elements(),
            expected: row_bytes.saturating_mul(n_rows),
            found: data.len() as u64,
        }
        .into());
    }
    let count = rows.end - rows.start;
    let too_large = QuantErrorKind::TooLarge {
        elements: count.saturating_mul(row_len),
    };
    let n = count
        .checked_mul(row_len)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| too_large.clone())?;
    // In range of `data` (checked above), hence of usize.
    let start = (rows.start * row_bytes) as usize;
    let end = (rows.end * row_bytes) as usize;
    Ok((&data[start..end], n))
}

/// `src` as consecutive `B`-byte blocks, `dst` as `N`-element blocks; lengths were checked.
#[inline(always)]
fn blocks_f32<const B: usize, const N: usize>(
    src: &[u8],
    dst: &mut [f32],
    f: impl Fn(&[u8; B], &mut [f32; N]),
) {
    for (s, d) in src.chunks_exact(B).zip(dst.chunks_exact_mut(N)) {
        f(array(s), array_mut(d));
    }
}

/// Like [`blocks_f32`] into f16: blocks are dequantized to f32 on the stack, a few at a time,
/// then rounded to f16 with the CPU's conversion instructions where it has them.
#[inline(always)]
fn blocks_f16<const B: usize, const N: usize>(
    src: &[u8],
    dst: &mut [f16],
    f: impl Fn(&[u8; B], &mut [f32; N]),
) {
    use half::slice::HalfFloatSliceExt;
    const CHUNK: usize = 256;
    const { assert!(N <= CHUNK && CHUNK.is_multiple_of(N)) };
    let per_chunk = CHUNK / N;
    let mut tmp = [0f32; CHUNK];
    for (s, d) in src.chunks(per_chunk * B).zip(dst.chunks_mut(CHUNK)) {
        let t = &mut tmp[..d.len()];
        blocks_f32(s, t, &f);
        d.convert_from_f32_slice(t);
    }
}

#[inline(always)]
fn blocks_quantize<const N: usize, const B: usize>(
    src: &[f32],
    dst: &mut [u8],
    f: impl Fn(&[f32; N], &mut [u8; B]),
) {
    for (s, d) in src.chunks_exact(N).zip(dst.chunks_exact_mut(B)) {
        f(array(s), array_mut(d));
    }
}

/// A `chunks_exact(N)` chunk as an array reference.
#[inline(always)]
fn array<T, const N: usize>(s: &[T]) -> &[T; N] {
    s.try_into().expect("chunks_exact yields N elements")
}

#[inline(always)]
fn array_mut<T, const N: usize>(s: &mut [T]) -> &mut [T; N] {
    s.try_into().expect("chunks_exact_mut yields N elements")
}

/// The little-endian f16 at `b[i..i + 2]`, widened to f32 (exactly).
#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    // half's scalar conversion is an out-of-line F16C call (or software without F16C). An
    // inlined branch-free conversion measured twice as slow here: inlined, it kept the
    // block's loop from vectorizing as well.
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Stores `x` rounded to f16 (to nearest, ties to even), little-endian, at `b[i..i + 2]`.
#[inline(always)]
fn put_f16(b: &mut [u8], i: usize, x: f32) {
    b[i..i + 2].copy_from_slice(&f16::from_f32(x).to_bits().to_le_bytes());
}

#[cfg(test)]
mod tests;
