//! A step's traffic between the host and the device, packed so that a decode step pays one
//! upload and one download (each a single driver call from pinned host memory) around its
//! kernels, instead of a pageable copy per input and a synchronize per result.
//!
//! One device buffer of `i32` holds, at offsets fixed at load ([`IoLayout`]):
//!
//! ```text
//! tokens [max_tokens] | positions [max_tokens] | slots [max_tokens] | output rows [max_outputs]
//! | flag [1] | results [capacity]
//! ```
//!
//! The host packs a step's integers and the non-finite flag's initial value into a pinned
//! staging buffer of the same layout ([`pack_step`]) and copies `tokens..=flag` in one copy. The
//! kernels read their inputs from those sub-spans (the addresses never change while graphs hold
//! them: the buffer is sized from the step limits at load), `first_non_finite` lowers the flag,
//! and argmax / top-k write their ids and values (the values as `f32` bits) right after it
//! ([`TopLayout`]), so one copy of `flag..` back and one synchronize bring all of it to the
//! host. The page tables stay a buffer of their own (a row per slot); their host mirror is
//! pinned too, and the rows a step touches go over in as few copies as there are runs of
//! neighbouring rows ([`table_runs`]), none on most decode steps.
//!
//! Pinned memory is read by the copy engine after the copy call returns, so a staging region
//! must not be rewritten until the copy that reads it has completed. [`Inflight`] keeps track:
//! a region enqueued for a copy is busy until the stream is synchronized (every step with
//! output rows ends with one, so decode steps never wait twice) or an event recorded after the
//! copy completes (a step without output rows records one right after its copy, so the next
//! step waits for that copy, not for the kernels: the host stays a step ahead of the device
//! through a prefill); writing a busy region waits first.

use super::CudaError;
use super::mem::{self, Span};
use crate::backend::step::{OutputKind, OutputRequest, PageTables, Step, TokenLogit};
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, PinnedHostSlice};
use std::ops::Range;
use std::sync::Arc;

/// Top-k width the results region holds per output row from load (the sampler asks for at
/// most `runtime::generate::MAX_BACKEND_TOP_K`); a wider request regrows the buffer, which
/// drops the captured graphs.
pub const RESERVED_TOP_K: usize = 1024;

/// Neighbouring page-table rows copied as one run when the rows between them (which the copy
/// rewrites with the values they already have) are at most this many entries.
pub const TABLE_GAP_ENTRIES: usize = 1024;

/// Where each field of the step I/O buffer starts, in `i32` elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoLayout {
    pub max_tokens: usize,
    pub max_outputs: usize,
    /// Elements of the results region (ids and values of argmax / top-k).
    pub capacity: usize,
}

impl IoLayout {
    /// The layout for steps of at most `max_tokens` tokens and `max_outputs` output rows, with
    /// room for `capacity` result elements; an error if it would not fit a 32-bit index.
    pub fn new(
        max_tokens: usize,
        max_outputs: usize,
        capacity: usize,
    ) -> Result<IoLayout, CudaError> {
        let layout = IoLayout {
            max_tokens,
            max_outputs,
            capacity,
        };
        let total = max_tokens
            .checked_mul(3)
            .and_then(|n| n.checked_add(max_outputs))
            .and_then(|n| n.checked_add(1))
            .and_then(|n| n.checked_add(capacity));
        match total {
            Some(n) if n <= i32::MAX as usize => Ok(layout),
            _ => Err(CudaError::Launch {
                kernel: "the step's I/O buffer".into(),
                reason: format!(
                    "{max_tokens} tokens, {max_outputs} output rows and {capacity} result \
                     elements do not fit 32-bit indices"
                ),
            }),
        }
    }

    /// The layout of a backend: results for `max_outputs` rows of top-k up to
    /// [`RESERVED_TOP_K`] (or the vocabulary, if smaller).
    pub fn for_limits(
        max_tokens: usize,
        max_outputs: usize,
        n_vocab: usize,
    ) -> Result<IoLayout, CudaError> {
        let capacity = TopLayout {
            rows: max_outputs,
            k: n_vocab.min(RESERVED_TOP_K),
        }
        .results_len();
        IoLayout::new(max_tokens, max_outputs, capacity)
    }

