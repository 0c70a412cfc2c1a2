//! The two merge loops: BPE (lowest merge rank first) and SentencePiece-style (highest token
//! score first). Both merge the leftmost pair on ties, as llama.cpp and HF do.

use super::vocab::{ModelKind, Vocab};
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

/// A symbol: a byte range of the word being merged and its symbol id, linked to its neighbours.
#[derive(Clone, Copy, Debug)]
struct Sym {
    start: u32,
    len: u32,
    id: u32,
    prev: u32,
    next: u32,
}

const NIL: u32 = u32::MAX;
/// The symbol id of a character that is neither a token nor part of any merge.
const UNMERGEABLE: u32 = u32::MAX;

/// A queued BPE merge: (rank, left symbol, right symbol, left length, right length); the
/// lowest rank, then the leftmost, comes first.
type BpePair = (u32, u32, u32, u32, u32);

/// Scratch space reused across the words of one `encode` call.
#[derive(Default)]
pub(crate) struct Scratch {
    syms: Vec<Sym>,
    bpe_heap: BinaryHeap<Reverse<BpePair>>,
    spm_heap: BinaryHeap<SpmPair>,
    encoded: String,
}

impl Vocab {
    /// Byte-level BPE over one pre-tokenized word (raw bytes of the text).
    pub(crate) fn bpe_word(
        &self,
        word: &[u8],
        byte_syms: &[Option<u32>; 256],
        sc: &mut Scratch,
        out: &mut Vec<u32>,
    ) {
        let n_vocab = self.n_tokens() as u32;
        if self.ignore_merges {
            // A word that is a token is taken whole.
            sc.encoded.clear();
            sc.encoded
                .extend(word.iter().map(|&b| super::unicode::byte_to_char(b)));
            if let Some(&id) = self.ids.get(sc.encoded.as_str()) {
                out.push(id);
                return;
            }
        }
        sc.syms.clear();
        for (i, &b) in word.iter().enumerate() {
            let id = byte_syms[b as usize].unwrap_or(UNMERGEABLE);
            push_sym(&mut sc.syms, i as u32, 1, id);
        }
        self.bpe_merge(sc);
        for s in &sc.syms {
            if s.len == 0 {
                continue;
            }
            if s.id < n_vocab {
                out.push(s.id);
            } else {
                // Not a token: each printable-ASCII byte as its own token, the rest dropped
                // (llama.cpp looks each byte of the byte-level text up as a token).
                for &b in &word[s.start as usize..(s.start + s.len) as usize] {
                    if (0x21..=0x7E).contains(&b)
                        && let Some(id) = byte_syms[b as usize].filter(|&id| id < n_vocab)
                    {
                        out.push(id);
                    }
                }
            }
        }
    }

    /// BPE over raw UTF-8 (Gemma 4): the word's characters are the initial symbols, and a
    /// symbol that is no token falls back to `<0xXX>` byte tokens.
    pub(crate) fn bpe_raw_word(&self, word: &str, sc: &mut Scratch, out: &mut Vec<u32>) {
        let n_vocab = self.n_tokens() as u32;
        if word.bytes().all(|b| b == b'\n')
            && let Some(&id) = self.ids.get(word)
        {
            out.push(id);
            return;
        }
        sc.syms.clear();
        for (i, c) in word.char_indices() {
            let s = &word[i..i + c.len_utf8()];
            let id = self.symbol_id(s).unwrap_or(UNMERGEABLE);
            push_sym(&mut sc.syms, i as u32, c.len_utf8() as u32, id);
        }
        self.bpe_merge(sc);
        for s in &sc.syms {
            if s.len == 0 {
                continue;
            }
            if s.id < n_vocab {
                out.push(s.id);
            } else {
                for &b in &word.as_bytes()[s.start as usize..(s.start + s.len) as usize] {
                    if let Some(&id) = self.ids.get(&format!("<0x{b:02X}>")) {
                        out.push(id);
                    }
                }
            }
        }
    }

