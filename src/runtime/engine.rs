//! The engine: a backend plus the bookkeeping of sequences and KV-cache pages.
//!
//! A [`Sequence`] is a handle to a token history whose keys and values live in pages of the
//! backend's paged KV cache ([`crate::backend::step`]). The engine owns the page pool (with
//! reference counts, so sequences can share a prefix), gives each sequence a backend slot, and
//! turns the work of one step (tokens appended to one or several sequences) into a [`Step`]
//! that carries only the step's tokens and the page-table changes since the last step.
//!
//! Handles: a `Sequence` is not `Clone`, so two handles never own the same pages;
//! [`Engine::release`] consumes it, so it cannot be freed twice; a handle dropped without
//! `release` returns its pages through a shared list the engine drains at its next call.
//!
//! ```
//! # fn f(engine: &mut m40_llm::runtime::engine::Engine) {
//! let seq = engine.new_sequence();
//! engine.release(seq); // the one way to free it now; dropping it frees it at the next call
//! # }
//! ```
//!
//! ```compile_fail
//! # fn f(engine: &mut m40_llm::runtime::engine::Engine) {
//! let seq = engine.new_sequence();
//! let copy = seq.clone(); // a handle cannot be copied: its pages have one owner
//! engine.release(seq);
//! engine.release(copy);
//! # }
//! ```
//!
//! ```compile_fail
//! # fn f(engine: &mut m40_llm::runtime::engine::Engine) {
//! let seq = engine.new_sequence();
//! engine.release(seq);
//! engine.release(seq); // released twice: `seq` was moved into the first call
//! # }
//! ```
//!
//! Memory policy: pages are taken when a step needs them (one per `page_size` positions, plus
//! one to copy a shared, partly filled page before writing it). [`Engine::reserve`] sets pages
//! aside for a sequence so that an admitted request cannot run out mid-decode; pages reserved
//! for one sequence are never given to another. When a step needs more pages than are free and
//! unreserved it fails before running with [`EngineError::CacheFull`] (`needed`, `free`,
//! `total` pages), and nothing changes: the caller decides whom to release or truncate (the
//! engine never evicts a sequence on its own).
//!
//! A failed call loses nothing: the pages it took go back, and the sequences are as they were
//! before it (a prompt prefilled in several steps is rolled back whole).

use crate::backend::step::{KvGeometry, OutputKind, PageOp, Step, StepOutputs};
use crate::backend::{Backend, BackendError, DeviceInfo, Logits};
use crate::plan::Plan;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Why the engine could not run a step.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "the sequence would hold {needed} tokens, more than the context of {n_ctx} tokens (use a shorter prompt, fewer new tokens or a larger --ctx-size)"
    )]
    ContextFull { needed: usize, n_ctx: usize },
    #[error(
        "the KV cache is full: {needed} more pages needed, {free} free (not reserved) of {total}"
    )]
    CacheFull {
        needed: usize,
        free: usize,
        total: usize,
    },
    #[error("all {max} sequence slots of the backend are in use: release a sequence first")]
    NoFreeSlot { max: u32 },
    #[error("a step needs {needed} {what}, but the plan allows at most {max}")]
    StepTooLarge {
        what: &'static str,
        needed: usize,
        max: u64,
    },
    #[error("nothing to run: every part of the step is empty")]
    EmptyStep,
    #[error("the sequence belongs to another engine")]
    ForeignSequence,
    #[error("cannot fork {len} tokens of a sequence that holds {held}")]
    ForkTooLong { len: usize, held: usize },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// What a dropped handle leaves for the engine to reclaim.
#[derive(Debug)]
struct Orphan {
    slot: Option<u32>,
    pages: Vec<u32>,
    reserved: usize,
}

type Reclaim = Arc<Mutex<Vec<Orphan>>>;

static NEXT_ENGINE: AtomicU64 = AtomicU64::new(1);

/// A sequence: its tokens, its page table and its place (slot) in the backend; see the
/// [module docs](self). Owned by one engine; not `Clone`.
#[derive(Debug)]
pub struct Sequence {
    engine: u64,
    slot: Option<u32>,
    tokens: Vec<u32>,
    /// Page of each `page_size` positions.
    pages: Vec<u32>,
    /// Pages set aside for this sequence's next tokens.
    reserved: usize,
    reclaim: Reclaim,
}

