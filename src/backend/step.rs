//! The step descriptor: everything a backend receives for one step besides the plan and weights,
//! and the page tables through which a step's tokens find their keys and values.
//!
//! # Pages and slots
//! The KV cache is `n_pages` pages of `page_size` cells (a power of two); per layer a K and a V
//! array of `n_pages * page_size` cells. A *slot* (`0..max_slots`) is the place of one sequence
//! in the backend: a page table of at most `max_pages_per_slot` entries and a length (the
//! positions it holds). Position `p` of a slot lives in cell
//! `table[p / page_size] * page_size + p % page_size`. The tables live in the backend (host
//! memory for the CPU, device memory for a GPU) and change only through a step's [`PageOp`]s.
//!
//! # A step
//! A [`Step`] carries `T` tokens (`tokens`, `slots`, `positions`), the page operations to apply
//! before anything is computed, and the output rows to return. Its size is O(tokens) plus
//! O(page-table changes), never O(context): a decode step of 64 sequences at any context is 64
//! tokens and at most a few dozen ops. Its buffers are reusable ([`Step::clear`] keeps their
//! capacity), so a steady decode loop does not allocate.
//!
//! # Validation ([`PageTables::stage`])
//! Strict and O(tokens + ops); bad input is an error ([`StepError`]), never memory corruption, and
//! a failed validation leaves the tables as they were:
//! - every slot, page and table index is in range; `Map` indices are at most the slot's mapped
//!   count (append or replace); `SetLen` is at most the mapped pages' cells;
//! - each slot's tokens are consecutive positions starting at the slot's length (append only;
//!   truncation is an explicit `SetLen`), so token `t` at position `p` attends positions
//!   `0..=p` (or the sliding window's tail) of its slot, all written by now or in this step;
//! - the page a token writes is mapped, and mapped exactly once in all tables (per-page
//!   reference counts, updated by the ops): a shared page is never written (copy it first);
//! - `Copy` writes only a page no table maps;
//! - output rows are ascending token indices, at most the plan's `max_outputs`.

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;

/// The page size used unless asked otherwise.
pub const DEFAULT_PAGE_SIZE: u32 = 16;

/// The shape of a paged KV cache: pages, page size, slots and the longest page table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvGeometry {
    /// Cells per page, a power of two.
    pub page_size: u32,
    /// Pages in the cache (per layer, K and V).
    pub n_pages: u32,
    /// Sequences the backend can hold at once (page tables).
    pub max_slots: u32,
    /// Entries of one page table: a slot holds at most `max_pages_per_slot * page_size`
    /// positions.
    pub max_pages_per_slot: u32,
}

impl KvGeometry {
    /// Checks the sizes: a power-of-two page size, at least one page and slot, positions that fit
    /// an `i32` (the plan's `positions` input) and cells that fit a `u32`.
    pub fn new(
        page_size: u32,
        n_pages: u32,
        max_slots: u32,
        max_pages_per_slot: u32,
    ) -> Result<KvGeometry, StepError> {
        let g = KvGeometry {
            page_size,
            n_pages,
            max_slots,
            max_pages_per_slot,
        };
        let cells_fit = u64::from(n_pages) * u64::from(page_size) <= u64::from(u32::MAX);
        let positions_fit = u64::from(max_pages_per_slot) * u64::from(page_size) <= i32::MAX as u64;
        let tables_fit =
            u64::from(max_slots) * u64::from(max_pages_per_slot) <= u64::from(u32::MAX);
        if !page_size.is_power_of_two()
            || n_pages == 0
            || max_slots == 0
            || max_pages_per_slot == 0
            || !cells_fit
            || !positions_fit
            || !tables_fit
        {
            return Err(StepError::Geometry(g));
        }
        Ok(g)
    }

    /// The geometry for `n_seqs` sequences of up to `n_ctx` tokens each: `ceil(n_ctx /
    /// page_size)` pages per sequence, and `max_slots` page tables (at least `n_seqs`).
    pub fn for_context(
        n_ctx: u32,
        n_seqs: u32,
        max_slots: u32,
        page_size: u32,
    ) -> Result<KvGeometry, StepError> {
        let per_seq = n_ctx.div_ceil(page_size.max(1));
        let n_pages = per_seq.checked_mul(n_seqs).unwrap_or(0);
        KvGeometry::new(page_size, n_pages, max_slots.max(n_seqs), per_seq)
    }

    /// Cells in the cache (`n_pages * page_size`).
    pub fn n_cells(&self) -> u64 {
        u64::from(self.n_pages) * u64::from(self.page_size)
    }

    /// The most positions one slot holds.
    pub fn max_positions(&self) -> u32 {
        self.max_pages_per_slot * self.page_size
    }

    /// Pages that hold `len` positions.
    pub fn pages_for(&self, len: u32) -> u32 {
        len.div_ceil(self.page_size)
    }
}

/// A page-table change, applied in order before the step computes anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PageOp {
    /// Entry `index` of `slot`'s table becomes `page`: appends when `index` is the slot's mapped
    /// count, replaces (after a `Copy`, for copy-on-write) when it is below.
    Map { slot: u32, index: u32, page: u32 },
    /// The slot holds `len` positions: truncates (rollback, regenerate) or adopts the positions
    /// of shared pages just mapped (a prefix). `len` is at most the mapped pages' cells; entries
    /// past `ceil(len / page_size)` are unmapped.
    SetLen { slot: u32, len: u32 },
    /// Copies page `src` to page `dst` (every layer, K and V): copy-on-write of a partly filled
    /// shared page. `dst` must be mapped by no table when the copy is applied.
    Copy { src: u32, dst: u32 },
}

