//! The compiler in one call: GGUF → lowered graph → passes → plan.

use crate::gguf::GgufFile;
use crate::ir::Graph;
use crate::lower::{LowerError, lower};
use crate::passes::{PassError, Pipeline};
use crate::plan::{FusionReport, ModelInfo, Plan, PlanError, PlanOptions};

/// What to compile for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileOptions {
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
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(transparent)]
    Lower(#[from] LowerError),
    #[error(transparent)]
    Pass(#[from] PassError),
    #[error(transparent)]
    Plan(#[from] PlanError),
}

/// The passes `options` asks for.
pub fn pipeline(options: &CompileOptions) -> Result<Pipeline, PassError> {
    let pipeline = if options.fuse {
        Pipeline::fusion()
    } else {
        Pipeline::empty()
    };
    // Unknown names are errors even with --no-fuse: a typo should not pass silently.
    Pipeline::fusion().without(&options.disabled_passes)?;
    pipeline.without(&options.disabled_passes)
}

/// Lowers `file`, runs the passes and plans the result.
pub fn compile(file: &GgufFile, options: &CompileOptions) -> Result<Compiled, CompileError> {
    let pipeline = pipeline(options)?;
    options.plan.validate()?;
    let lowered = lower(file)?;
    let mut graph = lowered.graph.clone();
    let passes = pipeline.run(&mut graph)?;
    let mut plan = Plan::build(&graph, &options.plan)?;
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
    })
}
