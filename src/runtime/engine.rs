//! The engine: a backend plus the bookkeeping of sequences and KV-cache cells.
//!
//! A [`Sequence`] is a token history whose keys and values live in cells of the backend's KV
//! cache, one cell per position. The engine hands out cells, turns the work of one step (tokens
//! appended to one or several sequences) into a [`Batch`], runs it, and gives each sequence the
//! logits it asked for. Prefill in chunks and all-position logits are built on the same step.
//!
//! A failed call loses nothing: the cells it took go back, and the sequences are as they were
//! before it (a prompt prefilled in several steps is rolled back whole).

use crate::backend::{Backend, BackendError, DeviceInfo, Logits};
use crate::ir::Batch;
use crate::plan::Plan;

/// Why the engine could not run a step.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "the sequence would hold {needed} tokens, more than the context of {n_ctx} tokens (use a shorter prompt, fewer new tokens or a larger --ctx-size)"
    )]
    ContextFull { needed: usize, n_ctx: usize },
    #[error("the KV cache is full: {needed} more cells needed, {free} free of {total}")]
    CacheFull {
        needed: usize,
        free: usize,
        total: usize,
    },
    #[error("a step needs {needed} {what}, but the plan allows at most {max}")]
    StepTooLarge {
        what: &'static str,
        needed: usize,
        max: u64,
    },
    #[error("nothing to run: every part of the step is empty")]
    EmptyStep,
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// One sequence's tokens and the cache cells that hold them (cell `cells[p]` for position `p`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sequence {
    tokens: Vec<u32>,
    cells: Vec<u32>,
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
}

/// Which logits a part of a step wants back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WantLogits {
    None,
    /// The logits after the part's last token (what predicts the next token).
    Last,
    /// The logits after each of the part's tokens.
    All,
    /// The logits after each of the part's tokens from this index on.
    From(usize),
}

/// Tokens appended to one sequence in a step.
pub struct Part<'a> {
    pub seq: &'a mut Sequence,
    pub tokens: &'a [u32],
    pub logits: WantLogits,
}

/// A backend with sequences and cells on top; see the [module docs](self).
pub struct Engine {
    backend: Box<dyn Backend>,
    /// Free cells, popped from the end (lowest numbers first).
    free: Vec<u32>,
    n_ctx: usize,
}

