//! Graph surgery and analysis on our ONNX types. Every edit goes through [`Patch`].

pub mod analysis;
pub mod batch;
pub mod cut;
mod error;
pub mod features;
pub mod heads;
pub mod index;
pub mod masks;
pub mod materialize;
pub mod opset;
mod patch;
pub mod preprocess;

pub use error::GraphError;
pub use patch::Patch;
