//! The sampler: the llama.cpp chain (penalties → top-k → top-p → min-p → temperature → draw)
//! over one logits vector, with a seeded ChaCha20 generator it owns.
//!
//! Determinism: every step works in a canonical order that depends only on the logits (token id
//! order, or descending logit with ties broken by the lower id), sums run sequentially in that
//! order in `f64`, `exp`/`ln` come from the pure-Rust `libm` crate rather than the platform's C
//! library, and nothing runs in parallel. So a seed, a config, the logits and the history fix the
//! token bit for bit, on every machine.

use super::{SampleError, SamplerConfig};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// A token id and its (working) logit.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Candidate {
    id: u32,
    logit: f32,
}

/// Descending logit, then ascending id: a total order (ids are unique), so selections and sorts
/// under it give one answer whatever the algorithm. Logits are never NaN here.
fn by_logit_desc(a: &Candidate, b: &Candidate) -> Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// A candidate ordered so that the worse one is the greater: a `BinaryHeap` of these keeps the
/// worst of the best k at its top.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Worst(Candidate);

impl Eq for Worst {}

impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Worst {
    fn cmp(&self, other: &Self) -> Ordering {
        by_logit_desc(&self.0, &other.0)
    }
}

/// Top-k up to this k runs as one pass with a bounded heap; larger k collect every candidate and
/// select (both keep the same tokens: the order is total).
const HEAP_TOP_K_MAX: usize = 1024;

/// How far top-p sorts at first when top-k left the whole vocabulary: the nucleus is usually a
/// few dozen tokens, so a partial selection of this many avoids sorting ~50k logits.
const TOP_P_FIRST_CHUNK: usize = 256;

/// Draws token ids from logits; see the [module docs](super) for the chain and its guarantees.
///
/// The sampler owns its random generator, so a sequence of [`sample`](Sampler::sample) calls is
/// reproducible from the seed; it also keeps scratch buffers, so sampling does not allocate
/// once it has seen a vocabulary.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplerConfig,
    seed: u64,
    rng: ChaCha20Rng,
    /// The penalty window, sorted to count occurrences.
    window: Vec<u32>,
    /// Penalized logits of the tokens in the window, by ascending id.
    penalized: Vec<(u32, f32)>,
    /// The best `top_k` so far during the top-k pass.
    heap: BinaryHeap<Worst>,
    /// Working set of candidate tokens.
    candidates: Vec<Candidate>,
    /// Softmax weights of the candidates, for the draw.
    weights: Vec<f32>,
}

impl Sampler {
    /// Validates `config` and seeds the generator (from the operating system when
    /// `config.seed` is `None`).
    pub fn new(config: SamplerConfig) -> Result<Self, SampleError> {
        config.validate()?;
        let seed = match config.seed {
            Some(seed) => seed,
            None => {
                use rand::TryRng;
                rand::rngs::SysRng
                    .try_next_u64()
                    .map_err(|e| SampleError::Entropy(e.to_string()))?
            }
        };
        Ok(Self {
            config,
            seed,
            rng: rng_from_seed(seed),
            window: Vec::new(),
            penalized: Vec::new(),
            heap: BinaryHeap::new(),
            candidates: Vec::new(),
            weights: Vec::new(),
        })
    }

    /// The configuration this sampler was built with.
    pub fn config(&self) -> &SamplerConfig {
        &self.config
    }

    /// The seed in use: the configured one, or the one taken from the operating system. A new
    /// sampler with this seed and the same config repeats this one's draws.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Rewinds the generator to its seeded state, as if the sampler were new.
    pub fn reset(&mut self) {
        self.rng = rng_from_seed(self.seed);
    }

    /// Chooses the next token from `logits` (one per vocabulary entry), given the `history` of
    /// tokens so far (oldest first; the penalties look at its last `repeat_last_n` entries).
    ///
    /// Non-finite logits: NaN counts as -inf (probability 0, never chosen). If any logit is
    /// +inf, only the +inf tokens remain and they are equally likely (the limit of the softmax);
    /// greedy takes the lowest such id. If every logit is NaN or -inf the result is
    /// [`SampleError::NoCandidates`].
    ///
    /// Unless greedy, each successful call consumes exactly one 64-bit random number, however
    /// many candidates survive the filters; greedy calls and errors consume none.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32, SampleError> {
        if logits.is_empty() {
            return Err(SampleError::EmptyLogits);
        }
        if u32::try_from(logits.len()).is_err() {
            return Err(SampleError::VocabTooLarge { len: logits.len() });
        }
        let vocab = logits.len();
        self.penalize(logits, history)?;

