//! `m40-llm serve` end to end on the default model: servers on 127.0.0.1 port 0, driven over
//! plain HTTP/1.1 (a small client below), checking OpenAI's shapes, SSE, batching determinism,
//! the error paths, the queue limit and disconnects. `openai_python_client_works` runs the
//! official `openai` Python client against the binary (scripts/openai_client_test.py).
#![cfg(feature = "server")]

mod common;

use m40_llm::backend::device::DeviceChoice;
use m40_llm::runtime::model::LoadOptions;
use m40_llm::server::{Server, ServerConfig, start};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const KEY: &str = "sekret";

fn server(parallel: usize, queue: usize, api_key: Option<&str>) -> Option<Server> {
    server_with(parallel, queue, api_key, |_| {})
}

fn server_with(
    parallel: usize,
    queue: usize,
    api_key: Option<&str>,
    adjust: impl FnOnce(&mut ServerConfig),
) -> Option<Server> {
    let model = common::default_model()?;
    let load = LoadOptions {
        device: DeviceChoice::Cpu,
        ctx_size: Some(512),
        ..LoadOptions::default()
    };
    let mut config = ServerConfig {
        port: 0,
        parallel,
        queue,
        api_key: api_key.map(str::to_string),
        model_name: "smollm2".into(),
        grace: Duration::from_secs(2),
        ..ServerConfig::default()
    };
    adjust(&mut config);
    Some(start(model, load, config).unwrap())
}

struct Reply {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    s
}

fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut s = send(addr, method, path, headers, body);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Reply { status, head, body }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..eol]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[eol + 2 + size + 2..];
    }
}

fn post(addr: SocketAddr, path: &str, body: Value) -> Reply {
    request(addr, "POST", path, &[], &body.to_string())
}

/// The JSON payloads of an SSE body, checking its framing: `data: ` lines separated by blank
/// lines, ending with `data: [DONE]`.
fn sse_events(r: &Reply) -> Vec<Value> {
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.head
            .to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{}",
        r.head
    );
    let text = r.text();
    let mut data: Vec<&str> = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        for line in block.lines() {
            if line.starts_with(':') {
                continue; // keep-alive comment
            }
            let d = line
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("bad SSE line {line:?}"));
            data.push(d);
        }
    }
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

fn health(addr: SocketAddr) -> Value {
    request(addr, "GET", "/health", &[], "").json()
}

