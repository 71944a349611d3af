//! A Clip or Relu right after a BatchNormalization (the Conv-BN-ReLU6 block every MobileNet
//! repeats) folded into the BatchNormalization kernel: one pass and one buffer fewer each
//! way per block. The values are the same as running the two ops one after the other.

use std::collections::HashMap;

use crate::engine::kernels::batchnorm::Clamp;
use crate::onnx::attr;
use crate::onnx::pb::{GraphProto, NodeProto};

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
    let view = super::View::new(g);
    let (readers, producer) = (&view.readers, &view.producer);
    let mut folded = HashMap::new();
    for (j, n) in g.node.iter().enumerate() {
        let Some(x) = n.input.first() else { continue };
        let Some(&i) = producer.get(x.as_str()) else { continue };
        let bn = &g.node[i];
        let default_domain = |n: &NodeProto| n.domain().is_empty() || n.domain() == "ai.onnx";
        if bn.op_type() != "BatchNormalization" || !default_domain(bn) || !default_domain(n) {
            continue;
        }
        if readers.get(x.as_str()).map(Vec::len) != Some(1) || folded.contains_key(&i) {
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
                    Some(name) if fixed(name) => super::scalar_initializer(g, name),
                    Some(_) => None,
                }
            };
            Some(Clamp { lo: bound(1, f64::NEG_INFINITY)?, hi: bound(2, f64::INFINITY)? })
        }
        _ => None,
    }
}
