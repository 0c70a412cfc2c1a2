//! The step descriptor: everything a backend receives for one step besides the plan and weights.
//!
//! A step runs `T` tokens that may belong to several sequences (the server batches concurrent
//! requests into one step). Each token has a sequence and a position in it; each sequence owns
//! cells of the KV cache, listed in position order. Three graph inputs are filled from the batch
//! (`token_ids`, `positions`, `output_rows`); `kv_write` and `attention` read the cell lists:
//!
//! - token `t` writes its K and V (every layer) to cell `sequences[seq[t]][positions[t]]`;
//! - token `t` attends to cells `sequences[seq[t]][lo..=positions[t]]`, `lo = 0` (or the start
//!   of the sliding window): causal masking, per sequence, with no mask tensor.
//!
//! The runtime owns cell assignment: it must have filled the cells before a token's position in
//! an earlier step or earlier in this one. Two sequences may list the same cells for a shared
//! prompt prefix.

use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// One step's tokens and where their keys and values live.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// Token ids, one per token of the step (`token_ids`, `i32[T]`).
    pub tokens: Vec<u32>,
    /// Each token's sequence: an index into `sequences`.
    pub seq: Vec<u32>,
    /// Each token's position in its sequence (`positions`, `i32[T]`).
    pub positions: Vec<u32>,
    /// Per sequence, the KV-cache cell of each of its positions: `sequences[s][p]` holds the keys
    /// and values of position `p` of sequence `s`.
    pub sequences: Vec<Vec<u32>>,
    /// The tokens whose logits the step returns, ascending indices into `tokens`
    /// (`output_rows`, `i32[O]`).
    pub outputs: Vec<u32>,
}

/// The bounds a batch must respect: the plan's sizes and the cache's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_tokens: u64,
    pub max_outputs: u64,
    /// Cells in the KV cache.
    pub n_cells: u64,
}

/// Why a batch cannot run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
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
    #[error("token {token} belongs to sequence {seq}, but the batch has {n} sequences")]
    NoSuchSequence { token: usize, seq: u32, n: usize },
    #[error("token {token} is at position {pos} of sequence {seq}, which lists only {cells} cells")]
    NoCell {
        token: usize,
        seq: u32,
        pos: u32,
        cells: usize,
    },
    #[error("sequence {seq} uses cell {cell}, but the cache has {n_cells} cells")]
    CellOutOfRange { seq: usize, cell: u32, n_cells: u64 },
    #[error("sequence {seq} lists cell {cell} twice")]
    DuplicateCell { seq: usize, cell: u32 },
    #[error("tokens {first} and {second} would both write cell {cell}")]
    CellWrittenTwice {
        first: usize,
        second: usize,
        cell: u32,
    },
    #[error("output rows must be ascending token indices below {tokens}: {rows:?}")]
    BadOutputs { rows: Vec<u32>, tokens: usize },
}

impl Batch {
    /// One sequence (number 0) of `tokens` at positions `start..`, using cells `0..start+len`
    /// (cell = position), returning the logits of its last token.
    pub fn single_sequence(tokens: &[u32], start: u32) -> Batch {
        let n = tokens.len() as u32;
        Batch {
            tokens: tokens.to_vec(),
            seq: vec![0; tokens.len()],
            positions: (start..start + n).collect(),
            sequences: vec![(0..start + n).collect()],
            outputs: n.checked_sub(1).into_iter().collect(),
        }
    }

    /// Number of tokens (`T`).
    pub fn n_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// The cache cell token `t` writes its K and V to.
    ///
    /// # Panics
    /// If `t` is out of range or the batch does not [`validate`](Self::validate).
    pub fn write_cell(&self, t: usize) -> u32 {
        let seq = &self.sequences[self.seq[t] as usize];
        seq[self.positions[t] as usize]
    }