    pub fn tokens(&self) -> usize {
        0
    }

    pub fn positions(&self) -> usize {
        self.max_tokens
    }

    pub fn slots(&self) -> usize {
        2 * self.max_tokens
    }

    pub fn outputs(&self) -> usize {
        3 * self.max_tokens
    }

    /// The non-finite flag: the last element uploaded and the first downloaded.
    pub fn flag(&self) -> usize {
        self.outputs() + self.max_outputs
    }

    /// Elements the host uploads each step: `tokens..=flag`.
    pub fn upload_len(&self) -> usize {
        self.flag() + 1
    }

    /// Elements the host can download: the flag and the results.
    pub fn download_len(&self) -> usize {
        1 + self.capacity
    }

    /// Elements of the device buffer.
    pub fn len(&self) -> usize {
        self.upload_len() + self.capacity
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Where argmax / top-k put a step's results, relative to the flag: `rows × k` ids (row-major,
/// best first), then `rows × k` values as `f32` bits. `k` is the widest request of the step
/// (argmax: 1); every row gets `k` (the kernels run over all rows at once). `k == 0`: no row
/// asked, only the flag comes back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopLayout {
    pub rows: usize,
    pub k: usize,
}

impl TopLayout {
    /// The layout of `outputs`' requests over a vocabulary of `n_vocab`.
    pub fn of(outputs: &[OutputRequest], n_vocab: usize) -> TopLayout {
        let k = outputs
            .iter()
            .map(|o| match o.kind {
                OutputKind::Logits => 0,
                OutputKind::Argmax => 1,
                OutputKind::TopK(k) => (k as usize).min(n_vocab),
            })
            .max()
            .unwrap_or(0);
        TopLayout {
            rows: outputs.len(),
            k,
        }
    }

    /// Result elements (ids and values) the kernels write.
    pub fn results_len(&self) -> usize {
        2 * self.rows * self.k
    }

    /// Elements downloaded: the flag and the results.
    pub fn download_len(&self) -> usize {
        1 + self.results_len()
    }

    /// The ids, relative to the flag.
    pub fn ids(&self) -> Range<usize> {
        1..1 + self.rows * self.k
    }

    /// The values (`f32` bits), relative to the flag.
    pub fn vals(&self) -> Range<usize> {
        1 + self.rows * self.k..1 + 2 * self.rows * self.k
    }

