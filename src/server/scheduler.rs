//! The engine loop: one thread owns the [`Engine`] and runs every request's steps.
//!
//! Continuous batching: every step carries one part per running sequence (a decode token, or
//! the next chunk of a prompt being prefilled), so all requests advance together; new requests
//! are admitted between steps, up to `parallel` running at once; the rest wait in the bounded
//! job channel (the HTTP side answers 503 when it is full). A prompt is prefilled in chunks of
//! at most `prefill_chunk` tokens, so the others' streams keep flowing while it loads.
//!
//! Prompt cache ([`PromptCache`]): a request that ends normally leaves its sequence in the cache
//! (unless it asked `cache_prompt: false`); a later prompt starting with the same tokens forks
//! the longest such prefix and prefills only the rest. Kept sequences are evicted least recently
//! used when an admission needs their pages.
//!
//! `n > 1` choices: the prompt is prefilled once; when its last chunk has run, the other
//! choices fork its sequence (sharing the prompt's pages) and sample from the same row. A
//! request takes `n` of the `parallel` places; it waits (first in line) until they are free.
//!
//! A request whose event channel is closed (its client went away) is dropped and its sequence
//! released before the next step. A failed step of several requests fails none of them yet (the
//! engine rolled them back): each then runs one step alone, and only those whose own step fails
//! get the error; the loop goes on with the others.

use super::cache::PromptCache;
use super::metrics::{Histogram, TPOT_BUCKETS, TTFT_BUCKETS};
use crate::backend::{OutputKind, RowOutput, StepOutputs};
use crate::runtime::engine::{Engine, EngineError, Part, Sequence, WantLogits};
use crate::runtime::generate::{Continuation, FinishReason, GenerateOptions, output_kind};
use crate::tokenizer::Tokenizer;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// One request for the engine loop.
pub struct Job {
    /// The prompt's token ids (not empty; checked against the context by the HTTP side).
    pub prompt: Vec<u32>,
    pub options: GenerateOptions,
    /// Reuse a cached prefix of the prompt, and keep the sequence for later requests.
    pub cache_prompt: bool,
    /// Choices to generate (at least 1, at most the scheduler's `parallel`).
    pub n: usize,
    /// Report each token's log-probability with this many alternatives.
    pub logprobs: Option<usize>,
    /// Added to the logits of these tokens before sampling (ids below the vocabulary size).
    pub logit_bias: Vec<(u32, f32)>,
    /// When the HTTP side queued it (time to first token counts from here).
    pub received: Instant,
    /// Where the text and the outcome go; closed when the client is gone.
    pub events: UnboundedSender<Event>,
}

/// What the engine loop tells a request's handler.
#[derive(Debug)]
pub enum Event {
    /// Text that became final, and the log-probabilities of the tokens sampled since the last
    /// event of this choice (when asked for).
    Text {
        choice: usize,
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    /// The request ended normally.
    Done(Summary),
    /// The request failed.
    Error(JobError),
}

/// A sampled token's log-probability (of the biased logits at temperature 1) and the most
/// likely tokens of its row, highest first.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// How one choice of a request ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Which choice (0 for the first).
    pub choice: usize,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens taken from the prompt cache (not prefilled).
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub seed: u64,
}

/// Why a request failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobError {
    /// The engine or the sampler failed (a 500).
    Failed(String),
    /// The server is shutting down and its grace period ran out (a 503).
    ShuttingDown,
}

