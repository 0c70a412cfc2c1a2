//! The CLI's input and output: bounded text inputs, output that reports write errors instead of
//! panicking, and files written atomically without replacing an input.
//!
//! - Text inputs (prompt files, `perplexity -f`, `tokenize --file`, `-` for stdin) are read with a
//!   size cap ([`DEFAULT_MAX_INPUT`], raised by `--max-input-bytes` or `M40LLM_MAX_INPUT_BYTES`);
//!   a path must name a regular file (a fifo or `/dev/zero` is refused before it is opened).
//! - Standard output is written through [`out`] / [`outln!`], which return an error (`cannot
//!   write to stdout: ...`) instead of panicking like `println!` on a full device.
//! - Notes on standard error ([`note!`]) are best-effort: when stderr itself cannot be written
//!   (`2>/dev/full`) they are dropped, and the command's result does not change.
//! - [`write_output`] writes a file through a temporary file and a rename, and refuses to write
//!   over any of the command's inputs.

use anyhow::{Context, Result, bail};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The default cap on a text input, in bytes (64 MiB: about 16 million tokens).
pub const DEFAULT_MAX_INPUT: u64 = 64 << 20;
/// The environment variable that sets the cap (as `--max-input-bytes` does).
pub const MAX_INPUT_ENV: &str = "M40LLM_MAX_INPUT_BYTES";

static MAX_INPUT: OnceLock<u64> = OnceLock::new();

/// Sets the cap on text inputs (once, from the command line).
pub fn set_max_input(bytes: u64) {
    let _ = MAX_INPUT.set(bytes);
}

/// The cap on text inputs, in bytes.
pub fn max_input() -> u64 {
    MAX_INPUT.get().copied().unwrap_or(DEFAULT_MAX_INPUT)
}

/// Parses a size in bytes with an optional K, M or G suffix (powers of 1024): `4096`, `64M`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 10),
        Some((i, 'm' | 'M')) => (&t[..i], 20),
        Some((i, 'g' | 'G')) => (&t[..i], 30),
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size in bytes (e.g. 4096, 512K, 64M, 1G)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn limit_hint(cap: u64) -> String {
    format!("the input limit is {cap} bytes; raise it with --max-input-bytes or {MAX_INPUT_ENV}")
}

/// Reads the UTF-8 text at `path` (`-`: standard input), at most [`max_input`] bytes. `what`
/// names the input's flag in errors (`--file`, `--prompt`).
pub fn read_text(path: &Path, what: &str) -> Result<String> {
    let cap = max_input();
    let (name, bytes) = if path.as_os_str() == "-" {
        let bytes = read_capped(std::io::stdin().lock(), cap)
            .with_context(|| format!("cannot read standard input ({what})"))?;
        let Some(bytes) = bytes else {
            bail!(
                "standard input ({what}) is larger than {cap} bytes ({})",
                limit_hint(cap)
            );
        };
        ("standard input".to_string(), bytes)
    } else {
        let name = path.display().to_string();
        let meta = regular_file(path, what)?;
        if meta.len() > cap {
            bail!(
                "{name} ({what}) has {} bytes, more than the limit ({})",
                meta.len(),
                limit_hint(cap)
            );
        }
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {name} ({what})"))?;
        let Some(bytes) =
            read_capped(file, cap).with_context(|| format!("cannot read {name} ({what})"))?
        else {
            bail!(
                "{name} ({what}) grew past the limit while read ({})",
                limit_hint(cap)
            );
        };
        (name, bytes)
    };
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        anyhow::anyhow!("{name} ({what}) is not UTF-8 text (invalid byte at offset {at})")
    })
}

/// All of `r`, or `None` if it holds more than `cap` bytes (reading stops at `cap + 1`).
fn read_capped(r: impl Read, cap: u64) -> std::io::Result<Option<Vec<u8>>> {
    let mut bytes = Vec::new();
    r.take(cap.saturating_add(1)).read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= cap).then_some(bytes))
}

/// The metadata of `path`, which must be a regular file (checked before opening it: opening a
/// fifo blocks until a writer comes).
pub fn regular_file(path: &Path, what: &str) -> Result<std::fs::Metadata> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read {} ({what})", path.display()))?;
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file (a fifo, socket or device)"
        };
        bail!(
            "{} ({what}) is {kind}; give a regular file, or `-` for standard input",
            path.display()
        );
    }
    Ok(meta)
}

/// Writes `args` to standard output and flushes it.
pub fn out(args: std::fmt::Arguments<'_>) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_fmt(args)
        .and_then(|()| stdout.flush())
        .context("cannot write to stdout")
}