    /// The `k` argument of `Ops::top_k`: 0 for argmax.
    pub fn kernel_k(&self) -> usize {
        if self.k == 1 { 0 } else { self.k }
    }
}

/// Writes `step`'s tokens, positions, slots and output rows and the flag's initial value into
/// `dst` (at least `layout.upload_len()` elements) at `layout`'s offsets. Elements past a
/// field's count keep whatever they held: the kernels read only the step's counts.
pub fn pack_step(
    layout: &IoLayout,
    step: &Step,
    flag: i32,
    dst: &mut [i32],
) -> Result<(), CudaError> {
    let (t, n_out) = (step.n_tokens(), step.outputs.len());
    if t > layout.max_tokens || n_out > layout.max_outputs || dst.len() < layout.upload_len() {
        return Err(CudaError::Launch {
            kernel: "the step's inputs".into(),
            reason: format!(
                "{t} tokens and {n_out} output rows into a staging buffer of {} for at most {} \
                 and {}",
                dst.len(),
                layout.max_tokens,
                layout.max_outputs
            ),
        });
    }
    // Each field stops at its own end, whatever the step holds (the step was validated: its
    // per-token fields are t long).
    let put = |dst: &mut [i32], at: usize, max: usize, src: &mut dyn Iterator<Item = u32>| {
        for (d, s) in dst[at..at + max].iter_mut().zip(src) {
            *d = s as i32;
        }
    };
    let (mt, mo) = (layout.max_tokens, layout.max_outputs);
    put(dst, layout.tokens(), mt, &mut step.tokens.iter().copied());
    put(
        dst,
        layout.positions(),
        mt,
        &mut step.positions.iter().copied(),
    );
    put(dst, layout.slots(), mt, &mut step.slots.iter().copied());
    put(
        dst,
        layout.outputs(),
        mo,
        &mut step.outputs.iter().map(|o| o.row),
    );
    dst[layout.flag()] = flag;
    Ok(())
}

/// The first `count` results of row `r` from a download (`down[0]` the flag, then `top`'s ids
/// and values) into `entries` (cleared first). Ids below 0 (a row with fewer numbers than `k`)
/// become 0, as the host's top-k never returns them.
pub fn row_results(
    down: &[i32],
    top: TopLayout,
    r: usize,
    count: usize,
    entries: &mut Vec<TokenLogit>,
) -> Result<(), CudaError> {
    entries.clear();
    let (ids, vals) = (top.ids(), top.vals());
    let out_of_range = || CudaError::Launch {
        kernel: "top-k results".into(),
        reason: format!(
            "row {r}, {count} entries of {top:?} in a download of {}",
            down.len()
        ),
    };
    if r >= top.rows || count > top.k {
        return Err(out_of_range());
    }
    for j in 0..count {
        let at = r * top.k + j;
        let id = down.get(ids.start + at).ok_or_else(out_of_range)?;
        let bits = down.get(vals.start + at).ok_or_else(out_of_range)?;
        entries.push(TokenLogit {
            id: (*id).max(0) as u32,
            logit: f32::from_bits(*bits as u32),
        });
    }
    Ok(())
}

/// The element ranges of the page tables to copy for the rows of `slots` (ascending, no
/// duplicates; a row is `stride` entries): one range per run of rows, neighbours merged when at
/// most `max_gap` entries of untouched rows lie between them.
pub fn table_runs(slots: &[u32], stride: usize, max_gap: usize) -> Vec<Range<usize>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    for &slot in slots {
        let row = slot as usize * stride..(slot as usize + 1) * stride;
        match runs.last_mut() {
            Some(last) if row.start >= last.end && row.start - last.end <= max_gap => {
                last.end = row.end;
            }
            _ => runs.push(row),
        }
    }
    runs
}

/// What a write to a staging region has to wait for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pending {
    /// Nothing in flight reads the region.
    #[default]
    Nothing,
    /// The stream (a copy enqueued and no event after it).
    Stream,
    /// The event recorded after the last copy.
    Event,
}

/// A pinned staging region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Region {
    /// The step's integers and the flag.
    Inputs,
    /// The page tables' mirror.
    Tables,
}

/// What each staging region waits for before it may be written again. Each region has its own
/// state, so a copy of one region does not make the other wait for more than its own copy.
/// There is one event: when it is recorded again, a region waiting on it waits for a later
/// point of the stream, which still follows that region's copy (events are recorded right
/// after copies, before the step's kernels).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Inflight {
    inputs: Pending,
    tables: Pending,
}

impl Inflight {
    fn slot(&mut self, region: Region) -> &mut Pending {
        match region {
            Region::Inputs => &mut self.inputs,
            Region::Tables => &mut self.tables,
        }
    }

    /// What to wait for before writing `region`.
    pub fn before_write(&self, region: Region) -> Pending {
        match region {
            Region::Inputs => self.inputs,
            Region::Tables => self.tables,
        }
    }

    /// A copy reading `region` was enqueued.
    pub fn enqueued(&mut self, region: Region) {
        *self.slot(region) = Pending::Stream;
    }

    /// The stream was synchronized: nothing is in flight.
    pub fn completed(&mut self) {
        *self = Inflight::default();
    }

    /// The event was waited for: the copies before it are done (those after it, `Stream`, not).
    pub fn event_completed(&mut self) {
        for p in [&mut self.inputs, &mut self.tables] {
            if *p == Pending::Event {
                *p = Pending::Nothing;
            }
        }
    }

    /// Whether an event should be recorded now (copies enqueued and no synchronize after).
    pub fn wants_event(&self) -> bool {
        self.inputs == Pending::Stream || self.tables == Pending::Stream
    }

