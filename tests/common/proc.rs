//! Running the CLI as a hostile user would: with a deadline (a hang fails instead of blocking the
//! test run), stdin fed from bytes or a file, and the child's peak memory (Linux `wait4`).

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How a command ended.
#[derive(Debug)]
pub struct Outcome {
    /// The exit code; `None` when a signal ended it (or it timed out and was killed).
    pub code: Option<i32>,
    /// The signal that ended it, if any.
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub stdout: Vec<u8>,
    pub stderr: String,
    /// Peak resident memory in KiB, where the OS reports it.
    pub max_rss_kib: u64,
}

impl Outcome {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Asserts a clean failure: exit code 1, no panic, and exactly one `error:` line, which
    /// mentions `needle`.
    pub fn fails_with(&self, needle: &str) {
        assert!(!self.timed_out, "timed out: {self:?}");
        assert_eq!(self.code, Some(1), "expected exit 1: {self:?}");
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        let errors: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .collect();
        assert_eq!(errors.len(), 1, "one error line: {:?}", self.stderr);
        assert!(
            errors[0].contains(needle),
            "{:?} does not mention {needle:?}",
            errors[0]
        );
    }

    /// Asserts success (exit 0).
    pub fn succeeds(&self) {
        assert!(!self.timed_out, "timed out: {self:?}");
        assert_eq!(self.code, Some(0), "expected success: {}", self.stderr);
    }
}

/// Where the child's stdin comes from.
pub enum Input<'a> {
    Null,
    Bytes(&'a [u8]),
    File(std::fs::File),
}

/// Runs `cmd` to completion or `timeout` (then kills it).
pub fn run(cmd: &mut Command, input: Input<'_>, timeout: Duration) -> Outcome {
    let bytes = match &input {
        Input::Bytes(b) => Some(b.to_vec()),
        _ => None,
    };
    let stdin = match input {
        Input::Null => Stdio::null(),
        Input::Bytes(_) => Stdio::piped(),
        Input::File(f) => Stdio::from(f),
    };
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let writer = bytes.map(|b| {
        let mut pipe = child.stdin.take().unwrap();
        // The child may stop reading early (a cap, an error): a broken pipe is fine.
        std::thread::spawn(move || {
            let _ = pipe.write_all(&b);
        })
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let (status, max_rss_kib, timed_out) = wait(&mut child, timeout);
    let stdout = out_t.join().unwrap();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap()).into_owned();
    if let Some(w) = writer {
        let _ = w.join();
    }
    let (code, signal) = status;
    Outcome {
        code,
        signal,
        timed_out,
        stdout,
        stderr,
        max_rss_kib,
    }
}

#[cfg(target_os = "linux")]
fn wait(
    child: &mut std::process::Child,
    timeout: Duration,
) -> ((Option<i32>, Option<i32>), u64, bool) {
    let pid = child.id() as libc::pid_t;
    let start = Instant::now();
    let mut timed_out = false;
    loop {
        let mut status = 0;
        // SAFETY: plain wait4 on our own child, into locals.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
            let signal = libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status));
            return ((code, signal), usage.ru_maxrss as u64, timed_out);
        }
        assert!(r == 0, "wait4 failed: {}", std::io::Error::last_os_error());
        if !timed_out && start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(not(target_os = "linux"))]
fn wait(
    child: &mut std::process::Child,
    timeout: Duration,
) -> ((Option<i32>, Option<i32>), u64, bool) {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return ((s.code(), None), 0, false);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let s = child.wait().unwrap();
            return ((s.code(), None), 0, true);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
