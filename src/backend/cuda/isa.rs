//! Instruction counts of the unit matvec kernels (kernels/matvec.cu `mmv_<ty>_r<R>`) against
//! what a Tesla M40 can issue while it streams weights (issue 12).
//!
//! A matvec is memory-bound on the M40 only if its inner loop issues fewer instructions per
//! byte of weights than the card retires per byte it reads: about 3.4 T lane-instructions/s
//! (3072 FP32 lanes at ~1.1 GHz) over 288 GB/s, ≈ 11.8 instructions per byte, so
//! 11.8 × bytes-per-weight per weight (Q4_0: 18/32 B → ≈ 6.6; Q8_0: 34/32 B → ≈ 12.5).
//!
//! [`matvec_ptx`] compiles kernels/matvec.cu to PTX for `compute_52` with the options and
//! headers [`super::kernels`] uses; [`unit_loop`] finds the loop of an entry point whose backward
//! branch closes over the activation loads (`ld.global.nc.v4.f32`: one per 4 weights and
//! activation row; the loop with the most of them when NVVM unrolled the unit loop and added a
//! remainder); [`count_kernel`] divides its instructions by the weights one iteration covers.
//! PTX is what ptxas is given, not what the GPU runs: ptxas folds constant `mov`s into
//! immediates, drops register-class `mov`s and splits 64-bit adds, so SASS counts differ.

use super::kernels::{COMPILE_OPTIONS, KERNEL_HEADERS, family_source};
use super::nvrtc::{Nvrtc, NvrtcError};
use crate::gguf::GgmlType;

/// An M40's lane-instructions per second: 3072 FP32 lanes × ~1.11 GHz boost.
pub const M40_LANE_INSTRUCTIONS_PER_S: f64 = 3.4e12;
/// An M40's memory bandwidth, bytes per second.
pub const M40_BYTES_PER_S: f64 = 288e9;
/// The PTX opcode of the activation (x) loads of the unit kernels.
pub const X_LOAD: &str = "ld.global.nc.v4.f32";
/// Weights one x load covers for one activation row (a `float4`).
pub const WEIGHTS_PER_X_LOAD: u32 = 4;
/// The activation-row counts reported: 1 (decode) and 8 (the widest unit kernel).
pub const REPORTED_ROWS: [u32; 2] = [1, 8];
/// The decoder kernels/matvec.cu instantiates the unit kernels of `suffix` with
/// (`MMV(q4_0, UQ4_0)` → `UQ4_0`), read from the embedded source.
pub fn unit_decoder(suffix: &str) -> Option<&'static str> {
    let src = family_source("matvec")?;
    src.lines().find_map(|l| {
        let args = l.trim().strip_prefix("MMV(")?.strip_suffix(')')?;
        let (name, decoder) = args.split_once(',')?;
        (name.trim() == suffix).then(|| decoder.trim())
    })
}

/// The unit width of the decoder `decoder` (`UQ4_0`, `UGen<TF32>`): its `static const int W`
/// in kernels/matvec.cu.
pub fn unit_weights(decoder: &str) -> Option<u32> {
    let src = family_source("matvec")?;
    let base = decoder.split('<').next()?.trim();
    // `struct UQ4_0 {` or, with a base, `struct UQ4_1 : PerUnit<UQ4_1> {`.
    let start = [format!("struct {base} {{"), format!("struct {base} : ")]
        .iter()
        .find_map(|head| src.find(head.as_str()))?;
    let body = &src[start..];
    let body = &body[..body[1..].find("\nstruct ").map_or(body.len(), |e| e + 1)];
    let w = body.split("static const int W =").nth(1)?;
    w.split(';').next()?.trim().parse().ok()
}

/// Whether `suffix`'s unit kernels have a decoder of their own (`UQ4_0`), not the generic
/// per-element one (`UGen<T>`, correct but not tuned).
pub fn is_tuned(suffix: &str) -> bool {
    unit_decoder(suffix).is_some_and(|d| !d.starts_with("UGen<"))
}

