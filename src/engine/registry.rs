//! The op table: each supported ONNX op declares its arity and opset range and how to build
//! an executable [`Op`] from a node. Families register themselves in `ops/`.

use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::{DType, Tensor};

use super::EngineError;
use crate::onnx::attr::node_label;
use crate::onnx::pb::NodeProto;

/// An executable node: inputs in node order (None for an omitted optional input), outputs
/// in node order.
pub trait Op: Send + Sync {
    fn forward(&self, inputs: &[Option<Tensor>]) -> candle_core::Result<Vec<Tensor>>;
}

/// An op written as a closure.
pub struct FnOp<F>(pub F);

impl<F> Op for FnOp<F>
where
    F: Fn(&[Option<Tensor>]) -> candle_core::Result<Vec<Tensor>> + Send + Sync,
{
    fn forward(&self, inputs: &[Option<Tensor>]) -> candle_core::Result<Vec<Tensor>> {
        (self.0)(inputs)
    }
}

/// What a builder may know about the model.
pub struct BuildCtx {
    /// The default-domain opset the model imports.
    pub opset: i64,
    /// The floating-point type computations run in (F32, or F64 for gradient checks).
    pub float: DType,
    /// Set while training: ops with running state (BatchNormalization whose statistics are
    /// in `stateful`) then use batch statistics and return updated running values.
    pub training: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Set while the running statistics are recalibrated (`Engine::recalibrate_batchnorm`):
    /// ops with running state then return the batch's own statistics as the running values.
    pub calibrating: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Initializers held as mutable state (BatchNormalization running statistics).
    pub stateful: std::collections::HashSet<String>,
}

pub type Build = fn(&NodeProto, &BuildCtx) -> Result<Box<dyn Op>, EngineError>;

#[derive(Clone, Copy)]
pub struct OpSpec {
    pub min_inputs: usize,
    pub max_inputs: usize,
    /// Outputs the engine can produce; more requested outputs are refused.
    pub max_outputs: usize,
    /// First default-domain opset the builder follows.
    pub since: i64,
    pub build: Build,
}

impl OpSpec {
    pub const fn new(min_inputs: usize, max_inputs: usize, build: Build) -> OpSpec {
        OpSpec { min_inputs, max_inputs, max_outputs: 1, since: 1, build }
    }

    pub const fn since(mut self, opset: i64) -> OpSpec {
        self.since = opset;
        self
    }

    pub const fn outputs(mut self, n: usize) -> OpSpec {
        self.max_outputs = n;
        self
    }
}

pub type Registry = HashMap<&'static str, OpSpec>;

pub fn registry() -> &'static Registry {
    static REG: OnceLock<Registry> = OnceLock::new();
    REG.get_or_init(|| {
        let mut r = Registry::new();
        super::ops::register_all(&mut r);
        r
    })
}

/// Whether the engine can execute `op` of the default domain.
pub fn supports(op: &str) -> bool {
    registry().contains_key(op)
}

/// Checks a node against its op's declaration and builds it.
pub fn build(node: &NodeProto, ctx: &BuildCtx) -> Result<Box<dyn Op>, EngineError> {
    let (label, op) = (node_label(node), node.op_type().to_string());
    let domain = node.domain();
    if !(domain.is_empty() || domain == "ai.onnx") {
        return Err(EngineError::Unsupported { node: label, op: format!("{domain}:{op}") });
    }
    let spec =
        registry().get(op.as_str()).ok_or_else(|| EngineError::Unsupported { node: label.clone(), op: op.clone() })?;
    let given = node.input.len();
    if given < spec.min_inputs || given > spec.max_inputs {
        let (min, max) = (spec.min_inputs, spec.max_inputs);
        return Err(EngineError::Arity { node: label, op, what: "inputs", given, min, max });
    }
    // Optional outputs the engine does not produce (MaxPool indices, Dropout mask) are
    // refused only when the model actually reads them.
    if node.output.iter().skip(spec.max_outputs).any(|o| !o.is_empty()) {
        let (given, max) = (node.output.len(), spec.max_outputs);
        return Err(EngineError::Arity { node: label, op, what: "outputs", given, min: 1, max });
    }
    if ctx.opset < spec.since {
        return Err(EngineError::Opset { node: label, op, opset: ctx.opset, since: spec.since });
    }
    (spec.build)(node, ctx)
}
