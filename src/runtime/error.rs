//! The runtime layer's error type: ONNX Runtime, tract and the engine run as a backend.

use std::path::PathBuf;

/// Failures of the runtimes. Messages name the model, the library or the tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "ONNX Runtime library not found (looked for {looked}). Fetch it with `scripts/fetch.sh ort` \
         from the mtpack checkout, or set ORT_DYLIB_PATH to libonnxruntime.so.1.31.1 from the PyPI \
         wheel onnxruntime==1.31.1 (file onnxruntime/capi/libonnxruntime.so.1.31.1)"
    )]
    OrtLibraryMissing { looked: String },
    #[error("ORT_DYLIB_PATH points to {path}, which does not exist")]
    OrtPathInvalid { path: PathBuf },
    #[error("cannot load the ONNX Runtime library {path}: {message}")]
    OrtLoad { path: PathBuf, message: String },
    #[error("ONNX Runtime: {context}")]
    Ort {
        context: String,
        #[source]
        source: ort::Error,
    },
    #[error("tract: {context}")]
    Tract {
        context: String,
        #[source]
        source: anyhow_like::TractError,
    },
    /// A runtime panicked on the model (a damaged or hostile file); the process goes on.
    #[error("{runtime}: {context}: the runtime failed on this model ({message})")]
    Panicked { runtime: &'static str, context: String, message: String },
    #[error("input '{input}': {problem}")]
    Input { input: String, problem: String },
    #[error("output '{output}': {problem}")]
    Output { output: String, problem: String },
    #[error("output '{output}': {problem}")]
    Mismatch { output: String, problem: String },
    /// The training engine run as a backend (it sits above this layer: its error is boxed).
    #[error("training engine")]
    Engine(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("device '{device}' is not available: {why}")]
    Device { device: String, why: String },
}

/// tract reports errors as `anyhow::Error`; this wrapper keeps the whole chain as the source.
pub mod anyhow_like {
    #[derive(Debug)]
    pub struct TractError(pub tract_onnx::prelude::TractError);

    impl std::fmt::Display for TractError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{:#}", self.0)
        }
    }

    impl std::error::Error for TractError {}
}