/// Counters the engine loop and the HTTP side share (for `/health` and the tests).
#[derive(Debug)]
pub struct Stats {
    /// Jobs sent and not yet taken by the loop.
    pub queued: AtomicUsize,
    /// Sequences running.
    pub running: AtomicUsize,
    pub kv_pages_used: AtomicUsize,
    pub kv_pages_total: AtomicUsize,
    /// Pages the prompt cache holds (part of `kv_pages_used`; all of it when nothing runs).
    pub kv_pages_cached: AtomicUsize,
    /// Sequences the prompt cache keeps.
    pub prompt_cache_entries: AtomicUsize,
    /// Requests that reused a cached prefix, and the prompt tokens they did not prefill.
    pub prompt_cache_hits: AtomicU64,
    pub cached_tokens: AtomicU64,
    /// Prompt tokens prefilled (cached ones not counted).
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Set when the shutdown grace period is over: every request still running is cancelled.
    pub cancel_all: AtomicBool,
    /// From queueing to a choice's first token.
    pub ttft: Histogram,
    /// Between a choice's successive tokens.
    pub tpot: Histogram,
    /// Microseconds spent in engine steps.
    pub step_us: AtomicU64,
    /// Generated tokens per second of step time over the last window (about a second of
    /// steps, or until the loop went idle), as `f64` bits.
    pub tokens_per_s: AtomicU64,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            queued: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            kv_pages_used: AtomicUsize::new(0),
            kv_pages_total: AtomicUsize::new(0),
            kv_pages_cached: AtomicUsize::new(0),
            prompt_cache_entries: AtomicUsize::new(0),
            prompt_cache_hits: AtomicU64::new(0),
            cached_tokens: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            cancel_all: AtomicBool::new(false),
            ttft: Histogram::new(TTFT_BUCKETS),
            tpot: Histogram::new(TPOT_BUCKETS),
            step_us: AtomicU64::new(0),
            tokens_per_s: AtomicU64::new(0f64.to_bits()),
        }
    }
}

impl Stats {
    /// [`tokens_per_s`](Self::tokens_per_s) as a number.
    pub fn tokens_per_second(&self) -> f64 {
        f64::from_bits(self.tokens_per_s.load(Ordering::Relaxed))
    }
}

/// Tokens per second of step time, published per window.
struct Throughput {
    busy: Duration,
    tokens_at_start: u64,
}

impl Throughput {
    fn add(&mut self, step: Duration, stats: &Stats, flush: bool) {
        self.busy += step;
        if self.busy >= Duration::from_secs(1) || (flush && !self.busy.is_zero()) {
            let now = stats.generated_tokens.load(Ordering::Relaxed);
            let rate = now.saturating_sub(self.tokens_at_start) as f64 / self.busy.as_secs_f64();
            stats.tokens_per_s.store(rate.to_bits(), Ordering::Relaxed);
            self.busy = Duration::ZERO;
            self.tokens_at_start = now;
        }
    }
}

/// Scheduling limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Sequences running at once.
    pub parallel: usize,
    /// The most prompt tokens one sequence prefills in one step.
    pub prefill_chunk: usize,
    /// Tests: a step feeding this token fails as a backend error would.
    pub fail_on_token: Option<u32>,
}

struct Active<'t> {
    /// Unique in this loop (set when it joins `active`).
    id: u64,
    seq: Sequence,
    prompt: Vec<u32>,
    /// Prompt tokens fed so far (from the cache first).
    fed: usize,
    /// Prompt tokens the cache gave.
    cached: usize,
    cache_prompt: bool,
    cont: Continuation<'t>,
    events: UnboundedSender<Event>,
    choice: usize,
    /// The other choices, started when the prompt is prefilled.
    children: Vec<Continuation<'t>>,
    /// Tokens to reserve for each choice's generation.
    max_new: usize,
    logprobs: Option<usize>,
    logit_bias: Vec<(u32, f32)>,
    received: Instant,
    /// When its last token was sampled.
    last_token: Option<Instant>,
}

impl Active<'_> {
    fn prefilling(&self) -> bool {
        self.fed < self.prompt.len()
    }

    /// Places of `parallel` it holds: itself and the choices it will fork.
    fn places(&self) -> usize {
        1 + self.children.len()
    }
}