    /// An event was recorded after every copy enqueued so far.
    pub fn event_recorded(&mut self) {
        for p in [&mut self.inputs, &mut self.tables] {
            if *p == Pending::Stream {
                *p = Pending::Event;
            }
        }
    }

    /// The most either region waits for (`Stream` over `Event` over `Nothing`).
    pub fn pending(&self) -> Pending {
        if self.wants_event() {
            Pending::Stream
        } else if self.inputs == Pending::Event || self.tables == Pending::Event {
            Pending::Event
        } else {
            Pending::Nothing
        }
    }
}

/// The step I/O buffer and the page tables on the device, their pinned host sides, and what is
/// in flight.
pub struct StepIo {
    stream: Arc<CudaStream>,
    layout: IoLayout,
    dev: CudaSlice<i32>,
    up: PinnedHostSlice<i32>,
    down: PinnedHostSlice<i32>,
    /// `max_slots × stride` page numbers, `-1` where unmapped.
    tables: CudaSlice<i32>,
    mirror: PinnedHostSlice<i32>,
    stride: usize,
    event: CudaEvent,
    state: Inflight,
}

/// `len` pinned `i32`s (at least one), every byte `byte` (0: zeros, 0xff: -1).
fn pinned(
    ctx: &Arc<CudaContext>,
    len: usize,
    byte: u8,
    what: &str,
) -> Result<PinnedHostSlice<i32>, CudaError> {
    let len = len.max(1);
    // SAFETY: the memory is uninitialized until the `write_bytes` below, which sets all `len`
    // elements before anything reads them; flags 0 (cacheable, not write-combined: the host
    // reads the download buffer).
    unsafe {
        let mut p = ctx
            .alloc_pinned_with_flags::<i32>(len, 0)
            .map_err(CudaError::driver(format!(
                "allocating pinned host memory for {what}"
            )))?;
        let ptr = p
            .as_mut_ptr()
            .map_err(CudaError::driver(format!("pinned host memory for {what}")))?;
        std::ptr::write_bytes(ptr, byte, len);
        Ok(p)
    }
}

fn device(stream: &Arc<CudaStream>, len: usize, what: &str) -> Result<CudaSlice<i32>, CudaError> {
    stream
        .alloc_zeros::<i32>(len.max(1))
        .map_err(CudaError::driver(format!("allocating {what} on the GPU")))
}

impl StepIo {
    /// The buffers for `layout` and page tables of `n_slots` rows of `stride` entries (all
    /// unmapped).
    pub fn new(
        stream: &Arc<CudaStream>,
        layout: IoLayout,
        n_slots: usize,
        stride: usize,
    ) -> Result<StepIo, CudaError> {
        let ctx = stream.context();
        let table_len = n_slots
            .checked_mul(stride)
            .ok_or_else(|| CudaError::Launch {
                kernel: "the page tables".into(),
                reason: format!("{n_slots} rows of {stride} entries overflow"),
            })?;
        let mirror = pinned(ctx, table_len, 0xff, "the page tables")?;
        let tables = device(stream, table_len, "the page tables")?;
        // SAFETY: `mirror` is pinned and nothing writes it until the stream is synchronized
        // below.
        unsafe {
            mem::upload_pinned(
                stream,
                &mirror,
                0..table_len.max(1),
                Span::of(&tables),
                "the page tables",
            )?;
        }
        stream
            .synchronize()
            .map_err(CudaError::driver("initializing the page tables"))?;
        Ok(StepIo {
            stream: stream.clone(),
            layout,
            dev: device(stream, layout.len(), "the step's inputs and results")?,
            up: pinned(ctx, layout.upload_len(), 0, "the step's inputs")?,
            down: pinned(ctx, layout.download_len(), 0, "the step's results")?,
            tables,
            mirror,
            stride,
            event: ctx
                .new_event(None)
                .map_err(CudaError::driver("creating the step's copy event"))?,
            state: Inflight::default(),
        })
    }

    pub fn layout(&self) -> IoLayout {
        self.layout
    }

