//! Op fusion at compile time. A Clip or Relu right after a BatchNormalization (the
//! Conv-BN-ReLU6 block every MobileNet repeats) is folded into the BatchNormalization
//! kernel: one pass and one buffer fewer each way per block. The values are the same as
//! running the two ops one after the other; only where the intermediate is read by nothing
//! else does the fusion apply.

use std::collections::HashMap;

use crate::engine::kernels::batchnorm::Clamp;
use crate::onnx::pb::{GraphProto, NodeProto};
use crate::onnx::{attr, tensor_proto};

/// A BatchNormalization whose output only a clamp reads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Folded {
    /// Index of the Clip/Relu node folded into the BatchNormalization.
    pub clamp_node: usize,
    pub clamp: Clamp,
}

/// For each BatchNormalization node index, the clamp folded into it. `fixed` tells whether
/// an initializer is a constant (a trainable Clip bound is never folded).
pub fn batch_norm_clamps(g: &GraphProto, opset: i64, fixed: &dyn Fn(&str) -> bool) -> HashMap<usize, Folded> {
    let mut readers: HashMap<&str, usize> = HashMap::new();
    for n in &g.node {
        for i in n.input.iter().filter(|i| !i.is_empty()) {
            *readers.entry(i.as_str()).or_default() += 1;
        }
    }
    for o in &g.output {
        *readers.entry(o.name()).or_default() += 1;
    }
    let producer: HashMap<&str, usize> =
        g.node.iter().enumerate().filter_map(|(i, n)| n.output.first().map(|o| (o.as_str(), i))).collect();
    let mut folded = HashMap::new();
    for (j, n) in g.node.iter().enumerate() {
        let Some(x) = n.input.first() else { continue };
        let Some(&i) = producer.get(x.as_str()) else { continue };
        let bn = &g.node[i];
        let default_domain = |n: &NodeProto| n.domain().is_empty() || n.domain() == "ai.onnx";
        if bn.op_type() != "BatchNormalization" || !default_domain(bn) || !default_domain(n) {
            continue;
        }
        if readers.get(x.as_str()) != Some(&1) || folded.contains_key(&i) {
            continue;
        }
        if let Some(clamp) = clamp_of(n, g, opset, fixed) {
            folded.insert(i, Folded { clamp_node: j, clamp });
        }
    }
    folded
}

/// The constant bounds of a Relu or Clip node, when they are known at compile time.
fn clamp_of(n: &NodeProto, g: &GraphProto, opset: i64, fixed: &dyn Fn(&str) -> bool) -> Option<Clamp> {
    match n.op_type() {
        "Relu" => Some(Clamp { lo: 0.0, hi: f64::INFINITY }),
        "Clip" if opset < 11 => Some(Clamp {
            lo: attr::float_or(n, "min", f32::MIN).ok()? as f64,
            hi: attr::float_or(n, "max", f32::MAX).ok()? as f64,
        }),
        "Clip" => {
            let bound = |k: usize, default: f64| -> Option<f64> {
                match n.input.get(k).filter(|s| !s.is_empty()) {
                    None => Some(default),
                    Some(name) if fixed(name) => scalar_initializer(g, name),
                    Some(_) => None,
                }
            };
            Some(Clamp { lo: bound(1, f64::NEG_INFINITY)?, hi: bound(2, f64::INFINITY)? })
        }
        _ => None,
    }
}

fn scalar_initializer(g: &GraphProto, name: &str) -> Option<f64> {
    let t = g.initializer.iter().find(|t| t.name() == name)?;
    let host = tensor_proto::to_tensor(t).ok()?;
    match host {
        crate::tensor::Tensor::F32(a) if a.len() == 1 => a.iter().next().map(|&v| v as f64),
        crate::tensor::Tensor::F64(a) if a.len() == 1 => a.iter().next().copied(),
        _ => None,
    }
}