fn places(active: &[Active<'_>]) -> usize {
    active.iter().map(Active::places).sum()
}

/// One part of the next step: which request, how many tokens, whether it wants a row.
#[derive(Clone, Copy, Debug)]
struct Planned {
    index: usize,
    n: usize,
    row: bool,
}

/// Runs requests from `jobs` until the channel is closed (every sender dropped) and nothing
/// is running.
pub fn run_loop(
    engine: &mut Engine,
    tokenizer: &Tokenizer,
    jobs: &Receiver<Job>,
    limits: Limits,
    stats: &Stats,
) {
    let parallel = limits.parallel.max(1);
    let chunk = limits.prefill_chunk.max(1);
    let mut active: Vec<Active<'_>> = Vec::new();
    let mut out = StepOutputs::new();
    let mut plan: Vec<Planned> = Vec::new();
    let mut open = true;
    // A request taken from the channel that waits for enough free places (n > 1).
    let mut held: Option<Job> = None;
    // Requests taken from the channel, oldest first (`stats.queued` counts them and `held`; the
    // HTTP side bounds that count by `--queue`).
    let mut waiting: std::collections::VecDeque<Job> = Default::default();
    let mut scratch = Vec::new();
    let mut next_id: u64 = 0;
    // Requests of a failed batched step, each to run one step alone (oldest first).
    let mut suspects: std::collections::VecDeque<u64> = Default::default();
    let mut throughput = Throughput {
        busy: Duration::ZERO,
        tokens_at_start: 0,
    };
    // Each kept sequence holds a backend slot: leave one per running request, and one to fork.
    let slots = engine.geometry().max_slots as usize;
    let mut cache = PromptCache::new(slots.saturating_sub(parallel + 1));
    publish(engine, &active, &cache, stats);
    loop {
        let cancel = stats.cancel_all.load(Ordering::Relaxed);
        // Drop the requests whose clients are gone (or all of them, past the grace period).
        let mut i = 0;
        while i < active.len() {
            if cancel || active[i].events.is_closed() {
                let a = active.remove(i);
                let _ = a.events.send(Event::Error(JobError::ShuttingDown));
                engine.release(a.seq);
            } else {
                i += 1;
            }
        }
        // Take everything the HTTP side queued, and forget the requests whose clients left while
        // they waited: a queue full of abandoned requests must not turn live clients away.
        while open {
            match jobs.try_recv() {
                Ok(job) => waiting.push_back(job),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        waiting.retain(|job| {
            let gone = job.events.is_closed();
            if gone {
                stats.queued.fetch_sub(1, Ordering::Relaxed);
            }
            !gone
        });
        // Admit waiting requests between steps.
        while places(&active) < parallel {
            let job = if let Some(job) = held.take() {
                job
            } else if let Some(job) = waiting.pop_front() {
                job
            } else if active.is_empty() && open {
                publish(engine, &active, &cache, stats);
                throughput.add(Duration::ZERO, stats, true);
                match jobs.recv() {
                    Ok(job) => job,
                    Err(_) => {
                        open = false;
                        break;
                    }
                }
            } else {
                break;
            };
            if job.events.is_closed() {
                stats.queued.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            if job.n > parallel {
                stats.queued.fetch_sub(1, Ordering::Relaxed);
                let message = format!("n = {} is more than the {parallel} slots", job.n);
                let _ = job.events.send(Event::Error(JobError::Failed(message)));
                continue;
            }
            if places(&active) + job.n > parallel {
                // First in line: it runs when enough choices have ended.
                held = Some(job);
                break;
            }
            stats.queued.fetch_sub(1, Ordering::Relaxed);
            if stats.cancel_all.load(Ordering::Relaxed) {
                let _ = job.events.send(Event::Error(JobError::ShuttingDown));
                continue;
            }
            match admit(engine, tokenizer, &mut cache, job, stats) {
                Ok(mut a) => {
                    a.id = next_id;
                    next_id += 1;
                    active.push(a);
                }
                Err((events, message)) => {
                    let _ = events.send(Event::Error(JobError::Failed(message)));
                }
            }
        }
        if active.is_empty() {
            if open || held.is_some() || !waiting.is_empty() {
                continue;
            }
            break;
        }
        publish(engine, &active, &cache, stats);
        plan_step(engine, &active, chunk, &mut plan);
        let solo = loop {
            let Some(&id) = suspects.front() else {
                break None;
            };
            match active.iter().position(|a| a.id == id) {
                Some(i) => break Some(i),
                None => {
                    suspects.pop_front();
                }
            }
        };
        if let Some(i) = solo {
            suspects.pop_front();
            plan.retain(|p| p.index == i);
            if plan.is_empty()
                && let Some(a) = active.get(i)
            {
                plan.push(plan_one(engine, a, i, chunk));
            }
        }
        if plan.is_empty() {
            // Cannot happen (every request has a token to feed); fail them rather than spin.
            for a in active.drain(..) {
                let message = "the scheduler found nothing to run".to_string();
                let _ = a.events.send(Event::Error(JobError::Failed(message)));
                engine.release(a.seq);
            }
            continue;
        }
        let result = {
            let mut parts = Vec::with_capacity(plan.len());
            let mut next = plan.iter().peekable();
            for (i, a) in active.iter_mut().enumerate() {
                let Some(p) = next.next_if(|p| p.index == i) else {
                    continue;
                };
                let Active {
                    seq,
                    prompt,
                    fed,
                    cont,
                    ..
                } = a;
                let tokens: &[u32] = if *fed < prompt.len() {
                    prompt.get(*fed..*fed + p.n).unwrap_or_default()
                } else {
                    cont.next_input()
                };
                let rows = if p.row {
                    WantLogits::Last
                } else {
                    WantLogits::None
                };
                parts.push(Part::new(seq, tokens, rows).with_kind(cont.kind()));
            }
            let t = Instant::now();
            let result = match limits.fail_on_token {
                Some(bad) if parts.iter().any(|p| p.tokens.contains(&bad)) => {
                    Err(EngineError::Backend(crate::backend::BackendError::Kernel(
                        format!("test hook: a step fed token {bad}"),
                    )))
                }
                _ => engine.step(&mut parts, &mut out),
            };
            let took = t.elapsed();
            stats.step_us.fetch_add(
                u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
                Ordering::Relaxed,
            );
            throughput.add(took, stats, false);
            result
        };
        let mut finished = Vec::new();
        match result {
            Err(e) if plan.len() > 1 => {
                // Nobody fails yet: each runs a step alone to find whose it is.
                tracing::warn!(
                    "a step of {} requests failed ({e}): retrying each alone",
                    plan.len()
                );
                suspects.extend(
                    plan.iter()
                        .filter_map(|p| active.get(p.index).map(|a| a.id)),
                );
            }
            Err(e) => {
                tracing::error!("step failed: {e}");
                for p in &plan {
                    finished.push((p.index, Some(Event::Error(JobError::Failed(e.to_string())))));
                }
            }
            Ok(()) => {
                let mut spawned: Vec<Active<'_>> = Vec::new();
                let mut spawned_ends = Vec::new();
                let mut row = 0;
                for p in &plan {
                    let Some(a) = active.get_mut(p.index) else {
                        continue;
                    };
                    if a.prefilling() {
                        a.fed += p.n;
                        stats.prompt_tokens.fetch_add(p.n as u64, Ordering::Relaxed);
                    }
                    if !p.row {
                        continue;
                    }
                    let Some(output) = out.row(row) else {
                        let message = "the step returned too few output rows".to_string();
                        finished.push((p.index, Some(Event::Error(JobError::Failed(message)))));
                        continue;
                    };
                    row += 1;
                    // The prompt is in: the other choices fork it and sample from this row.
                    let children = std::mem::take(&mut a.children);
                    for (i, cont) in children.into_iter().enumerate() {
                        match fork_choice(engine, &mut cache, a, cont, i + 1) {
                            Ok(mut child) => {
                                if let Some(end) =
                                    accept_row(&mut child, output, engine, stats, &mut scratch)
                                {
                                    spawned_ends.push((spawned.len(), end));
                                }
                                spawned.push(child);
                            }
                            Err(message) => finished
                                .push((p.index, Some(Event::Error(JobError::Failed(message))))),
                        }
                    }
                    if let Some(end) = accept_row(a, output, engine, stats, &mut scratch) {
                        finished.push((p.index, end));
                    }
                }
                // Spawned choices join at the end; their placeholders become real indices.
                let base = active.len();
                finished.extend(spawned_ends.into_iter().map(|(j, end)| (base + j, end)));
                for mut child in spawned {
                    child.id = next_id;
                    next_id += 1;
                    active.push(child);
                }
            }
        }
        // Highest index first, so the others keep their places; one end per request.
        finished.sort_by_key(|(index, _)| std::cmp::Reverse(*index));
        finished.dedup_by_key(|(index, _)| *index);
        // Release first and publish, so a client that sees its answer sees the pages freed.
        let mut outcomes = Vec::with_capacity(finished.len());
        for (index, event) in finished {
            if index >= active.len() {
                continue;
            }
            let a = active.remove(index);
            if a.cache_prompt && matches!(event, Some(Event::Done(_))) {
                cache.insert(engine, a.seq);
            } else {
                engine.release(a.seq);
            }
            outcomes.push((a.events, event));
        }
        if !outcomes.is_empty() {
            engine.reclaim();
            publish(engine, &active, &cache, stats);
            if active.is_empty() {
                // Idle from here: the last busy stretch's rate, before its clients hear.
                throughput.add(Duration::ZERO, stats, true);
            }
        }
        for (events, event) in outcomes {
            if let Some(event) = event {
                let _ = events.send(event);
            }
        }
    }
    cache.clear(engine);
    engine.reclaim();
    publish(engine, &active, &cache, stats);
}

/// Starts a request: its sampler and stop strings, a sequence (holding the longest cached
/// prefix of the prompt) with pages reserved for the rest of the prompt and every token it may
/// generate (so it cannot run out of cache mid-stream); kept sequences are evicted, least
/// recently used first, until the reservation fits.
fn admit<'t>(
    engine: &mut Engine,
    tokenizer: &'t Tokenizer,
    cache: &mut PromptCache,
    job: Job,
    stats: &Stats,
) -> Result<Active<'t>, (UnboundedSender<Event>, String)> {
    let kind = if job.logprobs.is_some() || !job.logit_bias.is_empty() {
        OutputKind::Logits
    } else {
        output_kind(&job.options.sampler, engine.n_vocab())
    };
    let mut conts = Vec::with_capacity(job.n.max(1));
    for i in 0..job.n.max(1) {
        // Each choice its own seed: the request's plus its index.
        let mut options = job.options.clone();
        options.sampler.seed = options.sampler.seed.map(|s| s.wrapping_add(i as u64));
        match Continuation::new(tokenizer, &options, kind) {
            Ok(c) => conts.push(c),
            Err(e) => return Err((job.events, e.to_string())),
        }
    }
    let cont = conts.remove(0);
    let hit = if job.cache_prompt {
        cache.lookup(engine, &job.prompt)
    } else {
        None
    };
    let (mut seq, cached) = match hit {
        Some(hit) => (hit.seq, hit.tokens),
        None => (engine.new_sequence(), 0),
    };
    let room = engine.n_ctx().saturating_sub(job.prompt.len());
    let max_new = job.options.max_new_tokens.min(room);
    let n = job.prompt.len() + max_new;
    loop {
        match engine.reserve(&mut seq, n - cached) {
            Ok(()) => break,
            Err(EngineError::CacheFull { .. }) if cache.evict_lru(engine) => {}
            Err(e) => {
                engine.release(seq);
                return Err((job.events, e.to_string()));
            }
        }
    }
    if cached > 0 {
        stats.prompt_cache_hits.fetch_add(1, Ordering::Relaxed);
        stats
            .cached_tokens
            .fetch_add(cached as u64, Ordering::Relaxed);
    }
    Ok(Active {
        id: 0,
        seq,
        prompt: job.prompt,
        fed: cached,
        cached,
        cache_prompt: job.cache_prompt,
        cont,
        events: job.events,
        choice: 0,
        children: conts,
        max_new,
        logprobs: job.logprobs,
        logit_bias: job.logit_bias,
        received: job.received,
        last_token: None,
    })
}

/// Another choice of `parent`, whose prompt has just been prefilled: a fork of its sequence
/// with pages reserved for its generation (evicting cached prompts if needed).
fn fork_choice<'t>(
    engine: &mut Engine,
    cache: &mut PromptCache,
    parent: &Active<'t>,
    cont: Continuation<'t>,
    choice: usize,
) -> Result<Active<'t>, String> {
    let mut seq = engine
        .fork(&parent.seq, parent.seq.len())
        .map_err(|e| e.to_string())?;
    loop {
        match engine.reserve(&mut seq, parent.max_new) {
            Ok(()) => break,
            Err(EngineError::CacheFull { .. }) if cache.evict_lru(engine) => {}
            Err(e) => {
                engine.release(seq);
                return Err(e.to_string());
            }
        }
    }
    Ok(Active {
        id: 0,
        seq,
        prompt: parent.prompt.clone(),
        fed: parent.fed,
        cached: 0,
        cache_prompt: parent.cache_prompt,
        cont,
        events: parent.events.clone(),
        choice,
        children: Vec::new(),
        max_new: parent.max_new,
        logprobs: parent.logprobs,
        logit_bias: parent.logit_bias.clone(),
        received: parent.received,
        last_token: None,
    })
}

