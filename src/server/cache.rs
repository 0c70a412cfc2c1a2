//! The prompt cache: sequences kept after their requests ended, so that a later prompt that
//! starts with the same tokens (the next turn of a chat, a shared system prompt) forks their
//! pages ([`Engine::fork`]) and prefills only the rest.
//!
//! Entries are whole sequences (prompt and generated tokens, without reservations). A new entry
//! replaces those that are prefixes of it, and is dropped when an entry already extends it.
//! Entries are evicted least recently used (used: inserted or forked from) when a request needs
//! their pages or when there are more than `max_entries` (each holds a backend slot).

use crate::runtime::engine::{Engine, EngineError, Sequence};
use std::collections::HashSet;

struct Entry {
    seq: Sequence,
    used: u64,
}

/// See the [module docs](self).
pub struct PromptCache {
    entries: Vec<Entry>,
    clock: u64,
    max_entries: usize,
    /// Distinct pages the entries hold (recounted when they change).
    pages: usize,
}

/// A cached prefix reused by a new sequence.
pub struct Hit {
    pub seq: Sequence,
    /// Tokens of the prompt it already holds.
    pub tokens: usize,
}

impl PromptCache {
    /// A cache of at most `max_entries` sequences (0: off).
    pub fn new(max_entries: usize) -> PromptCache {
        PromptCache {
            entries: Vec::new(),
            clock: 0,
            max_entries,
            pages: 0,
        }
    }

