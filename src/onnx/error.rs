//! The ONNX layer's error type: reading, decoding and writing model files.

use std::path::PathBuf;

/// Failures reading, decoding or writing ONNX models. Each names the file or tensor involved.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {size} bytes is larger than the {limit}-byte limit of an ONNX protobuf")]
    TooLarge { path: PathBuf, size: u64, limit: u64 },
    #[error("{path}: not a valid ONNX model (protobuf decoding failed)")]
    Decode {
        path: PathBuf,
        #[source]
        source: prost::DecodeError,
    },
    #[error("{path}: the model has no graph")]
    NoGraph { path: PathBuf },
    #[error("tensor '{tensor}': {problem}")]
    Tensor { tensor: String, problem: String },
    #[error("tensor '{tensor}': external data file {file}: {problem}")]
    ExternalData { tensor: String, file: PathBuf, problem: String },
    #[error("node '{node}' ({op}): attribute '{attribute}' {problem}")]
    Attribute { node: String, op: String, attribute: String, problem: String },
    #[error("node '{node}' ({op}): {problem}")]
    Node { node: String, op: String, problem: String },
}