/// Samples `a`'s next token from `output` and sends the text it releases; `Some` when the
/// choice ends (with the event to send once its sequence is released; `None`: its client is
/// gone).
fn accept_row(
    a: &mut Active<'_>,
    output: RowOutput<'_>,
    engine: &Engine,
    stats: &Stats,
    scratch: &mut Vec<f32>,
) -> Option<Option<Event>> {
    let row = if a.logprobs.is_none() && a.logit_bias.is_empty() {
        output
    } else {
        let RowOutput::Logits(logits) = output else {
            let message = "the step returned no logits row for logprobs".to_string();
            return Some(Some(Event::Error(JobError::Failed(message))));
        };
        scratch.clear();
        scratch.extend_from_slice(logits);
        for &(id, bias) in &a.logit_bias {
            if let Some(l) = scratch.get_mut(id as usize) {
                *l += bias;
            }
        }
        RowOutput::Logits(scratch)
    };
    let room = a.seq.len() < engine.n_ctx();
    let mut text = String::new();
    let mut on_text = |piece: &str| {
        text.push_str(piece);
        ControlFlow::Continue(())
    };
    let before = a.cont.tokens().len();
    let done = a
        .cont
        .accept(row, a.seq.tokens(), engine.n_vocab(), room, &mut on_text);
    let added = a.cont.tokens().len() - before;
    stats
        .generated_tokens
        .fetch_add(added as u64, Ordering::Relaxed);
    if added > 0 {
        let now = Instant::now();
        match a.last_token {
            None => stats.ttft.observe(now - a.received),
            Some(t) => stats.tpot.observe(now - t),
        }
        a.last_token = Some(now);
    }
    let mut logprobs = Vec::new();
    if let (Some(k), RowOutput::Logits(l), Some(&token)) = (a.logprobs, row, a.cont.tokens().last())
        && added > 0
    {
        logprobs.push(token_logprob(l, token, k));
    }
    if (!text.is_empty() || !logprobs.is_empty())
        && a.events
            .send(Event::Text {
                choice: a.choice,
                text,
                logprobs,
            })
            .is_err()
    {
        return Some(None);
    }
    match done {
        Ok(None) => None,
        Ok(Some(FinishReason::Cancelled)) => Some(None),
        Ok(Some(finish)) => Some(Some(Event::Done(Summary {
            choice: a.choice,
            finish,
            prompt_tokens: a.prompt.len(),
            cached_tokens: a.cached,
            completion_tokens: a.cont.tokens().len(),
            seed: a.cont.seed(),
        }))),
        Err(e) => Some(Some(Event::Error(JobError::Failed(e.to_string())))),
    }
}

