//! Chat templates: `tokenizer.chat_template` (Jinja) rendered with minijinja the way Hugging
//! Face transformers renders it with jinja2.
//!
//! HF's settings are reproduced: `trim_blocks` and `lstrip_blocks`, loop controls
//! (`break`/`continue`), Python string and dict methods (`.strip()`, `.split()`, `.items()`...,
//! from minijinja-contrib's pycompat), a `tojson` filter that writes what Python's
//! `json.dumps(..., ensure_ascii=False)` writes, `raise_exception(message)` and
//! `strftime_now(format)`. The context is `messages`, `add_generation_prompt`, `bos_token` and
//! `eos_token`, plus any extra variables given.
//!
//! A template that does not parse, or fails while rendering (an unknown filter, a Jinja
//! extension minijinja lacks, `raise_exception`), is a [`ChatError`] that says where: the
//! output is never a guess.

use super::Tokenizer;
use minijinja::value::{Kwargs, Serde, Value};
use minijinja::{Environment, Error, ErrorKind, syntax::SyntaxConfig};
use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

/// One message of a conversation, as HF templates expect it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Why a chat template could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("the model has no chat template (tokenizer.chat_template)")]
    NoTemplate,
    #[error("the chat template does not parse: {0}")]
    Syntax(String),
    #[error("the chat template cannot be rendered: {0}")]
    Render(String),
    #[error("the template raised an exception: {0}")]
    Raised(String),
}

/// A compiled chat template with the special tokens it may print.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    date: Option<(i64, u32, u32)>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles a template; `bos_token`/`eos_token` are what the template sees under those names.
    pub fn new(
        source: &str,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<ChatTemplate, ChatError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(|e| ChatError::Syntax(describe(&e)))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| ChatError::Syntax(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            date: None,
        })
    }

    /// The template stored in the model, with the model's BOS and EOS texts.
    pub fn from_tokenizer(tok: &Tokenizer) -> Result<ChatTemplate, ChatError> {
        let source = tok.chat_template().ok_or(ChatError::NoTemplate)?;
        let text = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or("").to_string();
        ChatTemplate::new(source, text(tok.special().bos), text(tok.special().eos))
    }

    /// Fixes the date `strftime_now` sees (year, month 1-12, day 1-31), for reproducible output;
    /// by default it is today's date (UTC).
    pub fn with_date(mut self, year: i64, month: u32, day: u32) -> ChatTemplate {
        self.date = Some((year, month, day));
        self
    }

    /// Renders a conversation; `add_generation_prompt` appends the assistant turn's opening.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        self.render_with(messages, add_generation_prompt, minijinja::context! {})
    }

    /// Like [`Self::render`], with extra variables (`tools`, `documents`, template options...).
    /// Messages may carry more fields than role and content (tool calls, names).
    pub fn render_with<M: Serialize, E: Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
        extra: E,
    ) -> Result<String, ChatError> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| ChatError::Syntax(describe(&e)))?;
        let (now_secs, date) = match self.date {
            Some(d) => (None, d),
            None => {
                let secs = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0);
                (Some(secs), civil_from_days(secs.div_euclid(86_400)))
            }
        };
        let seconds_of_day = now_secs.map(|s| s.rem_euclid(86_400)).unwrap_or(0);
        let strftime_now =
            Value::from_function(move |format: String| strftime(&format, date, seconds_of_day));
        // Values keep the order their serializer gives (a struct's field order; a serde_json
        // map's order, which is sorted unless serde_json's preserve_order is on).
        let ctx = minijinja::context! {
            messages => Value::from(Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
            strftime_now => strftime_now,
            ..Value::from(Serde(extra))
        };
        tmpl.render(ctx).map_err(|e| {
            if let Some(msg) = raised_message(&e) {
                ChatError::Raised(msg)
            } else {
                ChatError::Render(describe(&e))
            }
        })
    }
}

/// Marker at the start of errors from `raise_exception`.
const RAISED: &str = "raise_exception: ";

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED}{message}"),
    ))
}