impl Engine {
    /// An engine over `backend` whose sequences hold at most `n_ctx` tokens each (at most the
    /// backend's cache size).
    pub fn new(backend: Box<dyn Backend>, n_ctx: usize) -> Engine {
        let n_cells = backend.n_cells();
        let free = (0..n_cells).rev().collect();
        Engine {
            n_ctx: n_ctx.min(n_cells as usize),
            backend,
            free,
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

    /// The most tokens one sequence can hold.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// The most tokens one step runs.
    pub fn max_tokens(&self) -> usize {
        self.plan().options.max_tokens as usize
    }

    /// The most logits rows one step returns.
    pub fn max_outputs(&self) -> usize {
        self.plan().options.max_outputs as usize
    }

    /// Vocabulary size (the width of a logits row).
    pub fn n_vocab(&self) -> usize {
        self.plan()
            .model
            .as_ref()
            .map_or(0, |m| m.hparams.n_vocab as usize)
    }

    /// A new, empty sequence.
    pub fn new_sequence(&self) -> Sequence {
        Sequence::default()
    }

    /// Ends a sequence: its cells become free.
    pub fn release(&mut self, seq: Sequence) {
        self.free.extend(seq.cells.into_iter().rev());
    }

    /// Forgets everything a sequence holds, keeping it usable (its cells become free).
    pub fn clear(&mut self, seq: &mut Sequence) {
        self.release(std::mem::take(seq));
    }

    /// Runs one step over `parts` (several sequences may share it). Returns, per part, the
    /// logits it asked for (zero rows for [`WantLogits::None`]).
    pub fn step(&mut self, parts: &mut [Part<'_>]) -> Result<Vec<Logits>, EngineError> {
        let n_tokens: usize = parts.iter().map(|p| p.tokens.len()).sum();
        if n_tokens == 0 {
            return Err(EngineError::EmptyStep);
        }
        let plan = &self.backend.plan().options;
        if n_tokens as u64 > plan.max_tokens {
            return Err(EngineError::StepTooLarge {
                what: "tokens",
                needed: n_tokens,
                max: plan.max_tokens,
            });
        }
        let n_outputs: usize = parts.iter().map(|p| wanted_rows(p)).sum();
        if n_outputs as u64 > plan.max_outputs {
            return Err(EngineError::StepTooLarge {
                what: "logits rows",
                needed: n_outputs,
                max: plan.max_outputs,
            });
        }
        for p in parts.iter() {
            let needed = p.seq.len() + p.tokens.len();
            if needed > self.n_ctx {
                return Err(EngineError::ContextFull {
                    needed,
                    n_ctx: self.n_ctx,
                });
            }
        }
        if n_tokens > self.free.len() {
            return Err(EngineError::CacheFull {
                needed: n_tokens,
                free: self.free.len(),
                total: self.backend.n_cells() as usize,
            });
        }

        // Take cells and build the batch; the sequences change only once the step succeeded.
        let mut batch = Batch::default();
        let mut new_cells = Vec::with_capacity(parts.len());
        for (s, p) in parts.iter().enumerate() {
            let start = p.seq.len();
            let cells: Vec<u32> = (0..p.tokens.len())
                .map(|_| self.free.pop().expect("checked above"))
                .collect();
            let mut seq_cells = p.seq.cells.clone();
            seq_cells.extend_from_slice(&cells);
            batch.sequences.push(seq_cells);
            let first_row = batch.tokens.len() as u32;
            for (i, &t) in p.tokens.iter().enumerate() {
                batch.tokens.push(t);
                batch.seq.push(s as u32);
                batch.positions.push((start + i) as u32);
            }
            let n = p.tokens.len() as u32;
            match p.logits {
                WantLogits::None => {}
                WantLogits::Last if n > 0 => batch.outputs.push(first_row + n - 1),
                WantLogits::Last => {}
                WantLogits::All => batch.outputs.extend(first_row..first_row + n),
                WantLogits::From(k) => batch
                    .outputs
                    .extend(first_row + k.min(n as usize) as u32..first_row + n),
            }
            new_cells.push(cells);
        }

        let logits = match self.backend.step(&batch) {
            Ok(l) => l,
            Err(e) => {
                for cells in new_cells {
                    self.free.extend(cells.into_iter().rev());
                }
                return Err(e.into());
            }
        };

        let n_vocab = logits.n_vocab;
        let mut out = Vec::with_capacity(parts.len());
        let mut row = 0;
        for (p, cells) in parts.iter_mut().zip(new_cells) {
            p.seq.tokens.extend_from_slice(p.tokens);
            p.seq.cells.extend(cells);
            let rows = wanted_rows(p);
            out.push(Logits {
                n_vocab,
                data: logits.data[row * n_vocab..(row + rows) * n_vocab].to_vec(),
            });
            row += rows;
        }
        Ok(out)
    }

    /// Appends `tokens` to `seq` in steps of at most the plan's size and returns the logits
    /// after the last token (the prompt's prefill).
    pub fn prefill(&mut self, seq: &mut Sequence, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        let from = tokens.len().saturating_sub(1);
        Ok(self.evaluate(seq, tokens, from)?.data)
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
        self.check_fits(seq, tokens.len())?;
        if tokens.len() > self.free.len() {
            return Err(EngineError::CacheFull {
                needed: tokens.len(),
                free: self.free.len(),
                total: self.backend.n_cells() as usize,
            });
        }
        let start = seq.len();
        let result = self.evaluate_steps(seq, tokens, from);
        if result.is_err() {
            self.truncate(seq, start);
        }
        result
    }

    fn evaluate_steps(
        &mut self,
        seq: &mut Sequence,
        tokens: &[u32],
        from: usize,
    ) -> Result<Logits, EngineError> {
        let (max_tokens, max_outputs) = (self.max_tokens().max(1), self.max_outputs().max(1));
        let mut out = Logits {
            n_vocab: self.n_vocab(),
            data: Vec::with_capacity(tokens.len().saturating_sub(from) * self.n_vocab()),
        };
        let mut pos = 0;
        while pos < tokens.len() {
            // At most max_tokens tokens a step, of which at most max_outputs want logits.
            let first_out = from.max(pos);
            let mut end = (pos + max_tokens).min(tokens.len());
            let logits = if end > first_out {
                end = end.min(first_out + max_outputs);
                WantLogits::From(first_out - pos)
            } else {
                WantLogits::None
            };
            let mut parts = [Part {
                seq,
                tokens: &tokens[pos..end],
                logits,
            }];
            for l in self.step(&mut parts)? {
                out.n_vocab = l.n_vocab;
                out.data.extend_from_slice(&l.data);
            }
            pos = end;
        }
        Ok(out)
    }

    /// Shortens `seq` to its first `len` tokens, freeing the cells of the rest.
    pub fn truncate(&mut self, seq: &mut Sequence, len: usize) {
        if len < seq.len() {
            seq.tokens.truncate(len);
            self.free.extend(seq.cells.drain(len..).rev());
        }
    }

    /// Runs one token of `seq` and returns the logits after it (a decode step).
    pub fn decode(&mut self, seq: &mut Sequence, token: u32) -> Result<Vec<f32>, EngineError> {
        let mut parts = [Part {
            seq,
            tokens: std::slice::from_ref(&token),
            logits: WantLogits::Last,
        }];
        let mut l = self.step(&mut parts)?;
        Ok(l.pop().map(|l| l.data).unwrap_or_default())
    }

    fn check_fits(&self, seq: &Sequence, n: usize) -> Result<(), EngineError> {
        let needed = seq.len() + n;
        if needed > self.n_ctx {
            return Err(EngineError::ContextFull {
                needed,
                n_ctx: self.n_ctx,
            });
        }
        Ok(())
    }
}

fn wanted_rows(p: &Part<'_>) -> usize {
    match p.logits {
        WantLogits::None => 0,
        WantLogits::Last => usize::from(!p.tokens.is_empty()),
        WantLogits::All => p.tokens.len(),
        WantLogits::From(k) => p.tokens.len().saturating_sub(k),
    }
}
