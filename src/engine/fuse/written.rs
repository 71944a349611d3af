//! Layer normalisation and GELU as exporters write them out, fused into one kernel each.
//! PyTorch's exporter (opset < 17 for LayerNorm, < 20 for GELU) spells them
//!
//! - LayerNorm: m = ReduceMean(x, [-1]); d = Sub(x, m); v = ReduceMean(Pow(d, 2), [-1]);
//!   y = Add(Mul(Div(d, Sqrt(Add(v, eps))), scale), bias) — nine ops, nine buffers;
//! - GELU: y = Mul(Mul(x, Add(Erf(Div(x, sqrt 2)), 1)), 0.5), or with the 0.5 applied to x
//!   first — five ops.
//!
//! Each chain found becomes one step computing its last node's output from the chain's
//! outside inputs; commuted operands of Add and Mul are accepted.

use super::{default_domain, View};
use crate::onnx::attr;
use crate::onnx::pb::NodeProto;

/// What a chain computes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// Inputs (x, scale, bias), normalised over the last axis.
    LayerNorm { eps: f64 },
    /// Input (x), exact (erf) GELU.
    Gelu,
}

/// A fused chain: its nodes, the one whose output it produces (the step runs there), and
/// its inputs from outside the chain.
#[derive(Clone, Debug, PartialEq)]
pub struct Chain {
    pub kind: Kind,
    pub nodes: Vec<usize>,
    pub last: usize,
    pub inputs: Vec<String>,
}

/// Every written-out LayerNorm and GELU of the graph. `fixed` tells which initializers are
/// constants (epsilon and the GELU constants must be).
pub fn written_out(view: &View, opset: i64, fixed: &dyn Fn(&str) -> bool) -> Vec<Chain> {
    let mut chains = Vec::new();
    for (i, n) in view.g.node.iter().enumerate() {
        let found = match n.op_type() {
            "ReduceMean" if default_domain(n) => layer_norm(view, i, opset, fixed),
            "Erf" if default_domain(n) => gelu(view, i, fixed),
            _ => None,
        };
        chains.extend(found);
    }
    chains
}

/// The other operand of a binary node one of whose inputs is `known`.
fn other<'a>(n: &'a NodeProto, known: &str) -> Option<&'a str> {
    match n.input.as_slice() {
        [a, b] if a == known => Some(b),
        [a, b] if b == known => Some(a),
        _ => None,
    }
}

/// The only reader of `name` when it is a default-domain `op`.
fn next<'g>(view: &View<'g>, name: &str, op: &str) -> Option<(usize, &'g NodeProto)> {
    view.only_reader(name).filter(|(_, n)| n.op_type() == op && default_domain(n))
}

fn out(n: &NodeProto) -> Option<&str> {
    n.output.first().map(String::as_str)
}

/// A ReduceMean over the last axis only, keeping it.
fn mean_over_last(n: &NodeProto, opset: i64, view: &View, fixed: &dyn Fn(&str) -> bool) -> bool {
    let keep = attr::int_or(n, "keepdims", 1).is_ok_and(|k| k == 1);
    let axes = if opset >= 18 {
        n.input.get(1).and_then(|a| view.scalar(a, fixed)).map(|v| vec![v as i64])
    } else {
        attr::ints(n, "axes").ok().flatten()
    };
    keep && axes.as_deref() == Some(&[-1])
}

fn is_const(view: &View, name: &str, fixed: &dyn Fn(&str) -> bool, want: f64) -> bool {
    view.scalar(name, fixed).is_some_and(|v| (v - want).abs() <= 1e-6 * want.abs().max(1.0))
}

fn layer_norm(view: &View, r1: usize, opset: i64, fixed: &dyn Fn(&str) -> bool) -> Option<Chain> {
    let mean = view.g.node.get(r1)?;
    let x = mean.input.first()?;
    if !mean_over_last(mean, opset, view, fixed) {
        return None;
    }
    let (sub_i, sub) = next(view, out(mean)?, "Sub")?;
    if sub.input.as_slice() != [x.clone(), out(mean)?.to_string()] {
        return None;
    }
    let d = out(sub)?;
    let readers = view.readers.get(d)?;
    let (pow_i, pow) =
        readers.iter().find_map(|&i| Some((i, view.g.node.get(i)?)).filter(|(_, n)| n.op_type() == "Pow"))?;
    let (div_i, div) =
        readers.iter().find_map(|&i| Some((i, view.g.node.get(i)?)).filter(|(_, n)| n.op_type() == "Div"))?;
    if readers.len() != 2 || pow.input.first()? != d || !is_const(view, pow.input.get(1)?, fixed, 2.0) {
        return None;
    }
    let (r2_i, r2) = next(view, out(pow)?, "ReduceMean")?;
    if !mean_over_last(r2, opset, view, fixed) {
        return None;
    }
    let (add_i, add) = next(view, out(r2)?, "Add")?;
    let eps = view.scalar(other(add, out(r2)?)?, fixed)?;
    let (sqrt_i, sqrt) = next(view, out(add)?, "Sqrt")?;
    if next(view, out(sqrt)?, "Div")?.0 != div_i || div.input.as_slice() != [d.to_string(), out(sqrt)?.to_string()] {
        return None;
    }
    let (mul_i, mul) = next(view, out(div)?, "Mul")?;
    let scale = other(mul, out(div)?)?;
    let (bias_i, bias_add) = next(view, out(mul)?, "Add")?;
    let bias = other(bias_add, out(mul)?)?;
    Some(Chain {
        kind: Kind::LayerNorm { eps },
        nodes: vec![r1, sub_i, pow_i, r2_i, add_i, sqrt_i, div_i, mul_i, bias_i],
        last: bias_i,
        inputs: vec![x.clone(), scale.to_string(), bias.to_string()],
    })
}