fn raised_message(e: &Error) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(me) = err.downcast_ref::<Error>()
            && let Some(d) = me.detail()
            && let Some(msg) = d.strip_prefix(RAISED)
        {
            return Some(msg.to_string());
        }
        cur = err.source();
    }
    None
}

/// An error with its template location and causes, on one line.
fn describe(e: &Error) -> String {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// `tojson` as HF defines it: `json.dumps(value, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`. Without `indent` items are separated by
/// `", "` and keys by `": "`, as in Python.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => {
            if let Some(s) = v.as_str() {
                Some(s.to_string())
            } else {
                let n = i64::try_from(v.clone()).map_err(|_| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: indent must be an integer or string",
                    )
                })?;
                Some(" ".repeat(n.max(0) as usize))
            }
        }
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let a: Vec<Value> = v.try_iter()?.collect();
            match (
                a.first().and_then(Value::as_str),
                a.get(1).and_then(Value::as_str),
            ) {
                (Some(i), Some(k)) if a.len() == 2 => (i.to_string(), k.to_string()),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ));
                }
            }
        }
        _ => (
            if indent.is_some() { "," } else { ", " }.to_string(),
            ": ".to_string(),
        ),
    };
    let mut out = String::new();
    let f = Fmt {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    write_json(&value, &mut out, &f, 0)?;
    Ok(Value::from_safe_string(out))
}

struct Fmt {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

/// Writes a value as Python's `json.dumps` would, keeping the order of map keys.
fn write_json(v: &Value, out: &mut String, f: &Fmt, depth: usize) -> Result<(), Error> {
    use minijinja::value::ValueKind as K;
    let newline = |out: &mut String, depth: usize| {
        if let Some(ind) = &f.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    };
    let quote = |out: &mut String, s: &str| {
        let q = serde_json::to_string(s).unwrap_or_default();
        if f.ensure_ascii {
            // Python escapes every non-ASCII character, as UTF-16 code units.
            for c in q.chars() {
                if c.is_ascii() {
                    out.push(c);
                } else {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{u:04x}"));
                    }
                }
            }
        } else {
            out.push_str(&q);
        }
    };
    match v.kind() {
        K::Undefined | K::None => out.push_str("null"),
        K::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        K::Number if v.is_integer() => out.push_str(&v.to_string()),
        K::Number => {
            let x = f64::try_from(v.clone())?;
            out.push_str(&python_float(x));
        }
        K::String => quote(out, v.as_str().unwrap_or_default()),
        K::Seq | K::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&f.item_sep);
                }
                newline(out, depth + 1);
                write_json(x, out, f, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        K::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if f.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&f.item_sep);
                }
                newline(out, depth + 1);
                quote(out, &k.to_string());
                out.push_str(&f.key_sep);
                write_json(&v.get_item(k)?, out, f, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        other => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialize a value of kind {other}"),
            ));
        }
    }
    Ok(())
}

