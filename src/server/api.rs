//! Request parsing and error bodies in OpenAI's shapes.
//!
//! Bodies are parsed by hand from JSON values so that a wrong type or an out-of-range value is a
//! 400 naming the field (`param`), and unknown fields are ignored as OpenAI does. `null` counts
//! as absent everywhere.

use crate::runtime::generate::FinishReason;
use crate::sample::SamplerConfig;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// An error answered as `{"error": {"message", "type", "param", "code"}}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<String>,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            code: Some("invalid_value"),
            param: Some(param.to_string()),
        }
    }

    /// A 400 not about one field.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            code: Some(code),
            param: None,
        }
    }

    pub fn unauthorized() -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "invalid or missing API key: send `Authorization: Bearer KEY`".into(),
            kind: "authentication_error",
            code: Some("invalid_api_key"),
            param: None,
        }
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            kind: "server_error",
            code: Some(code),
            param: None,
        }
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            code: None,
            param: None,
        }
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            kind: "invalid_request_error",
            code: Some("not_found"),
            param: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// A JSON object body's fields.
pub struct Fields<'a>(pub &'a Map<String, Value>);

/// Parses a body as a JSON object.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid JSON body: {e}")))?;
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(ApiError::bad_request(
            "invalid_json",
            "the body must be a JSON object",
        )),
    }
}

impl<'a> Fields<'a> {
    /// The field, `None` when absent or null.
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    pub fn f32_in(&self, name: &str, min: f32, max: f32) -> Result<Option<f32>, ApiError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        let x = v
            .as_f64()
            .ok_or_else(|| ApiError::invalid(name, format!("`{name}` must be a number")))?;
        let x = x as f32;
        if !x.is_finite() || x < min || x > max {
            return Err(ApiError::invalid(
                name,
                format!("`{name}` must be between {min} and {max}, got {v}"),
            ));
        }
        Ok(Some(x))
    }

    pub fn int_in(&self, name: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        let x = v
            .as_i64()
            .ok_or_else(|| ApiError::invalid(name, format!("`{name}` must be an integer")))?;
        if x < min || x > max {
            return Err(ApiError::invalid(
                name,
                format!("`{name}` must be between {min} and {max}, got {x}"),
            ));
        }
        Ok(Some(x))
    }

    pub fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(ApiError::invalid(
                name,
                format!("`{name}` must be a boolean"),
            )),
        }
    }

    pub fn str(&self, name: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::invalid(
                name,
                format!("`{name}` must be a string"),
            )),
        }
    }
}

/// The generation parameters every endpoint shares.
#[derive(Clone, Debug, PartialEq)]
pub struct GenParams {
    pub sampler: SamplerConfig,
    /// `max_completion_tokens`, else `max_tokens`; `None`: until the context is full.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// llama.cpp's `cache_prompt` (default true): reuse and keep the prompt's KV pages.
    pub cache_prompt: bool,
    /// Choices per request.
    pub n: usize,
    /// Log-probabilities with this many alternatives per token (chat's `logprobs: true` +
    /// `top_logprobs`, or completions' integer `logprobs`).
    pub logprobs: Option<usize>,
    /// Token id and the bias added to its logit (ids checked against the vocabulary later).
    pub logit_bias: Vec<(u32, f32)>,
}

/// The most `top_logprobs` (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: i64 = 20;
/// The most choices per request.
pub const MAX_N: i64 = 128;