/// Polls /health until `ok` holds (at most a minute).
fn wait_for(addr: SocketAddr, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let h = health(addr);
        if ok(&h) {
            return h;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}: {h}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn greedy_completion(prompt: &str, n: u32) -> Value {
    json!({"model": "smollm2", "prompt": prompt, "max_tokens": n, "temperature": 0})
}

#[test]
fn chat_and_completions_answer_in_openai_shapes() {
    let Some(srv) = server(4, 8, None) else {
        return;
    };
    let addr = srv.addr();
    let h = health(addr);
    assert_eq!(h["status"], "ok");
    assert_eq!(h["device"]["kind"], "cpu");

    let r = post(
        addr,
        "/v1/completions",
        greedy_completion("The capital of France is", 5),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["model"], "smollm2");
    assert!(v["system_fingerprint"].as_str().unwrap().starts_with("fp_"));
    // The CLI's (and llama.cpp's) greedy tokens for this prompt.
    assert_eq!(v["choices"][0]["text"], " Paris.\n\nThe");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["usage"]["total_tokens"], 10);

    // A stop string ends the text before it, as finish_reason "stop".
    let mut body = greedy_completion("The capital of France is", 5);
    body["stop"] = json!(["."]);
    let v = post(addr, "/v1/completions", body).json();
    assert_eq!(v["choices"][0]["text"], " Paris");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // Token ids work as a prompt.
    let v = post(
        addr,
        "/v1/completions",
        json!({"prompt": [504, 3575, 282, 4649, 314], "max_tokens": 2, "temperature": 0}),
    )
    .json();
    assert_eq!(v["choices"][0]["text"], " Paris.");

    let r = post(
        addr,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0, "unknown_field": {"x": 1}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(!choice["message"]["content"].as_str().unwrap().is_empty());
    assert!(["stop", "length"].contains(&choice["finish_reason"].as_str().unwrap()));
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 5);

    // /generate: the generated text only.
    let v = post(
        addr,
        "/generate",
        json!({"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0}),
    )
    .json();
    assert_eq!(v["text"], " Paris.\n\nThe");

    let v = request(addr, "GET", "/v1/models", &[], "").json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "smollm2");
    srv.shutdown().unwrap();
}

#[test]
fn tokenize_detokenize_and_metrics() {
    let Some(srv) = server(1, 4, None) else {
        return;
    };
    let addr = srv.addr();
    let v = post(
        addr,
        "/tokenize",
        json!({"content": "The capital of France is"}),
    )
    .json();
    assert_eq!(v["tokens"], json!([504, 3575, 282, 4649, 314]));
    let v = post(
        addr,
        "/detokenize",
        json!({"tokens": [504, 3575, 282, 4649, 314]}),
    )
    .json();
    assert_eq!(v["content"], "The capital of France is");
    assert_eq!(
        post(addr, "/detokenize", json!({"tokens": [1e9]})).status,
        400
    );
    assert_eq!(
        post(addr, "/v1/completions", greedy_completion("Hi", 3)).status,
        200
    );
    let r = request(addr, "GET", "/metrics", &[], "");
    assert_eq!(r.status, 200);
    let text = r.text();
    let value = |name: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .unwrap_or_else(|| panic!("no {name} in {text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    // /tokenize, /detokenize and the completion: 3 answers of 200 before this one; one 400.
    assert_eq!(value("m40llm_requests_total{status=\"200\"}"), 3.0);
    assert_eq!(value("m40llm_requests_total{status=\"400\"}"), 1.0);
    assert_eq!(value("m40llm_generated_tokens_total"), 3.0);
    assert!(value("m40llm_prompt_tokens_total") >= 1.0);
    // Nothing runs: the pages in use are the prompt cache's (the completion's sequence).
    assert!(value("m40llm_kv_pages_cached") > 0.0);
    assert_eq!(
        value("m40llm_kv_pages_used"),
        value("m40llm_kv_pages_cached")
    );
    assert_eq!(value("m40llm_prompt_cache_entries"), 1.0);
    // One request of 3 tokens: one first token, two gaps between tokens.
    assert_eq!(value("m40llm_time_to_first_token_seconds_count"), 1.0);
    assert_eq!(
        value("m40llm_time_to_first_token_seconds_bucket{le=\"+Inf\"}"),
        1.0
    );
    assert!(value("m40llm_time_to_first_token_seconds_sum") > 0.0);
    assert_eq!(value("m40llm_time_per_output_token_seconds_count"), 2.0);
    assert!(value("m40llm_step_seconds_total") > 0.0);
    assert!(value("m40llm_tokens_per_second") > 0.0);
    assert!(text.contains("# TYPE m40llm_time_per_output_token_seconds histogram"));
    assert!(value("m40llm_kv_pages_free") > 0.0);
    assert_eq!(value("m40llm_requests_running"), 0.0);
    srv.shutdown().unwrap();
}

#[test]
fn health_is_503_while_the_model_loads() {
    let Some(model) = common::default_model() else {
        return;
    };
    let gate = std::sync::Arc::new(std::sync::Barrier::new(2));
    let load = LoadOptions {
        device: DeviceChoice::Cpu,
        ctx_size: Some(512),
        ..LoadOptions::default()
    };
    let config = ServerConfig {
        port: 0,
        load_gate: Some(gate.clone()),
        model_name: "smollm2".into(),
        ..ServerConfig::default()
    };
    let mut srv = m40_llm::server::spawn(model, load, config).unwrap();
    let addr = srv.addr();
    // Listening, not loaded: /health says so, requests are told to retry.
    let r = request(addr, "GET", "/health", &[], "");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["status"], "loading");
    let r = post(addr, "/v1/completions", greedy_completion("Hi", 1));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "loading");
    assert_eq!(request(addr, "GET", "/metrics", &[], "").status, 200);
    assert!(srv.device().is_none());
    gate.wait();
    srv.wait_ready().unwrap();
    assert_eq!(srv.device().unwrap().kind, "cpu");
    let r = request(addr, "GET", "/health", &[], "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["device"]["kind"], "cpu");
    assert_eq!(
        post(addr, "/v1/completions", greedy_completion("Hi", 1)).status,
        200
    );
    srv.shutdown().unwrap();
}

#[test]
fn a_model_that_fails_to_load_stops_the_server() {
    let dir = std::env::temp_dir().join(format!("m40llm-bad-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.gguf");
    std::fs::write(&path, b"not a gguf file").unwrap();
    let config = ServerConfig {
        port: 0,
        ..ServerConfig::default()
    };
    let mut srv = m40_llm::server::spawn(path, LoadOptions::default(), config).unwrap();
    let addr = srv.addr();
    assert!(srv.wait_ready().is_err());
    assert!(
        TcpStream::connect(addr).is_err(),
        "still listening after a failed load"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn streams_are_well_formed_sse_and_match_whole_responses() {
    let Some(srv) = server(2, 8, None) else {
        return;
    };
    let addr = srv.addr();
    let mut body = greedy_completion("The capital of France is", 5);
    body["stream"] = json!(true);
    let events = sse_events(&post(addr, "/v1/completions", body));
    let text: String = events
        .iter()
        .map(|e| e["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, " Paris.\n\nThe");
    assert_eq!(
        events.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    assert!(events.iter().all(|e| e["object"] == "text_completion"));

    let chat = json!({"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 10, "temperature": 0});
    let whole = post(addr, "/v1/chat/completions", chat.clone()).json();
    let mut streamed = chat;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let events = sse_events(&post(addr, "/v1/chat/completions", streamed));
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        events
            .iter()
            .all(|e| e["object"] == "chat.completion.chunk")
    );
    let content: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        content,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let n = events.len();
    assert_eq!(
        events[n - 2]["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    // The usage chunk comes last, with no choices; the others carry `usage: null`.
    assert_eq!(events[n - 1]["choices"], json!([]));
    let (usage, first) = (&events[n - 1]["usage"], &whole["usage"]);
    for field in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(usage[field], first[field], "{field}");
    }
    // The same prompt again: all but its last token come from the prompt cache.
    assert_eq!(
        usage["prompt_tokens_details"]["cached_tokens"],
        first["prompt_tokens"].as_u64().unwrap() - 1
    );
    assert!(events[..n - 1].iter().all(|e| e["usage"].is_null()));
    srv.shutdown().unwrap();
}

#[test]
fn greedy_tokens_are_the_same_alone_and_in_a_batch() {
    let Some(srv) = server(4, 8, None) else {
        return;
    };
    let addr = srv.addr();
    let prompts = [
        "The capital of France is",
        "Once upon a time, in a small village by the sea, there lived",
        "1, 2, 3, 4,",
        "The best way to learn a new programming language is to write a lot of small programs, and",
    ];
    let alone: Vec<Value> = prompts
        .iter()
        .map(|p| {
            post(addr, "/v1/completions", greedy_completion(p, 12)).json()["choices"][0]["text"]
                .clone()
        })
        .collect();
    let together: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| s.spawn(move || post(addr, "/v1/completions", greedy_completion(p, 12))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().json()["choices"][0]["text"].clone())
            .collect()
    });
    assert_eq!(alone, together);
    srv.shutdown().unwrap();
}

#[test]
fn a_second_chat_turn_prefills_only_its_new_tokens() {
    let Some(srv) = server(2, 8, None) else {
        return;
    };
    let addr = srv.addr();
    let chat = |messages: &Value, cache: bool| -> Value {
        let r = post(
            addr,
            "/v1/chat/completions",
            json!({"messages": messages, "max_tokens": 12, "temperature": 0, "cache_prompt": cache}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    let prefilled = || health(addr)["prompt_tokens_total"].as_u64().unwrap();
    let mut messages = json!([
        {"role": "system", "content": "You are a helpful assistant who answers briefly."},
        {"role": "user", "content": "Name a fruit."},
    ]);
    let before = prefilled();
    let first = chat(&messages, true);
    let p1 = first["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(prefilled() - before, p1);
    let answer = first["choices"][0]["message"]["content"].clone();
    let n1 = first["usage"]["completion_tokens"].as_u64().unwrap();
    let msgs = messages.as_array_mut().unwrap();
    msgs.push(json!({"role": "assistant", "content": answer}));
    msgs.push(json!({"role": "user", "content": "And a vegetable?"}));

    let before = prefilled();
    let second = chat(&messages, true);
    let p2 = second["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    // The whole first turn (its prompt and the answer's tokens the model read back) is reused;
    // only the rest is prefilled.
    assert!(
        cached >= p1 + n1 - 1,
        "cached {cached}, first turn {p1} + {n1}"
    );
    assert!(cached < p2);
    assert_eq!(prefilled() - before, p2 - cached);
    let h = health(addr);
    assert!(h["prompt_cache_hits"].as_u64().unwrap() >= 1, "{h}");

    // Without the cache: the same greedy answer, the whole prompt prefilled.
    let before = prefilled();
    let uncached = chat(&messages, false);
    assert_eq!(
        uncached["usage"]["prompt_tokens_details"]["cached_tokens"],
        0
    );
    assert_eq!(prefilled() - before, p2);
    assert_eq!(
        uncached["choices"][0]["message"]["content"],
        second["choices"][0]["message"]["content"]
    );
    let h = wait_for(addr, "the requests to end", |h| h["running"] == 0);
    assert_eq!(h["kv_pages_used"], h["kv_pages_cached"], "{h}");
    srv.shutdown().unwrap();
}

#[test]
fn cached_prompts_are_evicted_when_a_request_needs_their_pages() {
    // One slot of 512 tokens: the cache can only keep what the next request leaves free.
    let Some(srv) = server(1, 4, None) else {
        return;
    };
    let addr = srv.addr();
    for p in ["Hello there", "The capital of France is", "1, 2, 3,"] {
        assert_eq!(
            post(addr, "/v1/completions", greedy_completion(p, 2)).status,
            200
        );
    }
    let h = health(addr);
    assert!(h["prompt_cache_entries"].as_u64().unwrap() >= 2, "{h}");
    // A request reserving the whole context evicts them rather than failing.
    let r = post(
        addr,
        "/v1/completions",
        json!({"prompt": "Once", "max_tokens": 500, "temperature": 0, "stop": [" "]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let h = health(addr);
    assert!(h["prompt_cache_entries"].as_u64().unwrap() <= 1, "{h}");
    assert_eq!(h["kv_pages_used"], h["kv_pages_cached"], "{h}");
    srv.shutdown().unwrap();
}

#[test]
fn n_choices_fork_the_prompt_and_logprobs_and_logit_bias_work() {
    let Some(srv) = server(4, 8, None) else {
        return;
    };
    let addr = srv.addr();
    let prompt = "The capital of France is";
    let prefilled = || health(addr)["prompt_tokens_total"].as_u64().unwrap();

    // n = 2, greedy: both choices are the greedy text; the prompt is prefilled once.
    let before = prefilled();
    let mut body = greedy_completion(prompt, 5);
    body["n"] = json!(2);
    body["cache_prompt"] = json!(false);
    let v = post(addr, "/v1/completions", body).json();
    assert_eq!(prefilled() - before, 5, "the prompt is prefilled once: {v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2, "{v}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["text"], " Paris.\n\nThe");
    }
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(v["usage"]["completion_tokens"], 10);

    // Seeded sampling: choice i uses seed + i, so choice 1 is what seed 8 gives alone.
    let sampled = |seed: u64, n: usize| -> Vec<String> {
        let body =
            json!({"prompt": prompt, "max_tokens": 8, "temperature": 1.0, "seed": seed, "n": n});
        let v = post(addr, "/v1/completions", body).json();
        v["choices"]
            .as_array()
            .unwrap_or_else(|| panic!("{v}"))
            .iter()
            .map(|c| c["text"].as_str().unwrap().to_string())
            .collect()
    };
    let two = sampled(7, 2);
    assert_eq!(two, [sampled(7, 1)[0].clone(), sampled(8, 1)[0].clone()]);

    // Chat logprobs: one entry per token, the greedy token first among its alternatives.
    let r = post(
        addr,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 6,
               "temperature": 0, "logprobs": true, "top_logprobs": 3, "user": "someone"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let choice = &v["choices"][0];
    let content = choice["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    for t in content {
        let lp = t["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0, "{t}");
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{t}");
        assert_eq!(
            top[0]["token"], t["token"],
            "greedy takes the most likely: {t}"
        );
        assert!((top[0]["logprob"].as_f64().unwrap() - lp).abs() < 1e-6);
        assert!(
            top.windows(2)
                .all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64())
        );
        let bytes: Vec<u8> = t["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            t["token"].as_str().unwrap()
        );
    }
    if choice["finish_reason"] == "length" {
        let joined: String = content
            .iter()
            .map(|t| t["token"].as_str().unwrap())
            .collect();
        assert_eq!(joined, choice["message"]["content"].as_str().unwrap());
    }

    // Completions logprobs: the legacy shape.
    let mut body = greedy_completion(prompt, 5);
    body["logprobs"] = json!(2);
    let v = post(addr, "/v1/completions", body).json();
    let lp = &v["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.concat(), " Paris.\n\nThe");
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 5);
    assert_eq!(lp["text_offset"], json!([0, 6, 7, 8, 9]));
    for (t, top) in tokens.iter().zip(lp["top_logprobs"].as_array().unwrap()) {
        let top = top.as_object().unwrap();
        assert!(top.len() <= 2 && top.contains_key(*t), "{top:?}");
    }

    // logit_bias: -100 on " Paris" changes the answer; +100 on " London" forces it.
    let id =
        |word: &str| post(addr, "/tokenize", json!({"content": word})).json()["tokens"][0].clone();
    let (paris, london) = (id(" Paris"), id(" London"));
    let mut body = greedy_completion(prompt, 2);
    body["logit_bias"] = json!({paris.to_string(): -100});
    let v = post(addr, "/v1/completions", body).json();
    assert!(
        !v["choices"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with(" Paris"),
        "{v}"
    );
    let mut body = greedy_completion(prompt, 2);
    body["logit_bias"] = json!({london.to_string(): 100});
    let v = post(addr, "/v1/completions", body).json();
    assert_eq!(v["choices"][0]["text"], " London London", "{v}");

    // Streams carry every choice, each with its own finish chunk, then one [DONE].
    let mut body = greedy_completion(prompt, 5);
    body["n"] = json!(2);
    body["stream"] = json!(true);
    body["logprobs"] = json!(1);
    let events = sse_events(&post(addr, "/v1/completions", body));
    for i in 0..2 {
        let mine: Vec<&Value> = events
            .iter()
            .filter(|e| e["choices"][0]["index"] == i)
            .collect();
        let text: String = mine
            .iter()
            .map(|e| e["choices"][0]["text"].as_str().unwrap())
            .collect();
        assert_eq!(text, " Paris.\n\nThe");
        assert_eq!(
            mine.iter()
                .filter(|e| e["choices"][0]["finish_reason"] == "length")
                .count(),
            1
        );
        let n_lp: usize = mine
            .iter()
            .filter_map(|e| e["choices"][0]["logprobs"]["tokens"].as_array())
            .map(Vec::len)
            .sum();
        assert_eq!(n_lp, 5);
    }

    // n beyond --parallel, and a bias on a token outside the vocabulary, are 400s.
    let mut body = greedy_completion(prompt, 2);
    body["n"] = json!(5);
    let r = post(addr, "/v1/completions", body);
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("n"))
    );
    let mut body = greedy_completion(prompt, 2);
    body["logit_bias"] = json!({"999999": 1});
    let r = post(addr, "/v1/completions", body);
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("logit_bias"))
    );
    let h = wait_for(addr, "the requests to end", |h| h["running"] == 0);
    assert_eq!(h["kv_pages_used"], h["kv_pages_cached"], "{h}");
    srv.shutdown().unwrap();
}

#[test]
fn a_request_for_more_choices_than_are_free_waits_its_turn() {
    let Some(srv) = server(2, 4, None) else {
        return;
    };
    let addr = srv.addr();
    // A stream holds one of the two places.
    let body =
        json!({"prompt": "Once upon a time", "max_tokens": 60, "temperature": 0, "stream": true})
            .to_string();
    let streaming =
        std::thread::spawn(move || read_reply(send(addr, "POST", "/v1/completions", &[], &body)));
    wait_for(addr, "the stream to run", |h| h["running"] == 1);
    // n = 2 needs both: it waits for the stream, then runs.
    let mut body = greedy_completion("The capital of France is", 5);
    body["n"] = json!(2);
    let r = post(addr, "/v1/completions", body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["choices"][0]["text"], " Paris.\n\nThe");
    assert_eq!(v["choices"][1]["text"], " Paris.\n\nThe");
    let events = sse_events(&streaming.join().unwrap());
    assert!(
        events.iter().all(|e| e.get("error").is_none()),
        "{events:?}"
    );
    srv.shutdown().unwrap();
}

#[test]
fn errors_are_openai_shaped_and_name_the_problem() {
    let Some(srv) = server(1, 4, Some(KEY)) else {
        return;
    };
    let addr = srv.addr();
    let auth = format!("Bearer {KEY}");
    let ok = [("Authorization", auth.as_str())];
    let call = |path: &str, body: &str| request(addr, "POST", path, &ok, body);
    let error = |r: &Reply, status: u16| -> Value {
        assert_eq!(r.status, status, "{}", r.text());
        let v = r.json();
        assert!(v["error"]["message"].is_string(), "{v}");
        assert!(v["error"]["type"].is_string(), "{v}");
        v["error"].clone()
    };

    // The API key: missing or wrong is a 401; /health needs none.
    let body = greedy_completion("Hi", 1).to_string();
    let e = error(&request(addr, "POST", "/v1/completions", &[], &body), 401);
    assert_eq!(e["code"], "invalid_api_key");
    error(
        &request(
            addr,
            "POST",
            "/v1/completions",
            &[("Authorization", "Bearer nope")],
            &body,
        ),
        401,
    );
    error(&request(addr, "GET", "/v1/models", &[], ""), 401);
    assert_eq!(request(addr, "GET", "/health", &[], "").status, 200);
    assert_eq!(call("/v1/completions", &body).status, 200);

    let e = error(&call("/v1/completions", "{\"prompt\": "), 400);
    assert_eq!(e["code"], "invalid_json");
    let e = error(
        &call(
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}"#,
        ),
        400,
    );
    assert_eq!(e["param"], "temperature");
    let e = error(
        &call("/v1/chat/completions", r#"{"messages": "hello"}"#),
        400,
    );
    assert_eq!(e["param"], "messages");
    let e = error(
        &call("/v1/completions", r#"{"prompt": "x", "top_p": 2}"#),
        400,
    );
    assert_eq!(e["param"], "top_p");
    // The context is 512 tokens.
    let e = error(
        &call(
            "/v1/completions",
            r#"{"prompt": "Hello", "max_tokens": 600}"#,
        ),
        400,
    );
    assert_eq!(e["code"], "context_length_exceeded");
    let long = "word ".repeat(600);
    let e = error(
        &call("/v1/completions", &json!({"prompt": long}).to_string()),
        400,
    );
    assert_eq!(e["code"], "context_length_exceeded");
    let e = error(&call("/v1/nothing", "{}"), 404);
    assert_eq!(e["code"], "not_found");
    // The server is still fine.
    assert_eq!(call("/v1/completions", &body).status, 200);
    let h = health(addr);
    assert_eq!(h["kv_pages_used"], h["kv_pages_cached"], "{h}");
    srv.shutdown().unwrap();
}

#[test]
fn a_full_queue_is_a_503_and_a_disconnect_frees_the_sequence() {
    let Some(srv) = server(1, 1, None) else {
        return;
    };
    let addr = srv.addr();
    // A long stream takes the only slot; read until its first token arrives.
    let body =
        json!({"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": true})
            .to_string();
    let mut a = send(addr, "POST", "/v1/completions", &[], &body);
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"text\"") {
        let n = a.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "stream ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    wait_for(addr, "the stream to run", |h| h["running"] == 1);
    // A second request waits in the queue; a third finds it full.
    let waiting =
        std::thread::spawn(move || post(addr, "/v1/completions", greedy_completion("Hi", 2)));
    wait_for(addr, "the second request to queue", |h| h["queued"] == 1);
    let r = post(addr, "/v1/completions", greedy_completion("Hi", 2));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "queue_full");

    // The first client goes away: its sequence is freed, the queued request runs.
    drop(a);
    let r = waiting.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let h = wait_for(addr, "everything to finish", |h| {
        h["running"] == 0 && h["queued"] == 0
    });
    // Only the finished request's sequence stays, in the prompt cache.
    assert_eq!(h["kv_pages_used"], h["kv_pages_cached"], "{h}");
    assert_eq!(h["prompt_cache_entries"], 1, "{h}");
    // The abandoned stream did not run to its 400 tokens.
    assert!(h["generated_tokens_total"].as_u64().unwrap() < 300, "{h}");
    srv.shutdown().unwrap();
}

/// Requests abandoned while they wait leave the queue at the next step: they must not fill it
/// and turn live clients away (seen under load on the H200: 503s with a tenth of streams dropped).
#[test]
fn clients_that_leave_while_queued_do_not_fill_the_queue() {
    let Some(srv) = server(1, 2, None) else {
        return;
    };
    let addr = srv.addr();
    let body =
        json!({"prompt": "Once upon a time", "max_tokens": 300, "temperature": 0, "stream": true})
            .to_string();
    let mut a = send(addr, "POST", "/v1/completions", &[], &body);
    let mut first = [0u8; 256];
    assert!(a.read(&mut first).unwrap() > 0);
    wait_for(addr, "the stream to run", |h| h["running"] == 1);
    // Five streams queue behind it and go away.
    for i in 0..5 {
        let mut b = send(addr, "POST", "/v1/completions", &[], &body);
        let mut head = [0u8; 64];
        assert!(
            b.read(&mut head).unwrap() > 0,
            "stream {i} answered nothing"
        );
        wait_for(addr, "the stream to queue", |h| h["queued"] == 1);
        drop(b);
        wait_for(addr, "the abandoned stream to leave the queue", |h| {
            h["queued"] == 0
        });
    }
    // The queue still holds two live requests.
    let live: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || post(addr, "/v1/completions", greedy_completion("Hi", 2)))
        })
        .collect();
    wait_for(addr, "two requests to queue", |h| h["queued"] == 2);
    drop(a);
    for t in live {
        let r = t.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    srv.shutdown().unwrap();
}

#[test]
fn shutdown_finishes_a_running_request() {
    let Some(srv) = server(1, 2, None) else {
        return;
    };
    let addr = srv.addr();
    let running = std::thread::spawn(move || {
        post(
            addr,
            "/v1/completions",
            greedy_completion("The capital of France is", 5),
        )
    });
    wait_for(addr, "the request to start", |h| {
        h["running"] == 1 || h["generated_tokens_total"].as_u64() > Some(0)
    });
    srv.shutdown().unwrap();
    let r = running.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["text"], " Paris.\n\nThe");
    // And nothing listens any more.
    assert!(TcpStream::connect(addr).is_err());
}

#[test]
fn cors_preflight_allows_listed_origins_only() {
    let Some(srv) = server_with(1, 4, None, |c| {
        c.cors_origins = vec!["http://allowed.example".into()];
    }) else {
        return;
    };
    let addr = srv.addr();
    let preflight = |origin: &str| {
        request(
            addr,
            "OPTIONS",
            "/v1/chat/completions",
            &[
                ("Origin", origin),
                ("Access-Control-Request-Method", "POST"),
                (
                    "Access-Control-Request-Headers",
                    "content-type, authorization",
                ),
            ],
            "",
        )
    };
    let ok = preflight("http://allowed.example");
    assert_eq!(ok.status, 200, "{}", ok.head);
    let head = ok.head.to_ascii_lowercase();
    assert!(
        head.contains("access-control-allow-origin: http://allowed.example"),
        "{head}"
    );
    assert!(
        head.contains("access-control-allow-methods:") && head.contains("post"),
        "{head}"
    );
    assert!(
        head.contains("access-control-allow-headers:") && head.contains("authorization"),
        "{head}"
    );
    // Another origin gets no permission (the browser then refuses the request).
    let refused = preflight("http://evil.example");
    assert!(
        !refused
            .head
            .to_ascii_lowercase()
            .contains("access-control-allow-origin"),
        "{}",
        refused.head
    );
    // A plain request from the allowed origin is answered with the header.
    let r = request(
        addr,
        "GET",
        "/health",
        &[("Origin", "http://allowed.example")],
        "",
    );
    assert!(
        r.head
            .to_ascii_lowercase()
            .contains("access-control-allow-origin: http://allowed.example")
    );
    srv.shutdown().unwrap();

    // Without --cors-origin: no CORS headers at all.
    let Some(srv) = server(1, 4, None) else {
        return;
    };
    let r = request(
        srv.addr(),
        "GET",
        "/health",
        &[("Origin", "http://allowed.example")],
        "",
    );
    assert!(
        !r.head.to_ascii_lowercase().contains("access-control"),
        "{}",
        r.head
    );
    srv.shutdown().unwrap();
}

#[test]
fn a_backend_error_fails_only_its_request() {
    // " France" (4649) makes any step that feeds it fail, as a backend error would.
    let Some(srv) = server_with(4, 8, None, |c| c.fail_on_token = Some(4649)) else {
        return;
    };
    let addr = srv.addr();
    let other = "Once upon a time, in a small village by the sea, there lived";
    let alone =
        post(addr, "/v1/completions", greedy_completion(other, 100)).json()["choices"][0]["text"]
            .clone();
    // A stream runs; the failing request joins its batch.
    let mut body = greedy_completion(other, 100);
    body["stream"] = json!(true);
    let body = body.to_string();
    let streaming = std::thread::spawn(move || {
        let mut s = send(addr, "POST", "/v1/completions", &[], &body);
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        raw
    });
    wait_for(addr, "the stream to run", |h| h["running"] == 1);
    let r = post(
        addr,
        "/v1/completions",
        greedy_completion("The capital of France is", 5),
    );
    assert_eq!(r.status, 500, "{}", r.text());
    let e = r.json();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("test hook"),
        "{e}"
    );
    assert_eq!(e["error"]["type"], "server_error");
    // The stream went on undisturbed.
    let raw = streaming.join().unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let reply = Reply {
        status: 200,
        head: String::from_utf8_lossy(&raw[..split]).into_owned(),
        body: dechunk(&raw[split + 4..]),
    };
    let events = sse_events(&reply);
    assert!(
        events.iter().all(|e| e.get("error").is_none()),
        "{events:?}"
    );
    let text: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(json!(text), alone);
    // And the server goes on.
    assert_eq!(
        post(addr, "/v1/completions", greedy_completion("Hello", 2)).status,
        200
    );
    let h = wait_for(addr, "the requests to end", |h| h["running"] == 0);
    assert_eq!(h["kv_pages_used"], h["kv_pages_cached"], "{h}");
    srv.shutdown().unwrap();
}

#[test]
fn shutdown_cancels_what_outlasts_the_grace_period() {
    // A 1 s grace: a 500-token stream cannot finish in it.
    let Some(srv) = server_with(1, 2, None, |c| c.grace = Duration::from_secs(1)) else {
        return;
    };
    let addr = srv.addr();
    let body =
        json!({"prompt": "Once upon a time", "max_tokens": 500, "temperature": 0, "stream": true})
            .to_string();
    let mut s = send(addr, "POST", "/v1/completions", &[], &body);
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&raw).contains("\"text\"") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early");
        raw.extend_from_slice(&buf[..n]);
    }
    let reader = std::thread::spawn(move || {
        s.read_to_end(&mut raw).unwrap();
        raw
    });
    let t = Instant::now();
    srv.shutdown().unwrap();
    // Not a speed check: a hang guard (the grace is 1 s).
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    let raw = reader.join().unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let reply = Reply {
        status: 200,
        head: String::from_utf8_lossy(&raw[..split]).into_owned(),
        body: dechunk(&raw[split + 4..]),
    };
    let events = sse_events(&reply);
    let last = events.last().unwrap();
    assert_eq!(last["error"]["code"], "shutting_down", "{last}");
    let n_text = events
        .iter()
        .filter(|e| e["choices"][0]["text"].is_string())
        .count();
    assert!(n_text < 500, "the stream ran to its end: {n_text} chunks");
    assert!(TcpStream::connect(addr).is_err());
}

/// A small deterministic generator for the load test's choices.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Reads a whole HTTP response from `s` (the server closes it: `Connection: close`).
fn read_reply(mut s: TcpStream) -> Reply {
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("no complete answer (a hang?): {e}"));
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Reply { status, head, body }
}

#[test]
fn load_mixed_streams_with_disconnects_lose_nothing_and_leak_no_pages() {
    let Some(srv) = server(8, 64, None) else {
        return;
    };
    let addr = srv.addr();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let words = [
        "alpha", "beta", "gamma", "delta", "river", "stone", "light", "cloud",
    ];
    let clients: Vec<(String, u64, bool)> = (0..32)
        .map(|_| {
            let n_words = 1 + rng.below(120) as usize;
            let prompt: Vec<&str> = (0..n_words).map(|_| words[rng.below(8) as usize]).collect();
            (prompt.join(" "), 4 + rng.below(28), rng.below(4) == 0)
        })
        .collect();
    let outcomes: Vec<Option<Vec<Value>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = clients
            .iter()
            .map(|(prompt, max_tokens, disconnect)| {
                scope.spawn(move || {
                    let body = json!({"prompt": prompt, "max_tokens": max_tokens,
                                      "temperature": 0.7, "seed": 1, "stream": true});
                    let mut s = send(addr, "POST", "/v1/completions", &[], &body.to_string());
                    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
                    if *disconnect {
                        // Wait for the first bytes (it runs or streams), then go away.
                        let mut buf = [0u8; 64];
                        let _ = s.read(&mut buf).unwrap();
                        return None;
                    }
                    Some(sse_events(&read_reply(s)))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut completed = 0;
    for (events, (_, max_tokens, disconnect)) in outcomes.iter().zip(&clients) {
        let Some(events) = events else {
            assert!(disconnect);
            continue;
        };
        completed += 1;
        assert!(
            events.iter().all(|e| e.get("error").is_none()),
            "{events:?}"
        );
        let last = events.last().unwrap();
        let reason = last["choices"][0]["finish_reason"].as_str().unwrap();
        assert!(["stop", "length"].contains(&reason), "{last}");
        assert!(events.len() as u64 <= max_tokens + 1, "{events:?}");
    }
    let expected = clients.iter().filter(|c| !c.2).count();
    assert_eq!(completed, expected, "a request was lost");
    // Every sequence is freed once nothing runs; the prompt cache's pages are what stays.
    let h = wait_for(addr, "the load to end", |h| {
        h["running"] == 0 && h["queued"] == 0
    });
    assert_eq!(h["kv_pages_used"], h["kv_pages_cached"], "{h}");
    let metrics = request(addr, "GET", "/metrics", &[], "").text();
    assert!(
        metrics.contains("m40llm_requests_total{status=\"200\"}"),
        "{metrics}"
    );
    srv.shutdown().unwrap();
}

#[test]
fn load_200_clients_get_answers_or_clean_503s() {
    let Some(srv) = server(8, 16, None) else {
        return;
    };
    let addr = srv.addr();
    let replies: Vec<Reply> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..200)
            .map(|i| {
                scope.spawn(move || {
                    let body = json!({"prompt": format!("Count from {i}:"), "max_tokens": 4,
                                      "temperature": 0, "stream": i % 2 == 0});
                    let s = send(addr, "POST", "/v1/completions", &[], &body.to_string());
                    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
                    read_reply(s)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (mut ok, mut busy) = (0, 0);
    for r in &replies {
        match r.status {
            200 => {
                ok += 1;
                if r.head.to_ascii_lowercase().contains("text/event-stream") {
                    let events = sse_events(r);
                    assert!(
                        events.iter().all(|e| e.get("error").is_none()),
                        "{events:?}"
                    );
                } else {
                    assert!(r.json()["choices"][0]["text"].is_string(), "{}", r.text());
                }
            }
            503 => {
                busy += 1;
                assert_eq!(r.json()["error"]["code"], "queue_full", "{}", r.text());
            }
            other => panic!("status {other}: {}", r.text()),
        }
    }
    assert_eq!(ok + busy, 200);
    // The queue's 16 places at least were served (the first 16 always find room).
    assert!(ok >= 16, "only {ok} answered");
    let h = wait_for(addr, "the load to end", |h| {
        h["running"] == 0 && h["queued"] == 0
    });
    assert_eq!(h["kv_pages_used"], h["kv_pages_cached"], "{h}");
    srv.shutdown().unwrap();
}

/// The official `openai` Python client against `m40-llm serve` (scripts/openai_client_test.py).
/// Needs python3 with `openai` (scripts/test.sh installs the pinned version); skipped without
/// it unless M40LLM_REQUIRE_TESTDATA=1.
#[test]
fn openai_python_client_works() {
    let Some(model) = common::default_model() else {
        return;
    };
    // scripts/test.sh installs the client into .cache/python.
    let pythonpath = match std::env::var_os("PYTHONPATH") {
        Some(p) => format!(".cache/python:{}", p.to_string_lossy()),
        None => ".cache/python".to_string(),
    };
    let has_openai = std::process::Command::new("python3")
        .env("PYTHONPATH", &pythonpath)
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_openai {
        let required = std::env::var("M40LLM_REQUIRE_TESTDATA").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "python3 with the openai package is missing (scripts/test.sh installs it)"
        );
        eprintln!("SKIPPED: python3 with the openai package is missing");
        return;
    }
    let out = std::process::Command::new("python3")
        .env("PYTHONPATH", &pythonpath)
        .arg("scripts/openai_client_test.py")
        .arg(common::bin())
        .arg(model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
