//! The per-op parity harness (src/backend/parity): the whole table passes on every available
//! backend; every op has cases; a backend that leaves elements unwritten or computes slightly
//! wrong values fails; `m40-llm parity --ops` prints the table and fails on a failure.

mod common;

use m40_llm::backend::parity::ops::{self, Case, Outcome};
use m40_llm::backend::parity::{BACKENDS, BackendEntry, KvNeeds, open_cpu};
use m40_llm::backend::step::{KvGeometry, PageTables, Step, StepLimits, StepOutputs};
use m40_llm::backend::target::GemmPrecision;
use m40_llm::backend::{Backend, BackendError, DeviceInfo, HostTensor};
use m40_llm::gguf::GgufFile;
use m40_llm::ir::op::OpKind;
use m40_llm::plan::Plan;
use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::Arc;

#[test]
fn every_case_passes_on_every_available_backend() {
    let cases = ops::cases();
    for entry in BACKENDS {
        if let Some(why) = (entry.unavailable)() {
            eprintln!("SKIPPED backend {}: {why}", entry.name);
            continue;
        }
        let reports = ops::run(entry, &cases);
        let failed: Vec<String> = reports
            .iter()
            .filter(|r| !r.passed())
            .map(|r| format!("{r:?}"))
            .collect();
        assert!(
            failed.is_empty(),
            "{} of {} cases fail on {}:\n{}",
            failed.len(),
            reports.len(),
            entry.name,
            failed.join("\n")
        );
        // Every value was compared: no case passes by reading nothing.
        assert!(reports.iter().all(|r| !r.values.is_empty()));
    }
}

#[test]
fn every_kind_of_op_has_cases_whose_plan_runs_it() {
    for &kind in OpKind::ALL {
        let cases = ops::cases_for(kind);
        assert!(!cases.is_empty(), "{} has no case", kind.name());
        for case in &cases {
            assert_eq!(case.kind(), kind, "{}", case.name);
        }
        let built = cases[0].build().unwrap();
        let runs_it = match kind {
            OpKind::Weight => !built.plan.weights.is_empty(),
            _ => built.plan.steps.iter().any(|s| s.op.kind() == kind),
        };
        assert!(
            runs_it,
            "{}'s plan has no {} step",
            cases[0].name,
            kind.name()
        );
    }
    let all = ops::cases();
    let unique: HashSet<&str> = all.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(unique.len(), all.len(), "case names are unique");
}

#[test]
fn the_table_covers_the_required_shapes_and_types() {
    let all = ops::cases();
    let has = |op: &str, part: &str| {
        all.iter()
            .any(|c| c.op_name() == op && c.name.contains(part))
    };
    for ty in ops::WEIGHT_TYPES {
        let t = ty.name().to_ascii_lowercase();
        for op in ["matmul", "embedding", "gate_up_swiglu", "weight"] {
            assert!(has(op, &format!("/{t}/")), "{op} has no {t} case");
        }
    }
    for tokens in ["t1,", "t7,", "t64,", "t300,"] {
        assert!(has("matmul", tokens), "matmul at {tokens}");
    }
    for heads in ["h4/4,d64", "h8/2,d64", "h8/1,d128", "h16/4,d128"] {
        assert!(has("attention", heads), "attention {heads}");
    }
    assert!(has("attention", "|"), "several sequences in one step");
    assert!(has("attention", "window"));
}

/// A CPU backend that "forgets" to write row 0 of every plan output: reading a value gives row
/// 0 of the previous step's value. After the poison step, which the CPU backend reports as
/// non-finite without keeping its values readable, that row is what the poison step computed:
/// NaN.
struct Forgetful {
    inner: Box<dyn Backend>,
    previous: HashMap<String, HostTensor>,
    current: HashMap<String, HostTensor>,
    previous_poisoned: bool,
    current_poisoned: bool,
}

