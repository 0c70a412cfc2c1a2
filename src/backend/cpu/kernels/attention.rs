//! Causal grouped-query attention over the FP16 KV cache, and the cache write.
//!
//! The caches of one layer are `[cell, n_kv_heads * head_dim]` arrays of `half::f16`. The
//! runtime decides which cells each token may attend (its own sequence, positions up to its
//! own: the causal mask, with no mask tensor), so several sequences can share one step. A
//! token's cells are a [`KvSpan`]: positions `lo..hi` of a paged sequence, position `p` in cell
//! `pages[p / page_size] * page_size + p % page_size`; a plain cell list is the span of page
//! size 1.

#[cfg(target_arch = "x86_64")]
use super::simd::Avx2;
use super::simd::{LANES, Lanes, Simd, V8, f16_to_f32};
use super::softmax::softmax_in_place;
use super::{KernelError, check_len};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// The attention's head layout and score scale (see `ir::op::AttentionParams`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionShape {
    /// Query heads `H`.
    pub n_heads: usize,
    /// Key/value heads `Hkv` (dividing `H`); query head `h` reads KV head `h / (H / Hkv)`.
    pub n_kv_heads: usize,
    /// Elements per head `D`.
    pub head_dim: usize,
    /// Multiplies the scores: `1 / sqrt(D)` unless the model says otherwise.
    pub scale: f32,
}

/// The cells one token attends, oldest first: positions `lo..hi` of a sequence whose position
/// `p` is in cell `pages[p / page_size] * page_size + p % page_size` (`page_size` a power of
/// two).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvSpan<'a> {
    pub pages: &'a [u32],
    pub page_size: usize,
    pub lo: usize,
    pub hi: usize,
}

impl KvSpan<'_> {
    fn len(&self) -> usize {
        self.hi.saturating_sub(self.lo)
    }

    /// The span's cells as runs of consecutive cells `(first, count)`, one per page touched.
    fn runs(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let ps = self.page_size;
        let (first, last) = (self.lo / ps, self.hi.saturating_sub(1) / ps);
        let pages = if self.hi > self.lo {
            self.pages.get(first..=last).unwrap_or(&[])
        } else {
            &[]
        };
        pages.iter().enumerate().map(move |(i, &page)| {
            let index = first + i;
            let start = (index * ps).max(self.lo);
            let end = ((index + 1) * ps).min(self.hi);
            (page as usize * ps + start % ps, end - start)
        })
    }
}

/// For token `t` and query head `h` (KV head `g = h / (H / Hkv)`):
/// `s_c = scale * dot(q[t, h], K[c, g])` over the cells `c` in `cells[t]` (in that order),
/// `w = softmax(s)` (max-subtracted, f32 with an f64 sum), `y[t, h] = sum_c w_c * V[c, g]`, K and
/// V widened from FP16. `q` and `y` are `[T, H * D]` with `T = cells.len()`; every token must
/// attend at least one cell. ggml (flash attention off): `ggml_mul_mat(k, q)`,
/// `ggml_soft_max_ext(kq, mask, scale)`, `ggml_mul_mat(v, kq)` — where ggml rounds `q` and the
/// weights to FP16 for its FP16 dot products, this kernel keeps them in FP32.
pub fn attention(
    q: &[f32],
    k_cache: &[f16],
    v_cache: &[f16],
    cells: &[&[u32]],
    shape: &AttentionShape,
    y: &mut [f32],
) -> Result<(), KernelError> {
    attention_with(Simd::detect(), q, k_cache, v_cache, cells, shape, y)
}

/// [`attention`] with a chosen instruction set (tests compare them).
pub fn attention_with(
    simd: Simd,
    q: &[f32],
    k_cache: &[f16],
    v_cache: &[f16],
    cells: &[&[u32]],
    shape: &AttentionShape,
    y: &mut [f32],
) -> Result<(), KernelError> {
    let spans: Vec<KvSpan> = cells
        .iter()
        .map(|c| KvSpan {
            pages: c,
            page_size: 1,
            lo: 0,
            hi: c.len(),
        })
        .collect();
    attention_paged_with(simd, q, k_cache, v_cache, &spans, shape, y)
}

/// [`attention`] over paged spans: token `t` attends the cells of `spans[t]`, in position order.
pub fn attention_paged(
    q: &[f32],
    k_cache: &[f16],
    v_cache: &[f16],
    spans: &[KvSpan],
    shape: &AttentionShape,
    y: &mut [f32],
) -> Result<(), KernelError> {
    attention_paged_with(Simd::detect(), q, k_cache, v_cache, spans, shape, y)
}

