//! Op fusion at compile time: chains of nodes that one kernel computes in fewer passes over
//! the activations. A chain is fused only where nothing outside it reads its intermediates
//! (no other node, no graph output), so the graph's visible values are those of the nodes
//! run one by one.

mod clamp;
mod depthwise;
mod written;

pub use clamp::{batch_norm_clamps, Folded};
pub use depthwise::batch_norm_convs;
pub use written::{written_out, Chain, Kind};

use std::collections::HashMap;

use crate::onnx::pb::{GraphProto, NodeProto};
use crate::onnx::{attr, tensor_proto};

/// Stands for a graph output among a tensor's readers.
const GRAPH_OUTPUT: usize = usize::MAX;

/// Who produces and who reads each tensor of a graph.
pub(crate) struct View<'g> {
    pub g: &'g GraphProto,
    /// Node indices reading each tensor, [`GRAPH_OUTPUT`] for a graph output, in node order.
    pub readers: HashMap<&'g str, Vec<usize>>,
    pub producer: HashMap<&'g str, usize>,
}

impl<'g> View<'g> {
    pub fn new(g: &'g GraphProto) -> View<'g> {
        let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in g.node.iter().enumerate() {
            for input in n.input.iter().filter(|i| !i.is_empty()) {
                readers.entry(input.as_str()).or_default().push(i);
            }
        }
        for o in &g.output {
            readers.entry(o.name()).or_default().push(GRAPH_OUTPUT);
        }
        let producer = g
            .node
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.output.iter().filter(|o| !o.is_empty()).map(move |o| (o.as_str(), i)))
            .collect();
        View { g, readers, producer }
    }

    /// The one node reading `name`, when exactly one node and no graph output does.
    pub fn only_reader(&self, name: &str) -> Option<(usize, &'g NodeProto)> {
        match self.readers.get(name).map(Vec::as_slice) {
            Some(&[i]) if i != GRAPH_OUTPUT => Some((i, self.g.node.get(i)?)),
            _ => None,
        }
    }

    /// The value of a one-element constant: a fixed initializer or a Constant node's output.
    pub fn scalar(&self, name: &str, fixed: &dyn Fn(&str) -> bool) -> Option<f64> {
        if let Some(&i) = self.producer.get(name) {
            let n = self.g.node.get(i)?;
            if n.op_type() != "Constant" || !default_domain(n) {
                return None;
            }
            if let Ok(Some(t)) = attr::tensor(n, "value") {
                return one_value(t);
            }
            return attr::find(n, "value_float").and_then(|a| a.f).map(f64::from);
        }
        if fixed(name) {
            return scalar_initializer(self.g, name);
        }
        None
    }
}

pub(crate) fn default_domain(n: &NodeProto) -> bool {
    n.domain().is_empty() || n.domain() == "ai.onnx"
}

fn one_value(t: &crate::onnx::pb::TensorProto) -> Option<f64> {
    match tensor_proto::to_tensor(t).ok()? {
        crate::tensor::Tensor::F32(a) if a.len() == 1 => a.iter().next().map(|&v| v as f64),
        crate::tensor::Tensor::F64(a) if a.len() == 1 => a.iter().next().copied(),
        crate::tensor::Tensor::I64(a) if a.len() == 1 => a.iter().next().map(|&v| v as f64),
        _ => None,
    }
}

pub(crate) fn scalar_initializer(g: &GraphProto, name: &str) -> Option<f64> {
    one_value(g.initializer.iter().find(|t| t.name() == name)?)
}