    /// Sequences kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Distinct KV pages the kept sequences hold (shared with running ones or not).
    pub fn pages(&self) -> usize {
        self.pages
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// A sequence holding the longest cached prefix of `prompt`, at most all but its last token
    /// (the last is fed, to predict the next); `None` when nothing matches. Forking needs a
    /// backend slot: without one, the least recently used entries make room.
    pub fn lookup(&mut self, engine: &mut Engine, prompt: &[u32]) -> Option<Hit> {
        let limit = prompt.len().saturating_sub(1);
        let (best, len) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(e.seq.tokens(), prompt).min(limit)))
            .max_by_key(|&(i, len)| (len, std::cmp::Reverse(i)))?;
        if len == 0 {
            return None;
        }
        let mut best = best;
        self.entries[best].used = self.tick();
        loop {
            match engine.fork(&self.entries[best].seq, len) {
                Ok(seq) => return Some(Hit { seq, tokens: len }),
                Err(EngineError::NoFreeSlot { .. }) => {
                    // Make room: the least recently used other entry goes.
                    let victim = self
                        .entries
                        .iter()
                        .enumerate()
                        .filter(|&(i, _)| i != best)
                        .min_by_key(|(_, e)| e.used)
                        .map(|(i, _)| i)?;
                    let old = self.entries.swap_remove(victim);
                    engine.release(old.seq);
                    if best == self.entries.len() {
                        best = victim;
                    }
                    self.recount();
                }
                Err(e) => {
                    tracing::warn!("prompt cache: cannot fork a cached prefix: {e}");
                    return None;
                }
            }
        }
    }

    /// Keeps `seq` (its reservation given back). Entries that are prefixes of it go; if one
    /// already extends it, `seq` is released instead and that entry counts as used.
    pub fn insert(&mut self, engine: &mut Engine, mut seq: Sequence) {
        if self.max_entries == 0 || seq.is_empty() {
            engine.release(seq);
            return;
        }
        let now = self.tick();
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| e.seq.tokens().starts_with(seq.tokens()))
        {
            e.used = now;
            engine.release(seq);
            return;
        }
        let mut i = 0;
        while i < self.entries.len() {
            if seq.tokens().starts_with(self.entries[i].seq.tokens()) {
                let old = self.entries.swap_remove(i);
                engine.release(old.seq);
            } else {
                i += 1;
            }
        }
        engine.unreserve(&mut seq);
        self.entries.push(Entry { seq, used: now });
        while self.entries.len() > self.max_entries {
            self.evict_lru(engine);
        }
        self.recount();
    }

    /// Releases the least recently used entry; false when the cache is empty.
    pub fn evict_lru(&mut self, engine: &mut Engine) -> bool {
        let Some(i) = self
            .entries
            .iter()
            .enumerate()
            .min_by_key(|(_, e)| e.used)
            .map(|(i, _)| i)
        else {
            return false;
        };
        let e = self.entries.swap_remove(i);
        engine.release(e.seq);
        self.recount();
        true
    }

    /// Releases every entry.
    pub fn clear(&mut self, engine: &mut Engine) {
        for e in self.entries.drain(..) {
            engine.release(e.seq);
        }
        self.pages = 0;
    }

    fn recount(&mut self) {
        let pages: HashSet<u32> = self
            .entries
            .iter()
            .flat_map(|e| e.seq.pages().iter().copied())
            .collect();
        self.pages = pages.len();
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::target::Target;
    use crate::backend::{KvGeometry, OutputKind, StepOutputs};
    use crate::gguf::GgmlType;
    use crate::lower::TinyModel;
    use crate::plan::PlanOptions;
    use crate::{CompileOptions, compile};
    use std::sync::Arc;

    const PAGE: u32 = 16;

    fn engine(n_pages: u32, n_ctx: usize) -> Engine {
        let model = TinyModel::qwen2().with_weight_type(GgmlType::Q8_0);
        let file = Arc::new(model.open().unwrap());
        let options = CompileOptions {
            plan: PlanOptions {
                max_tokens: 64,
                max_outputs: 8,
                ..PlanOptions::default()
            },
            fuse: true,
            disabled_passes: Vec::new(),
        };
        let plan = compile(&file, &options, &Target::cpu()).unwrap().plan;
        let per_slot = (n_ctx as u32).div_ceil(PAGE);
        let kv = KvGeometry::new(PAGE, n_pages, 8, per_slot).unwrap();
        Engine::new(Box::new(CpuBackend::new(plan, file, kv).unwrap()), n_ctx)
    }

    fn seq_of(engine: &mut Engine, tokens: &[u32]) -> Sequence {
        let mut seq = engine.new_sequence();
        engine.prefill(&mut seq, tokens).unwrap();
        seq
    }

    fn used(e: &Engine) -> usize {
        let s = e.page_stats();
        s.total - s.free
    }

    #[test]
    fn a_prompt_reuses_the_longest_cached_prefix_and_its_logits_agree() {
        let mut e = engine(32, 128);
        let mut cache = PromptCache::new(4);
        let turn1: Vec<u32> = (0..40).map(|i| (i * 7) % 90).collect();
        let other: Vec<u32> = (0..20).map(|i| (i * 3 + 1) % 90).collect();
        let s = seq_of(&mut e, &turn1);
        cache.insert(&mut e, s);
        let s = seq_of(&mut e, &other);
        cache.insert(&mut e, s);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.pages(), 3 + 2);

        let mut turn2 = turn1.clone();
        turn2.extend([5, 6, 7, 8]);
        let hit = cache.lookup(&mut e, &turn2).unwrap();
        assert_eq!(hit.tokens, 40);
        let mut seq = hit.seq;
        let mut out = StepOutputs::new();
        e.prefill_into(&mut seq, &turn2[40..], OutputKind::Logits, &mut out)
            .unwrap();
        let cached = out.logits(0).unwrap().to_vec();
        let mut fresh = e.new_sequence();
        let full = e.prefill(&mut fresh, &turn2).unwrap();
        assert_eq!(cached, full, "a cached prefix changes no logit");
        e.release(fresh);

        // The same prompt again: all but its last token come from the cache.
        assert_eq!(cache.lookup(&mut e, &turn1).unwrap().tokens, 39);
        // No common prefix: no hit.
        assert!(cache.lookup(&mut e, &[89, 88]).is_none());
        // The longer sequence replaces the entry it extends.
        cache.insert(&mut e, seq);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.lookup(&mut e, &turn2).unwrap().tokens, 43);
        cache.clear(&mut e);
        e.reclaim();
        assert_eq!(used(&e), 0);
    }

    #[test]
    fn entries_are_evicted_least_recently_used() {
        let mut e = engine(32, 128);
        let mut cache = PromptCache::new(2);
        let a: Vec<u32> = vec![1; 20];
        let b: Vec<u32> = vec![2; 20];
        let c: Vec<u32> = vec![3; 20];
        for p in [&a, &b] {
            let s = seq_of(&mut e, p);
            cache.insert(&mut e, s);
        }
        // Using `a` makes `b` the oldest: inserting `c` (over the limit of 2) evicts `b`.
        drop(cache.lookup(&mut e, &a));
        let s = seq_of(&mut e, &c);
        cache.insert(&mut e, s);
        assert!(cache.lookup(&mut e, &b).is_none());
        // Forking from `a` makes it the most recent again: `c` goes first.
        assert!(cache.lookup(&mut e, &a).is_some());
        assert!(cache.evict_lru(&mut e));
        assert!(cache.lookup(&mut e, &c).is_none());
        assert!(cache.lookup(&mut e, &a).is_some());
        assert!(cache.evict_lru(&mut e));
        assert!(!cache.evict_lru(&mut e));
        e.reclaim();
        assert_eq!(used(&e), 0);
        assert_eq!(cache.pages(), 0);
    }

    #[test]
    fn a_kept_sequence_holds_no_reservation() {
        let mut e = engine(32, 128);
        let mut cache = PromptCache::new(2);
        let mut s = e.new_sequence();
        e.reserve(&mut s, 100).unwrap();
        e.prefill(&mut s, &[1, 2, 3]).unwrap();
        assert!(e.page_stats().reserved > 0);
        cache.insert(&mut e, s);
        assert_eq!(e.page_stats().reserved, 0);
        assert_eq!(used(&e), 1);
    }
}
