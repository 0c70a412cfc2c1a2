//! `m40-llm logits`: the top logits after a prompt, as JSON lines, for comparing runtimes.

use super::model_or_default;
use anyhow::{Context, bail};
use m40_llm::runtime::model::load;
use m40_llm::runtime::prompt::encode_prompt;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "ids"])))]
pub struct Args {
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// The prompt, tokenized as `run` does (special tokens parsed, BOS as the model asks).
    #[arg(short, long)]
    pub prompt: Option<String>,
    /// Token ids instead of a prompt, space-separated ("1 2 3").
    #[arg(long)]
    pub ids: Option<String>,
    /// How many of the largest logits to print per position.
    #[arg(long, default_value_t = 20)]
    pub top_k: usize,
    /// Print every position, not only the last.
    #[arg(long)]
    pub all_positions: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let path = model_or_default(args.model.model.clone())?;
    let mut options = args.model.load_options(1);
    if args.all_positions {
        options.max_outputs = options.max_tokens;
    }
    let mut model = load(&path, &options)?;
    let ids: Vec<u32> = match (&args.prompt, &args.ids) {
        (Some(p), _) => encode_prompt(&model.tokenizer, p),
        (None, Some(ids)) => parse_ids(ids, model.tokenizer.n_vocab())?,
        (None, None) => bail!("give --prompt or --ids"),
    };
    if ids.is_empty() {
        bail!("no tokens: the prompt is empty");
    }
    eprintln!("m40-llm: {} on {}", path.display(), model.engine.device());
    let engine = &mut model.engine;
    let mut seq = engine.new_sequence();
    let (first, rows) = if args.all_positions {
        let logits = engine.logits_all(&mut seq, &ids)?;
        (0, logits)
    } else {
        let data = engine.prefill(&mut seq, &ids)?;
        let n_vocab = data.len();
        (ids.len() - 1, m40_llm::backend::Logits { n_vocab, data })
    };
    let mut out = std::io::stdout().lock();
    for r in 0..rows.rows() {
        let line = serde_json::json!({
            "position": first + r,
            "top": top_k(rows.row(r), args.top_k),
        });
        use std::io::Write;
        writeln!(out, "{line}").context("cannot write to stdout")?;
    }
    Ok(())
}

/// The `k` largest logits as `(id, logit)`, largest first, ties broken by the lower id.
pub fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let cmp = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(order.len());
    if k == 0 {
        return Vec::new();
    }
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, cmp);
        order.truncate(k);
    }
    order.sort_by(cmp);
    order.into_iter().map(|i| (i, logits[i as usize])).collect()
}

fn parse_ids(s: &str, n_vocab: usize) -> anyhow::Result<Vec<u32>> {
    s.split(|c: char| c.is_whitespace() || c == ',')
        .filter(|t| !t.is_empty())
        .map(|t| {
            let id: u32 = t
                .parse()
                .with_context(|| format!("--ids: {t:?} is not a token id"))?;
            if id as usize >= n_vocab {
                bail!("--ids: token {id} is outside the vocabulary of {n_vocab} tokens");
            }
            Ok(id)
        })
        .collect()
}