/// [`attention_paged`] with a chosen instruction set.
pub fn attention_paged_with(
    simd: Simd,
    q: &[f32],
    k_cache: &[f16],
    v_cache: &[f16],
    spans: &[KvSpan],
    shape: &AttentionShape,
    y: &mut [f32],
) -> Result<(), KernelError> {
    let simd = simd.checked()?;
    let &AttentionShape {
        n_heads: h,
        n_kv_heads: hkv,
        head_dim: d,
        scale,
    } = shape;
    if h == 0 || hkv == 0 || d == 0 || h % hkv != 0 {
        return Err(KernelError::Invalid(format!(
            "attention: {h} query heads, {hkv} KV heads of {d} elements: KV heads must divide \
             query heads, none zero"
        )));
    }
    let t = spans.len();
    check_len(
        "attention q length (tokens x heads x head_dim)",
        q.len(),
        t * h * d,
    )?;
    check_len("attention output length", y.len(), q.len())?;
    let kv_dim = hkv * d;
    let n_cells = cache_cells(k_cache, v_cache, kv_dim)?;
    for (tok, span) in spans.iter().enumerate() {
        if span.len() == 0 {
            return Err(KernelError::NoCells { token: tok });
        }
        check_span(span, tok, n_cells)?;
    }
    let group = h / hkv;
    let attend: AttendFn = match simd {
        Simd::Portable => attend_portable,
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2Fma => attend_avx2,
    };
    let longest = spans.iter().map(|c| c.len()).max().unwrap_or(0);
    y.par_chunks_mut(d).enumerate().for_each_init(
        || Vec::with_capacity(longest),
        |scores, (i, yh)| {
            let (tok, head) = (i / h, i % h);
            let job = Head {
                q: &q[i * d..(i + 1) * d],
                k_cache,
                v_cache,
                span: spans[tok],
                kv_dim,
                offset: (head / group) * d,
                scale,
            };
            // SAFETY: `simd.checked()` above: this CPU runs the chosen instruction set.
            unsafe { attend(&job, scores, yh) }
        },
    );
    Ok(())
}

/// One (token, head) of the attention.
struct Head<'a> {
    q: &'a [f32],
    k_cache: &'a [f16],
    v_cache: &'a [f16],
    span: KvSpan<'a>,
    kv_dim: usize,
    /// Where the KV head starts within a cache row.
    offset: usize,
    scale: f32,
}

type AttendFn = unsafe fn(&Head, &mut Vec<f32>, &mut [f32]);