impl Sequence {
    /// The tokens evaluated so far, in position order.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Number of evaluated tokens (the next token's position).
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The pages holding its positions (page `i` holds positions `i * page_size ..`).
    pub fn pages(&self) -> &[u32] {
        &self.pages
    }

    /// Pages reserved for it and not yet used.
    pub fn reserved_pages(&self) -> usize {
        self.reserved
    }
}

impl Drop for Sequence {
    fn drop(&mut self) {
        if self.slot.is_none() && self.pages.is_empty() && self.reserved == 0 {
            return;
        }
        let orphan = Orphan {
            slot: self.slot.take(),
            pages: std::mem::take(&mut self.pages),
            reserved: std::mem::take(&mut self.reserved),
        };
        let mut list = self.reclaim.lock().unwrap_or_else(|e| e.into_inner());
        list.push(orphan);
    }
}

/// Which output rows a part of a step wants back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WantLogits {
    None,
    /// The row after the part's last token (what predicts the next token).
    Last,
    /// The rows after each of the part's tokens.
    All,
    /// The rows after each of the part's tokens from this index on.
    From(usize),
}

/// Tokens appended to one sequence in a step, and what to return for them.
pub struct Part<'a> {
    pub seq: &'a mut Sequence,
    pub tokens: &'a [u32],
    /// Which rows.
    pub logits: WantLogits,
    /// What each row returns: full logits, the argmax or the top-k.
    pub kind: OutputKind,
}

impl<'a> Part<'a> {
    /// A part returning full logits rows.
    pub fn new(seq: &'a mut Sequence, tokens: &'a [u32], logits: WantLogits) -> Part<'a> {
        Part {
            seq,
            tokens,
            logits,
            kind: OutputKind::Logits,
        }
    }

    /// The same part, returning `kind` per row.
    pub fn with_kind(mut self, kind: OutputKind) -> Part<'a> {
        self.kind = kind;
        self
    }

    /// Rows this part returns.
    pub fn n_rows(&self) -> usize {
        match self.logits {
            WantLogits::None => 0,
            WantLogits::Last => usize::from(!self.tokens.is_empty()),
            WantLogits::All => self.tokens.len(),
            WantLogits::From(k) => self.tokens.len().saturating_sub(k),
        }
    }
}

/// The page pool: reference counts and the free list.
#[derive(Debug)]
struct Pool {
    /// Per page, the sequences whose tables hold it.
    refs: Vec<u32>,
    /// Free pages, popped from the end (lowest numbers first).
    free: Vec<u32>,
    /// Free pages set aside for sequences (`<= free.len()`).
    reserved: usize,
}

impl Pool {
    fn unreserved(&self) -> usize {
        self.free.len() - self.reserved
    }

    /// Drops one reference to `page`, freeing it at zero.
    fn unref(&mut self, page: u32) {
        let r = &mut self.refs[page as usize];
        *r = r.saturating_sub(1);
        if *r == 0 {
            self.free.push(page);
        }
    }
}

/// What a step took for one part, to commit or give back.
#[derive(Clone, Copy, Debug, Default)]
struct Staged {
    /// The slot was assigned by this step.
    new_slot: Option<u32>,
    /// Copy-on-write: table index, old page, new page.
    cow: Option<(usize, u32, u32)>,
    /// `fresh[first..first + count]` are the part's new pages, in table order.
    first: usize,
    count: usize,
    /// Pages taken from the sequence's reservation.
    from_reserved: usize,
}

/// Takes a free page for `seq`, from its reservation first. The caller checked that the pool
/// has it.
fn take_page(pool: &mut Pool, seq: &mut Sequence, st: &mut Staged) -> u32 {
    if seq.reserved > 0 {
        seq.reserved -= 1;
        pool.reserved -= 1;
        st.from_reserved += 1;
    }
    let page = pool.free.pop().unwrap_or(0);
    pool.refs[page as usize] = 1;
    page
}

/// Page-pool statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageStats {
    pub total: usize,
    /// Free pages (including reserved ones).
    pub free: usize,
    /// Free pages set aside for sequences.
    pub reserved: usize,
    pub page_size: usize,
}

