//! The HTTP endpoints (see docs/server.md).

use super::api::{self, ApiError, Fields, GenParams, Prompt};
use super::scheduler::{Event, Job, JobError, Summary, TokenLogprob};
use super::{ServerConfig, ServerError, Shared};
use crate::runtime::generate::GenerateOptions;
use crate::runtime::prompt::encode_prompt;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};

/// How often an idle stream sends an SSE comment (`:`), which is how a vanished client is found.
const SSE_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_millis(250);
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

type AppState = Arc<Shared>;

pub(super) fn router(shared: AppState, config: &ServerConfig) -> Result<Router, ServerError> {
    let mut app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/generate", post(generate))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .fallback(not_found)
        .with_state(shared.clone())
        .layer(DefaultBodyLimit::max(config.body_limit))
        .layer(RequestBodyLimitLayer::new(config.body_limit))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            config.request_timeout,
        ));
    // Outermost: every answer is counted, the layers' own (413, 504) included.
    app = app.layer(axum::middleware::map_response_with_state(
        shared,
        count_status,
    ));
    if !config.cors_origins.is_empty() {
        let origin = if config.cors_origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            let list = config
                .cors_origins
                .iter()
                .map(|o| HeaderValue::from_str(o).map_err(|_| ServerError::CorsOrigin(o.clone())))
                .collect::<Result<Vec<_>, _>>()?;
            AllowOrigin::list(list)
        };
        app = app.layer(
            CorsLayer::new()
                .allow_origin(origin)
                .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
        );
    }
    Ok(app)
}

async fn count_status(State(s): State<AppState>, response: Response) -> Response {
    let mut counts = s.statuses.lock().unwrap_or_else(|e| e.into_inner());
    *counts.entry(response.status().as_u16()).or_insert(0) += 1;
    drop(counts);
    response
}

