//! The compiler in one call: GGUF → lowered graph → passes → plan, for a [`Target`].
//!
//! The target decides the passes (those it wants, less `--disable-pass`, none with
//! `--no-fuse`) and the buffer alignment. After the passes every node is checked against the
//! target ([`Target::supports_op`]): a fused node the target has no kernel for is unfused (its
//! definition in primitive ops, [`unfuse_if`]); anything else it cannot run is
//! [`CompileError::Unsupported`], naming the step, the op and the type.

use crate::backend::target::{Target, Unsupported};
use crate::gguf::GgufFile;
use crate::ir::{Graph, IrError, Op, ValueType, verify};
use crate::lower::{LowerError, lower};
use crate::passes::{PassError, PassRecord, Pipeline, unfuse_if};
use crate::plan::{FusionReport, ModelInfo, Plan, PlanError, PlanOptions};

/// How to compile (the target is the other half of what to compile for).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileOptions {
    /// Sizes and reuse; its `alignment` is replaced by the target's.
    pub plan: PlanOptions,
    /// Run the fusion passes (`--no-fuse` turns them off).
    pub fuse: bool,
    /// Fusion passes to skip, by name (`--disable-pass NAME`).
    pub disabled_passes: Vec<String>,
}

impl Default for CompileOptions {
    fn default() -> CompileOptions {
        CompileOptions {
            plan: PlanOptions::default(),
            fuse: true,
            disabled_passes: Vec::new(),
        }
    }
}

/// The compiler's products: both graphs and the plan.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The graph as lowered, before any pass.
    pub lowered: Graph,
    /// The graph after the passes: what the plan schedules.
    pub graph: Graph,
    pub plan: Plan,
    /// Fused nodes unfused because the target has no kernel for them.
    pub unfused: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(transparent)]
    Lower(#[from] LowerError),
    #[error(transparent)]
    Pass(#[from] PassError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Unsupported(#[from] Unsupported),
    #[error(transparent)]
    Graph(#[from] IrError),
    #[error("target {target}: {message}")]
    Target { target: String, message: String },
}

/// The passes `options` asks for on `target`: the target's, in the pipeline's order, less the
/// disabled ones; none with `fuse` off.
pub fn pipeline(options: &CompileOptions, target: &Target) -> Result<Pipeline, CompileError> {
    let all = Pipeline::fusion().names();
    // Unknown names are errors even with --no-fuse: a typo should not pass silently.
    Pipeline::fusion().without(&options.disabled_passes)?;
    Pipeline::fusion()
        .without(&target.passes)
        .map_err(|e| CompileError::Target {
            target: target.name.clone(),
            message: e.to_string(),
        })?;
    if !options.fuse {
        return Ok(Pipeline::empty());
    }
    let unwanted: Vec<&str> = all
        .into_iter()
        .filter(|p| !target.passes.iter().any(|t| t == p))
        .collect();
    Ok(Pipeline::fusion()
        .without(&unwanted)?
        .without(&options.disabled_passes)?)
}

/// Lowers `file`, runs the passes `target` wants, rewrites or refuses what it cannot run, and
/// plans the result with the target's alignment.
pub fn compile(
    file: &GgufFile,
    options: &CompileOptions,
    target: &Target,
) -> Result<Compiled, CompileError> {
    let pipeline = pipeline(options, target)?;
    let plan_options = PlanOptions {
        alignment: target.alignment,
        ..options.plan.clone()
    };
    plan_options.validate()?;
    let lowered = lower(file)?;
    let mut graph = lowered.graph.clone();
    let mut passes = pipeline.run(&mut graph)?;
    let unfused = fused_nodes_lacking_kernels(&graph, target)?;
    if !unfused.is_empty() {
        graph =
            unfuse_if(&graph, |name, _| unfused.iter().any(|u| u == name)).map_err(|source| {
                PassError::Rewrite {
                    pass: "unfuse",
                    source,
                }
            })?;
        verify(&graph).map_err(|source| PassError::Broken {
            pass: "unfuse",
            source,
        })?;
        tracing::info!(
            target = %target,
            nodes = unfused.len(),
            "unfused the fused ops the target has no kernel for"
        );
        passes.push(PassRecord {
            pass: "unfuse".into(),
            rewrites: unfused.len(),
            nodes_after: graph.n_compute_nodes(),
        });
    }
    // Every node, fused or not, must now be one the target runs.
    if let Some(err) = check_graph(&graph, target)?.into_iter().next() {
        return Err(err.into());
    }
    let mut plan = Plan::build(&graph, &plan_options)?;
    target.check_plan(&plan)?;
    plan.model = Some(ModelInfo {
        family: lowered.family,
        name: lowered.name,
        hparams: lowered.hparams,
    });
    plan.fusion = FusionReport {
        nodes_lowered: lowered.graph.n_compute_nodes(),
        passes,
    };
    Ok(Compiled {
        lowered: lowered.graph,
        graph,
        plan,
        unfused,
    })
}

/// What `target` cannot run in `graph`, node by node, in topological order (an error only when
/// the graph cannot be ordered, which a verified graph always can).
pub fn check_graph(graph: &Graph, target: &Target) -> Result<Vec<Unsupported>, IrError> {
    Ok(graph
        .topo_order()?
        .into_iter()
        .filter_map(|id| {
            let node = graph.node(id);
            let inputs = graph.inputs(id);
            let types: Vec<(&ValueType, bool)> = inputs
                .iter()
                .map(|&v| {
                    let is_weight = matches!(graph.node(v.node).op, Op::Weight { .. });
                    (graph.value_type(v), is_weight)
                })
                .collect();
            let outputs: Vec<&ValueType> = node.outputs.iter().map(|o| &o.ty).collect();
            target
                .supports_op(&node.name, &node.op, &types, &outputs)
                .err()
        })
        .collect())
}

/// The fused nodes `target` cannot run, by name: the ones to unfuse.
fn fused_nodes_lacking_kernels(
    graph: &Graph,
    target: &Target,
) -> Result<Vec<String>, CompileError> {
    let mut names = Vec::new();
    for id in graph.topo_order()? {
        let node = graph.node(id);
        if node.op.is_fused() && !(target.executes)(&node.op) {
            names.push(node.name.clone());
        }
    }
    Ok(names)
}