impl Backend for Forgetful {
    fn device(&self) -> &DeviceInfo {
        self.inner.device()
    }
    fn plan(&self) -> &Plan {
        self.inner.plan()
    }
    fn kv_geometry(&self) -> KvGeometry {
        self.inner.kv_geometry()
    }
    fn page_tables(&self) -> &PageTables {
        self.inner.page_tables()
    }
    fn step_limits(&self) -> StepLimits {
        self.inner.step_limits()
    }
    fn validate(&mut self, step: &Step) -> Result<(), BackendError> {
        self.inner.validate(step)
    }
    fn step(&mut self, step: &Step, out: &mut StepOutputs) -> Result<(), BackendError> {
        let result = self.inner.step(step, out);
        let poisoned = matches!(result, Err(BackendError::NonFinite { .. }));
        if result.is_err() && !poisoned {
            return result;
        }
        self.previous = std::mem::take(&mut self.current);
        self.previous_poisoned = std::mem::replace(&mut self.current_poisoned, poisoned);
        if poisoned {
            return result;
        }
        let plan = self.inner.plan();
        let names: Vec<String> = plan
            .outputs
            .iter()
            .filter_map(|&v| plan.value(v).map(|o| o.name.clone()))
            .collect();
        for name in names {
            let value = self.inner.read_value(&name)?;
            self.current.insert(name, value);
        }
        result
    }
    fn read_value(&self, name: &str) -> Result<HostTensor, BackendError> {
        let mut value = self.inner.read_value(name)?;
        if self.previous_poisoned {
            value.row_mut(0).fill(f32::NAN);
        } else if let Some(prev) = self.previous.get(name)
            && prev.dim() == value.dim()
        {
            value.row_mut(0).assign(&prev.row(0));
        }
        Ok(value)
    }
}

fn open_forgetful(
    plan: Plan,
    file: Arc<GgufFile>,
    kv: KvNeeds,
) -> Result<Box<dyn Backend>, BackendError> {
    Ok(Box::new(Forgetful {
        inner: open_cpu(plan, file, kv)?,
        previous: HashMap::new(),
        current: HashMap::new(),
        previous_poisoned: false,
        current_poisoned: false,
    }))
}

/// The CPU backend with every value read back scaled by `scale` (the step's inputs too, unless
/// `keep_inputs`).
struct Skewed {
    inner: Box<dyn Backend>,
    scale: f32,
    keep_inputs: bool,
}

impl Backend for Skewed {
    fn device(&self) -> &DeviceInfo {
        self.inner.device()
    }
    fn plan(&self) -> &Plan {
        self.inner.plan()
    }
    fn kv_geometry(&self) -> KvGeometry {
        self.inner.kv_geometry()
    }
    fn page_tables(&self) -> &PageTables {
        self.inner.page_tables()
    }
    fn step_limits(&self) -> StepLimits {
        self.inner.step_limits()
    }
    fn validate(&mut self, step: &Step) -> Result<(), BackendError> {
        self.inner.validate(step)
    }
    fn step(&mut self, step: &Step, out: &mut StepOutputs) -> Result<(), BackendError> {
        self.inner.step(step, out)
    }
    fn read_value(&self, name: &str) -> Result<HostTensor, BackendError> {
        let input = matches!(name, "token_ids" | "positions" | "output_rows");
        let v = self.inner.read_value(name)?;
        Ok(if self.keep_inputs && input {
            v
        } else {
            v * self.scale
        })
    }
}

/// A CPU backend skewed by `scale` (see [`Skewed`]).
fn skewed(
    plan: Plan,
    file: Arc<GgufFile>,
    kv: KvNeeds,
    scale: f32,
    keep_inputs: bool,
) -> Result<Box<dyn Backend>, BackendError> {
    let inner = open_cpu(plan, file, kv)?;
    Ok(Box::new(Skewed {
        inner,
        scale,
        keep_inputs,
    }))
}