/// The instructions an M40 can issue per byte of weights it reads (≈ 11.8).
pub fn m40_budget_per_byte() -> f64 {
    M40_LANE_INSTRUCTIONS_PER_S / M40_BYTES_PER_S
}

/// Bytes per weight of `ty` (Q4_0: 18 / 32).
pub fn bytes_per_weight(ty: GgmlType) -> f64 {
    ty.type_size() as f64 / ty.block_size() as f64
}

/// The instructions per weight an M40 can afford for `ty` and stay memory-bound.
pub fn m40_budget_per_weight(ty: GgmlType) -> f64 {
    m40_budget_per_byte() * bytes_per_weight(ty)
}

/// Why the counts could not be made.
#[derive(Debug, thiserror::Error)]
pub enum IsaError {
    #[error(transparent)]
    Nvrtc(#[from] NvrtcError),
    #[error("no entry point `{0}` in the PTX of kernels/matvec.cu")]
    NoEntry(String),
    #[error(
        "`{0}`: no loop with `{X_LOAD}` activation loads in its PTX (the kernel or the PTX parser changed)"
    )]
    NoLoop(String),
    #[error(
        "`{kernel}`: its unit loop has {x_loads} activation loads: not whole units of {unit} weights for {rows} rows"
    )]
    Uneven {
        kernel: String,
        x_loads: u32,
        rows: u32,
        unit: u32,
    },
    #[error("no unit width (`static const int W`) for the decoder `{0}` in kernels/matvec.cu")]
    NoUnitWidth(String),
}

/// The PTX of kernels/matvec.cu for `compute_{arch}`, compiled like the CUBINs (same headers,
/// same options).
pub fn matvec_ptx(nvrtc: &Nvrtc, arch: u32) -> Result<String, NvrtcError> {
    let source = family_source("matvec").ok_or_else(|| NvrtcError::Compile {
        name: "matvec".into(),
        arch,
        version: nvrtc.version_string(),
        log: "no such kernel family".into(),
    })?;
    let options: Vec<String> = COMPILE_OPTIONS.iter().map(|s| s.to_string()).collect();
    Ok(nvrtc
        .compile_ptx("matvec", source, KERNEL_HEADERS, arch, &options)?
        .ptx)
}

