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
//! A request whose event channel is closed (its client went away) is dropped and its sequence
//! released before the next step. A failed step fails the requests it carried (their clients get
//! the error) and the loop goes on with the others.

use super::cache::PromptCache;
use crate::backend::StepOutputs;
use crate::runtime::engine::{Engine, EngineError, Part, Sequence, WantLogits};
use crate::runtime::generate::{Continuation, FinishReason, GenerateOptions, output_kind};
use crate::tokenizer::Tokenizer;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use tokio::sync::mpsc::UnboundedSender;

/// One request for the engine loop.
pub struct Job {
    /// The prompt's token ids (not empty; checked against the context by the HTTP side).
    pub prompt: Vec<u32>,
    pub options: GenerateOptions,
    /// Reuse a cached prefix of the prompt, and keep the sequence for later requests.
    pub cache_prompt: bool,
    /// Where the text and the outcome go; closed when the client is gone.
    pub events: UnboundedSender<Event>,
}

/// What the engine loop tells a request's handler.
#[derive(Debug)]
pub enum Event {
    /// Text that became final.
    Text(String),
    /// The request ended normally.
    Done(Summary),
    /// The request failed.
    Error(JobError),
}

/// How a request ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
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
#[derive(Debug, Default)]
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
}

/// Scheduling limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Sequences running at once.
    pub parallel: usize,
    /// The most prompt tokens one sequence prefills in one step.
    pub prefill_chunk: usize,
}

struct Active<'t> {
    seq: Sequence,
    prompt: Vec<u32>,
    /// Prompt tokens fed so far (from the cache first).
    fed: usize,
    /// Prompt tokens the cache gave.
    cached: usize,
    cache_prompt: bool,
    cont: Continuation<'t>,
    events: UnboundedSender<Event>,
}

impl Active<'_> {
    fn prefilling(&self) -> bool {
        self.fed < self.prompt.len()
    }
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
        // Admit waiting requests between steps.
        while open && active.len() < parallel {
            let job = if active.is_empty() {
                publish(engine, &active, &cache, stats);
                match jobs.recv() {
                    Ok(job) => job,
                    Err(_) => {
                        open = false;
                        break;
                    }
                }
            } else {
                match jobs.try_recv() {
                    Ok(job) => job,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            };
            stats.queued.fetch_sub(1, Ordering::Relaxed);
            if job.events.is_closed() {
                continue;
            }
            if stats.cancel_all.load(Ordering::Relaxed) {
                let _ = job.events.send(Event::Error(JobError::ShuttingDown));
                continue;
            }
            match admit(engine, tokenizer, &mut cache, job, stats) {
                Ok(a) => active.push(a),
                Err((events, message)) => {
                    let _ = events.send(Event::Error(JobError::Failed(message)));
                }
            }
        }
        if active.is_empty() {
            if open {
                continue;
            }
            break;
        }
        publish(engine, &active, &cache, stats);
        plan_step(engine, &active, chunk, &mut plan);
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
            engine.step(&mut parts, &mut out)
        };
        let mut finished = Vec::new();
        match result {
            Err(e) => {
                tracing::error!("step failed: {e}");
                for p in &plan {
                    finished.push((p.index, Some(Event::Error(JobError::Failed(e.to_string())))));
                }
            }
            Ok(()) => {
                let n_ctx = engine.n_ctx();
                let n_vocab = engine.n_vocab();
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
                    let room = a.seq.len() < n_ctx;
                    let events = &a.events;
                    let mut on_text = |piece: &str| match events.send(Event::Text(piece.into())) {
                        Ok(()) => ControlFlow::Continue(()),
                        Err(_) => ControlFlow::Break(()),
                    };
                    let before = a.cont.tokens().len();
                    let done = a
                        .cont
                        .accept(output, a.seq.tokens(), n_vocab, room, &mut on_text);
                    let added = a.cont.tokens().len() - before;
                    stats
                        .generated_tokens
                        .fetch_add(added as u64, Ordering::Relaxed);
                    match done {
                        Ok(None) => {}
                        Ok(Some(FinishReason::Cancelled)) => finished.push((p.index, None)),
                        Ok(Some(finish)) => {
                            let summary = Summary {
                                finish,
                                prompt_tokens: a.prompt.len(),
                                cached_tokens: a.cached,
                                completion_tokens: a.cont.tokens().len(),
                                seed: a.cont.seed(),
                            };
                            finished.push((p.index, Some(Event::Done(summary))));
                        }
                        Err(e) => finished
                            .push((p.index, Some(Event::Error(JobError::Failed(e.to_string()))))),
                    }
                }
            }
        }
        // Highest index first, so the others keep their places.
        finished.sort_by_key(|(index, _)| std::cmp::Reverse(*index));
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
    let kind = output_kind(&job.options.sampler, engine.n_vocab());
    let cont = match Continuation::new(tokenizer, &job.options, kind) {
        Ok(c) => c,
        Err(e) => return Err((job.events, e.to_string())),
    };
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
    let n = job.prompt.len() + job.options.max_new_tokens.min(room);
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
        seq,
        prompt: job.prompt,
        fed: cached,
        cached,
        cache_prompt: job.cache_prompt,
        cont,
        events: job.events,
    })
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