/// What a step returns for one output row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputKind {
    /// The full row of logits (`n_vocab` values).
    Logits,
    /// The backend's argmax: the id and logit of the largest logit.
    Argmax,
    /// The backend's top `k` (ids and logits), largest first.
    TopK(u32),
}

/// One output row of a step: the logits after token `row` (an index into the step's tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRequest {
    pub row: u32,
    pub kind: OutputKind,
}

/// One step; see the [module docs](self). Fill it through the `push_*` methods or the fields
/// directly; a backend validates it before running it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// Token ids (`token_ids`, `i32[T]`).
    pub tokens: Vec<u32>,
    /// Each token's slot.
    pub slots: Vec<u32>,
    /// Each token's position in its slot (`positions`, `i32[T]`).
    pub positions: Vec<u32>,
    /// Page-table changes, applied in order before the step computes.
    pub ops: Vec<PageOp>,
    /// The rows to return, ascending `row`s (`output_rows`, `i32[O]`).
    pub outputs: Vec<OutputRequest>,
}

impl Step {
    pub fn new() -> Step {
        Step::default()
    }

    /// Empties the step, keeping its buffers' capacity.
    pub fn clear(&mut self) {
        self.tokens.clear();
        self.slots.clear();
        self.positions.clear();
        self.ops.clear();
        self.outputs.clear();
    }

    /// Number of tokens (`T`).
    pub fn n_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Appends a token of `slot` at `position`; returns its row index.
    pub fn push_token(&mut self, slot: u32, position: u32, token: u32) -> u32 {
        let row = self.tokens.len() as u32;
        self.tokens.push(token);
        self.slots.push(slot);
        self.positions.push(position);
        row
    }

    pub fn push_op(&mut self, op: PageOp) {
        self.ops.push(op);
    }

    pub fn push_output(&mut self, row: u32, kind: OutputKind) {
        self.outputs.push(OutputRequest { row, kind });
    }

    /// Slot 0 of a fresh backend, prefilled with `tokens` at positions `0..`, using pages
    /// `0, 1, ...`, returning the logits of every token (for tests and examples).
    pub fn prefill(tokens: &[u32], page_size: u32) -> Step {
        let mut s = Step::new();
        let n = tokens.len() as u32;
        for index in 0..n.div_ceil(page_size.max(1)) {
            s.push_op(PageOp::Map {
                slot: 0,
                index,
                page: index,
            });
        }
        for (p, &t) in tokens.iter().enumerate() {
            let row = s.push_token(0, p as u32, t);
            s.push_output(row, OutputKind::Logits);
        }
        s
    }
}

/// The bounds of a step besides the tables: the plan's sizes and the vocabulary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepLimits {
    pub max_tokens: u64,
    pub max_outputs: u64,
    /// Width of a logits row (for `TopK`).
    pub n_vocab: u32,
}

/// Why a step cannot run. Each names the token, op or row at fault.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum StepError {
    #[error(
        "invalid KV cache geometry {0:?}: the page size must be a power of two, pages, slots and table entries at least 1, and cells and positions must fit 32 bits"
    )]
    Geometry(KvGeometry),
    #[error("a step needs at least one token")]
    Empty,
    #[error("{tokens} tokens, but the plan takes at most {max} per step")]
    TooManyTokens { tokens: usize, max: u64 },
    #[error("{outputs} outputs, but the plan returns at most {max} per step")]
    TooManyOutputs { outputs: usize, max: u64 },
    #[error("{field} has {len} entries for {tokens} tokens")]
    Length {
        field: &'static str,
        len: usize,
        tokens: usize,
    },
    #[error("op {op}: slot {slot} is out of range (the backend has {max_slots} slots)")]
    OpSlot {
        op: usize,
        slot: u32,
        max_slots: u32,
    },
    #[error("op {op}: page {page} is out of range (the cache has {n_pages} pages)")]
    OpPage { op: usize, page: u32, n_pages: u32 },
    #[error(
        "op {op}: table index {index} of slot {slot}, which maps {mapped} pages (at most {max} entries): a map appends or replaces"
    )]
    OpIndex {
        op: usize,
        slot: u32,
        index: u32,
        mapped: u32,
        max: u32,
    },
    #[error("op {op}: slot {slot} cannot hold {len} positions with {mapped} pages mapped")]
    OpLen {
        op: usize,
        slot: u32,
        len: u32,
        mapped: u32,
    },
    #[error("op {op}: copy from page {src} to page {dst}, which is {why}")]
    OpCopy {
        op: usize,
        src: u32,
        dst: u32,
        why: &'static str,
    },
    #[error("token {token}: slot {slot} is out of range (the backend has {max_slots} slots)")]
    TokenSlot {
        token: usize,
        slot: u32,
        max_slots: u32,
    },
    #[error(
        "token {token}: position {pos} of slot {slot}, but the slot's next position is {expected} (tokens append in order; truncate with SetLen)"
    )]
    Position {
        token: usize,
        slot: u32,
        pos: u32,
        expected: u32,
    },
    #[error("token {token}: position {pos} of slot {slot} is on no mapped page ({mapped} mapped)")]
    NotMapped {
        token: usize,
        slot: u32,
        pos: u32,
        mapped: u32,
    },
    #[error(
        "token {token}: position {pos} of slot {slot} would write page {page}, which {refs} table entries map (copy a shared page before writing it)"
    )]
    SharedPage {
        token: usize,
        slot: u32,
        pos: u32,
        page: u32,
        refs: u32,
    },
    #[error("output {index}: row {row} is not an ascending token index below {tokens}")]
    OutputRow {
        index: usize,
        row: u32,
        tokens: usize,
    },
    #[error("output {index}: top-{k} of a vocabulary of {n_vocab}")]
    OutputTopK { index: usize, k: u32, n_vocab: u32 },
}