/// Reads the sampling and length parameters (OpenAI's and llama.cpp's names); absent ones take
/// the CLI's defaults ([`SamplerConfig::default`]).
pub fn gen_params(f: &Fields<'_>) -> Result<GenParams, ApiError> {
    let _ = f.str("model")?;
    let mut s = SamplerConfig::default();
    if let Some(t) = f.f32_in("temperature", 0.0, 100.0)? {
        s.temperature = t;
    }
    if let Some(p) = f.f32_in("top_p", 0.0, 1.0)? {
        s.top_p = p;
    }
    if let Some(p) = f.f32_in("min_p", 0.0, 1.0)? {
        s.min_p = p;
    }
    if let Some(k) = f.int_in("top_k", 0, i64::from(u32::MAX))? {
        s.top_k = k as u32;
    }
    if let Some(p) = f.f32_in("presence_penalty", -2.0, 2.0)? {
        s.presence_penalty = p;
    }
    if let Some(p) = f.f32_in("frequency_penalty", -2.0, 2.0)? {
        s.frequency_penalty = p;
    }
    if let Some(p) = f.f32_in("repeat_penalty", f32::MIN_POSITIVE, 100.0)? {
        s.repeat_penalty = p;
    }
    if let Some(n) = f.int_in("repeat_last_n", -1, i64::from(i32::MAX))? {
        s.repeat_last_n = n as i32;
    }
    if let Some(v) = f.get("seed") {
        let seed = v
            .as_u64()
            .or_else(|| v.as_i64().map(|x| x as u64))
            .ok_or_else(|| ApiError::invalid("seed", "`seed` must be an integer"))?;
        s.seed = Some(seed);
    }
    s.validate()
        .map_err(|e| ApiError::bad_request("invalid_value", e.to_string()))?;
    let limit = i64::from(u32::MAX);
    let max_tokens = match f.int_in("max_completion_tokens", 1, limit)? {
        Some(n) => Some(n as usize),
        None => f.int_in("max_tokens", 1, limit)?.map(|n| n as usize),
    };
    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::String(s) if !s.is_empty() => out.push(s.clone()),
                    _ => {
                        return Err(ApiError::invalid(
                            "stop",
                            "`stop` must be a string or a list of non-empty strings",
                        ));
                    }
                }
            }
            out
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "`stop` must be a string or a list of strings",
            ));
        }
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "stop strings must not be empty"));
    }
    if stop.len() > 16 {
        return Err(ApiError::invalid("stop", "at most 16 stop strings"));
    }
    let stream = f.bool("stream")?.unwrap_or(false);
    let cache_prompt = f.bool("cache_prompt")?.unwrap_or(true);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => Fields(o).bool("include_usage")?.unwrap_or(false),
        Some(_) => {
            return Err(ApiError::invalid(
                "stream_options",
                "`stream_options` must be an object",
            ));
        }
    };
    let _ = f.str("user")?;
    let n = f.int_in("n", 1, MAX_N)?.unwrap_or(1) as usize;
    let top = f.int_in("top_logprobs", 0, MAX_TOP_LOGPROBS)?;
    let logprobs = match f.get("logprobs") {
        None | Some(Value::Bool(false)) => None,
        Some(Value::Bool(true)) => Some(top.unwrap_or(0) as usize),
        // The completions API's form: the number of alternatives.
        Some(Value::Number(_)) => f
            .int_in("logprobs", 0, MAX_TOP_LOGPROBS)?
            .map(|k| k as usize),
        Some(_) => {
            return Err(ApiError::invalid(
                "logprobs",
                "`logprobs` must be a boolean (or, for completions, an integer)",
            ));
        }
    };
    if top.is_some_and(|k| k > 0) && logprobs.is_none() {
        return Err(ApiError::invalid(
            "top_logprobs",
            "`top_logprobs` needs `logprobs: true`",
        ));
    }
    if f.bool("echo")?.unwrap_or(false) {
        return Err(ApiError::invalid("echo", "echo is not supported"));
    }
    let logit_bias = match f.get("logit_bias") {
        None => Vec::new(),
        Some(Value::Object(o)) => {
            let mut out = Vec::with_capacity(o.len());
            for (key, value) in o {
                let id = key.parse::<u32>().map_err(|_| {
                    ApiError::invalid(
                        "logit_bias",
                        format!("`logit_bias` keys must be token ids, got {key:?}"),
                    )
                })?;
                let bias = value
                    .as_f64()
                    .filter(|b| (-100.0..=100.0).contains(b))
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "logit_bias",
                            format!(
                                "`logit_bias` values must be numbers from -100 to 100, got {value}"
                            ),
                        )
                    })?;
                out.push((id, bias as f32));
            }
            out
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "logit_bias",
                "`logit_bias` must be an object of token ids to biases",
            ));
        }
    };
    Ok(GenParams {
        sampler: s,
        max_tokens,
        stop,
        stream,
        include_usage,
        cache_prompt,
        n,
        logprobs,
        logit_bias,
    })
}