/// `token`'s log-softmax in `logits` and the `k` most likely tokens' (highest first, lowest id
/// on ties).
pub fn token_logprob(logits: &[f32], token: u32, k: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits
        .iter()
        .map(|&l| f64::from(l - max).exp())
        .sum::<f64>();
    let lse = f64::from(max) + sum.ln();
    let lp = |l: f32| (f64::from(l) - lse) as f32;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k > 0 {
        for (id, &l) in logits.iter().enumerate() {
            if top.len() == k && top.last().is_some_and(|&(_, m)| l <= m) {
                continue;
            }
            let at = top.partition_point(|&(_, m)| m >= l);
            top.insert(at, (id as u32, l));
            top.truncate(k);
        }
    }
    TokenLogprob {
        token,
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&l| lp(l)),
        top: top.into_iter().map(|(id, l)| (id, lp(l))).collect(),
    }
}

/// The part `a` (at `index`) runs in a step alone.
fn plan_one(engine: &Engine, a: &Active<'_>, index: usize, chunk: usize) -> Planned {
    if a.prefilling() {
        let n = (a.prompt.len() - a.fed)
            .min(chunk)
            .min(engine.max_tokens().max(1));
        Planned {
            index,
            n,
            row: a.fed + n == a.prompt.len(),
        }
    } else {
        Planned {
            index,
            n: 1,
            row: true,
        }
    }
}