        if self.config.is_greedy() {
            // Top-k, top-p and min-p all keep the argmax, so greedy skips them.
            return argmax(logits, &self.penalized).ok_or(SampleError::NoCandidates { vocab });
        }

        // `sorted`: in `by_logit_desc` order; otherwise in id order.
        let mut sorted = self.collect_candidates(logits);
        if self.candidates.is_empty() {
            return Err(SampleError::NoCandidates { vocab });
        }
        if self.config.top_p < 1.0 {
            top_p_filter(&mut self.candidates, self.config.top_p, sorted);
            sorted = true;
        }
        if self.config.min_p > 0.0 {
            min_p_filter(&mut self.candidates, self.config.min_p, sorted);
        }
        if sorted {
            // The draw walks tokens in id order, whatever the filters did.
            self.candidates.sort_unstable_by_key(|c| c.id);
        }

        let u = unit_f64(self.rng.next_u64());
        Ok(draw(
            &self.candidates,
            self.config.temperature,
            u,
            &mut self.weights,
        ))
    }

    /// Computes the penalized logits of the distinct tokens of the penalty window into
    /// `self.penalized` (empty when penalties are off), llama.cpp's way.
    fn penalize(&mut self, logits: &[f32], history: &[u32]) -> Result<(), SampleError> {
        self.penalized.clear();
        if !self.config.penalties_enabled() {
            return Ok(());
        }
        let window = match usize::try_from(self.config.repeat_last_n) {
            Ok(n) => &history[history.len().saturating_sub(n)..],
            Err(_) => history, // -1: the whole history
        };
        let vocab = logits.len();
        if let Some(&token) = window.iter().find(|&&t| t as usize >= vocab) {
            return Err(SampleError::TokenOutOfRange { token, vocab });
        }
        self.window.clear();
        self.window.extend_from_slice(window);
        self.window.sort_unstable();
        let SamplerConfig {
            repeat_penalty,
            frequency_penalty,
            presence_penalty,
            ..
        } = self.config;
        for run in self.window.chunk_by(|a, b| a == b) {
            let id = run[0];
            let count = run.len() as f32;
            let mut logit = sanitize(logits[id as usize]);
            if logit <= 0.0 {
                logit *= repeat_penalty;
            } else {
                logit /= repeat_penalty;
            }
            logit -= count * frequency_penalty + presence_penalty;
            // inf - inf (a +inf logit with a huge penalty) is NaN: `scan` treats it as -inf.
            self.penalized.push((id, logit));
        }
        Ok(())
    }

    /// Fills `self.candidates` with the tokens that can be drawn, after top-k; returns whether
    /// they are sorted (`by_logit_desc`) rather than in id order. Empty if none can be drawn.
    fn collect_candidates(&mut self, logits: &[f32]) -> bool {
        let k = self.config.top_k as usize;
        self.candidates.clear();
        if (1..=HEAP_TOP_K_MAX).contains(&k) {
            // One pass keeping the best k. Ids arrive in increasing order, so a token that ties
            // the worst kept one loses to it (lower id first) and `>` is the total order's test.
            let heap = &mut self.heap;
            heap.clear();
            // The worst kept logit once k are kept: most tokens fail this one comparison.
            let mut bar = f32::NEG_INFINITY;
            scan(logits, &self.penalized, |id, logit| {
                if logit == f32::NEG_INFINITY || (heap.len() == k && logit <= bar) {
                    return;
                }
                let c = Candidate { id, logit };
                if heap.len() < k {
                    heap.push(Worst(c));
                } else if let Some(mut worst) = heap.peek_mut() {
                    *worst = Worst(c);
                }
                if heap.len() == k {
                    bar = heap.peek().map_or(f32::NEG_INFINITY, |w| w.0.logit);
                }
            });
            let any_infinite = heap.iter().any(|w| w.0.logit == f32::INFINITY);
            if !any_infinite {
                self.candidates.extend(heap.drain().map(|w| w.0));
                self.candidates.sort_unstable_by(by_logit_desc);
                return true;
            }
            // +inf tokens beyond the k kept matter for the uniform rule: collect them all.
        }
        let candidates = &mut self.candidates;
        scan(logits, &self.penalized, |id, logit| {
            if logit > f32::NEG_INFINITY {
                candidates.push(Candidate { id, logit });
            }
        });
        keep_possible(candidates);
        if k > 0 && k < candidates.len() {
            top_k_filter(candidates, k);
            return true;
        }
        false
    }
}