/// Prometheus text format.
async fn metrics(State(s): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let st = &s.stats;
    let load = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed);
    let mut out = String::new();
    out.push_str("# HELP m40llm_requests_total HTTP responses by status code.\n");
    out.push_str("# TYPE m40llm_requests_total counter\n");
    {
        let counts = s.statuses.lock().unwrap_or_else(|e| e.into_inner());
        for (status, n) in counts.iter() {
            out.push_str(&format!(
                "m40llm_requests_total{{status=\"{status}\"}} {n}\n"
            ));
        }
    }
    let used = load(&st.kv_pages_used);
    let total = load(&st.kv_pages_total);
    let lines = [
        (
            "prompt_tokens_total",
            "counter",
            "Prompt tokens prefilled.",
            st.prompt_tokens.load(Ordering::Relaxed),
        ),
        (
            "generated_tokens_total",
            "counter",
            "Tokens generated.",
            st.generated_tokens.load(Ordering::Relaxed),
        ),
        (
            "requests_queued",
            "gauge",
            "Requests waiting for a slot.",
            load(&st.queued) as u64,
        ),
        (
            "requests_running",
            "gauge",
            "Requests running (busy slots).",
            load(&st.running) as u64,
        ),
        (
            "kv_pages_used",
            "gauge",
            "KV-cache pages holding tokens.",
            used as u64,
        ),
        (
            "kv_pages_free",
            "gauge",
            "KV-cache pages free.",
            total.saturating_sub(used) as u64,
        ),
        (
            "kv_pages_cached",
            "gauge",
            "KV-cache pages the prompt cache holds (part of kv_pages_used).",
            load(&st.kv_pages_cached) as u64,
        ),
        (
            "prompt_cache_entries",
            "gauge",
            "Sequences the prompt cache keeps.",
            load(&st.prompt_cache_entries) as u64,
        ),
        (
            "prompt_cache_hits_total",
            "counter",
            "Requests that reused a cached prompt prefix.",
            st.prompt_cache_hits.load(Ordering::Relaxed),
        ),
        (
            "prompt_cached_tokens_total",
            "counter",
            "Prompt tokens taken from the prompt cache instead of prefilled.",
            st.cached_tokens.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, value) in lines {
        out.push_str(&format!(
            "# HELP m40llm_{name} {help}\n# TYPE m40llm_{name} {kind}\nm40llm_{name} {value}\n"
        ));
    }
    let step_s = st.step_us.load(Ordering::Relaxed) as f64 / 1e6;
    out.push_str(&format!(
        "# HELP m40llm_step_seconds_total Time spent in engine steps.\n# TYPE m40llm_step_seconds_total counter\nm40llm_step_seconds_total {step_s}\n"
    ));
    out.push_str(&format!(
        "# HELP m40llm_tokens_per_second Generated tokens per second of step time, over the last second of steps.\n# TYPE m40llm_tokens_per_second gauge\nm40llm_tokens_per_second {}\n",
        st.tokens_per_second()
    ));
    st.ttft.render(
        "m40llm_time_to_first_token_seconds",
        "From queueing a request to its first generated token (per choice).",
        &mut out,
    );
    st.tpot.render(
        "m40llm_time_per_output_token_seconds",
        "Between successive generated tokens of a choice.",
        &mut out,
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

/// llama-server's shape: `{"content", "add_special"}` -> `{"tokens"}`.
async fn tokenize(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let r = s.ready()?;
    let map = body_object(body)?;
    let f = Fields(&map);
    let content = f
        .str("content")?
        .ok_or_else(|| ApiError::invalid("content", "`content` must be a string"))?;
    let tokens = if f.bool("add_special")?.unwrap_or(false) {
        encode_prompt(&r.tokenizer, content)
    } else {
        r.tokenizer.encode(content, false, true)
    };
    Ok(axum::Json(json!({ "tokens": tokens })).into_response())
}

/// llama-server's shape: `{"tokens"}` -> `{"content"}`.
async fn detokenize(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let r = s.ready()?;
    let map = body_object(body)?;
    let f = Fields(&map);
    let ids = match f.get("tokens") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_u64()
                    .filter(|&id| id < r.info.n_vocab as u64)
                    .map(|id| id as u32)
            })
            .collect::<Option<Vec<u32>>>(),
        _ => None,
    }
    .ok_or_else(|| {
        ApiError::invalid(
            "tokens",
            format!("`tokens` must be a list of ids below {}", r.info.n_vocab),
        )
    })?;
    let content = r
        .tokenizer
        .decode(&ids, true)
        .map_err(|e| ApiError::invalid("tokens", e.to_string()))?;
    Ok(axum::Json(json!({ "content": content })).into_response())
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

fn authorize(s: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &s.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::unauthorized())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn body_object(
    body: Result<Bytes, BytesRejection>,
) -> Result<serde_json::Map<String, Value>, ApiError> {
    let body = body.map_err(|e| ApiError {
        status: e.status(),
        message: format!("cannot read the body: {}", e.body_text()),
        kind: "invalid_request_error",
        code: Some("invalid_body"),
        param: None,
    })?;
    api::parse_object(&body)
}

async fn health(State(s): State<AppState>) -> Response {
    let st = &s.stats;
    let Some(r) = s.ready.get() else {
        let body = json!({"status": "loading", "model": s.name});
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    };
    axum::Json(json!({
        "status": "ok",
        "model": r.info.name,
        "device": r.info.device,
        "n_ctx": r.info.n_ctx,
        "parallel": s.parallel,
        "running": st.running.load(Ordering::Relaxed),
        "queued": st.queued.load(Ordering::Relaxed),
        "kv_pages_used": st.kv_pages_used.load(Ordering::Relaxed),
        "kv_pages_total": st.kv_pages_total.load(Ordering::Relaxed),
        "kv_pages_cached": st.kv_pages_cached.load(Ordering::Relaxed),
        "prompt_cache_entries": st.prompt_cache_entries.load(Ordering::Relaxed),
        "prompt_cache_hits": st.prompt_cache_hits.load(Ordering::Relaxed),
        "cached_tokens_total": st.cached_tokens.load(Ordering::Relaxed),
        "prompt_tokens_total": st.prompt_tokens.load(Ordering::Relaxed),
        "generated_tokens_total": st.generated_tokens.load(Ordering::Relaxed),
    }))
    .into_response()
}

