//! The two independent runtimes: ONNX Runtime (through ort) runs what is frozen and evaluates;
//! tract verifies. Both take and return mtpack host tensors.

pub mod device;
mod error;
pub mod ort_rt;
pub mod probe;
pub mod tract_rt;

pub use error::RuntimeError;

use crate::tensor::{max_abs_diff, Tensor};

/// Named tensors in, named tensors out.
pub type Named = Vec<(String, Tensor)>;

/// Something that runs an ONNX model.
pub trait Backend {
    /// A short name for messages and reports ("ort", "tract").
    fn name(&self) -> &'static str;
    fn run(&mut self, inputs: &[(String, Tensor)]) -> Result<Named, RuntimeError>;
}

/// One of the two runtimes, by kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// ONNX Runtime on the CPU.
    Ort,
    /// tract, the verifier.
    Tract,
}

impl Runtime {
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Ort => "ort",
            Runtime::Tract => "tract",
        }
    }

    /// A session of `model` in this runtime.
    pub fn session(self, model: &crate::onnx::Model, label: &str) -> Result<Box<dyn Backend>, RuntimeError> {
        let bytes = model.to_bytes();
        Ok(match self {
            Runtime::Ort => Box::new(ort_rt::OrtSession::from_bytes(&bytes, label)?),
            Runtime::Tract => Box::new(tract_rt::TractSession::from_bytes(&bytes, label)?),
        })
    }
}

/// Per-output largest absolute difference between two runs of the same model.
pub fn compare(a: &Named, b: &Named) -> Result<Vec<(String, f64)>, RuntimeError> {
    let mut out = Vec::new();
    for (name, ta) in a {
        let tb = b.iter().find(|(n, _)| n == name).map(|(_, t)| t).ok_or_else(|| RuntimeError::Mismatch {
            output: name.clone(),
            problem: "missing from the other runtime".into(),
        })?;
        let d = max_abs_diff(ta, tb).ok_or_else(|| RuntimeError::Mismatch {
            output: name.clone(),
            problem: format!("shapes differ: {:?} vs {:?}", ta.shape(), tb.shape()),
        })?;
        out.push((name.clone(), d));
    }
    Ok(out)
}
