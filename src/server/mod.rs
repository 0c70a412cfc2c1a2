//! `m40-llm serve`: an OpenAI-compatible HTTP server (axum on tokio) over one engine.
//!
//! Threads: the engine loop ([`scheduler`]) owns the [`Engine`](crate::runtime::engine::Engine)
//! on a dedicated thread; the HTTP side (a small tokio runtime) parses requests, tokenizes
//! prompts, and sends jobs over a bounded channel (`queue`, 503 when full); each job streams its
//! text back over its own channel. See docs/server.md for the endpoints.
//!
//! Shutdown ([`Server::shutdown`], or SIGINT/SIGTERM with [`ServerConfig::handle_signals`]):
//! the listener stops accepting, running requests get `grace` to finish, then every request
//! still running is cancelled; the threads end.

pub mod api;
pub mod cache;
pub mod metrics;
mod routes;
pub mod scheduler;

use crate::backend::DeviceInfo;
use crate::runtime::model::{LoadError, LoadOptions, LoadedModel, load};
use crate::tokenizer::Tokenizer;
use crate::tokenizer::chat::ChatTemplate;
use scheduler::{Job, Limits, Stats};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

/// How to serve.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub host: String,
    /// 0 picks a free port ([`Server::addr`] tells which).
    pub port: u16,
    /// Sequences running at once (continuous batching).
    pub parallel: usize,
    /// Requests waiting beyond the running ones; more get a 503.
    pub queue: usize,
    /// Required as `Authorization: Bearer KEY` when set (`/health` stays open).
    pub api_key: Option<String>,
    /// Allowed CORS origins (`*` for any); empty: no CORS headers.
    pub cors_origins: Vec<String>,
    /// The largest request body, in bytes.
    pub body_limit: usize,
    /// The longest a request may take to produce its response (for a stream: its headers).
    pub request_timeout: Duration,
    /// How long running requests may go on after shutdown begins.
    pub grace: Duration,
    /// The most prompt tokens one sequence prefills in one step.
    pub prefill_chunk: usize,
    /// The name `/v1/models` lists and responses carry.
    pub model_name: String,
    /// Shut down on SIGINT/SIGTERM (the CLI); tests use [`Server::shutdown`].
    pub handle_signals: bool,
    /// Tests: the engine thread waits at this barrier before loading the model (so that a test
    /// sees the server while it loads).
    #[doc(hidden)]
    pub load_gate: Option<Arc<std::sync::Barrier>>,
    /// Tests: a step feeding this token id fails as a backend error would.
    #[doc(hidden)]
    pub fail_on_token: Option<u32>,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            parallel: 4,
            queue: 64,
            api_key: None,
            cors_origins: Vec::new(),
            body_limit: 4 << 20,
            request_timeout: Duration::from_secs(600),
            grace: Duration::from_secs(10),
            prefill_chunk: 256,
            model_name: "m40-llm".into(),
            handle_signals: false,
            load_gate: None,
            fail_on_token: None,
        }
    }
}

/// Why the server could not start or ended badly.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("invalid CORS origin {0:?}")]
    CorsOrigin(String),
    #[error("--parallel and --queue must be at least 1")]
    Limits,
    #[error("{0}")]
    Runtime(String),
}

/// What the model side tells the HTTP side once loaded.
pub(crate) struct ModelInfo {
    pub name: String,
    pub device: DeviceInfo,
    pub n_ctx: usize,
    pub n_vocab: usize,
    pub fingerprint: String,
}

/// What the handlers need once the model is loaded.
pub(crate) struct Ready {
    pub info: ModelInfo,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Option<ChatTemplate>,
}

