//! mtpack: turn one pretrained ONNX backbone into one deployable ONNX model serving many
//! classification tasks.
//!
//! The modules follow the pipeline: [`onnx`] (I/O), [`graph`] (surgery), [`runtime`]
//! (ONNX Runtime and tract), [`data`] (task datasets).

pub mod adapt;
pub mod alloc;
pub mod bench;
pub mod cli;
pub mod data;
pub mod engine;
pub mod fsutil;
pub mod graph;
pub mod methods;
pub mod onnx;
pub mod pack;
pub mod report;
pub mod rng;
pub mod runtime;
pub mod store;
pub mod tensor;
pub mod train;
