//! `m40-llm tokenize`: a model's token ids for a text, as llama.cpp would produce them.

use super::io::outln;
use anyhow::{Context, Result, bail};
use m40_llm::gguf::GgufFile;
use m40_llm::tokenizer::Tokenizer;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The GGUF file: a model or a vocabulary-only file (default: the default model, fetched
    /// if missing).
    #[arg(long, value_name = "GGUF", value_parser = super::io::non_empty_path)]
    pub model: Option<PathBuf>,
    /// The text to tokenize.
    #[arg(
        long,
        value_name = "TEXT",
        required_unless_present = "file",
        conflicts_with = "file"
    )]
    pub text: Option<String>,
    /// Read the text from a file (UTF-8, at most --max-input-bytes; `-` reads standard input).
    #[arg(long, value_name = "FILE", value_parser = super::io::non_empty_path)]
    pub file: Option<PathBuf>,
    /// Parse special tokens written in the text (`<|im_start|>` becomes that token).
    #[arg(long)]
    pub special: bool,
    /// Add the tokens a prompt starts (and, where the model asks, ends) with: BOS, even where
    /// the vocabulary does not add it by itself.
    #[arg(long)]
    pub add_bos: bool,
    /// Print JSON with each token's id and piece instead of the ids on one line.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let text = match (&args.text, &args.file) {
        (Some(t), _) => t.clone(),
        (None, Some(path)) => super::io::read_text(path, "--file")?,
        (None, None) => bail!("give the text with --text TEXT or --file FILE"),
    };
    let path = super::model_or_default(args.model)?;
    let file = GgufFile::open(&path)?;
    let tok = Tokenizer::from_gguf(&file)
        .with_context(|| format!("cannot build the tokenizer of {}", path.display()))?;

    let mut ids = tok.encode(&text, args.add_bos, args.special);
    if args.add_bos && !tok.add_bos() {
        let bos = tok.special().bos.with_context(|| {
            format!(
                "--add-bos: the vocabulary of {} has no BOS token",
                path.display()
            )
        })?;
        ids.insert(0, bos);
    }

    if args.json {
        let tokens: Vec<serde_json::Value> = ids
            .iter()
            .map(|&id| {
                let piece = tok.token_piece(id).unwrap_or_default();
                let mut t = serde_json::json!({
                    "id": id,
                    "piece": String::from_utf8_lossy(piece),
                    "special": tok.is_special(id),
                });
                // A piece that is part of a character: its bytes, exactly.
                if std::str::from_utf8(piece).is_err() {
                    t["piece_hex"] = piece
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>()
                        .into();
                }
                t
            })
            .collect();
        let out = serde_json::json!({
            "model": path.display().to_string(),
            "n_tokens": ids.len(),
            "ids": ids,
            "tokens": tokens,
        });
        outln!("{}", serde_json::to_string_pretty(&out)?)?;
    } else {
        let line: Vec<String> = ids.iter().map(u32::to_string).collect();
        outln!("{}", line.join(" "))?;
    }
    Ok(())
}
