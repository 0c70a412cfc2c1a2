//! `m40-llm serve`: the OpenAI-compatible HTTP server (docs/server.md).

use super::model_or_default;
use m40_llm::server::{ServerConfig, spawn};
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Requests decoded together (continuous batching); the KV cache holds this many full
    /// contexts.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub parallel: u64,
    /// Requests that may wait beyond the running ones; more get 503.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub queue: u64,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health.
    #[arg(long, env = "M40LLM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Allow browser requests from this origin (repeatable; `*` for any). CORS is off without.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origins: Vec<String>,
    /// Name of the model in responses and /v1/models (default: the file's stem).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub body_limit: usize,
    /// Seconds a request may take before a 504 (a stream: until its first byte).
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Seconds running requests may go on after SIGINT/SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 10)]
    pub grace: u64,
    /// The most prompt tokens one request prefills per step (others decode in between).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub prefill_chunk: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let path = model_or_default(args.model.model.clone())?;
    let model_name = args.model_name.clone().unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "m40-llm".into())
    });
    let config = ServerConfig {
        host: args.host.clone(),
        port: args.port,
        parallel: args.parallel as usize,
        queue: args.queue as usize,
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        cors_origins: args.cors_origins.clone(),
        body_limit: args.body_limit,
        request_timeout: Duration::from_secs(args.timeout),
        grace: Duration::from_secs(args.grace),
        prefill_chunk: args.prefill_chunk as usize,
        model_name,
        handle_signals: true,
        load_gate: None,
        fail_on_token: None,
    };
    // Listen first (/health answers 503 while the model loads), then load.
    let mut server = spawn(path.clone(), args.model.load_options(1), config)?;
    eprintln!(
        "m40-llm: listening on {}, loading {}",
        server.addr(),
        path.display()
    );
    server.wait_ready()?;
    let device = server.device().map(ToString::to_string).unwrap_or_default();
    eprintln!(
        "m40-llm: serving {} on {device} at http://{}",
        path.display(),
        server.addr()
    );
    server.wait()?;
    eprintln!("m40-llm: stopped");
    Ok(())
}