/// Marks an unmapped table entry in the undo log.
const NONE: u32 = u32::MAX;

/// One staged change, undone in reverse order.
#[derive(Clone, Copy, Debug)]
enum Undo {
    /// Entry `index` of `slot` was `old` and is now `new` (either may be [`NONE`]).
    Entry {
        slot: u32,
        index: u32,
        old: u32,
        new: u32,
    },
    Mapped {
        slot: u32,
        old: u32,
    },
    Len {
        slot: u32,
        old: u32,
    },
}

/// The page tables a backend keeps, with per-page reference counts, and the step validation
/// that reads and changes them; see the [module docs](self). The CPU backend uses it directly;
/// a GPU backend keeps one as the host's view of the tables it mirrors on the device (applying
/// the same ops there), so both validate alike.
#[derive(Clone, Debug)]
pub struct PageTables {
    geometry: KvGeometry,
    /// `max_slots * max_pages_per_slot` entries; `table[slot * max_pages_per_slot + i]`.
    table: Vec<u32>,
    /// Mapped entries per slot (a prefix of its table).
    mapped: Vec<u32>,
    /// Positions held per slot.
    len: Vec<u32>,
    /// Per page, the table entries that map it.
    refs: Vec<u32>,
    /// Changes of the staged step, for [`rollback`](Self::rollback).
    undo: Vec<Undo>,
    /// Per slot, the next position a token of this step must have, valid where `epoch` matches.
    next: Vec<u32>,
    seen: Vec<u64>,
    epoch: u64,
    /// Slots with tokens in the staged step.
    touched: Vec<u32>,
}

impl PageTables {
    /// Empty tables: every slot holds nothing, no page is mapped.
    pub fn new(geometry: KvGeometry) -> PageTables {
        let slots = geometry.max_slots as usize;
        PageTables {
            table: vec![NONE; slots * geometry.max_pages_per_slot as usize],
            mapped: vec![0; slots],
            len: vec![0; slots],
            refs: vec![0; geometry.n_pages as usize],
            undo: Vec::new(),
            next: vec![0; slots],
            seen: vec![0; slots],
            epoch: 0,
            touched: Vec::new(),
            geometry,
        }
    }

    pub fn geometry(&self) -> KvGeometry {
        self.geometry
    }

    /// Positions `slot` holds.
    pub fn len(&self, slot: u32) -> Option<u32> {
        self.len.get(slot as usize).copied()
    }

    /// The mapped part of `slot`'s page table.
    pub fn pages(&self, slot: u32) -> Option<&[u32]> {
        let mapped = *self.mapped.get(slot as usize)? as usize;
        let start = slot as usize * self.geometry.max_pages_per_slot as usize;
        self.table.get(start..start + mapped)
    }

    /// How many table entries map `page`.
    pub fn refs(&self, page: u32) -> Option<u32> {
        self.refs.get(page as usize).copied()
    }

    /// Pages mapped by at least one table.
    pub fn pages_in_use(&self) -> usize {
        self.refs.iter().filter(|&&r| r > 0).count()
    }

    /// The cell of position `pos` of `slot`, if that position is on a mapped page.
    pub fn cell(&self, slot: u32, pos: u32) -> Option<u32> {
        let pages = self.pages(slot)?;
        let shift = self.geometry.page_size.trailing_zeros();
        let page = *pages.get((pos >> shift) as usize)?;
        Some((page << shift) | (pos & (self.geometry.page_size - 1)))
    }

    /// Applies `step`'s page ops and checks its tokens and outputs (see the [module
    /// docs](self)); the slots' lengths then include the step's tokens. On error nothing
    /// changed. After success, [`commit`](Self::commit) or [`rollback`](Self::rollback).
    pub fn stage(&mut self, step: &Step, limits: StepLimits) -> Result<(), StepError> {
        self.undo.clear();
        let result = self.stage_inner(step, limits);
        if result.is_err() {
            self.rollback();
        }
        result
    }

    /// Keeps the staged changes.
    pub fn commit(&mut self) {
        self.undo.clear();
    }

    /// Undoes the staged changes (no-op after [`commit`](Self::commit)).
    pub fn rollback(&mut self) {
        while let Some(u) = self.undo.pop() {
            match u {
                Undo::Entry {
                    slot,
                    index,
                    old,
                    new,
                } => {
                    let i = self.entry(slot, index);
                    self.table[i] = old;
                    if new != NONE {
                        self.refs[new as usize] -= 1;
                    }
                    if old != NONE {
                        self.refs[old as usize] += 1;
                    }
                }
                Undo::Mapped { slot, old } => self.mapped[slot as usize] = old,
                Undo::Len { slot, old } => self.len[slot as usize] = old,
            }
        }
    }