/// A float as Python's `repr` writes it: `2.0`, `0.1`, `1e+20`, `1e-05`.
fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let a = x.abs();
    if a == 0.0 || (1e-4..1e16).contains(&a) {
        let s = format!("{x}");
        return if s.contains('.') { s } else { format!("{s}.0") };
    }
    // Exponent form: Rust's "1.5e300" becomes "1.5e+300"; at least two exponent digits.
    let s = format!("{x:e}");
    let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
    let (sign, digits) = match exp.strip_prefix('-') {
        Some(d) => ('-', d),
        None => ('+', exp),
    };
    format!("{mantissa}e{sign}{digits:0>2}")
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Days since 1970-01-01 of a civil date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 } as i64;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// C `strftime` for the conversions chat templates use; anything else is an error.
fn strftime(format: &str, (y, m, d): (i64, u32, u32), secs: i64) -> Result<String, Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "strftime_now: invalid date",
        ));
    }
    let days = days_from_civil(y, m, d);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let (hh, mm, ss) = (secs / 3600, secs / 60 % 60, secs % 60);
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(spec) = chars.next() else {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "strftime_now: format ends with %",
            ));
        };
        match spec {
            'd' => out.push_str(&format!("{d:02}")),
            'e' => out.push_str(&format!("{d:>2}")),
            'm' => out.push_str(&format!("{m:02}")),
            'Y' => out.push_str(&y.to_string()),
            'y' => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            'B' => out.push_str(month),
            'b' | 'h' => out.push_str(&month[..3]),
            'A' => out.push_str(DAYS[weekday]),
            'a' => out.push_str(&DAYS[weekday][..3]),
            'j' => out.push_str(&format!("{yday:03}")),
            'H' => out.push_str(&format!("{hh:02}")),
            'I' => out.push_str(&format!("{:02}", if hh % 12 == 0 { 12 } else { hh % 12 })),
            'p' => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            'M' => out.push_str(&format!("{mm:02}")),
            'S' => out.push_str(&format!("{ss:02}")),
            'F' => out.push_str(&format!("{y}-{m:02}-{d:02}")),
            '%' => out.push('%'),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported conversion %{other}"),
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
        ]
    }

    #[test]
    fn renders_with_hf_whitespace_rules() {
        let t = ChatTemplate::new(
            "{% for m in messages %}\n  {{ m.role }}: {{ m.content.strip() }}\n{% endfor %}\n{% if add_generation_prompt %}assistant:{% endif %}",
            "<s>",
            "</s>",
        )
        .unwrap();
        // As jinja2 renders it: lstrip_blocks strips before block tags only.
        assert_eq!(
            t.render(&conv(), true).unwrap(),
            "  system: Be brief.\n  user: Hi\nassistant:"
        );
    }

    #[test]
    fn errors_are_clear() {
        let e = ChatTemplate::new("{% for m in messages %}", "", "").unwrap_err();
        assert!(matches!(e, ChatError::Syntax(_)), "{e}");
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
        let e = t.render(&conv(), false).unwrap_err();
        assert!(
            matches!(&e, ChatError::Raised(m) if m == "roles must alternate"),
            "{e}"
        );
        let t = ChatTemplate::new("{{ messages | no_such_filter }}", "", "").unwrap();
        let e = t.render(&conv(), false).unwrap_err();
        assert!(e.to_string().contains("no_such_filter"), "{e}");
        let t = ChatTemplate::new("{% generation %}x{% endgeneration %}", "", "");
        assert!(t.is_err());
    }

    #[test]
    fn tojson_writes_what_python_writes() {
        let t = ChatTemplate::new(
            "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ 'é<' | tojson }}|{{ messages | tojson }}|{{ 'é🙂' | tojson(ensure_ascii=true) }}",
            "",
            "",
        )
        .unwrap();
        #[derive(Serialize)]
        struct X {
            b: Vec<f64>,
            a: Option<u8>,
        }
        let x = X {
            b: vec![1.5, 2.0, 1e20, 1e-5],
            a: None,
        };
        let out = t
            .render_with(
                &conv(),
                false,
                minijinja::context! { x => Value::from(Serde(x)) },
            )
            .unwrap();
        assert_eq!(
            out,
            concat!(
                "{\"b\": [1.5, 2.0, 1e+20, 1e-05], \"a\": null}|",
                "{\n  \"b\": [\n    1.5,\n    2.0,\n    1e+20,\n    1e-05\n  ],\n  \"a\": null\n}|",
                "\"é<\"|",
                "[{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": \"Hi\"}]|",
                "\"\\u00e9\\ud83d\\ude42\""
            )
        );
    }

    #[test]
    fn strftime_now_formats_the_date() {
        let t = ChatTemplate::new("{{ strftime_now('%d %b %Y, %A %B %j') }}", "", "")
            .unwrap()
            .with_date(2024, 7, 26);
        assert_eq!(
            t.render(&conv(), false).unwrap(),
            "26 Jul 2024, Friday July 208"
        );
        let t = ChatTemplate::new("{{ strftime_now('%Q') }}", "", "").unwrap();
        assert!(t.render(&conv(), false).is_err());
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
    }
}
