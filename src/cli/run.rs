//! `m40-llm run`: generate text from a prompt, streaming it to stdout.

use super::io::note;
use super::model_or_default;
use anyhow::Context;
use m40_llm::runtime::generate::{FinishReason, GenerateOptions, generate};
use m40_llm::runtime::model::load;
use m40_llm::runtime::prompt::{chat_prompt, encode_prompt};
use m40_llm::runtime::stop::StopMatcher;
use m40_llm::sample::SamplerConfig;
use std::io::Write;
use std::ops::ControlFlow;

#[derive(clap::Args)]
#[command(allow_negative_numbers = true)]
pub struct Args {
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// The prompt, used verbatim (special tokens such as <|im_start|> in it are parsed) unless
    /// --chat wraps it in the model's chat template. `-` reads it from stdin (at most
    /// --max-input-bytes).
    #[arg(short, long)]
    pub prompt: String,
    /// Apply the model's chat template: the prompt becomes the user's message.
    #[arg(long)]
    pub chat: bool,
    /// A system message (with --chat).
    #[arg(long)]
    pub system: Option<String>,
    /// The most tokens to generate.
    #[arg(short = 'n', long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Stop when the text contains this string (repeatable); the string is not printed. Stop
    /// strings match the text of every token, special tokens (`<|im_start|>`) included, with
    /// or without --show-special.
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print special tokens (such as <|im_end|>) in the text.
    #[arg(long)]
    pub show_special: bool,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

/// Sampling flags, as llama.cpp names them.
#[derive(clap::Args)]
pub struct SamplingArgs {
    /// Temperature; 0 is greedy (always the most likely token).
    #[arg(long, default_value_t = SamplerConfig::default().temperature, allow_hyphen_values = true)]
    pub temperature: f32,
    /// Keep the K most likely tokens (0: all).
    #[arg(long, default_value_t = SamplerConfig::default().top_k)]
    pub top_k: u32,
    /// Keep the most likely tokens whose probabilities add up to P (1: all).
    #[arg(long, default_value_t = SamplerConfig::default().top_p, allow_hyphen_values = true)]
    pub top_p: f32,
    /// Drop tokens less likely than P times the most likely one (0: none).
    #[arg(long, default_value_t = SamplerConfig::default().min_p, allow_hyphen_values = true)]
    pub min_p: f32,
    /// Penalize tokens seen in the last --repeat-last-n tokens (1: off).
    #[arg(long, default_value_t = SamplerConfig::default().repeat_penalty, allow_hyphen_values = true)]
    pub repeat_penalty: f32,
    /// Tokens the penalties look back over (0: off, -1: the whole context).
    #[arg(long, default_value_t = SamplerConfig::default().repeat_last_n, allow_hyphen_values = true)]
    pub repeat_last_n: i32,
    /// Subtract this times a token's count from its logit (0: off).
    #[arg(long, default_value_t = SamplerConfig::default().frequency_penalty, allow_hyphen_values = true)]
    pub frequency_penalty: f32,
    /// Subtract this from the logit of every token seen (0: off).
    #[arg(long, default_value_t = SamplerConfig::default().presence_penalty, allow_hyphen_values = true)]
    pub presence_penalty: f32,
    /// Random seed (default: from the OS; the summary prints it so a run can be repeated).
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    pub fn config(&self) -> SamplerConfig {
        SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            seed: self.seed,
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let sampler = args.sampling.config();
    sampler.validate()?;
    // Refuse bad stop strings before loading anything.
    StopMatcher::new(args.stop.iter().cloned())?;
    if args.system.is_some() && !args.chat {
        anyhow::bail!("--system needs --chat (the system message goes into the chat template)");
    }
    let prompt = if args.prompt == "-" {
        super::io::read_text(std::path::Path::new("-"), "--prompt")?
    } else {
        args.prompt.clone()
    };
    let path = model_or_default(args.model.model.clone())?;
    let mut model = load(&path, &args.model.load_options(1))?;
    let text = if args.chat {
        chat_prompt(&model.tokenizer, args.system.as_deref(), &prompt)?
    } else {
        prompt
    };
    let ids = encode_prompt(&model.tokenizer, &text);
    let device = model.engine.device().clone();
    note!("m40-llm: {} on {device}", path.display());

    let options = GenerateOptions {
        max_new_tokens: args.max_tokens,
        sampler,
        stop_strings: args.stop.clone(),
        stop_at_eog: true,
        render_special: args.show_special,
    };
    let mut stdout = std::io::stdout().lock();
    let json = args.json;
    let mut write_error = None;
    let generation = generate(
        &mut model.engine,
        &model.tokenizer,
        &ids,
        &options,
        &mut |piece| {
            if json {
                return ControlFlow::Continue(());
            }
            match stdout
                .write_all(piece.as_bytes())
                .and_then(|_| stdout.flush())
            {
                Ok(()) => ControlFlow::Continue(()),
                // A closed pipe (`| head`): stop generating, report it below.
                Err(e) => {
                    write_error = Some(e);
                    ControlFlow::Break(())
                }
            }
        },
    )?;
    if let Some(e) = write_error {
        return Err(e).context("cannot write to stdout");
    }
    let t = &generation.timings;
    if json {
        let out = serde_json::json!({
            "prompt_tokens": generation.prompt_tokens,
            "tokens": generation.tokens,
            "text": generation.text,
            "finish": generation.finish,
            "seed": generation.seed,
            "device": device,
            "timings": {
                "prompt_tokens": t.prompt_tokens,
                "prefill_s": t.prefill_s,
                "prefill_tokens_per_s": t.prefill_tokens_per_s(),
                "decode_steps": t.decode_steps,
                "decode_s": t.decode_s,
                "decode_tokens_per_s": t.decode_tokens_per_s(),
                "sample_s": t.sample_s,
            },
        });
        writeln!(stdout, "{out}").context("cannot write to stdout")?;
    } else {
        writeln!(stdout).context("cannot write to stdout")?;
    }
    let finish = match &generation.finish {
        FinishReason::EndOfGeneration { token } => format!("end of generation (token {token})"),
        FinishReason::StopString { stop } => format!("stop string {stop:?}"),
        FinishReason::MaxTokens => "token limit".into(),
        FinishReason::ContextFull => "context full".into(),
        FinishReason::Cancelled => "output closed".into(),
    };
    note!(
        "m40-llm: device {} | prompt {} tokens, {:.1} tokens/s | generated {} tokens, {:.1} tokens/s | stop: {finish} | seed {}",
        device.kind,
        t.prompt_tokens,
        t.prefill_tokens_per_s(),
        generation.tokens.len(),
        t.decode_tokens_per_s(),
        generation.seed
    );
    Ok(())
}
