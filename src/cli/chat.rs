//! `m40-llm chat`: an interactive, multi-turn chat in the terminal with the model's chat
//! template. The conversation stays in one kept sequence: each turn renders the whole
//! conversation, keeps the KV pages of the tokens it shares with what the sequence holds (the
//! previous turns) and prefills only the rest. `/exit` (or end of input) quits, `/clear` starts
//! over, Ctrl-C stops the answer being written (not the program).
//!
//! When stdin is not a terminal (piped), no prompt is printed: each line is a user message and
//! each answer is printed followed by a newline (for scripts and tests).

use super::io::note;
use super::model_or_default;
use super::run::SamplingArgs;
use anyhow::Context;
use m40_llm::backend::StepOutputs;
use m40_llm::runtime::engine::{Engine, Sequence};
use m40_llm::runtime::generate::{Continuation, FinishReason, GenerateOptions, output_kind};
use m40_llm::runtime::model::load;
use m40_llm::runtime::prompt::encode_prompt;
use m40_llm::tokenizer::Tokenizer;
use m40_llm::tokenizer::chat::{ChatMessage, ChatTemplate};
use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(clap::Args)]
#[command(allow_negative_numbers = true)]
pub struct Args {
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// A system message opening the conversation (kept by /clear).
    #[arg(long)]
    pub system: Option<String>,
    /// The most tokens of one answer.
    #[arg(short = 'n', long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Stop an answer at this string (repeatable).
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Set by SIGINT: stop the answer being written.
static STOP: AtomicBool = AtomicBool::new(false);

#[cfg(unix)]
extern "C" fn on_sigint(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn catch_sigint() {
    #[cfg(unix)]
    {
        let handler = on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            libc::signal(libc::SIGINT, handler);
        }
    }
}

/// One answer: how it went.
struct Turn {
    text: String,
    finish: FinishReason,
    prompt_tokens: usize,
    cached: usize,
    generated: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let sampler = args.sampling.config();
    sampler.validate()?;
    let path = model_or_default(args.model.model.clone())?;
    let mut model = load(&path, &args.model.load_options(1))?;
    let template = ChatTemplate::from_tokenizer(&model.tokenizer)?;
    let device = model.engine.device().clone();
    let interactive = std::io::stdin().is_terminal();
    note!(
        "m40-llm: chatting with {} on {device}{}",
        path.display(),
        if interactive {
            " (/exit quits, /clear starts over, Ctrl-C stops an answer)"
        } else {
            ""
        }
    );
    catch_sigint();
    let options = GenerateOptions {
        max_new_tokens: args.max_tokens,
        sampler,
        stop_strings: args.stop.clone(),
        stop_at_eog: true,
        render_special: false,
    };
    let opening: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s.as_str()))
        .collect();
    let mut messages = opening.clone();
    let mut seq = model.engine.new_sequence();
    let mut stdout = std::io::stdout().lock();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut turn = 0;
    loop {
        if interactive {
            write!(stdout, "> ")
                .and_then(|()| stdout.flush())
                .context("cannot write to stdout")?;
        }
        let Some(line) = lines.next() else {
            break;
        };
        let line = line.context("cannot read stdin")?;
        let input = line.trim();
        match input {
            "" => continue,
            "/exit" | "/quit" => break,
            "/clear" => {
                messages = opening.clone();
                model.engine.clear(&mut seq);
                note!("m40-llm: conversation cleared");
                continue;
            }
            _ => {}
        }
        messages.push(ChatMessage::new("user", input));
        let text = template.render(&messages, true)?;
        let ids = encode_prompt(&model.tokenizer, &text);
        if ids.len() >= model.engine.n_ctx() {
            messages.pop();
            note!(
                "error: the conversation ({} tokens) no longer fits the context of {}: /clear starts over",
                ids.len(),
                model.engine.n_ctx()
            );
            continue;
        }
        STOP.store(false, Ordering::SeqCst);
        let t = answer(
            &mut model.engine,
            &model.tokenizer,
            &mut seq,
            &ids,
            &options,
            &mut stdout,
        )?;
        writeln!(stdout)
            .and_then(|()| stdout.flush())
            .context("cannot write to stdout")?;
        turn += 1;
        let finish = match &t.finish {
            FinishReason::Cancelled => "interrupted",
            FinishReason::MaxTokens => "token limit",
            FinishReason::ContextFull => "context full",
            FinishReason::EndOfGeneration { .. } => "end of answer",
            FinishReason::StopString { .. } => "stop string",
        };
        note!(
            "m40-llm: turn {turn}: prompt {} tokens ({} cached), answer {} tokens, {finish}",
            t.prompt_tokens,
            t.cached,
            t.generated
        );
        messages.push(ChatMessage::new("assistant", t.text));
    }
    model.engine.release(seq);
    Ok(())
}

/// Answers the conversation `ids` in `seq`, reusing the tokens it already holds, streaming the
/// text to `out`; SIGINT stops it.
fn answer(
    engine: &mut Engine,
    tokenizer: &Tokenizer,
    seq: &mut Sequence,
    ids: &[u32],
    options: &GenerateOptions,
    out: &mut impl Write,
) -> anyhow::Result<Turn> {
    let keep = seq
        .tokens()
        .iter()
        .zip(ids)
        .take_while(|(a, b)| a == b)
        .count()
        .min(ids.len().saturating_sub(1));
    engine.truncate(seq, keep)?;
    let kind = output_kind(&options.sampler, engine.n_vocab());
    let mut cont = Continuation::new(tokenizer, options, kind)?;
    let mut rows = StepOutputs::new();
    let rest = ids.get(keep..).unwrap_or_default();
    engine.prefill_into(seq, rest, kind, &mut rows)?;
    let n_vocab = engine.n_vocab();
    let mut write_error = None;
    let finish = loop {
        let row = rows
            .row(0)
            .context("the step returned no output row to sample from")?;
        let room = seq.len() < engine.n_ctx();
        let mut on_text = |piece: &str| {
            if let Err(e) = out.write_all(piece.as_bytes()).and_then(|()| out.flush()) {
                write_error = Some(e);
                return ControlFlow::Break(());
            }
            if STOP.load(Ordering::SeqCst) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        if let Some(finish) = cont.accept(row, seq.tokens(), n_vocab, room, &mut on_text)? {
            break finish;
        }
        if STOP.load(Ordering::SeqCst) {
            break FinishReason::Cancelled;
        }
        let token = cont.last_token().context("the sampler returned no token")?;
        engine.decode_into(seq, token, kind, &mut rows)?;
    };
    if let Some(e) = write_error {
        return Err(e).context("cannot write to stdout");
    }
    Ok(Turn {
        text: cont.text().to_string(),
        finish,
        prompt_tokens: ids.len(),
        cached: keep,
        generated: cont.tokens().len(),
    })
}