    /// Checks `step` without keeping any change ([`stage`](Self::stage), then
    /// [`rollback`](Self::rollback)).
    pub fn validate(&mut self, step: &Step, limits: StepLimits) -> Result<(), StepError> {
        self.stage(step, limits)?;
        self.rollback();
        Ok(())
    }

    fn entry(&self, slot: u32, index: u32) -> usize {
        slot as usize * self.geometry.max_pages_per_slot as usize + index as usize
    }

    fn set_entry(&mut self, slot: u32, index: u32, new: u32) {
        let i = self.entry(slot, index);
        let old = self.table[i];
        self.table[i] = new;
        if old != NONE {
            self.refs[old as usize] -= 1;
        }
        if new != NONE {
            self.refs[new as usize] += 1;
        }
        self.undo.push(Undo::Entry {
            slot,
            index,
            old,
            new,
        });
    }

    fn stage_inner(&mut self, step: &Step, limits: StepLimits) -> Result<(), StepError> {
        let n = step.tokens.len();
        if n == 0 {
            return Err(StepError::Empty);
        }
        if n as u64 > limits.max_tokens {
            return Err(StepError::TooManyTokens {
                tokens: n,
                max: limits.max_tokens,
            });
        }
        if step.outputs.len() as u64 > limits.max_outputs {
            return Err(StepError::TooManyOutputs {
                outputs: step.outputs.len(),
                max: limits.max_outputs,
            });
        }
        for (field, len) in [
            ("slots", step.slots.len()),
            ("positions", step.positions.len()),
        ] {
            if len != n {
                return Err(StepError::Length {
                    field,
                    len,
                    tokens: n,
                });
            }
        }
        let mut last_row = None;
        for (index, out) in step.outputs.iter().enumerate() {
            if out.row as usize >= n || last_row.is_some_and(|r| out.row <= r) {
                return Err(StepError::OutputRow {
                    index,
                    row: out.row,
                    tokens: n,
                });
            }
            last_row = Some(out.row);
            if let OutputKind::TopK(k) = out.kind
                && (k == 0 || k > limits.n_vocab)
            {
                return Err(StepError::OutputTopK {
                    index,
                    k,
                    n_vocab: limits.n_vocab,
                });
            }
        }
        let g = self.geometry;
        for (op, &page_op) in step.ops.iter().enumerate() {
            self.apply(op, page_op, g)?;
        }

        self.epoch += 1;
        self.touched.clear();
        let shift = g.page_size.trailing_zeros();
        for t in 0..n {
            let (slot, pos) = (step.slots[t], step.positions[t]);
            let s = slot as usize;
            if slot >= g.max_slots {
                return Err(StepError::TokenSlot {
                    token: t,
                    slot,
                    max_slots: g.max_slots,
                });
            }
            let expected = if self.seen[s] == self.epoch {
                self.next[s]
            } else {
                self.len[s]
            };
            if pos != expected {
                return Err(StepError::Position {
                    token: t,
                    slot,
                    pos,
                    expected,
                });
            }
            let index = pos >> shift;
            let mapped = self.mapped[s];
            if index >= mapped {
                return Err(StepError::NotMapped {
                    token: t,
                    slot,
                    pos,
                    mapped,
                });
            }
            let page = self.table[self.entry(slot, index)];
            let refs = self.refs[page as usize];
            if refs != 1 {
                return Err(StepError::SharedPage {
                    token: t,
                    slot,
                    pos,
                    page,
                    refs,
                });
            }
            if self.seen[s] != self.epoch {
                self.seen[s] = self.epoch;
                self.touched.push(slot);
            }
            self.next[s] = pos + 1;
        }
        for i in 0..self.touched.len() {
            let slot = self.touched[i];
            let s = slot as usize;
            self.undo.push(Undo::Len {
                slot,
                old: self.len[s],
            });
            self.len[s] = self.next[s];
        }
        Ok(())
    }

    fn apply(&mut self, op: usize, page_op: PageOp, g: KvGeometry) -> Result<(), StepError> {
        let check_slot = |slot: u32| {
            if slot < g.max_slots {
                Ok(())
            } else {
                Err(StepError::OpSlot {
                    op,
                    slot,
                    max_slots: g.max_slots,
                })
            }
        };
        let check_page = |page: u32| {
            if page < g.n_pages {
                Ok(())
            } else {
                Err(StepError::OpPage {
                    op,
                    page,
                    n_pages: g.n_pages,
                })
            }
        };
        match page_op {
            PageOp::Map { slot, index, page } => {
                check_slot(slot)?;
                check_page(page)?;
                let mapped = self.mapped[slot as usize];
                if index > mapped || index >= g.max_pages_per_slot {
                    return Err(StepError::OpIndex {
                        op,
                        slot,
                        index,
                        mapped,
                        max: g.max_pages_per_slot,
                    });
                }
                self.set_entry(slot, index, page);
                if index == mapped {
                    self.undo.push(Undo::Mapped { slot, old: mapped });
                    self.mapped[slot as usize] = mapped + 1;
                }
            }
            PageOp::SetLen { slot, len } => {
                check_slot(slot)?;
                let s = slot as usize;
                let mapped = self.mapped[s];
                if u64::from(len) > u64::from(mapped) * u64::from(g.page_size) {
                    return Err(StepError::OpLen {
                        op,
                        slot,
                        len,
                        mapped,
                    });
                }
                let keep = g.pages_for(len);
                for index in (keep..mapped).rev() {
                    self.set_entry(slot, index, NONE);
                }
                if keep != mapped {
                    self.undo.push(Undo::Mapped { slot, old: mapped });
                    self.mapped[s] = keep;
                }
                self.undo.push(Undo::Len {
                    slot,
                    old: self.len[s],
                });
                self.len[s] = len;
            }
            PageOp::Copy { src, dst } => {
                check_page(src)?;
                check_page(dst)?;
                let why = if src == dst {
                    Some("the same page")
                } else if self.refs[dst as usize] != 0 {
                    Some("mapped by a table")
                } else {
                    None
                };
                if let Some(why) = why {
                    return Err(StepError::OpCopy { op, src, dst, why });
                }
            }
        }
        Ok(())
    }
}