/// A chat request's messages as the template sees them: role and text content (a string, or a
/// list of `{"type": "text", "text"}` parts, joined).
pub fn chat_messages(f: &Fields<'_>) -> Result<Vec<crate::tokenizer::chat::ChatMessage>, ApiError> {
    let Some(Value::Array(items)) = f.get("messages") else {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must be a non-empty list of messages",
        ));
    };
    if items.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must not be empty",
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::Object(m) = item else {
            return Err(ApiError::invalid(
                &format!("messages[{i}]"),
                "each message must be an object",
            ));
        };
        let m = Fields(m);
        let role = match m.get("role") {
            Some(Value::String(r)) => r.clone(),
            _ => {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    "`role` must be a string",
                ));
            }
        };
        let param = format!("messages[{i}].content");
        let content = match m.get("content") {
            None => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match part.get("text").and_then(Value::as_str) {
                        Some(t) if part.get("type").and_then(Value::as_str) == Some("text") => {
                            text.push_str(t);
                        }
                        _ => {
                            return Err(ApiError::invalid(
                                &param,
                                "only text content parts are supported",
                            ));
                        }
                    }
                }
                text
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    &param,
                    "`content` must be a string or a list of text parts",
                ));
            }
        };
        out.push(crate::tokenizer::chat::ChatMessage::new(role, content));
    }
    Ok(out)
}

/// A completion prompt: text, or token ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// `prompt`: a string, a list of one string, a list of token ids or a list of one such list.
pub fn prompt(f: &Fields<'_>, n_vocab: usize) -> Result<Prompt, ApiError> {
    let bad = || {
        ApiError::invalid(
            "prompt",
            "`prompt` must be a string, or a list of token ids (one prompt per request)",
        )
    };
    let ids = |items: &[Value]| -> Result<Vec<u32>, ApiError> {
        items
            .iter()
            .map(|v| {
                v.as_u64()
                    .filter(|&id| id < n_vocab as u64)
                    .map(|id| id as u32)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "prompt",
                            format!("token ids must be integers below {n_vocab}"),
                        )
                    })
            })
            .collect()
    };
    match f.get("prompt") {
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => Ok(Prompt::Text(s.clone())),
            [Value::Array(inner)] => Ok(Prompt::Ids(ids(inner)?)),
            list if !list.is_empty() && list.iter().all(Value::is_number) => {
                Ok(Prompt::Ids(ids(list)?))
            }
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

/// OpenAI's `finish_reason`.
pub fn finish_reason(f: &FinishReason) -> &'static str {
    match f {
        FinishReason::MaxTokens | FinishReason::ContextFull => "length",
        FinishReason::EndOfGeneration { .. }
        | FinishReason::StopString { .. }
        | FinishReason::Cancelled => "stop",
    }
}