/// `println!` that returns an error instead of panicking.
macro_rules! outln {
    () => { $crate::cli::io::out(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::cli::io::out(format_args!("{}\n", format_args!($($arg)*))) };
}
pub(crate) use outln;

/// `eprintln!` that drops the text when stderr cannot be written.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
pub(crate) use note;

/// Writes `bytes` to `dest` atomically (a temporary file beside it, then a rename), refusing to
/// write over any of `inputs`. A destination that exists and is not a regular file (`/dev/stdout`,
/// a fifo) is written directly.
pub fn write_output(dest: &Path, bytes: &[u8], inputs: &[&Path]) -> Result<()> {
    write_output_with(dest, inputs, |w| Ok(w.write_all(bytes)?))
}

/// [`write_output`] for output produced piece by piece: `write` gets a buffered writer onto the
/// temporary file (or the non-regular destination). When it fails, the temporary file is
/// removed and its error returned with the destination named.
pub fn write_output_with(
    dest: &Path,
    inputs: &[&Path],
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    let cannot = || format!("cannot write {}", dest.display());
    if dest.as_os_str().is_empty() {
        bail!("the output path is empty");
    }
    if let Ok(meta) = std::fs::metadata(dest) {
        for input in inputs {
            if same_file(dest, &meta, input) {
                bail!(
                    "refusing to write the output over the input {}: choose another -o path",
                    input.display()
                );
            }
        }
        if !meta.is_file() {
            if meta.is_dir() {
                bail!("the output {} is a directory", dest.display());
            }
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(dest)
                .with_context(|| format!("cannot open {}", dest.display()))?;
            let mut w = std::io::BufWriter::new(f);
            write(&mut w).with_context(cannot)?;
            return w.flush().with_context(cannot);
        }
    }
    // Rename onto the file a symbolic link points to, not over the link.
    let target = std::fs::canonicalize(dest).unwrap_or_else(|_| dest.to_path_buf());
    let dir = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = target
        .file_name()
        .with_context(|| format!("the output {} has no file name", dest.display()))?;
    let name = name.to_string_lossy();
    remove_stale_temporaries(dir, &name);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let written = (|| -> Result<()> {
        let f = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        write(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &target)?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(cannot);
    }
    Ok(())
}

/// Removes the `.{name}.tmp-PID` files in `dir` that runs killed before their rename left (a
/// SIGKILL or a power cut: an 8B `synth` leaves 16 GB), saying so: those whose process is gone.
/// Where that cannot be told (no `/proc`), nothing is removed.
fn remove_stale_temporaries(dir: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || process_may_run(pid) {
            continue;
        }
        if std::fs::remove_file(entry.path()).is_ok() {
            eprintln!(
                "removed {}: a partial output of process {pid}, which is gone",
                entry.path().display()
            );
        }
    }
}

/// Whether process `pid` may still run (true unless `/proc` says it does not).
fn process_may_run(pid: u32) -> bool {
    let proc = Path::new("/proc");
    !proc.join("self").exists() || proc.join(pid.to_string()).exists()
}

/// Whether `input` is the file `dest` (whose metadata is `meta`) is, through any link.
fn same_file(dest: &Path, meta: &std::fs::Metadata, input: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let _ = dest;
        if let Ok(m) = std::fs::metadata(input) {
            return m.dev() == meta.dev() && m.ino() == meta.ino();
        }
        false
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        let canon = |p: &Path| std::fs::canonicalize(p).ok();
        canon(dest).is_some_and(|d| Some(d) == canon(input))
    }
}

/// A path argument that must not be empty (`inspect ''`).
pub fn non_empty_path(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("the path is empty".into());
    }
    Ok(PathBuf::from(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999G").is_err());
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_write_removes_the_partial_outputs_of_dead_runs_only() {
        let dir = std::env::temp_dir().join(format!("m40-io-stale-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // pid_max is at most 2^22: 999999999 never runs; pid 1 always does.
        let dead = dir.join(".out.gguf.tmp-999999999");
        let live = dir.join(".out.gguf.tmp-1");
        let other = dir.join(".other.gguf.tmp-999999999");
        let odd = dir.join(".out.gguf.tmp-notapid");
        for f in [&dead, &live, &other, &odd] {
            std::fs::write(f, b"partial").unwrap();
        }
        let out = dir.join("out.gguf");
        write_output(&out, b"done", &[]).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"done");
        assert!(!dead.exists(), "the dead run's partial output stays");
        for kept in [&live, &other, &odd] {
            assert!(kept.exists(), "{} was removed", kept.display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn capped_reads_stop_after_the_cap() {
        assert_eq!(read_capped(&b"abc"[..], 3).unwrap(), Some(b"abc".to_vec()));
        assert_eq!(read_capped(&b"abcd"[..], 3).unwrap(), None);
        assert_eq!(read_capped(std::io::repeat(0), 10).unwrap(), None);
    }
}