/// NaN counts as -inf.
fn sanitize(logit: f32) -> f32 {
    if logit.is_nan() {
        f32::NEG_INFINITY
    } else {
        logit
    }
}

/// Calls `f(id, logit)` for every token in id order, with the penalized logit where there is
/// one and NaN mapped to -inf. `penalized` is sorted by id, without duplicates, ids in range.
fn scan(logits: &[f32], penalized: &[(u32, f32)], mut f: impl FnMut(u32, f32)) {
    let mut start = 0;
    for &(id, logit) in penalized {
        let id = id as usize;
        for (i, &l) in logits[start..id].iter().enumerate() {
            f((start + i) as u32, sanitize(l));
        }
        f(id as u32, sanitize(logit));
        start = id + 1;
    }
    for (i, &l) in logits[start..].iter().enumerate() {
        f((start + i) as u32, sanitize(l));
    }
}

/// The highest (penalized) logit's id, the lowest id on ties; `None` if all are NaN or -inf.
fn argmax(logits: &[f32], penalized: &[(u32, f32)]) -> Option<u32> {
    let mut best: Option<Candidate> = None;
    scan(logits, penalized, |id, logit| {
        if logit > best.map_or(f32::NEG_INFINITY, |b| b.logit) {
            best = Some(Candidate { id, logit });
        }
    });
    best.map(|b| b.id)
}

/// The generator for a seed: ChaCha20 keyed with the seed's 8 little-endian bytes followed by 24
/// zero bytes, stream 0. Written out (rather than `seed_from_u64`) so the mapping from seed to
/// draws is this crate's contract, not a detail of `rand_core`.
fn rng_from_seed(seed: u64) -> ChaCha20Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    ChaCha20Rng::from_seed(key)
}