/// Everything the handlers share.
pub(crate) struct Shared {
    /// Set by the engine thread once the model is loaded (the server listens before).
    pub ready: Arc<std::sync::OnceLock<Ready>>,
    /// The model's name (known before it loads).
    pub name: String,
    pub jobs: std::sync::mpsc::SyncSender<Job>,
    pub stats: Arc<Stats>,
    pub api_key: Option<String>,
    pub parallel: usize,
    /// Requests that may wait for a place (`--queue`): beyond them, 503.
    pub queue: usize,
    /// Responses by status code (for `/metrics`).
    pub statuses: std::sync::Mutex<std::collections::BTreeMap<u16, u64>>,
}

impl Shared {
    /// The loaded model, or a 503 while it loads.
    pub fn ready(&self) -> Result<&Ready, api::ApiError> {
        self.ready.get().ok_or_else(|| {
            api::ApiError::unavailable("loading", "the model is loading; retry shortly")
        })
    }
}

type ReadyResult = Result<DeviceInfo, ServerError>;

/// A running server; see the [module docs](self).
pub struct Server {
    addr: SocketAddr,
    /// Known once the model is loaded.
    device: Option<DeviceInfo>,
    /// Where the engine thread says whether the model loaded (taken by `wait_ready`).
    loaded: Option<std::sync::mpsc::Receiver<ReadyResult>>,
    stats: Arc<Stats>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    http: Option<JoinHandle<Result<(), ServerError>>>,
    engine: Option<JoinHandle<()>>,
}

impl Server {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The device the engine runs on (once the model is loaded).
    pub fn device(&self) -> Option<&DeviceInfo> {
        self.device.as_ref()
    }

    /// Waits until the model is loaded (the server answers `/health` with 503 until then). A
    /// load error stops the server and comes back here.
    pub fn wait_ready(&mut self) -> Result<(), ServerError> {
        let Some(rx) = self.loaded.take() else {
            return Ok(());
        };
        let result = rx
            .recv()
            .unwrap_or_else(|_| Err(ServerError::Runtime("the engine thread ended early".into())));
        match result {
            Ok(device) => {
                self.device = Some(device);
                Ok(())
            }
            Err(e) => {
                if let Some(tx) = self.shutdown.take() {
                    let _ = tx.send(());
                }
                let _ = self.join();
                Err(e)
            }
        }
    }

    /// Requests waiting, requests running, KV pages in use.
    pub fn load(&self) -> (usize, usize, usize) {
        (
            self.stats.queued.load(Ordering::Relaxed),
            self.stats.running.load(Ordering::Relaxed),
            self.stats.kv_pages_used.load(Ordering::Relaxed),
        )
    }