/// A backend with sequences and pages on top; see the [module docs](self).
pub struct Engine {
    backend: Box<dyn Backend>,
    id: u64,
    geometry: KvGeometry,
    n_ctx: usize,
    pool: Pool,
    /// Free backend slots, popped from the end (lowest first).
    free_slots: Vec<u32>,
    reclaim: Reclaim,
    /// Page-table changes not yet sent (releases, truncations, forks): they lead the next step.
    pending: Vec<PageOp>,
    /// The step being built (kept: its buffers are reused).
    step: Step,
    staged: Vec<Staged>,
    fresh: Vec<u32>,
    /// Outputs of internal steps (prefill, decode, evaluate).
    outputs: StepOutputs,
}

impl Engine {
    /// An engine over `backend` whose sequences hold at most `n_ctx` tokens each (at most what a
    /// backend slot holds).
    pub fn new(backend: Box<dyn Backend>, n_ctx: usize) -> Engine {
        let geometry = backend.kv_geometry();
        Engine {
            n_ctx: n_ctx.min(geometry.max_positions() as usize),
            id: NEXT_ENGINE.fetch_add(1, Ordering::Relaxed),
            pool: Pool {
                refs: vec![0; geometry.n_pages as usize],
                free: (0..geometry.n_pages).rev().collect(),
                reserved: 0,
            },
            free_slots: (0..geometry.max_slots).rev().collect(),
            reclaim: Arc::new(Mutex::new(Vec::new())),
            pending: Vec::new(),
            step: Step::new(),
            staged: Vec::new(),
            fresh: Vec::new(),
            outputs: StepOutputs::new(),
            geometry,
            backend,
        }
    }

    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    pub fn device(&self) -> &DeviceInfo {
        self.backend.device()
    }

    pub fn plan(&self) -> &Plan {
        self.backend.plan()
    }

    /// The KV cache's pages and slots.
    pub fn geometry(&self) -> KvGeometry {
        self.geometry
    }

    /// The most tokens one sequence can hold.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// The most tokens one step runs.
    pub fn max_tokens(&self) -> usize {
        self.plan().options.max_tokens as usize
    }

    /// The most output rows one step returns.
    pub fn max_outputs(&self) -> usize {
        self.plan().options.max_outputs as usize
    }

    /// Vocabulary size (the width of a logits row).
    pub fn n_vocab(&self) -> usize {
        self.backend.step_limits().n_vocab as usize
    }

    /// The page pool's counts (after reclaiming what dropped handles left, which happens at
    /// every `&mut` call; see [`reclaim`](Self::reclaim)).
    pub fn page_stats(&self) -> PageStats {
        PageStats {
            total: self.geometry.n_pages as usize,
            free: self.pool.free.len(),
            reserved: self.pool.reserved,
            page_size: self.geometry.page_size as usize,
        }
    }

    /// The step descriptor of the last step built (what the backend received or validated).
    pub fn last_step(&self) -> &Step {
        &self.step
    }

    /// A new, empty sequence (it takes a backend slot at its first step).
    pub fn new_sequence(&self) -> Sequence {
        Sequence {
            engine: self.id,
            slot: None,
            tokens: Vec::new(),
            pages: Vec::new(),
            reserved: 0,
            reclaim: self.reclaim.clone(),
        }
    }

    /// Returns the pages, reservations and slots of handles dropped without [`release`]
    /// (every `&mut` method calls it first).
    ///
    /// [`release`]: Self::release
    pub fn reclaim(&mut self) {
        let orphans = {
            let mut list = self.reclaim.lock().unwrap_or_else(|e| e.into_inner());
            if list.is_empty() {
                return;
            }
            std::mem::take(&mut *list)
        };
        for o in orphans {
            self.free_parts(o.slot, &o.pages, o.reserved);
        }
    }

    fn free_parts(&mut self, slot: Option<u32>, pages: &[u32], reserved: usize) {
        for &p in pages.iter().rev() {
            self.pool.unref(p);
        }
        self.pool.reserved -= reserved.min(self.pool.reserved);
        if let Some(slot) = slot {
            self.pending.push(PageOp::SetLen { slot, len: 0 });
            self.free_slots.push(slot);
        }
    }