async fn models(State(s): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let r = s.ready()?;
    Ok(axum::Json(json!({
        "object": "list",
        "data": [{
            "id": r.info.name,
            "object": "model",
            "created": now(),
            "owned_by": "m40-llm",
        }],
    }))
    .into_response())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    Chat,
    Completion,
    Generate,
}

async fn chat(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let r = s.ready()?;
    let map = body_object(body)?;
    let f = Fields(&map);
    let params = api::gen_params(&f)?;
    let messages = api::chat_messages(&f)?;
    let template = r.template.as_ref().ok_or_else(|| {
        ApiError::bad_request(
            "no_chat_template",
            "the model has no chat template: use /v1/completions",
        )
    })?;
    let text = template
        .render(&messages, true)
        .map_err(|e| ApiError::bad_request("invalid_messages", e.to_string()))?;
    let ids = encode_prompt(&r.tokenizer, &text);
    respond(s, Api::Chat, ids, params).await
}

async fn completions(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let r = s.ready()?;
    let map = body_object(body)?;
    let f = Fields(&map);
    let params = api::gen_params(&f)?;
    let ids = match api::prompt(&f, r.info.n_vocab)? {
        Prompt::Text(t) => encode_prompt(&r.tokenizer, &t),
        Prompt::Ids(ids) => ids,
    };
    respond(s, Api::Completion, ids, params).await
}

async fn generate(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let r = s.ready()?;
    let map = body_object(body)?;
    let f = Fields(&map);
    let params = api::gen_params(&f)?;
    let text = f
        .str("prompt")?
        .ok_or_else(|| ApiError::invalid("prompt", "`prompt` must be a string"))?;
    let ids = encode_prompt(&r.tokenizer, text);
    respond(s, Api::Generate, ids, params).await
}

/// Identifies one response.
struct Meta {
    api: Api,
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
    include_usage: bool,
    /// Choices.
    n: usize,
    /// Log-probabilities were asked for.
    logprobs: bool,
    tokenizer: Arc<crate::tokenizer::Tokenizer>,
}

/// One finished choice of a whole response.
struct ChoiceOut {
    text: String,
    logprobs: Vec<TokenLogprob>,
    summary: Summary,
}