/// A uniform number in `[0, 1)` from the top 53 bits of a random `u64`.
fn unit_f64(bits: u64) -> f64 {
    (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Drops tokens that cannot be drawn (-inf); if any token is +inf, keeps only those and makes
/// them equally likely (logit 0). Keeps id order.
fn keep_possible(candidates: &mut Vec<Candidate>) {
    if candidates.iter().any(|c| c.logit == f32::INFINITY) {
        candidates.retain(|c| c.logit == f32::INFINITY);
        for c in candidates.iter_mut() {
            c.logit = 0.0;
        }
    } else {
        candidates.retain(|c| c.logit > f32::NEG_INFINITY);
    }
}

/// Keeps the `k` best candidates (`0 < k < len`), sorted by `by_logit_desc`. A partial
/// selection, then a sort of the `k` kept: O(n + k log k).
fn top_k_filter(candidates: &mut Vec<Candidate>, k: usize) {
    candidates.select_nth_unstable_by(k - 1, by_logit_desc);
    candidates.truncate(k);
    candidates.sort_unstable_by(by_logit_desc);
}

/// Keeps the smallest prefix (in `by_logit_desc` order) whose softmax probabilities at
/// temperature 1 sum to at least `p`, at least one token; leaves the candidates sorted.
///
/// The softmax total is summed in the order the candidates come in (id order, or sorted); the
/// cumulative sum runs in sorted order. Unsorted candidates are sorted only as far as needed: a
/// selection of the best 256, then doubling chunks of the rest.
fn top_p_filter(candidates: &mut Vec<Candidate>, p: f32, sorted: bool) {
    let max = candidates
        .iter()
        .map(|c| c.logit)
        .fold(f32::NEG_INFINITY, f32::max);
    let weight = |c: &Candidate| f64::from(libm::expf(c.logit - max));
    let total: f64 = candidates.iter().map(weight).sum();
    let target = f64::from(p) * total;

    let n = candidates.len();
    let mut cumulative = 0.0f64;
    // candidates[..done] are sorted and are the best `done`; the rest are all worse.
    let mut done = 0;
    let mut chunk = TOP_P_FIRST_CHUNK;
    while done < n {
        let end = if sorted { n } else { (done + chunk).min(n) };
        if !sorted {
            let rest = &mut candidates[done..];
            if end < n {
                rest.select_nth_unstable_by(end - done - 1, by_logit_desc);
            }
            candidates[done..end].sort_unstable_by(by_logit_desc);
            chunk = chunk.saturating_mul(2);
        }
        for i in done..end {
            cumulative += weight(&candidates[i]);
            if cumulative >= target {
                candidates.truncate(i + 1);
                return;
            }
        }
        done = end;
    }
    // Rounding kept the sum below `target`: keep everything (now fully sorted).
}

/// Keeps candidates whose logit is at least `max + ln(p)`, i.e. whose probability is at least
/// `p` times the most likely one's. Keeps the order (the most likely token always stays).
fn min_p_filter(candidates: &mut Vec<Candidate>, p: f32, sorted: bool) {
    let max = if sorted {
        candidates[0].logit
    } else {
        candidates
            .iter()
            .map(|c| c.logit)
            .fold(f32::NEG_INFINITY, f32::max)
    };
    let threshold = max + libm::logf(p);
    candidates.retain(|c| c.logit >= threshold);
}

/// Draws from the softmax of `logit / temperature` over the candidates (non-empty, finite, in id
/// order) with a uniform `u` in `[0, 1)`: the first token whose cumulative weight exceeds
/// `u * total`. `weights` is scratch space.
fn draw(candidates: &[Candidate], temperature: f32, u: f64, weights: &mut Vec<f32>) -> u32 {
    let max = candidates
        .iter()
        .map(|c| c.logit)
        .fold(f32::NEG_INFINITY, f32::max);
    // (logit - max) / t rather than logit / t - max / t: no overflow for tiny temperatures.
    weights.clear();
    weights.extend(
        candidates
            .iter()
            .map(|c| libm::expf((c.logit - max) / temperature)),
    );
    let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
    let target = u * total;
    let mut cumulative = 0.0f64;
    let mut last_possible = candidates[0].id;
    for (c, &w) in candidates.iter().zip(weights.iter()) {
        if w > 0.0 {
            cumulative += f64::from(w);
            last_possible = c.id;
            if cumulative > target {
                return c.id;
            }
        }
    }
    // `u * total` rounded up to `total`: the last token with a non-zero weight.
    last_possible
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(logits: &[f32]) -> Vec<Candidate> {
        logits
            .iter()
            .enumerate()
            .map(|(i, &logit)| Candidate {
                id: i as u32,
                logit,
            })
            .collect()
    }

    fn ids(c: &[Candidate]) -> Vec<u32> {
        c.iter().map(|c| c.id).collect()
    }

    #[test]
    fn unit_f64_spans_zero_to_just_below_one() {
        assert_eq!(unit_f64(0), 0.0);
        assert_eq!(unit_f64(u64::MAX), 1.0 - f64::EPSILON / 2.0);
        assert_eq!(unit_f64(1 << 63), 0.5);
    }

    #[test]
    fn top_k_keeps_the_best_sorted_with_lower_id_on_ties() {
        let mut c = cands(&[1.0, 3.0, 2.0, 3.0, 0.5]);
        top_k_filter(&mut c, 3);
        assert_eq!(ids(&c), [1, 3, 2]);
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // Probabilities ∝ 4, 2, 1, 1 (of 8): 0.5, 0.25, 0.125, 0.125.
        let l = |w: f32| w.ln();
        let logits = [l(1.0), l(4.0), l(1.0), l(2.0)];
        for (p, want) in [
            (0.0, vec![1]),
            (0.49, vec![1]),
            (0.51, vec![1, 3]),
            (0.74, vec![1, 3]),
            (0.76, vec![1, 3, 0]),
            (0.99, vec![1, 3, 0, 2]),
        ] {
            for sorted in [false, true] {
                let mut c = cands(&logits);
                if sorted {
                    c.sort_unstable_by(by_logit_desc);
                }
                top_p_filter(&mut c, p, sorted);
                assert_eq!(ids(&c), want, "p = {p}, sorted = {sorted}");
            }
        }
    }

    #[test]
    fn top_p_past_the_first_chunk_sorts_further() {
        // 1000 equal logits: a nucleus of 0.5 needs 500 tokens, beyond the first 256.
        let mut c = cands(&vec![0.0; 1000]);
        top_p_filter(&mut c, 0.5, false);
        assert_eq!(ids(&c), (0..500).collect::<Vec<u32>>());
    }

    #[test]
    fn min_p_threshold_is_relative_to_the_best() {
        // Relative probabilities 1, 0.5, 0.25, 0.1 of the best.
        let logits = [0.0, 0.5f32.ln(), 0.25f32.ln(), 0.1f32.ln()];
        let mut c = cands(&logits);
        min_p_filter(&mut c, 0.3, false);
        assert_eq!(ids(&c), [0, 1]);
        let mut c = cands(&logits);
        min_p_filter(&mut c, 1.0, false);
        assert_eq!(ids(&c), [0]);
    }

    #[test]
    fn draw_maps_u_onto_cumulative_weights_in_id_order() {
        // Probabilities 0.25, 0.5, 0.25 at temperature 1.
        let c = cands(&[0.0, 2f32.ln(), 0.0]);
        assert_eq!(draw(&c, 1.0, 0.0, &mut Vec::new()), 0);
        assert_eq!(draw(&c, 1.0, 0.2499, &mut Vec::new()), 0);
        assert_eq!(draw(&c, 1.0, 0.2501, &mut Vec::new()), 1);
        assert_eq!(draw(&c, 1.0, 0.7499, &mut Vec::new()), 1);
        assert_eq!(draw(&c, 1.0, 0.7501, &mut Vec::new()), 2);
        assert_eq!(draw(&c, 1.0, 1.0 - f64::EPSILON / 2.0, &mut Vec::new()), 2);
    }

    #[test]
    fn draw_never_returns_a_zero_weight_token() {
        // At temperature 1e-3 the 0-logit token's weight exp(-1000) underflows to 0.
        let c = cands(&[0.0, 1.0]);
        for u in [0.0, 0.5, 1.0 - f64::EPSILON / 2.0] {
            assert_eq!(draw(&c, 1e-3, u, &mut Vec::new()), 1);
        }
    }

    #[test]
    fn heap_top_k_keeps_what_selection_keeps() {
        // Many ties (values mod 7) and penalties in the middle of the scan.
        let logits: Vec<f32> = (0..3000u32).map(|i| ((i * 31) % 7) as f32).collect();
        let history = [5u32, 5, 17, 2999, 1200];
        for k in [1, 2, 40, 500, 1024] {
            let config = SamplerConfig {
                top_k: k,
                temperature: 1.0,
                repeat_penalty: 1.5,
                presence_penalty: 0.5,
                ..SamplerConfig::greedy()
            };
            let mut sampler = Sampler::new(SamplerConfig {
                seed: Some(0),
                ..config
            })
            .unwrap();
            sampler.penalize(&logits, &history).unwrap();
            assert!(sampler.collect_candidates(&logits), "k = {k}");
            let mut reference = Vec::new();
            scan(&logits, &sampler.penalized, |id, logit| {
                reference.push(Candidate { id, logit })
            });
            top_k_filter(&mut reference, k as usize);
            assert_eq!(sampler.candidates, reference, "k = {k}");
        }
    }

    #[test]
    fn scan_substitutes_penalized_logits_and_maps_nan() {
        let logits = [1.0, f32::NAN, 3.0, 4.0];
        let mut seen = Vec::new();
        scan(&logits, &[(0, -1.0), (3, f32::NAN)], |id, l| {
            seen.push((id, l))
        });
        assert_eq!(
            seen,
            [
                (0, -1.0),
                (1, f32::NEG_INFINITY),
                (2, 3.0),
                (3, f32::NEG_INFINITY)
            ]
        );
    }

    #[test]
    fn keep_possible_handles_infinities() {
        let mut c = cands(&[f32::NEG_INFINITY, 1.0, f32::INFINITY, 2.0, f32::INFINITY]);
        keep_possible(&mut c);
        assert_eq!(
            c,
            [
                Candidate { id: 2, logit: 0.0 },
                Candidate { id: 4, logit: 0.0 }
            ]
        );
        let mut c = cands(&[f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY]);
        keep_possible(&mut c);
        assert_eq!(ids(&c), [1]);
    }
}