/// A token id and its logit: an argmax or a top-k entry.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenLogit {
    pub id: u32,
    pub logit: f32,
}

/// The order of argmax and top-k (the host sampler's): NaN counts as -inf, larger logits
/// first, ties by the lower id.
pub fn by_logit_desc(a: &TokenLogit, b: &TokenLogit) -> Ordering {
    sanitize(b.logit)
        .total_cmp(&sanitize(a.logit))
        .then(a.id.cmp(&b.id))
}

fn sanitize(l: f32) -> f32 {
    if l.is_nan() { f32::NEG_INFINITY } else { l }
}

/// The largest logit of `row` and its id (the lowest id on ties; NaN counts as -inf, so a row
/// of only NaN and -inf gives id 0 with its value). The reference every backend's argmax
/// matches. `None` for an empty row.
pub fn argmax(row: &[f32]) -> Option<TokenLogit> {
    let mut best: Option<TokenLogit> = None;
    for (id, &logit) in row.iter().enumerate() {
        let c = TokenLogit {
            id: id as u32,
            logit,
        };
        if best.is_none_or(|b| by_logit_desc(&c, &b) == Ordering::Less) {
            best = Some(c);
        }
    }
    best
}

/// Appends the `k` largest logits of `row` to `out`, sorted by [`by_logit_desc`] (all of them if
/// `k` exceeds the row). The reference every backend's top-k matches.
pub fn top_k_into(row: &[f32], k: usize, out: &mut Vec<TokenLogit>) {
    let k = k.min(row.len());
    if k == 0 {
        return;
    }
    let start = out.len();
    // A sorted window of the best k so far; most logits fail the one comparison with its worst.
    for (id, &logit) in row.iter().enumerate() {
        let c = TokenLogit {
            id: id as u32,
            logit,
        };
        let kept = out.len() - start;
        if kept == k {
            let worst = out[out.len() - 1];
            if by_logit_desc(&c, &worst) != Ordering::Less {
                continue;
            }
            out.pop();
        }
        let at = out[start..].partition_point(|e| by_logit_desc(e, &c) == Ordering::Less);
        out.insert(start + at, c);
    }
}

/// Where one row's result sits in [`StepOutputs`].
#[derive(Clone, Copy, Debug, PartialEq)]
enum RowSlot {
    Logits { offset: usize },
    Argmax { offset: usize },
    TopK { offset: usize, len: usize },
}

/// One output row of a step, as the step's [`OutputRequest`] asked for it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RowOutput<'a> {
    Logits(&'a [f32]),
    Argmax(TokenLogit),
    TopK(&'a [TokenLogit]),
}

/// A plan output besides the logits (the plan's first output): every output row's values.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OutputValue {
    pub name: String,
    /// Values per row.
    pub cols: usize,
    /// `rows * cols` values, row-major, in the order of the step's outputs.
    pub data: Vec<f32>,
}

/// What a step returns, in buffers the caller owns and reuses: per output request, in the
/// step's order, the full logits row, the argmax or the top-k (see [`OutputKind`]); and the
/// plan's other outputs (none today) for every output row. A backend fills it with
/// [`clear`](Self::clear) and the `push_*` methods.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepOutputs {
    n_vocab: usize,
    rows: Vec<RowSlot>,
    logits: Vec<f32>,
    top: Vec<TokenLogit>,
    values: Vec<OutputValue>,
    n_values: usize,
}

impl StepOutputs {
    pub fn new() -> StepOutputs {
        StepOutputs::default()
    }