/// One statement of a PTX function body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stmt<'a> {
    /// `$L__BB3_2:` (without the colon).
    Label(&'a str),
    /// An instruction without its `;`, its predicate guard kept (`@%p2 bra $L__BB3_2`).
    Instr(&'a str),
}

/// The body of the entry point `name` (between its outer braces), or `None`.
pub fn entry_body<'a>(ptx: &'a str, name: &str) -> Option<&'a str> {
    let head = format!(".entry {name}(");
    let start = ptx.find(&head)? + head.len();
    let rest = &ptx[start..];
    let open = start + rest.find('{')?;
    let mut depth = 0usize;
    let mut in_comment = false;
    let bytes = ptx.as_bytes();
    let mut i = open;
    while i < bytes.len() {
        match bytes[i] {
            b'\n' => in_comment = false,
            _ if in_comment => {}
            b'/' if bytes.get(i + 1) == Some(&b'/') => in_comment = true,
            b'{' => depth += 1,
            b'}' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return ptx.get(open + 1..i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// The labels and instructions of a function body, in order: comments, directives (`.reg`,
/// `.pragma`, ...) and the braces of inline-asm scopes dropped.
pub fn statements(body: &str) -> Vec<Stmt<'_>> {
    let mut out = Vec::new();
    for line in body.lines() {
        let code = line.split("//").next().unwrap_or_default();
        for piece in code.split(';') {
            let mut s = piece.trim().trim_start_matches('{').trim();
            if let Some(stripped) = s.strip_suffix('}')
                && !stripped.contains('{')
            {
                s = stripped.trim();
            }
            if let Some((label, rest)) = split_label(s) {
                out.push(Stmt::Label(label));
                s = rest.trim();
            }
            if s.is_empty() || s.starts_with('.') {
                continue;
            }
            out.push(Stmt::Instr(s));
        }
    }
    out
}

/// `("$L__BB3_2", rest)` for `$L__BB3_2: rest`.
fn split_label(s: &str) -> Option<(&str, &str)> {
    let colon = s.find(':')?;
    let label = &s[..colon];
    let ident = !label.is_empty()
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$' || c == '.')
        && !label.starts_with('.');
    ident.then(|| (label, &s[colon + 1..]))
}

/// The opcode of an instruction, its predicate guard skipped: `fma.rn.f32`, `bra.uni`.
pub fn opcode(instr: &str) -> &str {
    let mut words = instr.split_whitespace();
    let first = words.next().unwrap_or_default();
    if first.starts_with('@') {
        words.next().unwrap_or_default()
    } else {
        first
    }
}

/// What an instruction does, coarsely.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// `ld`, `ldu`: memory loads (weights, activations, parameters).
    Load,
    /// `st`, `atom`, `red`.
    Store,
    /// Floating-point arithmetic: `fma`, `mul`, `add`, `sub`, `neg`, ... on f16/f32/f64.
    Float,
    /// Integer and bit operations: `add.s64`, `mul.wide`, `shl`, `shr`, `and`, `or`, `prmt`,
    /// `shf`, `lop3`, `bfe`, ...
    Integer,
    /// `cvt`, `cvta`.
    Convert,
    /// `mov` (constants into registers, register-class reinterpretations).
    Move,
    /// Branches and predicates: `bra`, `setp`, `selp`, `ret`.
    Control,
    /// Anything else (`shfl`, `bar`, ...).
    Other,
}

/// The [`Class`] of an instruction.
pub fn classify(instr: &str) -> Class {
    let op = opcode(instr);
    let mut parts = op.split('.');
    let base = parts.next().unwrap_or_default();
    let float_typed = op
        .split('.')
        .skip(1)
        .any(|m| matches!(m, "f16" | "f16x2" | "bf16" | "bf16x2" | "f32" | "f64"));
    match base {
        "ld" | "ldu" => Class::Load,
        "st" | "atom" | "red" => Class::Store,
        "cvt" | "cvta" => Class::Convert,
        "mov" => Class::Move,
        "bra" | "brx" | "setp" | "selp" | "ret" | "exit" | "call" => Class::Control,
        "fma" | "mad" | "mul" | "add" | "sub" | "neg" | "abs" | "min" | "max" | "div" | "rcp"
        | "sqrt" | "rsqrt" | "ex2" | "lg2" | "sin" | "cos" | "copysign" | "testp" | "tanh"
            if float_typed =>
        {
            Class::Float
        }
        "add" | "sub" | "mul" | "mad" | "mul24" | "mad24" | "sad" | "div" | "rem" | "abs"
        | "neg" | "min" | "max" | "popc" | "clz" | "bfind" | "fns" | "brev" | "bfe" | "bfi"
        | "and" | "or" | "xor" | "not" | "cnot" | "lop3" | "shf" | "shl" | "shr" | "prmt"
        | "addc" | "subc" | "madc" | "dp4a" | "dp2a" => Class::Integer,
        _ => Class::Other,
    }
}

/// Instructions of a loop by [`Class`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClassCounts {
    pub loads: u32,
    pub stores: u32,
    pub float: u32,
    pub integer: u32,
    pub convert: u32,
    pub moves: u32,
    pub control: u32,
    pub other: u32,
}

impl ClassCounts {
    fn add(&mut self, class: Class) {
        let slot = match class {
            Class::Load => &mut self.loads,
            Class::Store => &mut self.stores,
            Class::Float => &mut self.float,
            Class::Integer => &mut self.integer,
            Class::Convert => &mut self.convert,
            Class::Move => &mut self.moves,
            Class::Control => &mut self.control,
            Class::Other => &mut self.other,
        };
        *slot += 1;
    }
}