    /// Device bytes of the buffers (for the load's footprint).
    pub fn bytes(layout: &IoLayout, table_len: usize) -> u64 {
        (layout.len() + table_len) as u64 * 4
    }

    fn span(&self, start: usize, len: usize, what: &str) -> Result<Span<i32>, CudaError> {
        Span::of(&self.dev).sub(start, len, what)
    }

    pub fn tokens(&self, t: usize) -> Result<Span<i32>, CudaError> {
        self.span(self.layout.tokens(), self.layout.max_tokens, "tokens")?
            .prefix(t, "tokens")
    }

    pub fn positions(&self, t: usize) -> Result<Span<i32>, CudaError> {
        self.span(self.layout.positions(), self.layout.max_tokens, "positions")?
            .prefix(t, "positions")
    }

    pub fn slots(&self, t: usize) -> Result<Span<i32>, CudaError> {
        self.span(self.layout.slots(), self.layout.max_tokens, "slots")?
            .prefix(t, "slots")
    }

    pub fn output_rows(&self, n: usize) -> Result<Span<i32>, CudaError> {
        self.span(
            self.layout.outputs(),
            self.layout.max_outputs,
            "output rows",
        )?
        .prefix(n, "output rows")
    }

    pub fn flag(&self) -> Result<Span<i32>, CudaError> {
        self.span(self.layout.flag(), 1, "the non-finite flag")
    }

    pub fn top_ids(&self, top: TopLayout) -> Result<Span<i32>, CudaError> {
        let r = top.ids();
        self.span(self.layout.flag() + r.start, r.len(), "top-k ids")
    }

    pub fn top_vals(&self, top: TopLayout) -> Result<Span<f32>, CudaError> {
        let r = top.vals();
        self.span(self.layout.flag() + r.start, r.len(), "top-k logits")?
            .cast()
    }

    /// The page tables on the device.
    pub fn tables(&self) -> Span<i32> {
        Span::of(&self.tables)
    }

    /// Grows the results region to hold `top`'s results; `true` when the device buffer moved
    /// (the captured graphs read the old one and must go).
    pub fn ensure_results(&mut self, top: TopLayout) -> Result<bool, CudaError> {
        if top.results_len() <= self.layout.capacity {
            return Ok(false);
        }
        // The old buffers may still be read by a copy or by the last step's kernels (a step
        // without output rows does not synchronize): let everything finish before they go.
        self.stream.synchronize().map_err(CudaError::driver(
            "finishing the steps before the results grow",
        ))?;
        self.state.completed();
        let layout = IoLayout::new(
            self.layout.max_tokens,
            self.layout.max_outputs,
            top.results_len(),
        )?;
        let ctx = self.stream.context().clone();
        // Both buffers first, then the swap: a failed allocation leaves the old buffers (and
        // the graphs captured on them) as they were.
        let dev = device(&self.stream, layout.len(), "the step's inputs and results")?;
        let down = pinned(&ctx, layout.download_len(), 0, "the step's results")?;
        self.dev = dev;
        self.down = down;
        self.layout = layout;
        Ok(true)
    }

    /// Waits for `pending`: the stream (then nothing is in flight) or the event (then the
    /// copies before it are done).
    fn wait_for(&mut self, pending: Pending) -> Result<(), CudaError> {
        match pending {
            Pending::Nothing => {}
            Pending::Stream => {
                self.stream
                    .synchronize()
                    .map_err(CudaError::driver("waiting for the step's copies"))?;
                self.state.completed();
            }
            Pending::Event => {
                self.event
                    .synchronize()
                    .map_err(CudaError::driver("waiting for the step's copies"))?;
                self.state.event_completed();
            }
        }
        Ok(())
    }

    fn before_write(&mut self, region: Region) -> Result<(), CudaError> {
        let pending = self.state.before_write(region);
        self.wait_for(pending)
    }