    /// Width of a logits row.
    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// Output rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Row `i` as it was asked for.
    pub fn row(&self, i: usize) -> Option<RowOutput<'_>> {
        Some(match *self.rows.get(i)? {
            RowSlot::Logits { offset } => {
                RowOutput::Logits(self.logits.get(offset..offset + self.n_vocab)?)
            }
            RowSlot::Argmax { offset } => RowOutput::Argmax(*self.top.get(offset)?),
            RowSlot::TopK { offset, len } => RowOutput::TopK(self.top.get(offset..offset + len)?),
        })
    }

    /// Row `i`'s full logits, if it asked for them.
    pub fn logits(&self, i: usize) -> Option<&[f32]> {
        match self.row(i)? {
            RowOutput::Logits(l) => Some(l),
            _ => None,
        }
    }

    /// Every full logits row, concatenated in row order (rows that asked for argmax or top-k
    /// have none).
    pub fn all_logits(&self) -> &[f32] {
        &self.logits
    }

    /// Row `i`'s argmax: asked for, or the first of its top-k, or computed from its logits.
    pub fn argmax(&self, i: usize) -> Option<TokenLogit> {
        match self.row(i)? {
            RowOutput::Logits(l) => argmax(l),
            RowOutput::Argmax(a) => Some(a),
            RowOutput::TopK(t) => t.first().copied(),
        }
    }

    /// The plan's outputs after the first.
    pub fn values(&self) -> &[OutputValue] {
        &self.values[..self.n_values]
    }

    /// Empties the outputs for a step with logits rows of `n_vocab`, keeping every buffer.
    pub fn clear(&mut self, n_vocab: usize) {
        self.n_vocab = n_vocab;
        self.rows.clear();
        self.logits.clear();
        self.top.clear();
        self.n_values = 0;
    }

    /// Appends a row's full logits (`n_vocab` values).
    pub fn push_logits(&mut self, row: &[f32]) {
        let offset = self.logits.len();
        self.logits.extend_from_slice(row);
        self.rows.push(RowSlot::Logits { offset });
    }

    /// Appends a row's argmax.
    pub fn push_argmax(&mut self, best: TokenLogit) {
        self.rows.push(RowSlot::Argmax {
            offset: self.top.len(),
        });
        self.top.push(best);
    }

    /// Appends a row's top-k, already sorted by [`by_logit_desc`].
    pub fn push_top_k(&mut self, entries: &[TokenLogit]) {
        let offset = self.top.len();
        self.top.extend_from_slice(entries);
        self.rows.push(RowSlot::TopK {
            offset,
            len: entries.len(),
        });
    }

    /// Appends the answer to `request` computed on the host from a full logits row (what the
    /// CPU backend does, and a GPU backend's fallback).
    pub fn push_from_row(&mut self, kind: OutputKind, row: &[f32]) {
        match kind {
            OutputKind::Logits => self.push_logits(row),
            OutputKind::Argmax => {
                let best = argmax(row).unwrap_or(TokenLogit {
                    id: 0,
                    logit: f32::NAN,
                });
                self.push_argmax(best);
            }
            OutputKind::TopK(k) => {
                let offset = self.top.len();
                top_k_into(row, k as usize, &mut self.top);
                self.rows.push(RowSlot::TopK {
                    offset,
                    len: self.top.len() - offset,
                });
            }
        }
    }

    /// The next plan output's buffer (named `name`, `cols` per row), emptied; its allocation is
    /// reused from step to step.
    pub fn push_value(&mut self, name: &str, cols: usize) -> &mut Vec<f32> {
        if self.n_values == self.values.len() {
            self.values.push(OutputValue::default());
        }
        let v = &mut self.values[self.n_values];
        self.n_values += 1;
        if v.name != name {
            v.name = name.to_string();
        }
        v.cols = cols;
        v.data.clear();
        &mut v.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry() -> KvGeometry {
        KvGeometry::new(4, 8, 3, 4).unwrap()
    }

    const LIMITS: StepLimits = StepLimits {
        max_tokens: 16,
        max_outputs: 16,
        n_vocab: 10,
    };

    fn map(slot: u32, index: u32, page: u32) -> PageOp {
        PageOp::Map { slot, index, page }
    }

    #[test]
    fn geometry_is_checked() {
        assert!(KvGeometry::new(3, 8, 1, 4).is_err());
        assert!(KvGeometry::new(4, 0, 1, 4).is_err());
        assert!(KvGeometry::new(1 << 16, 1 << 17, 1, 1).is_err());
        let g = KvGeometry::for_context(100, 2, 1, 16).unwrap();
        assert_eq!((g.n_pages, g.max_slots, g.max_pages_per_slot), (14, 2, 7));
        assert_eq!(g.max_positions(), 112);
    }

    #[test]
    fn tokens_write_through_the_page_table() {
        let mut pt = PageTables::new(geometry());
        let mut s = Step::new();
        s.push_op(map(1, 0, 5));
        s.push_op(map(1, 1, 2));
        for p in 0..6 {
            s.push_token(1, p, 7);
        }
        s.push_output(5, OutputKind::Argmax);
        pt.stage(&s, LIMITS).unwrap();
        pt.commit();
        assert_eq!(pt.len(1), Some(6));
        assert_eq!(pt.pages(1), Some(&[5, 2][..]));
        assert_eq!(pt.cell(1, 0), Some(20));
        assert_eq!(pt.cell(1, 5), Some(9));
        assert_eq!(pt.cell(1, 8), None);
        assert_eq!(pt.refs(5), Some(1));
    }

    #[test]
    fn a_failed_step_leaves_the_tables_unchanged() {
        let mut pt = PageTables::new(geometry());
        pt.stage(&Step::prefill(&[1, 2, 3, 4, 5], 4), LIMITS)
            .unwrap();
        pt.commit();
        let before = (
            pt.pages(0).unwrap().to_vec(),
            pt.len(0),
            pt.refs(0),
            pt.refs(1),
        );
        // Valid ops, then a token at the wrong position.
        let mut s = Step::new();
        s.push_op(PageOp::SetLen { slot: 0, len: 2 });
        s.push_op(map(0, 1, 6));
        s.push_op(map(2, 0, 1));
        s.push_token(0, 3, 9);
        assert!(matches!(
            pt.stage(&s, LIMITS),
            Err(StepError::Position { expected: 2, .. })
        ));
        let after = (
            pt.pages(0).unwrap().to_vec(),
            pt.len(0),
            pt.refs(0),
            pt.refs(1),
        );
        assert_eq!(before, after);
        assert_eq!(pt.pages(2), Some(&[][..]));
        assert_eq!(pt.refs(6), Some(0));
        // validate() keeps nothing either.
        let mut ok = Step::new();
        ok.push_token(0, 5, 1);
        pt.validate(&ok, LIMITS).unwrap();
        assert_eq!(pt.len(0), Some(5));
    }

    #[test]
    fn shared_pages_are_read_but_never_written() {
        let mut pt = PageTables::new(geometry());
        pt.stage(&Step::prefill(&[1, 2, 3, 4, 5, 6], 4), LIMITS)
            .unwrap();
        pt.commit();
        // Slot 1 adopts slot 0's first 6 positions (pages 0 and 1).
        let mut s = Step::new();
        s.push_op(map(1, 0, 0));
        s.push_op(map(1, 1, 1));
        s.push_op(PageOp::SetLen { slot: 1, len: 6 });
        s.push_token(1, 6, 9);
        let err = pt.stage(&s, LIMITS).unwrap_err();
        assert!(
            matches!(
                err,
                StepError::SharedPage {
                    page: 1,
                    refs: 2,
                    ..
                }
            ),
            "{err}"
        );
        // Copy-on-write: copy page 1 to 3 and map it in its place.
        s.ops.push(PageOp::Copy { src: 1, dst: 3 });
        s.ops.push(map(1, 1, 3));
        pt.stage(&s, LIMITS).unwrap();
        pt.commit();
        assert_eq!(pt.pages(1), Some(&[0, 3][..]));
        assert_eq!(
            (pt.refs(0), pt.refs(1), pt.refs(3)),
            (Some(2), Some(1), Some(1))
        );
        // A copy onto a mapped page is refused.
        let mut s = Step::new();
        s.push_op(PageOp::Copy { src: 0, dst: 1 });
        s.push_token(0, 6, 1);
        assert!(matches!(
            pt.stage(&s, LIMITS),
            Err(StepError::OpCopy { .. })
        ));
        // The same page twice in one table counts twice: not writable.
        let mut s = Step::new();
        s.push_op(map(2, 0, 4));
        s.push_op(map(2, 1, 4));
        s.push_token(2, 0, 1);
        assert!(matches!(
            pt.stage(&s, LIMITS),
            Err(StepError::SharedPage { refs: 2, .. })
        ));
    }

    #[test]
    fn bad_steps_are_rejected_with_a_reason() {
        let mut pt = PageTables::new(geometry());
        let ok = Step::prefill(&[1, 2], 4);
        let check = |pt: &mut PageTables, f: &dyn Fn(&mut Step)| {
            let mut s = ok.clone();
            f(&mut s);
            pt.stage(&s, LIMITS).unwrap_err()
        };
        assert_eq!(check(&mut pt, &|s| s.clear()), StepError::Empty);
        assert!(matches!(
            check(&mut pt, &|s| s.ops[0] = map(3, 0, 0)),
            StepError::OpSlot { slot: 3, .. }
        ));
        assert!(matches!(
            check(&mut pt, &|s| s.ops[0] = map(0, 0, 8)),
            StepError::OpPage { page: 8, .. }
        ));
        assert!(matches!(
            check(&mut pt, &|s| s.ops[0] = map(0, 1, 0)),
            StepError::OpIndex { index: 1, .. }
        ));
        assert!(matches!(
            check(&mut pt, &|s| s.ops.push(PageOp::SetLen { slot: 0, len: 5 })),
            StepError::OpLen { len: 5, .. }
        ));
        assert!(matches!(
            check(&mut pt, &|s| s.slots[1] = 7),
            StepError::TokenSlot { token: 1, .. }
        ));
        assert!(matches!(
            check(&mut pt, &|s| s.positions[1] = 0),
            StepError::Position { token: 1, .. }
        ));
        assert!(matches!(
            check(&mut pt, &|s| s.ops.clear()),
            StepError::NotMapped { token: 0, .. }
        ));
        assert!(matches!(
            check(&mut pt, &|s| s.outputs.reverse()),
            StepError::OutputRow { index: 1, .. }
        ));
        assert!(matches!(
            check(&mut pt, &|s| s.outputs[0].kind = OutputKind::TopK(11)),
            StepError::OutputTopK { k: 11, .. }
        ));
        assert!(matches!(
            check(&mut pt, &|s| s.positions.pop().map(|_| ()).unwrap_or(())),
            StepError::Length { .. }
        ));
        let big = Step::prefill(&[0; 17], 4);
        assert!(matches!(
            pt.stage(&big, LIMITS),
            Err(StepError::TooManyTokens { .. })
        ));
        assert_eq!(pt.pages_in_use(), 0);
    }

    /// Everything a caller can observe: per slot its pages and length, per page its count.
    fn snapshot(pt: &PageTables) -> (Vec<(Vec<u32>, u32)>, Vec<u32>) {
        let g = pt.geometry();
        let slots = (0..g.max_slots)
            .map(|s| (pt.pages(s).unwrap().to_vec(), pt.len(s).unwrap()))
            .collect();
        let refs = (0..g.n_pages).map(|p| pt.refs(p).unwrap()).collect();
        (slots, refs)
    }

    proptest::proptest! {
        /// Arbitrary steps, valid or not, never panic; a refused one changes nothing; the
        /// reference counts always equal the table entries that map each page. Ops and
        /// positions are drawn relative to the tables (mostly appends at the right place), so
        /// that many steps are valid.
        #[test]
        fn any_step_is_applied_whole_or_not_at_all(
            steps in proptest::collection::vec(
                (
                    proptest::collection::vec((0u8..6, 0u32..3, 0u32..6, 0u32..9), 0..6),
                    proptest::collection::vec((0u32..3, 0u32..6), 0..5),
                ),
                1..16,
            )
        ) {
            let mut pt = PageTables::new(geometry());
            for (ops, toks) in steps {
                let mut s = Step::new();
                let mut mapped = [0u32; 3];
                let mut len = [0u32; 3];
                for slot in 0..3u32 {
                    mapped[slot as usize] = pt.pages(slot).unwrap().len() as u32;
                    len[slot as usize] = pt.len(slot).unwrap();
                }
                for (kind, slot, a, b) in ops {
                    let m = &mut mapped[slot as usize];
                    s.push_op(match kind {
                        0..4 => {
                            let index = match a {
                                0..4 => *m,
                                4 => m.saturating_sub(1),
                                _ => 7,
                            };
                            if index == *m {
                                *m += 1;
                            }
                            PageOp::Map { slot, index, page: b }
                        }
                        4 => {
                            // Mostly within the mapped cells.
                            let l = if a == 5 { b * 2 } else { (b * 2).min(*m * 4) };
                            *m = (*m).min(l.div_ceil(4));
                            len[slot as usize] = l;
                            PageOp::SetLen { slot, len: l }
                        }
                        _ => PageOp::Copy { src: a, dst: b },
                    });
                }
                for (slot, off) in toks {
                    let pos = len[slot as usize] + u32::from(off == 2);
                    len[slot as usize] = pos + 1;
                    let slot = if off == 1 && slot == 2 { 9 } else { slot };
                    let row = s.push_token(slot, pos, 1);
                    s.push_output(row, OutputKind::Argmax);
                }
                let before = snapshot(&pt);
                match pt.stage(&s, LIMITS) {
                    Ok(()) => pt.commit(),
                    Err(_) => proptest::prop_assert_eq!(&before, &snapshot(&pt)),
                }
                let (slots, refs) = snapshot(&pt);
                for (page, &r) in refs.iter().enumerate() {
                    let n = slots
                        .iter()
                        .flat_map(|(p, _)| p)
                        .filter(|&&p| p as usize == page)
                        .count();
                    proptest::prop_assert_eq!(r as usize, n);
                }
                for (pages, len) in &slots {
                    proptest::prop_assert!(*len as usize <= pages.len() * 4);
                }
            }
        }
    }

    #[test]
    fn argmax_and_top_k_order_by_logit_then_id() {
        let row = [1.0, 3.0, f32::NAN, 3.0, -1.0, f32::NEG_INFINITY];
        assert_eq!(argmax(&row), Some(TokenLogit { id: 1, logit: 3.0 }));
        let mut top = Vec::new();
        top_k_into(&row, 3, &mut top);
        let ids: Vec<u32> = top.iter().map(|t| t.id).collect();
        assert_eq!(ids, [1, 3, 0]);
        top.clear();
        top_k_into(&row, 10, &mut top);
        let ids: Vec<u32> = top.iter().map(|t| t.id).collect();
        assert_eq!(ids, [1, 3, 0, 4, 2, 5]);
        assert_eq!(
            argmax(&[f32::NAN, f32::NEG_INFINITY]).map(|t| t.id),
            Some(0)
        );
    }

    #[test]
    fn outputs_keep_their_buffers_and_kinds() {
        let mut out = StepOutputs::new();
        out.clear(3);
        out.push_from_row(OutputKind::Logits, &[1.0, 2.0, 0.0]);
        out.push_from_row(OutputKind::Argmax, &[1.0, 2.0, 0.0]);
        out.push_from_row(OutputKind::TopK(2), &[1.0, 2.0, 0.0]);
        assert_eq!(out.len(), 3);
        assert_eq!(out.logits(0), Some(&[1.0, 2.0, 0.0][..]));
        assert_eq!(
            out.row(1),
            Some(RowOutput::Argmax(TokenLogit { id: 1, logit: 2.0 }))
        );
        assert_eq!(out.argmax(2).map(|t| t.id), Some(1));
        assert!(matches!(out.row(2), Some(RowOutput::TopK(t)) if t.len() == 2 && t[1].id == 0));
        assert_eq!(out.row(3), None);
        out.push_value("x", 2).extend([1.0, 2.0]);
        assert_eq!(out.values().len(), 1);
        out.clear(3);
        assert!(out.is_empty() && out.values().is_empty());
    }
}
