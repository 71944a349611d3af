//! The graph layer's error type: checks and surgery on a model's graph.

use crate::onnx::OnnxError;

/// Failures of graph checks and surgery. Each names the node or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    #[error("node '{node}' ({op}) reads tensor '{tensor}', which no node, input or initializer provides")]
    MissingTensor { node: String, op: String, tensor: String },
    #[error("node '{node}' uses unknown operator '{op}' of the default ONNX domain")]
    UnknownOp { node: String, op: String },
    #[error("the graph has a cycle through node '{node}' ({op})")]
    Cycle { node: String, op: String },
    #[error("tensor '{tensor}' is produced twice: by '{first}' and by '{second}'")]
    DuplicateTensor { tensor: String, first: String, second: String },
    #[error("graph output '{tensor}' is not produced by any node, input or initializer")]
    MissingOutput { tensor: String },
    #[error("no tensor named '{tensor}' in the graph")]
    NoSuchTensor { tensor: String },
    #[error("cannot cut at '{tensor}': node '{node}' after the cut also reads '{needs}', which is computed before it")]
    NotACut { tensor: String, node: String, needs: String },
    #[error("cannot cut at '{tensor}': it is a graph input or a constant, not a computed tensor")]
    CutAtSource { tensor: String },
    #[error("the model has no classifier head to drop: {why}")]
    NoHead { why: String },
    #[error("'{tensor}' is not an input of the graph")]
    NotAnInput { tensor: String },
    #[error("{what} is already used in the graph")]
    NameTaken { what: String },
    #[error("tensor '{tensor}': {problem}")]
    Shape { tensor: String, problem: String },
    #[error("the model imports opset {from} and cannot be raised to {to}: {why}; re-export it at opset {to} or later")]
    Opset { from: i64, to: i64, why: String },
}