    fn bpe_merge(&self, sc: &mut Scratch) {
        let syms = &mut sc.syms;
        let heap = &mut sc.bpe_heap;
        heap.clear();
        let pair = |syms: &[Sym], l: u32| -> Option<BpePair> {
            let ls = syms[l as usize];
            if ls.next == NIL {
                return None;
            }
            let rs = syms[ls.next as usize];
            let &(rank, _) = self.merges.get(&(ls.id, rs.id))?;
            Some((rank, l, ls.next, ls.len, rs.len))
        };
        for i in 0..syms.len() as u32 {
            if let Some(p) = pair(syms, i) {
                heap.push(Reverse(p));
            }
        }
        while let Some(Reverse((_, l, r, llen, rlen))) = heap.pop() {
            let (ls, rs) = (syms[l as usize], syms[r as usize]);
            // Stale: one side has merged since this pair was queued.
            if ls.len != llen || rs.len != rlen || ls.next != r {
                continue;
            }
            let Some(&(_, merged)) = self.merges.get(&(ls.id, rs.id)) else {
                continue;
            };
            let left = &mut syms[l as usize];
            left.len += rs.len;
            left.id = merged;
            left.next = rs.next;
            syms[r as usize].len = 0;
            if rs.next != NIL {
                syms[rs.next as usize].prev = l;
            }
            if ls.prev != NIL
                && let Some(p) = pair(syms, ls.prev)
            {
                heap.push(Reverse(p));
            }
            if let Some(p) = pair(syms, l) {
                heap.push(Reverse(p));
            }
        }
    }

    /// SentencePiece-style merging of `text` (spaces already escaped to `▁`): adjacent symbols
    /// whose concatenation is a token merge, highest score first; characters that are no token
    /// become byte tokens.
    pub(crate) fn spm_text(&self, text: &str, sc: &mut Scratch, out: &mut Vec<u32>) {
        debug_assert_eq!(self.model, ModelKind::Spm);
        sc.syms.clear();
        for (i, c) in text.char_indices() {
            push_sym(&mut sc.syms, i as u32, c.len_utf8() as u32, 0);
        }
        let syms = &mut sc.syms;
        let heap = &mut sc.spm_heap;
        heap.clear();
        let bigram = |syms: &[Sym], l: u32| -> Option<SpmPair> {
            let ls = syms[l as usize];
            if ls.next == NIL {
                return None;
            }
            let rs = syms[ls.next as usize];
            let s = &text[ls.start as usize..(rs.start + rs.len) as usize];
            let &id = self.ids.get(s)?;
            Some(SpmPair {
                score: self.scores[id as usize],
                left: l,
                right: ls.next,
                size: ls.len + rs.len,
            })
        };
        for i in 0..syms.len() as u32 {
            if let Some(p) = bigram(syms, i) {
                heap.push(p);
            }
        }
        while let Some(p) = heap.pop() {
            let (ls, rs) = (syms[p.left as usize], syms[p.right as usize]);
            if ls.len == 0 || rs.len == 0 || ls.len + rs.len != p.size || ls.next != p.right {
                continue;
            }
            let left = &mut syms[p.left as usize];
            left.len += rs.len;
            left.next = rs.next;
            syms[p.right as usize].len = 0;
            if rs.next != NIL {
                syms[rs.next as usize].prev = p.left;
            }
            if ls.prev != NIL
                && let Some(b) = bigram(syms, ls.prev)
            {
                heap.push(b);
            }
            if let Some(b) = bigram(syms, p.left) {
                heap.push(b);
            }
        }
        for s in syms.iter().filter(|s| s.len > 0) {
            let piece = &text[s.start as usize..(s.start + s.len) as usize];
            if let Some(&id) = self.ids.get(piece) {
                out.push(id);
            } else {
                for &b in piece.as_bytes() {
                    match self.byte_token(b).or(self.special.unk) {
                        Some(id) => out.push(id),
                        None => tracing::warn!(
                            "byte 0x{b:02X} has no token and there is no UNK token: dropped"
                        ),
                    }
                }
            }
        }
    }
}

fn push_sym(syms: &mut Vec<Sym>, start: u32, len: u32, id: u32) {
    let i = syms.len() as u32;
    if let Some(last) = syms.last_mut() {
        last.next = i;
    }
    syms.push(Sym {
        start,
        len,
        id,
        prev: if i == 0 { NIL } else { i - 1 },
        next: NIL,
    });
}

/// A SentencePiece merge candidate: highest score first, then leftmost.
#[derive(Debug)]
struct SpmPair {
    score: f32,
    left: u32,
    right: u32,
    size: u32,
}

impl Ord for SpmPair {
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}
impl PartialOrd for SpmPair {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl PartialEq for SpmPair {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for SpmPair {}