    /// Copies the rows of `slots` (ascending, no duplicates) from `tables` to the device.
    pub fn upload_rows(&mut self, tables: &PageTables, slots: &[u32]) -> Result<(), CudaError> {
        if slots.is_empty() {
            return Ok(());
        }
        self.before_write(Region::Tables)?;
        let stride = self.stride;
        let mirror = self
            .mirror
            .as_mut_slice()
            .map_err(CudaError::driver("the page tables' host mirror"))?;
        for &slot in slots {
            let start = slot as usize * stride;
            let row = mirror
                .get_mut(start..start + stride)
                .ok_or_else(|| CudaError::Launch {
                    kernel: "page tables".into(),
                    reason: format!("slot {slot} is outside the tables"),
                })?;
            let pages = tables.pages(slot).unwrap_or(&[]);
            row.fill(-1);
            for (d, &p) in row.iter_mut().zip(pages) {
                *d = p as i32;
            }
        }
        let all = Span::of(&self.tables);
        for run in table_runs(slots, stride, TABLE_GAP_ENTRIES) {
            let dst = all.sub(run.start, run.len(), "page tables")?;
            // SAFETY: `before_write` above waited for every copy that read the mirror; the
            // mirror is written again only through `before_write`, which waits for this one.
            unsafe { mem::upload_pinned(&self.stream, &self.mirror, run, dst, "page table rows")? };
            self.state.enqueued(Region::Tables);
        }
        Ok(())
    }

    /// Packs `step` and the flag's initial value and copies them to the device in one copy.
    /// A step that will not synchronize (no output rows) records the event right after the
    /// copy, so the next step waits for this copy only, not for this step's kernels.
    pub fn upload_step(&mut self, step: &Step, flag: i32) -> Result<(), CudaError> {
        self.before_write(Region::Inputs)?;
        let layout = self.layout;
        let up = self
            .up
            .as_mut_slice()
            .map_err(CudaError::driver("the step's staging buffer"))?;
        pack_step(&layout, step, flag, up)?;
        let n = layout.upload_len();
        let dst = Span::of(&self.dev).prefix(n, "the step's inputs")?;
        // SAFETY: `before_write` above waited for the copy of the previous step (if it was
        // still in flight); the staging buffer is written again only through `before_write`.
        unsafe { mem::upload_pinned(&self.stream, &self.up, 0..n, dst, "the step's inputs")? };
        self.state.enqueued(Region::Inputs);
        if step.outputs.is_empty() {
            self.fence()?;
        }
        Ok(())
    }

    /// Copies the flag and `top`'s results back in one copy, synchronizes the stream (which
    /// reports any failure of the step's work) and returns them (`[0]` the flag).
    pub fn download(&mut self, top: TopLayout) -> Result<&[i32], CudaError> {
        let n = top.download_len();
        let src = self.span(self.layout.flag(), n, "the step's results")?;
        mem::download_pinned(&self.stream, src, &mut self.down, n, "the step's results")?;
        self.state.completed();
        let down = self
            .down
            .as_slice()
            .map_err(CudaError::driver("the step's results"))?;
        down.get(..n).ok_or_else(|| CudaError::Launch {
            kernel: "the step's results".into(),
            reason: format!("{n} elements from a buffer of {}", down.len()),
        })
    }

    /// Synchronizes the stream: nothing is in flight afterwards (after a step's extra
    /// downloads, or a failed step).
    pub fn synchronize(&mut self) -> Result<(), CudaError> {
        self.stream
            .synchronize()
            .map_err(CudaError::driver("finishing the step"))?;
        self.state.completed();
        Ok(())
    }

    /// Records the event that the next write of a staging region waits for, if copies were
    /// enqueued since the last synchronize (at the end of a step, in case it did not
    /// synchronize).
    pub fn fence(&mut self) -> Result<(), CudaError> {
        if self.state.wants_event() {
            self.event
                .record(&self.stream)
                .map_err(CudaError::driver("recording the step's copy event"))?;
            self.state.event_recorded();
        }
        Ok(())
    }
}