    /// The cache cells token `t` attends to, oldest first: its sequence's cells up to and
    /// including its own position, limited to the last `window` positions if given.
    ///
    /// # Panics
    /// If `t` is out of range or the batch does not [`validate`](Self::validate).
    pub fn attended_cells(&self, t: usize, window: Option<u32>) -> &[u32] {
        let pos = self.positions[t] as usize;
        let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w as usize));
        &self.sequences[self.seq[t] as usize][lo..=pos]
    }

    /// Checks the batch against the plan's and the cache's limits. A backend runs a batch only
    /// after this passed; then the accessors above cannot panic.
    pub fn validate(&self, limits: BatchLimits) -> Result<(), BatchError> {
        let n = self.tokens.len();
        if n == 0 {
            return Err(BatchError::Empty);
        }
        if n as u64 > limits.max_tokens {
            return Err(BatchError::TooManyTokens {
                tokens: n,
                max: limits.max_tokens,
            });
        }
        if self.outputs.len() as u64 > limits.max_outputs {
            return Err(BatchError::TooManyOutputs {
                outputs: self.outputs.len(),
                max: limits.max_outputs,
            });
        }
        for (field, len) in [("seq", self.seq.len()), ("positions", self.positions.len())] {
            if len != n {
                return Err(BatchError::Length {
                    field,
                    len,
                    tokens: n,
                });
            }
        }
        for (s, cells) in self.sequences.iter().enumerate() {
            if let Some(&cell) = cells.iter().find(|&&c| u64::from(c) >= limits.n_cells) {
                return Err(BatchError::CellOutOfRange {
                    seq: s,
                    cell,
                    n_cells: limits.n_cells,
                });
            }
        }
        let mut writers = std::collections::HashMap::new();
        for t in 0..n {
            let (seq, pos) = (self.seq[t], self.positions[t]);
            let Some(cells) = self.sequences.get(seq as usize) else {
                return Err(BatchError::NoSuchSequence {
                    token: t,
                    seq,
                    n: self.sequences.len(),
                });
            };
            let Some(&cell) = cells.get(pos as usize) else {
                return Err(BatchError::NoCell {
                    token: t,
                    seq,
                    pos,
                    cells: cells.len(),
                });
            };
            if let Some(first) = writers.insert(cell, t) {
                return Err(BatchError::CellWrittenTwice {
                    first,
                    second: t,
                    cell,
                });
            }
        }
        let ascending = self.outputs.windows(2).all(|w| w[0] < w[1]);
        let in_range = self.outputs.iter().all(|&r| (r as usize) < n);
        if !ascending || !in_range {
            return Err(BatchError::BadOutputs {
                rows: self.outputs.clone(),
                tokens: n,
            });
        }
        // Distinct cells per sequence keep attention from reading one cell twice.
        for (s, cells) in self.sequences.iter().enumerate() {
            let mut seen = HashSet::new();
            if let Some(&cell) = cells.iter().find(|&&c| !seen.insert(c)) {
                return Err(BatchError::DuplicateCell { seq: s, cell });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: BatchLimits = BatchLimits {
        max_tokens: 8,
        max_outputs: 8,
        n_cells: 32,
    };

    #[test]
    fn a_single_sequence_writes_and_attends_by_position() {
        let b = Batch::single_sequence(&[5, 6, 7], 2);
        b.validate(LIMITS).unwrap();
        assert_eq!(b.positions, [2, 3, 4]);
        assert_eq!(b.write_cell(0), 2);
        assert_eq!(b.attended_cells(0, None), &[0, 1, 2]);
        assert_eq!(b.attended_cells(2, Some(2)), &[3, 4]);
        assert_eq!(b.outputs, [2]);
    }

    #[test]
    fn two_sequences_share_a_step_without_seeing_each_other() {
        // Sequence 0 decodes its position 3; sequence 1 prefills positions 0..2.
        let b = Batch {
            tokens: vec![10, 20, 21],
            seq: vec![0, 1, 1],
            positions: vec![3, 0, 1],
            sequences: vec![vec![0, 1, 2, 3], vec![8, 9]],
            outputs: vec![0, 2],
        };
        b.validate(LIMITS).unwrap();
        assert_eq!(b.write_cell(0), 3);
        assert_eq!(b.write_cell(2), 9);
        assert_eq!(b.attended_cells(0, None), &[0, 1, 2, 3]);
        assert_eq!(b.attended_cells(2, None), &[8, 9]);
    }

    #[test]
    fn invalid_batches_are_rejected_with_a_reason() {
        let ok = Batch::single_sequence(&[1, 2], 0);
        let mut b = ok.clone();
        b.positions = vec![0, 5];
        assert!(matches!(
            b.validate(LIMITS),
            Err(BatchError::NoCell { token: 1, .. })
        ));
        let mut b = ok.clone();
        b.sequences = vec![vec![0, 40]];
        assert!(matches!(
            b.validate(LIMITS),
            Err(BatchError::CellOutOfRange { cell: 40, .. })
        ));
        let mut b = ok.clone();
        b.outputs = vec![1, 0];
        assert!(matches!(
            b.validate(LIMITS),
            Err(BatchError::BadOutputs { .. })
        ));
        let mut b = ok.clone();
        b.positions = vec![1, 1];
        assert!(matches!(
            b.validate(LIMITS),
            Err(BatchError::CellWrittenTwice { .. })
        ));
        let b = Batch::single_sequence(&[0; 9], 0);
        assert!(matches!(
            b.validate(LIMITS),
            Err(BatchError::TooManyTokens { .. })
        ));
        assert_eq!(Batch::default().validate(LIMITS), Err(BatchError::Empty));
    }
}