#[test]
fn a_backend_that_rounds_matmul_operands_gets_their_tolerance_for_matmuls_only() {
    let fp32 = BackendEntry {
        name: "nudged",
        unavailable: || None,
        // Computed values off by 5e-4 (between the FP32 and the rounded-operand matmul
        // tolerance).
        open: |plan, file, kv| skewed(plan, file, kv, 1.0005, true),
        matmul_tolerance: || ops::matmul_tolerance(None),
    };
    let rounding = BackendEntry {
        matmul_tolerance: || ops::matmul_tolerance(Some(GemmPrecision::F16)),
        ..fp32
    };
    assert_eq!(
        ops::matmul_tolerance(Some(GemmPrecision::Tf32)),
        ops::ROUNDED_OPERANDS_TOLERANCE
    );
    assert_eq!(
        ops::matmul_tolerance(Some(GemmPrecision::F32)),
        ops::tolerance(OpKind::MatMul)
    );
    let first = |k: OpKind| ops::cases_for(k).into_iter().next().unwrap();
    let matmul = first(OpKind::MatMul);
    assert_eq!(ops::run_case(&fp32, &matmul).outcome, Outcome::Fail);
    let r = ops::run_case(&rounding, &matmul);
    assert_eq!(r.outcome, Outcome::Pass, "{r:?}");
    assert_eq!(r.tolerance, ops::ROUNDED_OPERANDS_TOLERANCE);
    // A norm keeps its own tolerance on that backend.
    let norm = first(OpKind::RmsNorm);
    assert_eq!(ops::run_case(&rounding, &norm).outcome, Outcome::Fail);
}

/// The first case of every kind of op.
fn one_case_per_op() -> Vec<Case> {
    OpKind::ALL
        .iter()
        .filter_map(|&k| ops::cases_for(k).into_iter().next())
        .collect()
}

#[test]
fn unwritten_elements_keep_the_poison_and_fail() {
    let entry = BackendEntry {
        name: "forgetful",
        unavailable: || None,
        open: open_forgetful,
        matmul_tolerance: || ops::matmul_tolerance(None),
    };
    for case in one_case_per_op() {
        let r = ops::run_case(&entry, &case);
        assert_eq!(r.outcome, Outcome::Fail, "{}: {r:?}", case.name);
        assert!(r.max_abs.is_infinite(), "{}: {r:?}", case.name);
        let worst = r.values.iter().find_map(|v| v.worst.clone()).unwrap();
        assert!(
            worst.got.is_nan() && worst.at[0] == 0,
            "{}: {r:?}",
            case.name
        );
    }
}

#[test]
fn values_off_by_one_percent_fail() {
    let entry = BackendEntry {
        name: "skewed",
        unavailable: || None,
        // Every value read back 1 % too large.
        open: |plan, file, kv| skewed(plan, file, kv, 1.01, false),
        matmul_tolerance: || ops::matmul_tolerance(None),
    };
    for case in one_case_per_op() {
        let r = ops::run_case(&entry, &case);
        assert_eq!(r.outcome, Outcome::Fail, "{}: {r:?}", case.name);
        assert!(r.max_rel > 5e-3 && r.max_rel < 2e-2, "{}: {r:?}", case.name);
    }
}

#[test]
fn a_backend_that_cannot_open_reports_an_error_not_a_pass() {
    let entry = BackendEntry {
        name: "broken",
        unavailable: || None,
        open: |_, _, _| Err(BackendError::Kernel("no device".into())),
        matmul_tolerance: || ops::matmul_tolerance(None),
    };
    let case = &one_case_per_op()[0];
    let r = ops::run_case(&entry, case);
    assert!(
        matches!(&r.outcome, Outcome::Error(e) if e.contains("no device")),
        "{r:?}"
    );
}

fn parity(args: &[&str]) -> std::process::Output {
    Command::new(common::bin())
        .arg("parity")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn cli_prints_one_line_per_case_and_a_summary() {
    let o = parity(&["--ops", "--backend", "cpu", "--filter", "rms_norm"]);
    let stdout = String::from_utf8(o.stdout).unwrap();
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let n = ops::cases()
        .iter()
        .filter(|c| c.matches("rms_norm"))
        .count();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), n + 1, "{stdout}");
    for line in &lines[..n] {
        assert!(
            line.starts_with("cpu") && line.contains("rms_norm/"),
            "{line}"
        );
        assert!(
            line.contains("abs ") && line.contains("rel ") && line.ends_with("ok"),
            "{line}"
        );
    }
    assert_eq!(lines[n], format!("{n} cases, {n} passed, 0 failed"));
}