/// A loop of a PTX function: the statements from a label to a later branch back to it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PtxLoop {
    /// The label the backward branch jumps to (the loop head).
    pub label: String,
    /// Instructions from the head to the backward branch, both included (every basic block laid
    /// out in between, so both sides of a branch inside the loop count).
    pub instructions: u32,
    /// Of those, the activation loads ([`X_LOAD`]).
    pub x_loads: u32,
    pub classes: ClassCounts,
}

/// Every loop of a function body: each branch to a label laid out before it closes one.
pub fn loops(body: &str) -> Vec<PtxLoop> {
    let stmts = statements(body);
    let mut out = Vec::new();
    for (i, s) in stmts.iter().enumerate() {
        let Stmt::Instr(instr) = *s else { continue };
        if opcode(instr).split('.').next() != Some("bra") {
            continue;
        }
        let Some(target) = instr.split_whitespace().last() else {
            continue;
        };
        let Some(head) = stmts[..i].iter().rposition(|s| *s == Stmt::Label(target)) else {
            continue; // a forward branch
        };
        let mut l = PtxLoop {
            label: target.to_string(),
            instructions: 0,
            x_loads: 0,
            classes: ClassCounts::default(),
        };
        for s in &stmts[head..=i] {
            if let Stmt::Instr(instr) = *s {
                l.instructions += 1;
                l.classes.add(classify(instr));
                if opcode(instr) == X_LOAD {
                    l.x_loads += 1;
                }
            }
        }
        out.push(l);
    }
    out
}

/// The unit loop of a function body: of the loops with activation loads, the one with the most
/// (the unrolled body rather than its remainder), the shortest of those (the innermost).
pub fn unit_loop(body: &str) -> Option<PtxLoop> {
    loops(body)
        .into_iter()
        .filter(|l| l.x_loads > 0)
        .max_by(|a, b| {
            a.x_loads
                .cmp(&b.x_loads)
                .then(b.instructions.cmp(&a.instructions))
        })
}

/// The count for one unit kernel.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct KernelCount {
    pub kernel: String,
    /// Activation rows (`R` of `mmv_<ty>_r<R>`).
    pub rows: u32,
    /// The unit loop: its head, instructions, x loads, classes.
    #[serde(rename = "loop")]
    pub unit_loop: PtxLoop,
    /// Weights per unit of the decoder (`W`: 8 for every decoder today).
    pub unit_weights: u32,
    /// Output columns a block computes (`Cols` in kernels/matvec.cu): each x load feeds that
    /// many weight rows.
    pub cols: u32,
    /// Weights one iteration of the loop covers: 4 × x loads × columns / rows.
    pub weights_per_iteration: u32,
    /// Units one iteration decodes: weights per iteration / unit weights.
    pub units_per_iteration: u32,
    /// PTX instructions per weight: loop instructions / weights per iteration.
    pub per_weight: f64,
    /// The M40 budget for the type, instructions per weight.
    pub budget: f64,
    /// `per_weight <= budget`.
    pub under_budget: bool,
}

/// Counts the unit loop of the entry point `kernel` (with `rows` activation rows, units of
/// `unit_weights` weights, `cols` output columns sharing each x load) in `ptx` against `budget`
/// instructions per weight.
pub fn count_kernel(
    ptx: &str,
    kernel: &str,
    rows: u32,
    unit_weights: u32,
    cols: u32,
    budget: f64,
) -> Result<KernelCount, IsaError> {
    let body = entry_body(ptx, kernel).ok_or_else(|| IsaError::NoEntry(kernel.to_string()))?;
    let unit_loop = unit_loop(body).ok_or_else(|| IsaError::NoLoop(kernel.to_string()))?;
    let rows = rows.max(1);
    let unit = unit_weights.max(1);
    let cols = cols.max(1);
    let covered = WEIGHTS_PER_X_LOAD * unit_loop.x_loads * cols;
    if !covered.is_multiple_of(rows * unit) {
        return Err(IsaError::Uneven {
            kernel: kernel.to_string(),
            x_loads: unit_loop.x_loads,
            rows,
            unit,
        });
    }
    let weights_per_iteration = covered / rows;
    let per_weight = f64::from(unit_loop.instructions) / f64::from(weights_per_iteration);
    Ok(KernelCount {
        kernel: kernel.to_string(),
        rows,
        unit_weights: unit,
        cols,
        weights_per_iteration,
        units_per_iteration: weights_per_iteration / unit,
        per_weight,
        budget,
        under_budget: per_weight <= budget,
        unit_loop,
    })
}

