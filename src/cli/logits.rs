//! `m40-llm logits`: the top logits after a prompt, as JSON lines, for comparing runtimes.

use super::io::{note, outln};
use super::model_or_default;
use anyhow::{Context, bail};
use m40_llm::runtime::model::load;
use m40_llm::runtime::prompt::encode_prompt;

/// Rows `--all-positions` computes (and holds) at a time: each is printed before the next
/// block is computed, so memory stays at this many rows of logits whatever the prompt's length.
const ROWS_PER_BLOCK: usize = 64;

#[derive(clap::Args)]
#[command(allow_negative_numbers = true)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "ids"])))]
pub struct Args {
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// The prompt, tokenized as `run` does (special tokens parsed, BOS as the model asks).
    #[arg(short, long)]
    pub prompt: Option<String>,
    /// Token ids instead of a prompt, space-separated ("1 2 3").
    #[arg(long, allow_hyphen_values = true)]
    pub ids: Option<String>,
    /// How many of the largest logits to print per position (0: all, as `run --top-k 0`).
    #[arg(long, default_value_t = 20)]
    pub top_k: usize,
    /// Print every position, not only the last (each row is printed as soon as it is computed).
    #[arg(long)]
    pub all_positions: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let path = model_or_default(args.model.model.clone())?;
    let mut options = args.model.load_options(1);
    if args.all_positions {
        options.max_outputs = options.max_tokens.min(ROWS_PER_BLOCK as u64);
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
    let n_ctx = model.engine.n_ctx();
    if ids.len() > n_ctx {
        bail!(
            "the prompt has {} tokens, more than the context of {n_ctx} tokens (use a shorter prompt or a larger --ctx-size)",
            ids.len()
        );
    }
    note!("m40-llm: {} on {}", path.display(), model.engine.device());
    let engine = &mut model.engine;
    let mut seq = engine.new_sequence();
    let print = |position: usize, row: &[f32]| {
        let line = serde_json::json!({
            "position": position,
            "top": top_k(row, args.top_k),
        });
        outln!("{line}")
    };
    if args.all_positions {
        for (b, block) in ids.chunks(ROWS_PER_BLOCK).enumerate() {
            let rows = engine.evaluate(&mut seq, block, 0)?;
            for r in 0..rows.rows() {
                print(b * ROWS_PER_BLOCK + r, rows.row(r))?;
            }
        }
    } else {
        let row = engine.prefill(&mut seq, &ids)?;
        print(ids.len() - 1, &row)?;
    }
    Ok(())
}

/// The `k` largest logits as `(id, logit)`, largest first, ties broken by the lower id; `k = 0`
/// means all of them.
pub fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let value = |i: u32| logits.get(i as usize).copied().unwrap_or(f32::NAN);
    let cmp = |a: &u32, b: &u32| value(*b).total_cmp(&value(*a)).then(a.cmp(b));
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let k = if k == 0 {
        order.len()
    } else {
        k.min(order.len())
    };
    if k == 0 {
        return Vec::new();
    }
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, cmp);
        order.truncate(k);
    }
    order.sort_by(cmp);
    order.into_iter().map(|i| (i, value(i))).collect()
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
