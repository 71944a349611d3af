//! Cutting a graph at a tensor into a standalone prefix (inputs -> tensor) and suffix
//! (tensor -> outputs).

use std::collections::HashSet;

use super::index::{ancestors, node_reads, producers, Source};
use super::{GraphError, Patch};
use crate::onnx::attr::node_label;
use crate::onnx::pb::{GraphProto, ValueInfoProto};
use crate::onnx::{build, Model};
use crate::tensor::DType;

/// The declared type of a tensor if the model has one, else float32 of unknown shape.
pub fn value_info_for(g: &GraphProto, tensor: &str) -> ValueInfoProto {
    g.value_info
        .iter()
        .chain(g.output.iter())
        .chain(g.input.iter())
        .find(|v| v.name() == tensor && v.r#type.is_some())
        .cloned()
        .unwrap_or_else(|| build::value_info(tensor, DType::F32, None))
}

/// The model truncated so that `tensor` is its only output.
pub fn prefix(model: &Model, tensor: &str) -> Result<Model, GraphError> {
    check_cut_point(model.graph(), tensor)?;
    let vi = value_info_for(model.graph(), tensor);
    Patch::new().set_outputs(vec![vi]).apply(model)
}

/// The part of the model after `tensor`, with `tensor` as its only input.
pub fn suffix(model: &Model, tensor: &str) -> Result<Model, GraphError> {
    let g = model.graph();
    check_cut_point(g, tensor)?;
    let outputs: Vec<&str> = g.output.iter().map(|o| o.name()).collect();
    let stop: HashSet<&str> = [tensor].into_iter().collect();
    let after = ancestors(g, &outputs, &stop);
    let after_set: HashSet<usize> = after.iter().copied().collect();
    let prod = producers(g);
    for &idx in &after {
        let n = &g.node[idx];
        for r in node_reads(n) {
            if r == tensor {
                continue;
            }
            let crosses = match prod.get(r) {
                Some(Source::Input) => true,
                Some(Source::Node(p)) => !after_set.contains(p) && depends_on_input(g, r),
                _ => false,
            };
            if crosses {
                return Err(GraphError::NotACut { tensor: tensor.into(), node: node_label(n), needs: r.into() });
            }
        }
    }
    let vi = value_info_for(g, tensor);
    // The cut tensor becomes the input; pruning drops everything before it.
    Patch::new().remove_producer(tensor).set_inputs(vec![vi]).apply(model)
}

/// Both halves at once.
pub fn cut(model: &Model, tensor: &str) -> Result<(Model, Model), GraphError> {
    Ok((prefix(model, tensor)?, suffix(model, tensor)?))
}

fn check_cut_point(g: &GraphProto, tensor: &str) -> Result<(), GraphError> {
    match producers(g).get(tensor) {
        Some(Source::Node(_)) => Ok(()),
        Some(_) => Err(GraphError::CutAtSource { tensor: tensor.into() }),
        None => Err(GraphError::NoSuchTensor { tensor: tensor.into() }),
    }
}

/// Whether computing `tensor` needs a graph input (a constant-only subgraph does not).
fn depends_on_input(g: &GraphProto, tensor: &str) -> bool {
    let inputs: HashSet<&str> = g.input.iter().map(|i| i.name()).collect();
    let init: HashSet<&str> = g.initializer.iter().map(|t| t.name()).collect();
    if inputs.contains(tensor) && !init.contains(tensor) {
        return true;
    }
    ancestors(g, &[tensor], &HashSet::new())
        .iter()
        .any(|&i| node_reads(&g.node[i]).iter().any(|r| inputs.contains(r) && !init.contains(r)))
}