    /// Ends a sequence: its pages (those no other sequence shares), its reservation and its
    /// slot become free. A sequence of another engine is dropped (its own engine reclaims it).
    pub fn release(&mut self, mut seq: Sequence) {
        self.reclaim();
        if seq.engine != self.id {
            return;
        }
        let pages = std::mem::take(&mut seq.pages);
        let reserved = std::mem::take(&mut seq.reserved);
        self.free_parts(seq.slot.take(), &pages, reserved);
    }

    /// Forgets everything a sequence holds, keeping it usable (its pages and reservation become
    /// free).
    pub fn clear(&mut self, seq: &mut Sequence) {
        let fresh = self.new_sequence();
        self.release(std::mem::replace(seq, fresh));
    }

    /// Shortens `seq` to its first `len` tokens (stop-string rollback, regenerate), freeing the
    /// pages past them. Pages shared with another sequence stay with it.
    pub fn truncate(&mut self, seq: &mut Sequence, len: usize) -> Result<(), EngineError> {
        self.reclaim();
        self.check_owner(seq)?;
        if len >= seq.len() {
            return Ok(());
        }
        let keep = self.geometry.pages_for(len as u32) as usize;
        for &p in seq.pages[keep..].iter().rev() {
            self.pool.unref(p);
        }
        seq.pages.truncate(keep);
        seq.tokens.truncate(len);
        if let Some(slot) = seq.slot {
            self.pending.push(PageOp::SetLen {
                slot,
                len: len as u32,
            });
        }
        Ok(())
    }

    /// A new sequence holding the first `len` tokens of `parent`, sharing its pages (the prompt
    /// cache and `n > 1` build on this). Whichever of the two later writes into a shared, partly
    /// filled page copies it first; full pages stay shared until both are released.
    pub fn fork(&mut self, parent: &Sequence, len: usize) -> Result<Sequence, EngineError> {
        self.reclaim();
        self.check_owner(parent)?;
        if len > parent.len() {
            return Err(EngineError::ForkTooLong {
                len,
                held: parent.len(),
            });
        }
        let mut child = self.new_sequence();
        let n_pages = self.geometry.pages_for(len as u32) as usize;
        child.tokens.extend_from_slice(&parent.tokens[..len]);
        if len > 0 {
            let slot = self.free_slots.pop().ok_or(EngineError::NoFreeSlot {
                max: self.geometry.max_slots,
            })?;
            child.slot = Some(slot);
            for (index, &page) in parent.pages[..n_pages].iter().enumerate() {
                self.pool.refs[page as usize] += 1;
                child.pages.push(page);
                self.pending.push(PageOp::Map {
                    slot,
                    index: index as u32,
                    page,
                });
            }
            self.pending.push(PageOp::SetLen {
                slot,
                len: len as u32,
            });
        }
        Ok(child)
    }

    /// Pages `seq` needs to append `n` tokens: new pages, plus one to copy a shared, partly
    /// filled last page.
    fn pages_needed(&self, seq: &Sequence, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        let end = self.geometry.pages_for((seq.len() + n) as u32) as usize;
        let new = end.saturating_sub(seq.pages.len());
        let ps = self.geometry.page_size as usize;
        let cow = !seq.len().is_multiple_of(ps)
            && seq
                .pages
                .get(seq.len() / ps)
                .is_some_and(|&p| self.pool.refs[p as usize] > 1);
        new + usize::from(cow)
    }

    /// Sets aside the pages `seq` needs to append `n_tokens` more, so that those steps cannot
    /// fail with `CacheFull` (a larger earlier reservation is kept). Fails with `ContextFull`
    /// past the context, or `CacheFull` if the free, unreserved pages are too few.
    pub fn reserve(&mut self, seq: &mut Sequence, n_tokens: usize) -> Result<(), EngineError> {
        self.reclaim();
        self.check_owner(seq)?;
        self.check_fits(seq, n_tokens)?;
        let needed = self.pages_needed(seq, n_tokens);
        if needed <= seq.reserved {
            return Ok(());
        }
        let extra = needed - seq.reserved;
        if extra > self.pool.unreserved() {
            return Err(self.cache_full(extra));
        }
        seq.reserved += extra;
        self.pool.reserved += extra;
        Ok(())
    }