/// The `usage` object (`cached_tokens`: prompt tokens the prompt cache gave).
pub fn usage(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(body: &str) -> Result<GenParams, ApiError> {
        let map = parse_object(body.as_bytes())?;
        gen_params(&Fields(&map))
    }

    #[test]
    fn wrong_types_and_ranges_name_the_field() {
        for (body, field) in [
            (r#"{"temperature": "hot"}"#, "temperature"),
            (r#"{"temperature": -1}"#, "temperature"),
            (r#"{"top_p": 1.5}"#, "top_p"),
            (r#"{"top_k": 1.5}"#, "top_k"),
            (r#"{"max_tokens": 0}"#, "max_tokens"),
            (r#"{"max_completion_tokens": "x"}"#, "max_completion_tokens"),
            (r#"{"stop": 3}"#, "stop"),
            (r#"{"stop": [""]}"#, "stop"),
            (r#"{"seed": 1.5}"#, "seed"),
            (r#"{"stream": "yes"}"#, "stream"),
            (r#"{"cache_prompt": 1}"#, "cache_prompt"),
            (r#"{"n": 0}"#, "n"),
            (r#"{"n": 1000}"#, "n"),
            (r#"{"logprobs": "yes"}"#, "logprobs"),
            (r#"{"logprobs": 30}"#, "logprobs"),
            (r#"{"logprobs": true, "top_logprobs": 21}"#, "top_logprobs"),
            (r#"{"top_logprobs": 2}"#, "top_logprobs"),
            (r#"{"logit_bias": {"x": 1}}"#, "logit_bias"),
            (r#"{"logit_bias": {"5": 101}}"#, "logit_bias"),
            (r#"{"logit_bias": [1]}"#, "logit_bias"),
            (r#"{"user": 5}"#, "user"),
            (r#"{"presence_penalty": 3}"#, "presence_penalty"),
            (r#"{"model": 7}"#, "model"),
        ] {
            let e = params(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param.as_deref(), Some(field), "{body}: {e:?}");
            assert!(e.message.contains(field), "{body}: {}", e.message);
        }
    }

    #[test]
    fn absent_null_and_unknown_fields_take_the_defaults() {
        let p = params(r#"{"temperature": null, "whatever": [1, 2], "user": "x"}"#).unwrap();
        assert_eq!(p.sampler, SamplerConfig::default());
        assert_eq!(p.max_tokens, None);
        assert!(!p.stream);
        assert!(p.cache_prompt);
        let p = params(
            r#"{"max_tokens": 5, "max_completion_tokens": 7, "stop": "x", "seed": 3,
                "stream": true, "stream_options": {"include_usage": true}, "temperature": 0}"#,
        )
        .unwrap();
        assert_eq!(p.max_tokens, Some(7));
        assert_eq!(p.stop, ["x"]);
        assert_eq!(p.sampler.seed, Some(3));
        assert!(p.stream && p.include_usage && p.sampler.is_greedy());
        let p = params(
            r#"{"n": 3, "logprobs": true, "top_logprobs": 2, "logit_bias": {"7": -100, "9": 2.5}, "user": "u"}"#,
        )
        .unwrap();
        assert_eq!((p.n, p.logprobs), (3, Some(2)));
        let mut bias = p.logit_bias;
        bias.sort_by_key(|b| b.0);
        assert_eq!(bias, [(7, -100.0), (9, 2.5)]);
        assert_eq!(params(r#"{"logprobs": 3}"#).unwrap().logprobs, Some(3));
        assert_eq!(params(r#"{"logprobs": false}"#).unwrap().logprobs, None);
    }

    #[test]
    fn bad_json_is_a_400() {
        assert_eq!(
            parse_object(b"{not json").unwrap_err().code,
            Some("invalid_json")
        );
        assert_eq!(parse_object(b"[1]").unwrap_err().code, Some("invalid_json"));
    }

    #[test]
    fn prompts_take_text_or_ids() {
        let p = |body: &str| prompt(&Fields(&parse_object(body.as_bytes()).unwrap()), 100);
        assert_eq!(p(r#"{"prompt": "hi"}"#).unwrap(), Prompt::Text("hi".into()));
        assert_eq!(
            p(r#"{"prompt": ["hi"]}"#).unwrap(),
            Prompt::Text("hi".into())
        );
        assert_eq!(p(r#"{"prompt": [1, 2]}"#).unwrap(), Prompt::Ids(vec![1, 2]));
        assert_eq!(p(r#"{"prompt": [[3]]}"#).unwrap(), Prompt::Ids(vec![3]));
        for bad in [r#"{}"#, r#"{"prompt": ["a", "b"]}"#, r#"{"prompt": [100]}"#] {
            assert_eq!(
                p(bad).unwrap_err().param.as_deref(),
                Some("prompt"),
                "{bad}"
            );
        }
    }

    #[test]
    fn messages_need_roles_and_text() {
        let m = |body: &str| chat_messages(&Fields(&parse_object(body.as_bytes()).unwrap()));
        let ok = m(r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}"#).unwrap();
        assert_eq!(ok[0].content, "ab");
        assert_eq!(
            m(r#"{"messages": [{"content": "x"}]}"#)
                .unwrap_err()
                .param
                .as_deref(),
            Some("messages[0].role")
        );
        assert_eq!(
            m(r#"{"messages": [{"role": "user", "content": 5}]}"#)
                .unwrap_err()
                .param
                .as_deref(),
            Some("messages[0].content")
        );
        assert!(m(r#"{"messages": []}"#).is_err());
    }
}