/// The counts for one weight type.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TypeCount {
    /// `q4_0` (the kernels' suffix).
    #[serde(rename = "type")]
    pub ty: String,
    /// The unit decoder kernels/matvec.cu uses for it (`UQ4_0`, `UGen<TQ5_0>`).
    pub decoder: String,
    /// Whether that decoder is tuned ([`is_tuned`]).
    pub tuned: bool,
    pub bytes_per_weight: f64,
    /// The M40 budget, instructions per weight.
    pub budget: f64,
    /// One per [`REPORTED_ROWS`], in order.
    pub kernels: Vec<KernelResult>,
    /// The one-column-a-warp decode kernel `mmv_<ty>_r1_wc`, for the types that have one (the
    /// K-quants): what decode runs for a matrix of K >= 1024 (`matmul::unit_kernel`), so on
    /// every real model's shapes, where `mmv_<ty>_r1` runs only below that.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wc: Option<KernelResult>,
}

/// A [`KernelCount`], or why there is none.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KernelResult {
    pub kernel: String,
    pub rows: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<KernelCount>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl TypeCount {
    /// The count for `rows` activation rows, if it was made.
    pub fn count(&self, rows: u32) -> Option<&KernelCount> {
        self.kernels
            .iter()
            .find(|k| k.rows == rows)
            .and_then(|k| k.count.as_ref())
    }
}