    /// Gives back the pages reserved for `seq` and not used yet, keeping what it holds (a
    /// sequence kept after its request ended, e.g. in the server's prompt cache).
    pub fn unreserve(&mut self, seq: &mut Sequence) {
        self.reclaim();
        if seq.engine == self.id {
            self.pool.reserved -= std::mem::take(&mut seq.reserved).min(self.pool.reserved);
        }
    }

    fn cache_full(&self, needed: usize) -> EngineError {
        EngineError::CacheFull {
            needed,
            free: self.pool.unreserved(),
            total: self.geometry.n_pages as usize,
        }
    }

    fn check_owner(&self, seq: &Sequence) -> Result<(), EngineError> {
        if seq.engine == self.id {
            Ok(())
        } else {
            Err(EngineError::ForeignSequence)
        }
    }

    /// Runs one step over `parts` (several sequences may share it). `out` receives the rows the
    /// parts asked for, part after part, each as its part's `kind` asked.
    pub fn step(
        &mut self,
        parts: &mut [Part<'_>],
        out: &mut StepOutputs,
    ) -> Result<(), EngineError> {
        self.prepare(parts)?;
        match self.backend.step(&self.step, out) {
            Ok(()) => {
                self.commit(parts);
                Ok(())
            }
            Err(e) => {
                self.rollback(parts);
                Err(e.into())
            }
        }
    }

    /// Builds the step `parts` would run and has the backend validate it, then undoes
    /// everything: what [`step`](Self::step) does besides computing (for benchmarks and
    /// admission checks). [`last_step`](Self::last_step) shows the descriptor.
    pub fn validate_step(&mut self, parts: &mut [Part<'_>]) -> Result<(), EngineError> {
        self.prepare(parts)?;
        let result = self.backend.validate(&self.step);
        self.rollback(parts);
        Ok(result?)
    }

    /// Checks `parts`, takes slots and pages for them and builds `self.step`; on error nothing
    /// is taken. After success, exactly one of `commit` and `rollback` must follow.
    fn prepare(&mut self, parts: &mut [Part<'_>]) -> Result<(), EngineError> {
        self.reclaim();
        let n_tokens: usize = parts.iter().map(|p| p.tokens.len()).sum();
        if n_tokens == 0 {
            return Err(EngineError::EmptyStep);
        }
        let options = &self.backend.plan().options;
        let (max_tokens, max_outputs) = (options.max_tokens, options.max_outputs);
        if n_tokens as u64 > max_tokens {
            return Err(EngineError::StepTooLarge {
                what: "tokens",
                needed: n_tokens,
                max: max_tokens,
            });
        }
        let n_outputs: usize = parts.iter().map(Part::n_rows).sum();
        if n_outputs as u64 > max_outputs {
            return Err(EngineError::StepTooLarge {
                what: "output rows",
                needed: n_outputs,
                max: max_outputs,
            });
        }
        let mut unreserved_needed = 0;
        let mut new_slots = 0;
        for p in parts.iter() {
            self.check_owner(p.seq)?;
            self.check_fits(p.seq, p.tokens.len())?;
            if p.tokens.is_empty() {
                continue;
            }
            let needed = self.pages_needed(p.seq, p.tokens.len());
            unreserved_needed += needed.saturating_sub(p.seq.reserved);
            new_slots += usize::from(p.seq.slot.is_none());
        }
        if unreserved_needed > self.pool.unreserved() {
            return Err(self.cache_full(unreserved_needed));
        }
        if new_slots > self.free_slots.len() {
            return Err(EngineError::NoFreeSlot {
                max: self.geometry.max_slots,
            });
        }

        // Nothing can fail from here on: take slots and pages, and build the step.
        let ps = self.geometry.page_size as usize;
        self.step.clear();
        self.step.ops.extend_from_slice(&self.pending);
        self.staged.clear();
        self.fresh.clear();
        for p in parts.iter_mut() {
            let mut st = Staged {
                first: self.fresh.len(),
                ..Staged::default()
            };
            if p.tokens.is_empty() {
                self.staged.push(st);
                continue;
            }
            let slot = match p.seq.slot {
                Some(s) => s,
                None => {
                    // Counted above.
                    let s = self.free_slots.pop().unwrap_or(0);
                    p.seq.slot = Some(s);
                    st.new_slot = Some(s);
                    s
                }
            };
            let start = p.seq.len();
            if !start.is_multiple_of(ps) {
                let index = start / ps;
                if let Some(&old) = p.seq.pages.get(index)
                    && self.pool.refs[old as usize] > 1
                {
                    let new = take_page(&mut self.pool, p.seq, &mut st);
                    st.cow = Some((index, old, new));
                    self.step.ops.push(PageOp::Copy { src: old, dst: new });
                    self.step.ops.push(PageOp::Map {
                        slot,
                        index: index as u32,
                        page: new,
                    });
                }
            }
            let end = (start + p.tokens.len()).div_ceil(ps);
            for index in p.seq.pages.len()..end {
                let page = take_page(&mut self.pool, p.seq, &mut st);
                self.fresh.push(page);
                self.step.ops.push(PageOp::Map {
                    slot,
                    index: index as u32,
                    page,
                });
            }
            st.count = self.fresh.len() - st.first;
            let first_row = self.step.n_tokens() as u32;
            for (i, &t) in p.tokens.iter().enumerate() {
                self.step.push_token(slot, (start + i) as u32, t);
            }
            let n = p.tokens.len() as u32;
            let rows = match p.logits {
                WantLogits::None => 0..0,
                WantLogits::Last => first_row + n - 1..first_row + n,
                WantLogits::All => first_row..first_row + n,
                WantLogits::From(k) => first_row + (k as u32).min(n)..first_row + n,
            };
            for row in rows {
                self.step.push_output(row, p.kind);
            }
            self.staged.push(st);
        }
        Ok(())
    }

    /// The step ran: the sequences take their new tokens and pages.
    fn commit(&mut self, parts: &mut [Part<'_>]) {
        self.pending.clear();
        for (p, st) in parts.iter_mut().zip(&self.staged) {
            if let Some((index, old, new)) = st.cow {
                p.seq.pages[index] = new;
                self.pool.unref(old);
            }
            p.seq
                .pages
                .extend_from_slice(&self.fresh[st.first..st.first + st.count]);
            p.seq.tokens.extend_from_slice(p.tokens);
        }
    }

    /// The step did not run: give back what `prepare` took.
    fn rollback(&mut self, parts: &mut [Part<'_>]) {
        for (p, st) in parts.iter_mut().zip(&self.staged).rev() {
            let new_pages = self.fresh[st.first..st.first + st.count]
                .iter()
                .rev()
                .copied()
                .chain(st.cow.map(|(_, _, new)| new));
            for page in new_pages {
                self.pool.refs[page as usize] = 0;
                self.pool.free.push(page);
            }
            p.seq.reserved += st.from_reserved;
            self.pool.reserved += st.from_reserved;
            if let Some(slot) = st.new_slot {
                p.seq.slot = None;
                self.free_slots.push(slot);
            }
        }
    }

    /// Appends `tokens` to `seq` in steps of at most the plan's size and returns the logits
    /// after the last token (the prompt's prefill).
    pub fn prefill(&mut self, seq: &mut Sequence, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        let from = tokens.len().saturating_sub(1);
        Ok(self.evaluate(seq, tokens, from)?.data)
    }

    /// [`prefill`](Self::prefill) returning the last row as `kind` asks, into `out` (row 0).
    pub fn prefill_into(
        &mut self,
        seq: &mut Sequence,
        tokens: &[u32],
        kind: OutputKind,
        out: &mut StepOutputs,
    ) -> Result<(), EngineError> {
        let from = tokens.len().saturating_sub(1);
        self.evaluate_with(seq, tokens, from, kind, Some(out), &mut |_| {})
    }

    /// Appends `tokens` to `seq` and returns the logits after every one of them
    /// (`tokens.len()` rows), in steps no larger than the plan allows.
    pub fn logits_all(
        &mut self,
        seq: &mut Sequence,
        tokens: &[u32],
    ) -> Result<Logits, EngineError> {
        self.evaluate(seq, tokens, 0)
    }

    /// Appends `tokens` to `seq` in steps no larger than the plan allows, and returns the logits
    /// after each of `tokens[from..]` (rows for earlier tokens are never computed). All or
    /// nothing: if a step fails, `seq` is rolled back to what it held before.
    pub fn evaluate(
        &mut self,
        seq: &mut Sequence,
        tokens: &[u32],
        from: usize,
    ) -> Result<Logits, EngineError> {
        let n_vocab = self.n_vocab();
        let mut data = Vec::with_capacity(tokens.len().saturating_sub(from) * n_vocab);
        self.evaluate_with(seq, tokens, from, OutputKind::Logits, None, &mut |o| {
            data.extend_from_slice(o.all_logits());
        })?;
        Ok(Logits { n_vocab, data })
    }

    /// The chunked, all-or-nothing loop of [`evaluate`](Self::evaluate): the steps write into
    /// `out` (the engine's own buffer if `None`), and `sink` sees each step's outputs.
    fn evaluate_with(
        &mut self,
        seq: &mut Sequence,
        tokens: &[u32],
        from: usize,
        kind: OutputKind,
        out: Option<&mut StepOutputs>,
        sink: &mut dyn FnMut(&StepOutputs),
    ) -> Result<(), EngineError> {
        self.reclaim();
        self.check_owner(seq)?;
        self.check_fits(seq, tokens.len())?;
        let needed = self.pages_needed(seq, tokens.len());
        if needed > seq.reserved + self.pool.unreserved() {
            return Err(self.cache_full(needed.saturating_sub(seq.reserved)));
        }
        let start = seq.len();
        let mut own = None;
        let out = match out {
            Some(o) => o,
            None => own.insert(std::mem::take(&mut self.outputs)),
        };
        let result = self.evaluate_steps(seq, tokens, from, kind, out, sink);
        if let Some(o) = own {
            self.outputs = o;
        }
        if result.is_err() {
            // The sequence is ours (checked above).
            let _ = self.truncate(seq, start);
        }
        result
    }

    fn evaluate_steps(
        &mut self,
        seq: &mut Sequence,
        tokens: &[u32],
        from: usize,
        kind: OutputKind,
        out: &mut StepOutputs,
        sink: &mut dyn FnMut(&StepOutputs),
    ) -> Result<(), EngineError> {
        let (max_tokens, max_outputs) = (self.max_tokens().max(1), self.max_outputs().max(1));
        let mut pos = 0;
        while pos < tokens.len() {
            // At most max_tokens tokens a step, of which at most max_outputs want rows.
            let first_out = from.max(pos);
            let mut end = (pos + max_tokens).min(tokens.len());
            let logits = if end > first_out {
                end = end.min(first_out + max_outputs);
                WantLogits::From(first_out - pos)
            } else {
                WantLogits::None
            };
            let mut parts = [Part::new(seq, &tokens[pos..end], logits).with_kind(kind)];
            self.step(&mut parts, out)?;
            if !out.is_empty() {
                sink(out);
            }
            pos = end;
        }
        Ok(())
    }

    /// Runs one token of `seq` and returns the logits after it (a decode step).
    pub fn decode(&mut self, seq: &mut Sequence, token: u32) -> Result<Vec<f32>, EngineError> {
        let mut out = std::mem::take(&mut self.outputs);
        let result = self.decode_into(seq, token, OutputKind::Logits, &mut out);
        let row = out.logits(0).map(<[f32]>::to_vec).unwrap_or_default();
        self.outputs = out;
        result.map(|()| row)
    }

    /// Runs one token of `seq`; `out` gets the row after it (row 0) as `kind` asks.
    pub fn decode_into(
        &mut self,
        seq: &mut Sequence,
        token: u32,
        kind: OutputKind,
        out: &mut StepOutputs,
    ) -> Result<(), EngineError> {
        let mut parts =
            [Part::new(seq, std::slice::from_ref(&token), WantLogits::Last).with_kind(kind)];
        self.step(&mut parts, out)
    }

    fn check_fits(&self, seq: &Sequence, n: usize) -> Result<(), EngineError> {
        let needed = seq.len().saturating_add(n);
        if needed > self.n_ctx {
            return Err(EngineError::ContextFull {
                needed,
                n_ctx: self.n_ctx,
            });
        }
        Ok(())
    }
}