    /// Begins the shutdown and waits for it.
    pub fn shutdown(mut self) -> Result<(), ServerError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.join()
    }

    /// Waits until the server ends (a signal, with `handle_signals`).
    pub fn wait(mut self) -> Result<(), ServerError> {
        self.join()
    }

    fn join(&mut self) -> Result<(), ServerError> {
        let http = self.http.take().map(JoinHandle::join);
        if let Some(engine) = self.engine.take() {
            let _ = engine.join();
        }
        match http {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(ServerError::Runtime("the HTTP thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
            let _ = self.join();
        }
    }
}

/// Binds, starts serving, loads the model at `model` on the engine thread and waits for it
/// ([`spawn`] and [`Server::wait_ready`]).
pub fn start(
    model: PathBuf,
    load_options: LoadOptions,
    config: ServerConfig,
) -> Result<Server, ServerError> {
    let mut server = spawn(model, load_options, config)?;
    server.wait_ready()?;
    Ok(server)
}

/// Binds and starts serving at once; the model loads on the engine thread meanwhile (`/health`
/// answers 503 and the other endpoints 503 `loading` until it is in). Bind errors come back
/// here, load errors from [`Server::wait_ready`].
pub fn spawn(
    model: PathBuf,
    load_options: LoadOptions,
    config: ServerConfig,
) -> Result<Server, ServerError> {
    if config.parallel == 0 || config.queue == 0 {
        return Err(ServerError::Limits);
    }
    let addr_text = format!("{}:{}", config.host, config.port);
    let listener =
        std::net::TcpListener::bind(addr_text.as_str()).map_err(|source| ServerError::Bind {
            addr: addr_text.clone(),
            source,
        })?;
    let bind_err = |source| ServerError::Bind {
        addr: addr_text.clone(),
        source,
    };
    listener.set_nonblocking(true).map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;

    let mut options = load_options;
    options.n_seqs = config.parallel;
    options.max_outputs = config.parallel as u64;
    options.max_tokens = options.max_tokens.max(config.parallel as u64);
    // The engine thread drains the channel between steps; `Shared::queue` is the bound.
    let (jobs_tx, jobs_rx) = std::sync::mpsc::sync_channel::<Job>(config.queue.max(1));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<ReadyResult>();
    let stats = Arc::new(Stats::default());
    let limits = Limits {
        parallel: config.parallel,
        prefill_chunk: config.prefill_chunk,
        fail_on_token: config.fail_on_token,
    };
    let ready = Arc::new(std::sync::OnceLock::new());
    let shared = Arc::new(Shared {
        ready: ready.clone(),
        name: config.model_name.clone(),
        jobs: jobs_tx,
        stats: stats.clone(),
        api_key: config.api_key.clone(),
        parallel: config.parallel,
        queue: config.queue,
        statuses: Default::default(),
    });
    let app = routes::router(shared, &config)?;

    let engine_stats = stats.clone();
    let gate = config.load_gate.clone();
    let model_name = config.model_name.clone();
    let engine = std::thread::Builder::new()
        .name("m40-engine".into())
        .spawn(move || {
            if let Some(gate) = gate {
                gate.wait();
            }
            let LoadedModel {
                tokenizer,
                mut engine,
                ..
            } = match load(&model, &options) {
                Ok(m) => m,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            let template = match ChatTemplate::from_tokenizer(&tokenizer) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!("chat completions are off: {e}");
                    None
                }
            };
            let tokenizer = Arc::new(tokenizer);
            let device = engine.device().clone();
            let _ = ready.set(Ready {
                info: ModelInfo {
                    name: model_name,
                    fingerprint: format!("fp_m40llm_{}_{}", env!("CARGO_PKG_VERSION"), device.kind),
                    device: device.clone(),
                    n_ctx: engine.n_ctx(),
                    n_vocab: engine.n_vocab(),
                },
                tokenizer: tokenizer.clone(),
                template,
            });
            let _ = ready_tx.send(Ok(device));
            scheduler::run_loop(&mut engine, &tokenizer, &jobs_rx, limits, &engine_stats);
        })
        .map_err(|e| ServerError::Runtime(format!("cannot start the engine thread: {e}")))?;

    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let grace = config.grace;
    let signals = config.handle_signals;
    let grace_stats = stats.clone();
    let http = std::thread::Builder::new()
        .name("m40-http".into())
        .spawn(move || -> Result<(), ServerError> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| ServerError::Runtime(format!("cannot start tokio: {e}")))?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)
                    .map_err(|e| ServerError::Runtime(format!("cannot listen: {e}")))?;
                let stop = async move {
                    tokio::select! {
                        _ = shutdown_rx => {}
                        _ = signal(), if signals => {}
                    }
                    tracing::info!("shutting down: finishing requests for up to {grace:?}");
                    tokio::spawn(async move {
                        tokio::time::sleep(grace).await;
                        grace_stats.cancel_all.store(true, Ordering::Relaxed);
                    });
                };
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await
                    .map_err(|e| ServerError::Runtime(format!("the server failed: {e}")))
            })
        })
        .map_err(|e| ServerError::Runtime(format!("cannot start the HTTP thread: {e}")))?;
    Ok(Server {
        addr,
        device: None,
        loaded: Some(ready_rx),
        stats,
        shutdown: Some(shutdown_tx),
        http: Some(http),
        engine: Some(engine),
    })
}

/// SIGINT or SIGTERM.
async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