#[test]
fn cli_json_has_one_object_per_case() {
    let o = parity(&["--ops", "--json", "--filter", "q6_k"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8(o.stdout).unwrap();
    let n = ops::cases().iter().filter(|c| c.matches("q6_k")).count();
    assert!(n >= 4);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let expected = n * BACKENDS
        .iter()
        .filter(|b| (b.unavailable)().is_none())
        .count();
    assert_eq!(lines.len(), expected, "{stdout}");
    for v in &lines {
        assert_eq!(v["outcome"], "pass", "{v}");
        assert!(v["case"].as_str().unwrap().contains("q6_k"));
        assert!(v["max_rel"].as_f64().unwrap() <= v["tolerance"].as_f64().unwrap());
    }
}

#[test]
fn cli_refuses_unknown_backends_and_filters() {
    for (args, message) in [
        (
            &["--ops", "--backend", "tpu"][..],
            "no backend `tpu` (known: cpu",
        ),
        (
            &["--ops", "--filter", "no-such-op"][..],
            "no case matches `no-such-op`",
        ),
        (&[][..], "pass --ops"),
    ] {
        let o = parity(args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(message),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn compare_measures_normwise_error_and_flags_non_finite_and_misshapen_values() {
    let check = ops::Check {
        value: "y".into(),
        want: ndarray::array![[1.0, -4.0], [2.0, 0.5]],
        tolerance: 1e-3,
        matmul: false,
    };
    let got = ndarray::array![[1.0f32, -4.0], [2.002, 0.5]];
    let e = ops::compare(&check, &got).unwrap();
    assert!(
        (e.max_abs - 0.002).abs() < 1e-6 && (e.max_rel - 0.0005).abs() < 1e-6,
        "{e:?}"
    );
    assert!(e.passed());
    assert_eq!(e.worst.as_ref().unwrap().at, [1, 0]);
    let nan = ndarray::array![[1.0f32, f32::NAN], [2.0, 0.5]];
    let e = ops::compare(&check, &nan).unwrap();
    assert!(e.max_abs.is_infinite() && !e.passed(), "{e:?}");
    let short = ndarray::array![[1.0f32, -4.0]];
    assert!(ops::compare(&check, &short).unwrap_err().contains("shape"));
}

/// `parity --prompt` on the CPU against itself: one line per plan value, all exact, and the
/// command's errors. (On the GPU machine the same command compares with `cuda`.)
#[test]
fn parity_prompt_compares_every_value_of_the_model_and_fails_on_the_first_over() {
    let Some(model) = common::default_model() else {
        return;
    };
    let model = model.to_str().unwrap();
    let o = parity(&["-m", model, "--prompt", "Hello world", "--backend", "cpu"]);
    let stdout = String::from_utf8(o.stdout).unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    let (summary, values) = lines.split_last().unwrap();
    assert!(values.len() > 300, "{} values", values.len());
    for l in values {
        assert!(l.ends_with("ok") && l.contains("abs    0.00e0"), "{l}");
    }
    assert!(values.iter().any(|l| l.contains(" logits ")));
    assert!(
        summary.starts_with(&format!("{} values, {} within", values.len(), values.len())),
        "{summary}"
    );

    let o = parity(&[
        "-m",
        model,
        "--prompt",
        "Hello",
        "--backend",
        "cpu",
        "--json",
    ]);
    let first: serde_json::Value =
        serde_json::from_str(String::from_utf8(o.stdout).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(first["value"], "inp_embd");
    assert_eq!(first["over"], false);

    for (args, message) in [
        (
            &["--prompt", "Hi", "--backend", "cpu", "--tolerance=-1"][..],
            "--tolerance must be",
        ),
        (
            &["--prompt", "Hi", "--backend", "tpu"][..],
            "no backend `tpu`",
        ),
        (&["--prompt", "Hi", "--ops"][..], "cannot be used with"),
    ] {
        let mut all = vec!["-m", model];
        all.extend_from_slice(args);
        let o = parity(&all);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}