fn attend_portable(job: &Head, scores: &mut Vec<f32>, y: &mut [f32]) {
    attend::<Lanes>(job, scores, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2(job: &Head, scores: &mut Vec<f32>, y: &mut [f32]) {
    attend::<Avx2>(job, scores, y)
}

#[inline(always)]
fn attend<V: V8>(job: &Head, scores: &mut Vec<f32>, y: &mut [f32]) {
    let d = job.q.len();
    let start = |c: usize| c * job.kv_dim + job.offset;
    scores.clear();
    for (first, n) in job.span.runs() {
        let rows = &job.k_cache[start(first)..];
        for i in 0..n {
            let k = &rows[i * job.kv_dim..][..d];
            scores.push(job.scale * dot_f16::<V>(job.q, k));
        }
    }
    softmax_in_place(scores);
    y.fill(0.0);
    let whole = d / LANES * LANES;
    let mut weights = scores.iter();
    for (first, n) in job.span.runs() {
        // One page's cells are consecutive rows of the cache.
        let rows = &job.v_cache[start(first)..];
        for (i, &w) in (0..n).zip(weights.by_ref()) {
            let v = &rows[i * job.kv_dim..][..d];
            let wv = V::splat(w);
            for (y8, v8) in y[..whole]
                .chunks_exact_mut(LANES)
                .zip(v.chunks_exact(LANES))
            {
                V::load(y8).madd(wv, V::from_f16(v8)).store(y8);
            }
            for (y, v) in y[whole..].iter_mut().zip(&v[whole..]) {
                *y = V::madd1(w, f16_to_f32(v.to_bits()), *y);
            }
        }
    }
}

/// `dot(q, k)` with `k` widened from FP16, 8 lanes at a time, then the tail.
#[inline(always)]
fn dot_f16<V: V8>(q: &[f32], k: &[f16]) -> f32 {
    let mut acc = V::zero();
    let (qc, kc) = (q.chunks_exact(LANES), k.chunks_exact(LANES));
    let (qr, kr) = (qc.remainder(), kc.remainder());
    for (q8, k8) in qc.zip(kc) {
        acc = acc.madd(V::load(q8), V::from_f16(k8));
    }
    let mut sum = acc.hsum();
    for (&q, k) in qr.iter().zip(kr) {
        sum = V::madd1(q, f16_to_f32(k.to_bits()), sum);
    }
    sum
}

/// Cells in the caches (equal lengths, whole rows of `kv_dim`).
fn cache_cells(k_cache: &[f16], v_cache: &[f16], kv_dim: usize) -> Result<usize, KernelError> {
    check_len(
        "V cache length (must equal the K cache's)",
        v_cache.len(),
        k_cache.len(),
    )?;
    if kv_dim == 0 || !k_cache.len().is_multiple_of(kv_dim) {
        return Err(KernelError::Invalid(format!(
            "a KV cache of {} values is not whole rows of {kv_dim}",
            k_cache.len()
        )));
    }
    Ok(k_cache.len() / kv_dim)
}

/// Checks that a span's pages cover its positions and its cells are in the cache.
fn check_span(span: &KvSpan, token: usize, n_cells: usize) -> Result<(), KernelError> {
    let ps = span.page_size;
    let pages_needed = span.hi.div_ceil(ps.max(1));
    if !ps.is_power_of_two() || span.pages.len() < pages_needed {
        return Err(KernelError::OutOfRange {
            what: "attended position of token (past its mapped pages)",
            index: token,
            value: span.hi as i64 - 1,
            limit: span.pages.len() * ps,
        });
    }
    let n_pages = n_cells / ps;
    match span.pages[span.lo / ps..pages_needed]
        .iter()
        .find(|&&p| p as usize >= n_pages)
    {
        Some(&p) => Err(KernelError::OutOfRange {
            what: "cache cell of token",
            index: token,
            value: (p as usize * ps) as i64,
            limit: n_cells,
        }),
        None => Ok(()),
    }
}

fn check_cells(cells: &[u32], token: usize, n_cells: usize) -> Result<(), KernelError> {
    match cells.iter().find(|&&c| c as usize >= n_cells) {
        Some(&c) => Err(KernelError::OutOfRange {
            what: "cache cell of token",
            index: token,
            value: i64::from(c),
            limit: n_cells,
        }),
        None => Ok(()),
    }
}

/// Checks a write of `T = cells.len()` rows of `kv_dim` into the caches.
pub(crate) fn check_kv_write(
    k: &[f32],
    v: &[f32],
    cells: &[u32],
    kv_dim: usize,
    k_cache: &[f16],
    v_cache: &[f16],
) -> Result<(), KernelError> {
    check_len(
        "kv_write k length (cells x kv_dim)",
        k.len(),
        cells.len() * kv_dim,
    )?;
    check_len(
        "kv_write v length (cells x kv_dim)",
        v.len(),
        cells.len() * kv_dim,
    )?;
    let n_cells = cache_cells(k_cache, v_cache, kv_dim)?;
    for (t, &c) in cells.iter().enumerate() {
        check_cells(&[c], t, n_cells)?;
    }
    Ok(())
}

/// `dst = src` rounded to FP16 (round to nearest, ties to even).
pub(crate) fn store_f16(src: &[f32], dst: &mut [f16]) {
    dst.convert_from_f32_slice(src);
}

/// Stores token `t`'s `k[t]` and `v[t]` (`kv_dim` each), rounded to FP16 (nearest even), into
/// cell `cells[t]` of the K and V caches (`[cell, kv_dim]`). ggml: `ggml_set_rows` /
/// `ggml_cpy` into the f16 cache (`GGML_FP32_TO_FP16`).
pub fn kv_write(
    k: &[f32],
    v: &[f32],
    cells: &[u32],
    kv_dim: usize,
    k_cache: &mut [f16],
    v_cache: &mut [f16],
) -> Result<(), KernelError> {
    check_kv_write(k, v, cells, kv_dim, k_cache, v_cache)?;
    for (t, &c) in cells.iter().enumerate() {
        let c = c as usize;
        store_f16(
            &k[t * kv_dim..][..kv_dim],
            &mut k_cache[c * kv_dim..][..kv_dim],
        );
        store_f16(
            &v[t * kv_dim..][..kv_dim],
            &mut v_cache[c * kv_dim..][..kv_dim],
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paged_spans_read_the_cells_a_cell_list_names() {
        let shape = AttentionShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            scale: 0.3,
        };
        let (kv_dim, n_cells) = (16, 32);
        let val = |i: usize| f16::from_f32(((i * 37 % 101) as f32 - 50.0) / 40.0);
        let k: Vec<f16> = (0..n_cells * kv_dim).map(val).collect();
        let v: Vec<f16> = (0..n_cells * kv_dim).map(|i| val(i + 7)).collect();
        let q: Vec<f32> = (0..3 * 32)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 9.0)
            .collect();
        // Pages of 4 cells: positions 0..=9 of a sequence on pages 5, 2, 7.
        let pages = [5u32, 2, 7];
        let cell = |p: usize| pages[p / 4] * 4 + (p % 4) as u32;
        let spans: Vec<KvSpan> = [(0, 10), (3, 9), (6, 7)]
            .iter()
            .map(|&(lo, hi)| KvSpan {
                pages: &pages,
                page_size: 4,
                lo,
                hi,
            })
            .collect();
        let lists: Vec<Vec<u32>> = spans
            .iter()
            .map(|s| (s.lo..s.hi).map(cell).collect())
            .collect();
        let cells: Vec<&[u32]> = lists.iter().map(|l| &l[..]).collect();
        let (mut a, mut b) = (vec![0.0; q.len()], vec![0.0; q.len()]);
        attention(&q, &k, &v, &cells, &shape, &mut a).unwrap();
        attention_paged(&q, &k, &v, &spans, &shape, &mut b).unwrap();
        assert_eq!(a, b);
        // A span past its pages is an error, not a read out of bounds.
        let short = [KvSpan {
            pages: &pages[..2],
            page_size: 4,
            lo: 0,
            hi: 10,
        }];
        assert!(attention_paged(&q[..32], &k, &v, &short, &shape, &mut b[..32]).is_err());
    }
}