impl Drop for StepIo {
    fn drop(&mut self) {
        // The pinned buffers must outlive the copies that read them.
        if self.state.pending() != Pending::Nothing
            && let Err(e) = self.stream.synchronize()
        {
            tracing::warn!("the CUDA stream failed while the step's buffers were dropped: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::step::Step;

    #[test]
    fn the_layout_puts_each_field_after_the_last() {
        let l = IoLayout::new(5, 3, 8).unwrap();
        assert_eq!(
            (l.tokens(), l.positions(), l.slots(), l.outputs(), l.flag()),
            (0, 5, 10, 15, 18)
        );
        assert_eq!((l.upload_len(), l.download_len(), l.len()), (19, 9, 27));
        let l = IoLayout::for_limits(512, 8, 49152).unwrap();
        assert_eq!(l.flag(), 3 * 512 + 8);
        assert_eq!(l.capacity, 2 * 8 * RESERVED_TOP_K);
        let small = IoLayout::for_limits(4, 2, 10).unwrap();
        assert_eq!(
            small.capacity,
            2 * 2 * 10,
            "never wider than the vocabulary"
        );
        assert!(IoLayout::new(1 << 30, 1, 1).is_err());
        assert!(IoLayout::new(usize::MAX / 2, 1, 1).is_err());
    }

    #[test]
    fn the_reserved_top_k_is_the_samplers_largest() {
        assert_eq!(
            RESERVED_TOP_K,
            crate::runtime::generate::MAX_BACKEND_TOP_K as usize
        );
    }

    fn step() -> Step {
        let mut s = Step::new();
        s.push_token(2, 7, 101);
        s.push_token(2, 8, 102);
        s.push_token(1, 0, 103);
        s.push_output(1, OutputKind::Argmax);
        s.push_output(2, OutputKind::TopK(4));
        s
    }

    #[test]
    fn a_step_packs_each_field_at_its_offset() {
        let l = IoLayout::new(4, 3, 6).unwrap();
        let mut buf = vec![-9; l.upload_len()];
        pack_step(&l, &step(), 77, &mut buf).unwrap();
        #[rustfmt::skip]
        let want = [
            101, 102, 103, -9, // tokens
            7, 8, 0, -9,       // positions
            2, 2, 1, -9,       // slots
            1, 2, -9,          // output rows
            77,                // flag
        ];
        assert_eq!(buf, want);
        // Too many tokens or rows for the layout, or a short buffer: errors, nothing written.
        let tight = IoLayout::new(2, 3, 0).unwrap();
        let mut buf = vec![0; tight.upload_len()];
        assert!(pack_step(&tight, &step(), 0, &mut buf).is_err());
        let one_row = IoLayout::new(4, 1, 0).unwrap();
        let mut buf = vec![0; one_row.upload_len()];
        assert!(pack_step(&one_row, &step(), 0, &mut buf).is_err());
        assert!(buf.iter().all(|&x| x == 0));
        let mut short = vec![0; l.upload_len() - 1];
        assert!(pack_step(&l, &step(), 0, &mut short).is_err());
    }

    #[test]
    fn the_top_layout_is_the_widest_request_and_results_follow_the_flag() {
        let s = step();
        let top = TopLayout::of(&s.outputs, 100);
        assert_eq!(top, TopLayout { rows: 2, k: 4 });
        assert_eq!((top.ids(), top.vals()), (1..9, 9..17));
        assert_eq!((top.results_len(), top.download_len()), (16, 17));
        assert_eq!(top.kernel_k(), 4);
        assert_eq!(
            TopLayout::of(&s.outputs, 3).k,
            3,
            "k is capped by the vocabulary"
        );
        let mut argmax = s.clone();
        argmax.outputs[1].kind = OutputKind::Logits;
        let top = TopLayout::of(&argmax.outputs, 100);
        assert_eq!((top.k, top.kernel_k(), top.download_len()), (1, 0, 5));
        argmax.outputs[0].kind = OutputKind::Logits;
        let top = TopLayout::of(&argmax.outputs, 100);
        assert_eq!(
            (top.k, top.download_len()),
            (0, 1),
            "logits only: the flag alone"
        );
    }

    #[test]
    fn results_unpack_per_row_with_values_from_their_bits() {
        // What the kernels write for 2 rows of k = 3: ids row-major, then values' bits.
        let top = TopLayout { rows: 2, k: 3 };
        let vals = [1.5f32, -0.25, f32::NEG_INFINITY, 9.0, 8.5, -3.0e-8];
        let mut down = vec![55, 10, 11, -1, 20, 21, 22];
        down.extend(vals.iter().map(|v| v.to_bits() as i32));
        let mut e = Vec::new();
        row_results(&down, top, 0, 3, &mut e).unwrap();
        let got: Vec<(u32, f32)> = e.iter().map(|t| (t.id, t.logit)).collect();
        assert_eq!(got, [(10, 1.5), (11, -0.25), (0, f32::NEG_INFINITY)]);
        row_results(&down, top, 1, 2, &mut e).unwrap();
        let got: Vec<(u32, f32)> = e.iter().map(|t| (t.id, t.logit)).collect();
        assert_eq!(got, [(20, 9.0), (21, 8.5)]);
        row_results(&down, top, 1, 3, &mut e).unwrap();
        assert_eq!(e[2].logit.to_bits(), (-3.0e-8f32).to_bits());
        // Past the rows, k or the download: errors.
        assert!(row_results(&down, top, 2, 1, &mut e).is_err());
        assert!(row_results(&down, top, 0, 4, &mut e).is_err());
        assert!(row_results(&down[..10], top, 1, 3, &mut e).is_err());
    }

    #[test]
    fn touched_table_rows_copy_as_runs() {
        assert!(table_runs(&[], 8, 0).is_empty());
        assert_eq!(table_runs(&[3], 8, 0), vec![24..32]);
        assert_eq!(table_runs(&[0, 1, 2, 5], 8, 0), [0..24, 40..48]);
        // A gap of two rows (16 entries) merges at 16, not at 15.
        assert_eq!(table_runs(&[0, 3], 8, 16), vec![0..32]);
        assert_eq!(table_runs(&[0, 3], 8, 15), [0..8, 24..32]);
    }

    #[test]
    fn a_staging_region_waits_only_for_copies_in_flight() {
        let mut s = Inflight::default();
        assert_eq!(s.before_write(Region::Inputs), Pending::Nothing);
        // A decode step: rows and inputs copied, then the download synchronizes.
        s.enqueued(Region::Tables);
        assert_eq!(s.before_write(Region::Inputs), Pending::Nothing);
        s.enqueued(Region::Inputs);
        assert_eq!(s.before_write(Region::Tables), Pending::Stream);
        assert_eq!(s.before_write(Region::Inputs), Pending::Stream);
        s.completed();
        assert_eq!(s.before_write(Region::Inputs), Pending::Nothing);
        assert!(!s.wants_event());
        // A step without output rows: no synchronize, an event instead.
        s.enqueued(Region::Inputs);
        assert!(s.wants_event());
        s.event_recorded();
        assert!(!s.wants_event());
        assert_eq!(s.before_write(Region::Inputs), Pending::Event);
        assert_eq!(s.before_write(Region::Tables), Pending::Nothing);
        // A copy of the tables after the event: the tables wait for the stream, the inputs
        // still only for the event (the reviewer's case: a quiet step, then one mapping pages,
        // must not wait for the quiet step's kernels).
        s.enqueued(Region::Tables);
        assert_eq!(s.before_write(Region::Tables), Pending::Stream);
        assert_eq!(s.before_write(Region::Inputs), Pending::Event);
        assert_eq!(s.pending(), Pending::Stream);
        assert!(s.wants_event());
        // Waiting for the event frees what came before it, not the later copy.
        s.event_completed();
        assert_eq!(s.before_write(Region::Inputs), Pending::Nothing);
        assert_eq!(s.before_write(Region::Tables), Pending::Stream);
        s.event_recorded();
        assert_eq!(s.before_write(Region::Tables), Pending::Event);
        assert_eq!(s.pending(), Pending::Event);
        s.completed();
        assert_eq!(s, Inflight::default());
        assert_eq!(s.pending(), Pending::Nothing);
    }
}