/// Counts `mmv_<ty>_r<R>` for every weight type the kernels read and every [`REPORTED_ROWS`]
/// against the M40 budget, and `mmv_<ty>_r1_wc` where `ptx` has it (one column a warp: one
/// column shares each x load); a kernel that cannot be counted carries its error.
pub fn m40_counts(ptx: &str) -> Vec<TypeCount> {
    crate::gguf::quants::DEQUANTIZE_TYPES
        .iter()
        .filter_map(|&ty| Some((ty, super::weight_kernel_suffix(ty)?)))
        .map(|(ty, suffix)| {
            let budget = m40_budget_per_weight(ty);
            let decoder = unit_decoder(suffix).unwrap_or("?");
            let unit = unit_weights(decoder);
            let result = |kernel: String, rows: u32, cols: u32| {
                let r = unit
                    .ok_or_else(|| IsaError::NoUnitWidth(decoder.to_string()))
                    .and_then(|w| count_kernel(ptx, &kernel, rows, w, cols, budget));
                KernelResult {
                    kernel,
                    rows,
                    error: r.as_ref().err().map(ToString::to_string),
                    count: r.ok(),
                }
            };
            let kernels = REPORTED_ROWS
                .iter()
                .map(|&rows| {
                    let cols = super::matmul::unit_cols(ty, false, rows as usize) as u32;
                    result(format!("mmv_{suffix}_r{rows}"), rows, cols)
                })
                .collect();
            let wc_kernel = format!("mmv_{suffix}_r1_wc");
            let wc = entry_body(ptx, &wc_kernel).map(|_| result(wc_kernel, 1, 1));
            TypeCount {
                ty: suffix.to_string(),
                decoder: decoder.to_string(),
                tuned: is_tuned(suffix),
                bytes_per_weight: bytes_per_weight(ty),
                budget,
                kernels,
                wc,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two entry points; the second has a prologue, a unit loop of two blocks (a forward branch
    /// inside) with 4 x loads (16 weights for one row), a remainder loop with fewer x loads, a
    /// reduction loop with none, inline asm, directives and comments.
    const PTX: &str = r#"
//
// Generated by NVIDIA NVVM Compiler
.version 8.4
.target sm_52
.address_size 64

.visible .entry other_kernel(
	.param .u64 other_kernel_param_0
)
{
	.reg .f32 	%f<4>;
$L__BB0_1:
	ld.global.nc.v4.f32 {%f0,%f1,%f2,%f3}, [%rd1];
	@%p1 bra 	$L__BB0_1;
	ret;
}

	// .globl	mmv_t_r1
.visible .entry mmv_t_r1(
	.param .u64 mmv_t_r1_param_0,
	.param .u32 mmv_t_r1_param_1
)
.maxntid 128, 1, 1
{
	.reg .pred 	%p<4>;
	.reg .f32 	%f<64>;
	// demoted variable
	.shared .align 4 .b8 red[16];

	ld.param.u64 	%rd1, [mmv_t_r1_param_0];
	mov.u32 	%r1, %tid.x;
	setp.lt.s32 	%p1, %r1, %r2;
	@%p1 bra 	$L__BB1_2;
	bra.uni 	$L__BB1_9;

$L__BB1_2:
	.pragma "nounroll";
	mul.wide.s32 	%rd2, %r1, 18;
	// begin inline asm
	ld.global.nc.u32 %r3, [%rd2];
	// end inline asm
	prmt.b32 	%r4, %r3, %r5, %r6;
	mov.b32 	%f1, %r4;
	add.f32 	%f2, %f1, 0fCB000008;
	@%p2 bra 	$L__BB1_4;
	shf.r.wrap.b32 %r7, %r3, %r4, %r5;
$L__BB1_4:
	// begin inline asm
	ld.global.nc.v4.f32 {%f3,%f4,%f5,%f6}, [%rd3];
	// end inline asm
	fma.rn.f32 	%f7, %f2, %f3, %f7;
	{ .reg .b16 tmp; cvt.f32.f16 %f8, %rs1; }
	ld.global.nc.v4.f32 {%f9,%f10,%f11,%f12}, [%rd3+16];
	ld.global.nc.v4.f32 {%f13,%f14,%f15,%f16}, [%rd3+32];
	ld.global.nc.v4.f32 {%f17,%f18,%f19,%f20}, [%rd3+48];
	add.s32 	%r1, %r1, %r8;
	setp.lt.s32 	%p3, %r1, %r2;
	@%p3 bra 	$L__BB1_2;

$L__BB1_5:
	ld.global.nc.v4.f32 {%f21,%f22,%f23,%f24}, [%rd4];
	fma.rn.f32 	%f25, %f21, %f22, %f25;
	@!%p3 bra.uni 	$L__BB1_5;

$L__BB1_7:
	ld.shared.f32 	%f26, [%rd5];
	add.f32 	%f27, %f27, %f26;
	@%p2 bra 	$L__BB1_7;

$L__BB1_9:
	st.global.f32 	[%rd6], %f27;
	ret;

}
"#;

    #[test]
    fn entry_bodies_are_found_by_exact_name() {
        let body = entry_body(PTX, "mmv_t_r1").unwrap();
        assert!(body.contains("$L__BB1_2:"));
        assert!(!body.contains("$L__BB0_1"));
        assert!(body.trim_end().ends_with("ret;"));
        assert!(entry_body(PTX, "mmv_t").is_none());
        assert!(entry_body(PTX, "missing").is_none());
        assert!(entry_body("", "mmv_t_r1").is_none());
        // Unbalanced braces: no body rather than a panic.
        assert!(entry_body(".entry k(\n){\n ret;\n", "k").is_none());
    }

    #[test]
    fn statements_skip_directives_comments_and_asm_braces() {
        let body = entry_body(PTX, "mmv_t_r1").unwrap();
        let stmts = statements(body);
        assert!(stmts.contains(&Stmt::Label("$L__BB1_4")));
        assert!(stmts.contains(&Stmt::Instr("cvt.f32.f16 %f8, %rs1")));
        assert!(stmts.contains(&Stmt::Instr("@%p3 bra \t$L__BB1_2")));
        for s in &stmts {
            if let Stmt::Instr(i) = s {
                assert!(
                    !i.starts_with('.') && !i.starts_with('{') && !i.contains("//"),
                    "{i}"
                );
            }
        }
        let instrs = stmts.iter().filter(|s| matches!(s, Stmt::Instr(_))).count();
        assert_eq!(instrs, 29);
    }

    #[test]
    fn instructions_are_classified() {
        for (instr, class) in [
            ("ld.global.nc.v4.f32 {%f1,%f2,%f3,%f4}, [%rd1]", Class::Load),
            ("ld.param.u64 %rd1, [p]", Class::Load),
            ("st.shared.f32 [%rd1], %f1", Class::Store),
            ("fma.rn.f32 %f1, %f2, %f3, %f4", Class::Float),
            ("add.f32 %f1, %f2, 0fCB000008", Class::Float),
            ("neg.f32 %f1, %f2", Class::Float),
            ("add.s64 %rd1, %rd2, 4", Class::Integer),
            ("mul.wide.s32 %rd1, %r1, 18", Class::Integer),
            ("prmt.b32 %r1, %r2, %r3, %r4", Class::Integer),
            ("shf.r.wrap.b32 %r1, %r2, %r3, %r4", Class::Integer),
            ("lop3.b32 %r1, %r2, %r3, %r4, 0xe8", Class::Integer),
            ("and.b32 %r1, %r2, 252645135", Class::Integer),
            ("cvt.f32.f16 %f1, %rs1", Class::Convert),
            ("mov.b32 %f1, %r1", Class::Move),
            ("@%p1 bra $L__BB1_2", Class::Control),
            ("@!%p1 bra.uni $L__BB1_2", Class::Control),
            ("setp.lt.s32 %p1, %r1, %r2", Class::Control),
            ("selp.b32 %r1, %r2, %r3, %p1", Class::Control),
            ("shfl.sync.bfly.b32 %r1|%p1, %r2, 16, 31, -1", Class::Other),
        ] {
            assert_eq!(classify(instr), class, "{instr}");
        }
        assert_eq!(opcode("@%p1 bra $L"), "bra");
        assert_eq!(opcode("fma.rn.f32 %f1"), "fma.rn.f32");
    }

    #[test]
    fn the_unit_loop_is_the_backward_branch_over_the_most_x_loads() {
        let body = entry_body(PTX, "mmv_t_r1").unwrap();
        let all = loops(body);
        let labels: Vec<_> = all.iter().map(|l| l.label.as_str()).collect();
        // The forward branches to $L__BB1_2 (prologue) and $L__BB1_4 close no loop.
        assert_eq!(labels, ["$L__BB1_2", "$L__BB1_5", "$L__BB1_7"]);
        let l = unit_loop(body).unwrap();
        assert_eq!(l.label, "$L__BB1_2");
        assert_eq!(l.x_loads, 4);
        assert_eq!(l.instructions, 16);
        assert_eq!(
            l.classes,
            ClassCounts {
                loads: 5,
                stores: 0,
                float: 2,
                integer: 4,
                convert: 1,
                moves: 1,
                control: 3,
                other: 0,
            }
        );
        assert_eq!(all[1].x_loads, 1);
        assert_eq!(all[2].x_loads, 0);
    }

    #[test]
    fn counts_divide_by_the_units_one_iteration_covers() {
        // 4 x loads are 16 weights for one row: two units of 8, half a unit of 32 (the parser or
        // the kernel changed), 8 weights for each of 2 rows, nothing whole for 3.
        let c = count_kernel(PTX, "mmv_t_r1", 1, 8, 1, 6.6).unwrap();
        assert_eq!((c.weights_per_iteration, c.units_per_iteration), (16, 2));
        assert!((c.per_weight - 1.0).abs() < 1e-12);
        let c = count_kernel(PTX, "mmv_t_r1", 2, 8, 1, 6.6).unwrap();
        assert_eq!((c.weights_per_iteration, c.units_per_iteration), (8, 1));
        // Four output columns share each x load: four times the weights per iteration.
        let c = count_kernel(PTX, "mmv_t_r1", 1, 8, 4, 6.6).unwrap();
        assert_eq!((c.weights_per_iteration, c.units_per_iteration), (64, 8));
        assert!((c.per_weight - 0.25).abs() < 1e-12);
        for (rows, unit) in [(1, 32), (3, 8)] {
            let e = count_kernel(PTX, "mmv_t_r1", rows, unit, 1, 6.6).unwrap_err();
            assert!(matches!(e, IsaError::Uneven { x_loads: 4, .. }), "{e}");
        }
        assert!(matches!(
            count_kernel(PTX, "nope_r1", 1, 8, 1, 6.6),
            Err(IsaError::NoEntry(_))
        ));
        // A kernel whose loop loads 8 float4 per row: one unit of 32 for R = 1.
        let ptx = PTX.replace(
            "\t@%p3 bra \t$L__BB1_2;",
            "\tld.global.nc.v4.f32 {%f1,%f2,%f3,%f4}, [%rd3+64];\n\
             \tld.global.nc.v4.f32 {%f1,%f2,%f3,%f4}, [%rd3+80];\n\
             \tld.global.nc.v4.f32 {%f1,%f2,%f3,%f4}, [%rd3+96];\n\
             \tld.global.nc.v4.f32 {%f1,%f2,%f3,%f4}, [%rd3+112];\n\
             \t@%p3 bra \t$L__BB1_2;",
        );
        let c = count_kernel(&ptx, "mmv_t_r1", 1, 32, 1, 0.6).unwrap();
        assert_eq!(c.units_per_iteration, 1);
        assert_eq!(c.unit_loop.instructions, 20);
        assert!((c.per_weight - 20.0 / 32.0).abs() < 1e-12);
        assert!(!c.under_budget);
        assert!(
            count_kernel(&ptx, "mmv_t_r1", 1, 32, 1, 0.7)
                .unwrap()
                .under_budget
        );
        // No loop with x loads at all.
        let flat =
            ".entry mmv_f_r1(\n)\n{\n\tld.global.nc.v4.f32 {%f1,%f2,%f3,%f4}, [%rd1];\n\tret;\n}\n";
        assert!(matches!(
            count_kernel(flat, "mmv_f_r1", 1, 8, 1, 1.0),
            Err(IsaError::NoLoop(_))
        ));
    }

    #[test]
    fn decoders_are_read_from_the_kernel_source() {
        assert_eq!(unit_decoder("q4_0"), Some("UQ4_0"));
        assert_eq!(unit_decoder("f32"), Some("UGen<TF32>"));
        assert_eq!(unit_decoder("q9_9"), None);
        assert!(is_tuned("q4_k") && is_tuned("f16"));
        assert!(!is_tuned("f32") && !is_tuned("q9_9"));
        assert_eq!(unit_weights("UQ4_K"), Some(8));
        assert_eq!(unit_weights("UQ4_0"), Some(8));
        assert_eq!(unit_weights("UGen<TF32>"), Some(8));
        assert_eq!(unit_weights("UQ9_9"), None);
    }

    #[test]
    fn m40_budgets_follow_the_bytes_per_weight() {
        let per_byte = m40_budget_per_byte();
        assert!((per_byte - 11.805).abs() < 0.01, "{per_byte}");
        for (ty, want) in [
            (GgmlType::Q4_0, 6.64),
            (GgmlType::Q4_1, 7.38),
            (GgmlType::Q8_0, 12.54),
            (GgmlType::Q4_K, 6.64),
            (GgmlType::Q6_K, 9.68),
            (GgmlType::F16, 23.61),
            (GgmlType::F32, 47.22),
        ] {
            let b = m40_budget_per_weight(ty);
            assert!((b - want).abs() < 0.01, "{ty}: {b}");
        }
    }
}