impl Meta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.api, chunk) {
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
            _ => "text_completion",
        }
    }

    /// A response or chunk object around `choices`.
    fn wrap(&self, chunk: bool, choices: Value) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        });
        if chunk && self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// A token's text (special tokens rendered) and bytes.
    fn token(&self, id: u32) -> (String, Vec<u8>) {
        let bytes = self.tokenizer.token_piece(id).unwrap_or_default().to_vec();
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    }

    /// OpenAI's `logprobs` object for `lps` (null when not asked for). `offset`: the choice's
    /// text length so far, in characters (completions' `text_offset`), advanced past them.
    fn logprobs_json(&self, lps: &[TokenLogprob], offset: &mut usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        if self.api == Api::Chat {
            let content: Vec<Value> = lps
                .iter()
                .map(|lp| {
                    let (token, bytes) = self.token(lp.token);
                    let top: Vec<Value> = lp
                        .top
                        .iter()
                        .map(|&(id, logprob)| {
                            let (token, bytes) = self.token(id);
                            json!({"token": token, "logprob": logprob, "bytes": bytes})
                        })
                        .collect();
                    json!({"token": token, "logprob": lp.logprob, "bytes": bytes, "top_logprobs": top})
                })
                .collect();
            return json!({"content": content, "refusal": null});
        }
        let (mut tokens, mut logprobs, mut tops, mut offsets) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for lp in lps {
            let (token, _) = self.token(lp.token);
            offsets.push(*offset);
            *offset += token.chars().count();
            tokens.push(token);
            logprobs.push(lp.logprob);
            let top: serde_json::Map<String, Value> = lp
                .top
                .iter()
                .map(|&(id, logprob)| (self.token(id).0, json!(logprob)))
                .collect();
            tops.push(Value::Object(top));
        }
        json!({"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets})
    }

    /// The chunk that opens a chat stream's choice (the role).
    fn role_chunk(&self, choice: usize) -> Value {
        self.wrap(
            true,
            json!([{"index": choice, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
        )
    }

    /// A streamed chunk of text.
    fn text_chunk(&self, choice: usize, text: &str, logprobs: Value) -> Value {
        match self.api {
            Api::Generate => json!({"text": text}),
            Api::Completion => self.wrap(
                true,
                json!([{"index": choice, "text": text, "logprobs": logprobs, "finish_reason": null}]),
            ),
            Api::Chat => self.wrap(
                true,
                json!([{"index": choice, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": null}]),
            ),
        }
    }

    /// The chunk that ends a choice of a stream.
    fn finish_chunk(&self, summary: &Summary) -> Value {
        let reason = api::finish_reason(&summary.finish);
        match self.api {
            Api::Generate => json!({
                "text": "",
                "finish_reason": reason,
                "tokens": summary.completion_tokens,
                "seed": summary.seed,
            }),
            Api::Chat => self.wrap(
                true,
                json!([{"index": summary.choice, "delta": {}, "logprobs": null, "finish_reason": reason}]),
            ),
            Api::Completion => self.wrap(
                true,
                json!([{"index": summary.choice, "text": "", "logprobs": null, "finish_reason": reason}]),
            ),
        }
    }

    /// The usage chunk that ends a stream (with `include_usage`).
    fn usage_chunk(&self, summaries: &[Summary]) -> Option<Value> {
        if !self.include_usage {
            return None;
        }
        let mut u = self.wrap(true, json!([]));
        u["usage"] = usage(summaries);
        Some(u)
    }

    /// The whole (non-streamed) response.
    fn response(&self, choices: &[ChoiceOut]) -> Value {
        let summaries: Vec<Summary> = choices.iter().map(|c| c.summary.clone()).collect();
        if self.api == Api::Generate
            && let Some(c) = choices.first()
        {
            return json!({
                "text": c.text,
                "finish_reason": api::finish_reason(&c.summary.finish),
                "tokens": c.summary.completion_tokens,
                "seed": c.summary.seed,
            });
        }
        let list: Vec<Value> = choices
            .iter()
            .map(|c| {
                let reason = api::finish_reason(&c.summary.finish);
                let logprobs = self.logprobs_json(&c.logprobs, &mut 0);
                if self.api == Api::Chat {
                    json!({
                        "index": c.summary.choice,
                        "message": {"role": "assistant", "content": c.text},
                        "logprobs": logprobs,
                        "finish_reason": reason,
                    })
                } else {
                    json!({"index": c.summary.choice, "text": c.text, "logprobs": logprobs, "finish_reason": reason})
                }
            })
            .collect();
        let mut v = self.wrap(false, Value::Array(list));
        v["usage"] = usage(&summaries);
        v
    }
}

/// The `usage` of a request's choices: the prompt once, every choice's tokens.
fn usage(summaries: &[Summary]) -> Value {
    let first = summaries.first();
    api::usage(
        first.map_or(0, |s| s.prompt_tokens),
        summaries.iter().map(|s| s.completion_tokens).sum(),
        first.map_or(0, |s| s.cached_tokens),
    )
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn unique_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!("{prefix}-{nanos:x}{n:04x}")
}

fn job_error(e: &JobError) -> ApiError {
    match e {
        JobError::Failed(message) => ApiError::internal(message.clone()),
        JobError::ShuttingDown => {
            ApiError::unavailable("shutting_down", "the server is shutting down")
        }
    }
}

/// Checks the request against the context, queues it, and answers (streamed or whole).
async fn respond(
    s: AppState,
    api: Api,
    prompt: Vec<u32>,
    params: GenParams,
) -> Result<Response, ApiError> {
    let r = s.ready()?;
    if prompt.is_empty() {
        return Err(ApiError::invalid(
            "prompt",
            "the prompt is empty: at least one token is needed",
        ));
    }
    if params.n > s.parallel {
        return Err(ApiError::invalid(
            "n",
            format!(
                "`n` is {}, more than the {} requests this server runs at once (--parallel)",
                params.n, s.parallel
            ),
        ));
    }
    if api == Api::Generate && (params.n != 1 || params.logprobs.is_some()) {
        return Err(ApiError::invalid(
            if params.n != 1 { "n" } else { "logprobs" },
            "/generate answers one choice without logprobs: use /v1/completions",
        ));
    }
    if let Some(&(id, _)) = params
        .logit_bias
        .iter()
        .find(|(id, _)| *id as usize >= r.info.n_vocab)
    {
        return Err(ApiError::invalid(
            "logit_bias",
            format!(
                "token id {id} is not below the vocabulary size {}",
                r.info.n_vocab
            ),
        ));
    }
    let n_ctx = r.info.n_ctx;
    let max_new = match params.max_tokens {
        Some(n) => n,
        None => n_ctx.saturating_sub(prompt.len()),
    };
    if prompt.len() + max_new.max(1) > n_ctx {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!(
                "the prompt ({} tokens) plus max_tokens ({}) does not fit the context of {n_ctx} tokens",
                prompt.len(),
                max_new.max(1)
            ),
            kind: "invalid_request_error",
            code: Some("context_length_exceeded"),
            param: Some("max_tokens".into()),
        });
    }
    let options = GenerateOptions {
        max_new_tokens: max_new,
        sampler: params.sampler,
        stop_strings: params.stop,
        stop_at_eog: true,
        render_special: false,
    };
    let (events, rx) = unbounded_channel();
    let job = Job {
        prompt,
        options,
        cache_prompt: params.cache_prompt,
        n: params.n,
        logprobs: params.logprobs,
        logit_bias: params.logit_bias,
        received: std::time::Instant::now(),
        events,
    };
    let busy = || {
        ApiError::unavailable(
            "queue_full",
            "the server is busy: every slot is running and the queue is full; retry later",
        )
    };
    if s.stats.queued.fetch_add(1, Ordering::Relaxed) >= s.queue {
        s.stats.queued.fetch_sub(1, Ordering::Relaxed);
        return Err(busy());
    }
    if let Err(e) = s.jobs.try_send(job) {
        s.stats.queued.fetch_sub(1, Ordering::Relaxed);
        return Err(match e {
            std::sync::mpsc::TrySendError::Full(_) => busy(),
            std::sync::mpsc::TrySendError::Disconnected(_) => {
                ApiError::unavailable("shutting_down", "the server is shutting down")
            }
        });
    }
    let prefix = match api {
        Api::Chat => "chatcmpl",
        Api::Completion => "cmpl",
        Api::Generate => "gen",
    };
    let meta = Meta {
        api,
        id: unique_id(prefix),
        created: now(),
        model: r.info.name.clone(),
        fingerprint: r.info.fingerprint.clone(),
        include_usage: params.include_usage && api != Api::Generate,
        n: params.n,
        logprobs: params.logprobs.is_some(),
        tokenizer: r.tokenizer.clone(),
    };
    if params.stream {
        Ok(stream(meta, rx).into_response())
    } else {
        whole(meta, rx).await
    }
}

async fn whole(meta: Meta, mut rx: UnboundedReceiver<Event>) -> Result<Response, ApiError> {
    let mut texts = vec![String::new(); meta.n];
    let mut logprobs: Vec<Vec<TokenLogprob>> = vec![Vec::new(); meta.n];
    let mut done: Vec<Option<Summary>> = vec![None; meta.n];
    while let Some(event) = rx.recv().await {
        match event {
            Event::Text {
                choice,
                text,
                logprobs: lps,
            } => {
                if let (Some(t), Some(l)) = (texts.get_mut(choice), logprobs.get_mut(choice)) {
                    t.push_str(&text);
                    l.extend(lps);
                }
            }
            Event::Done(summary) => {
                let choice = summary.choice;
                if let Some(d) = done.get_mut(choice) {
                    *d = Some(summary);
                }
                if done.iter().all(Option::is_some) {
                    let choices: Vec<ChoiceOut> = texts
                        .into_iter()
                        .zip(logprobs)
                        .zip(done)
                        .filter_map(|((text, logprobs), summary)| {
                            Some(ChoiceOut {
                                text,
                                logprobs,
                                summary: summary?,
                            })
                        })
                        .collect();
                    return Ok(axum::Json(meta.response(&choices)).into_response());
                }
            }
            Event::Error(e) => return Err(job_error(&e)),
        }
    }
    Err(ApiError::internal("the engine dropped the request"))
}

struct StreamState {
    meta: Meta,
    rx: UnboundedReceiver<Event>,
    pending: VecDeque<SseEvent>,
    /// Per choice, the text streamed so far in characters (completions' `text_offset`).
    offsets: Vec<usize>,
    /// Per choice, whether its first chunk (chat: the role) went out.
    started: Vec<bool>,
    summaries: Vec<Summary>,
    done: bool,
}

impl StreamState {
    /// Queues choice `choice`'s role chunk (chat) if it has not gone out yet.
    fn start(&mut self, choice: usize) {
        if let Some(started) = self.started.get_mut(choice).filter(|s| !**s) {
            *started = true;
            if self.meta.api == Api::Chat {
                self.pending
                    .push_back(sse_json(&self.meta.role_chunk(choice)));
            }
        }
    }
}

fn sse_json(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

fn stream(
    meta: Meta,
    rx: UnboundedReceiver<Event>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    // A chat choice's role chunk goes out with its first text (or its end), not on arrival: a
    // request waiting in the queue sends only keep-alive comments, so a client never sees the
    // answer begin before it has begun, and one that leaves then is found while it holds a
    // running place (at the next token), not a queue place (which could turn a live request
    // away while the server cannot know the waiting one is gone).
    let pending = VecDeque::new();
    let state = StreamState {
        offsets: vec![0; meta.n],
        started: vec![false; meta.n],
        meta,
        rx,
        pending,
        summaries: Vec::new(),
        done: false,
    };
    let events = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(e) = st.pending.pop_front() {
                return Some((Ok(e), st));
            }
            if st.done {
                return None;
            }
            match st.rx.recv().await {
                Some(Event::Text {
                    choice,
                    text,
                    logprobs,
                }) => {
                    st.start(choice);
                    let mut offset = st.offsets.get(choice).copied().unwrap_or(0);
                    let lps = st.meta.logprobs_json(&logprobs, &mut offset);
                    if let Some(o) = st.offsets.get_mut(choice) {
                        *o = offset;
                    }
                    let chunk = st.meta.text_chunk(choice, &text, lps);
                    st.pending.push_back(sse_json(&chunk));
                }
                Some(Event::Done(summary)) => {
                    st.start(summary.choice);
                    st.pending
                        .push_back(sse_json(&st.meta.finish_chunk(&summary)));
                    st.summaries.push(summary);
                    if st.summaries.len() >= st.meta.n {
                        if let Some(u) = st.meta.usage_chunk(&st.summaries) {
                            st.pending.push_back(sse_json(&u));
                        }
                        st.pending.push_back(SseEvent::default().data("[DONE]"));
                        st.done = true;
                    }
                }
                Some(Event::Error(e)) => {
                    st.pending.push_back(sse_json(&job_error(&e).body()));
                    st.pending.push_back(SseEvent::default().data("[DONE]"));
                    st.done = true;
                }
                None => {
                    let e = ApiError::internal("the engine dropped the request");
                    st.pending.push_back(sse_json(&e.body()));
                    st.done = true;
                }
            }
        }
    });
    // A comment every 250 ms: a stream waiting in the queue or behind a long prefill writes
    // nothing else, and a client that left is only noticed when a write fails (the second write
    // after the close, once the peer's reset is back). With it the engine drops such a request
    // within about half a second instead of holding its place in the queue.
    Sse::new(events).keep_alive(KeepAlive::new().interval(SSE_KEEP_ALIVE))
}