/// Chooses the next step's parts: first a decode token for every request past its prompt,
/// then prompt chunks with the tokens and output rows the plan has left.
fn plan_step(engine: &Engine, active: &[Active<'_>], chunk: usize, plan: &mut Vec<Planned>) {
    plan.clear();
    let max_tokens = engine.max_tokens().max(1);
    let max_rows = engine.max_outputs().max(1);
    let (mut tokens, mut rows) = (0, 0);
    for (index, a) in active.iter().enumerate() {
        if !a.prefilling() && tokens < max_tokens && rows < max_rows {
            plan.push(Planned {
                index,
                n: 1,
                row: true,
            });
            tokens += 1;
            rows += 1;
        }
    }
    for (index, a) in active.iter().enumerate() {
        if !a.prefilling() {
            continue;
        }
        let left = max_tokens - tokens;
        let mut n = (a.prompt.len() - a.fed).min(chunk).min(left);
        let mut row = a.fed + n == a.prompt.len();
        if row && rows >= max_rows {
            // The last prompt token waits for a step with a free row.
            n -= 1;
            row = false;
        }
        if n == 0 {
            continue;
        }
        plan.push(Planned { index, n, row });
        tokens += n;
        rows += usize::from(row);
        if tokens >= max_tokens {
            break;
        }
    }
    plan.sort_by_key(|p| p.index);
}

fn publish(engine: &Engine, active: &[Active<'_>], cache: &PromptCache, stats: &Stats) {
    let pages = engine.page_stats();
    stats.running.store(active.len(), Ordering::Relaxed);
    stats
        .kv_pages_cached
        .store(cache.pages(), Ordering::Relaxed);
    stats
        .prompt_cache_entries
        .store(cache.len(), Ordering::Relaxed);
    stats
        .kv_pages_used
        .store(pages.total - pages.free, Ordering::Relaxed);
    stats.kv_pages_total.store(pages.total, Ordering::Relaxed);
}
