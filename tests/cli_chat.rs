//! `m40-llm chat` through the binary with piped stdin (its non-interactive mode): multi-turn
//! answers through the model's template, the history reused from the KV cache, `/clear`,
//! `/exit`, and a SIGINT that stops an answer but not the program.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

const GREEDY: [&str; 6] = ["--device", "cpu", "--temperature", "0", "-n", "12"];

/// Runs `m40-llm chat` with `input` on stdin: (exit ok, stdout, stderr).
fn chat(model: &str, input: &str) -> (bool, String, String) {
    let mut child = Command::new(common::bin())
        .args(["chat", "--model", model])
        .args(GREEDY)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The `(prompt tokens, cached tokens)` of each turn, from the stderr summaries.
fn turns(stderr: &str) -> Vec<(u64, u64)> {
    stderr
        .lines()
        .filter(|l| l.contains(": turn "))
        .map(|l| {
            let after = |key: &str| -> u64 {
                let rest = &l[l.find(key).unwrap() + key.len()..];
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            };
            (after("prompt "), after("tokens ("))
        })
        .collect()
}

#[test]
fn chat_answers_turns_reusing_the_history_and_clears() {
    let Some(model) = common::default_model() else {
        return;
    };
    let model = model.to_str().unwrap();
    // The first answer is `run --chat`'s (the same template, the same greedy tokens).
    let o = Command::new(common::bin())
        .args(["run", "--model", model, "--chat", "-p", "Name a fruit."])
        .args(GREEDY)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let first = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(first.trim().len() > 1, "{first:?}");

    let (ok, out, err) = chat(
        model,
        "Name a fruit.\n\nAnd a vegetable?\n/clear\nName a fruit.\n/exit\nnot read\n",
    );
    assert!(ok, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // Answers 1 and 3 (after /clear) are the same; answer 2 sits between them.
    let middle = out
        .strip_prefix(first.as_str())
        .and_then(|rest| rest.strip_suffix(first.as_str()))
        .unwrap_or_else(|| panic!("{out:?} is not {first:?} + answer + {first:?}"));
    assert!(middle.trim().len() > 1, "{out:?}");
    let t = turns(&err);
    assert_eq!(t.len(), 3, "{err}");
    // Turn 1 reuses nothing; turn 2 reuses all of turn 1 (prompt and answer); after /clear,
    // turn 3 starts over.
    assert_eq!(t[0].1, 0, "{err}");
    assert!(t[1].1 >= t[0].0, "{err}");
    assert!(t[1].1 < t[1].0, "{err}");
    assert_eq!(t[2], t[0], "{err}");
}

#[cfg(unix)]
#[test]
fn sigint_stops_the_answer_not_the_program() {
    let Some(model) = common::default_model() else {
        return;
    };
    let model = model.to_str().unwrap();
    let mut child = Command::new(common::bin())
        .args([
            "chat",
            "--model",
            model,
            "--device",
            "cpu",
            "--temperature",
            "0",
        ])
        .args(["-n", "400", "--stop", "never-appears"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"Tell me a very long story.\n").unwrap();
    stdin.flush().unwrap();
    // Wait until it writes its answer, then interrupt it.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    stdin.write_all(b"/exit\n").unwrap();
    drop(stdin);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    let t = turns(&err);
    assert_eq!(t.len(), 1, "{err}");
}
