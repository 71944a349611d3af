//! mtpack: turn one pretrained ONNX backbone into one deployable ONNX model serving many
//! classification tasks.
//!
//! The modules follow the pipeline: [`onnx`] (I/O), [`graph`] (surgery), [`runtime`]
//! (ONNX Runtime and tract), [`data`] (task datasets), [`serve`] (one task of an exported
//! artifact at the plain backbone's speed).

// Nothing read from a file may panic: fallible paths return errors (tests may unwrap).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod adapt;
pub mod alloc;
pub mod bench;
pub mod cli;
pub mod data;
pub mod engine;
pub mod fsutil;
pub mod fuzz;
pub mod graph;
pub mod interrupt;
pub mod layers;
pub mod methods;
pub mod onnx;
pub mod pack;
pub mod parallel;
pub mod plan;
pub mod report;
pub mod rng;
pub mod runtime;
pub mod serve;
pub mod store;
pub mod tensor;
pub mod train;

/// An error and its sources on one line, as anyhow's `{:#}` prints them, for reports that
/// collect problems as text.
pub fn report_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        text.push_str(": ");
        text.push_str(&s.to_string());
        next = s.source();
    }
    text
}