fn gelu(view: &View, erf_i: usize, fixed: &dyn Fn(&str) -> bool) -> Option<Chain> {
    let erf = view.g.node.get(erf_i)?;
    let scaled = erf.input.first()?;
    let &scale_i = view.producer.get(scaled.as_str())?;
    let scale = view.g.node.get(scale_i)?;
    if view.only_reader(scaled)?.0 != erf_i {
        return None;
    }
    let x = match (scale.op_type(), scale.input.as_slice()) {
        ("Div", [x, c]) if is_const(view, c, fixed, std::f64::consts::SQRT_2) => x,
        ("Mul", [_, _]) => {
            let x = scale.input.iter().find(|i| !is_const(view, i, fixed, std::f64::consts::FRAC_1_SQRT_2))?;
            other(scale, x).filter(|c| is_const(view, c, fixed, std::f64::consts::FRAC_1_SQRT_2))?;
            x
        }
        _ => return None,
    };
    let (one_i, one) = next(view, out(erf)?, "Add")?;
    if !is_const(view, other(one, out(erf)?)?, fixed, 1.0) {
        return None;
    }
    let (m1_i, m1) = next(view, out(one)?, "Mul")?;
    let factor = other(m1, out(one)?)?;
    let mut nodes = vec![scale_i, erf_i, one_i, m1_i];
    let last = if factor == x {
        // x * (1 + erf) first, then * 0.5.
        let (m2_i, m2) = next(view, out(m1)?, "Mul")?;
        if !is_const(view, other(m2, out(m1)?)?, fixed, 0.5) {
            return None;
        }
        nodes.push(m2_i);
        m2_i
    } else {
        // (x * 0.5) * (1 + erf).
        let &half_i = view.producer.get(factor)?;
        let half = view.g.node.get(half_i)?;
        let reads_x = half.op_type() == "Mul" && other(half, x).is_some_and(|c| is_const(view, c, fixed, 0.5));
        if !reads_x || view.only_reader(factor)?.0 != m1_i {
            return None;
        }
        nodes.push(half_i);
        m1_i
    };
    Some(Chain { kind: Kind::Gelu, nodes, last, inputs: vec![x.clone()] })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::Model;

    fn tiny_vit() -> Model {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny/tiny_vit.onnx");
        Model::load(&path).unwrap()
    }

    fn kinds(m: &Model) -> (usize, usize) {
        let chains = written_out(&View::new(m.graph()), 14, &|_| true);
        let ln = chains.iter().filter(|c| matches!(c.kind, Kind::LayerNorm { .. })).count();
        (ln, chains.len() - ln)
    }

    #[test]
    fn finds_every_layer_norm_and_gelu_of_the_fixture() {
        // Two blocks of two LayerNorms and one GELU, and the final LayerNorm; constants as
        // Constant nodes (as exported) or as initializers (after materialisation) alike.
        let m = tiny_vit();
        assert_eq!(kinds(&m), (5, 2));
        let (folded, _) = crate::graph::materialize::weights_from_nodes(&m).unwrap();
        assert_eq!(kinds(&folded), (5, 2));
        let chains = written_out(&View::new(m.graph()), 14, &|_| true);
        let eps: Vec<f64> =
            chains.iter().filter_map(|c| if let Kind::LayerNorm { eps } = c.kind { Some(eps) } else { None }).collect();
        assert!(eps.iter().all(|e| (e - 1e-6).abs() < 1e-12), "{eps:?}");
    }

    #[test]
    fn an_intermediate_read_outside_the_chain_keeps_it_unfused() {
        let mut m = tiny_vit();
        let g = m.graph_mut();
        let sqrt = g.node.iter().find(|n| n.op_type() == "Sqrt").and_then(|n| n.output.first().cloned()).unwrap();
        let erf = g.node.iter().find(|n| n.op_type() == "Erf").and_then(|n| n.output.first().cloned()).unwrap();
        for name in [sqrt, erf] {
            g.output.push(crate::onnx::pb::ValueInfoProto { name: Some(name), ..Default::default() });
        }
        assert_eq!(kinds(&m), (4, 1));
    }

    #[test]
    fn a_different_constant_is_not_gelu() {
        let mut m = tiny_vit();
        let g = m.graph_mut();
        // The 0.5 of the first GELU becomes 0.25: the chain no longer computes GELU.
        let erf_at = g.node.iter().position(|n| n.op_type() == "Erf").unwrap();
        let half = g.node[erf_at..]
            .iter()
            .filter(|n| n.op_type() == "Mul")
            .nth(1)
            .and_then(|n| n.input.get(1).cloned())
            .unwrap();
        let c = g.node.iter_mut().find(|n| n.output.first() == Some(&half)).unwrap();
        let t =
            crate::onnx::tensor_proto::from_tensor("", &crate::tensor::Tensor::F32(ndarray::arr0(0.25f32).into_dyn()));
        c.attribute = vec![crate::onnx::attr::make_tensor("value", t)];
        assert_eq!(kinds(&m), (5, 1));
    }
}
