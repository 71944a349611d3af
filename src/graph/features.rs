//! Where new heads attach: the candidate feature tensors of a model, and the backbone cut at a
//! chosen tensor with the pooling that turns it into one vector per image (class token or
//! mean of a token sequence `[N, T, D]`, global average of a feature map).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::cut::prefix;
use super::index::{consumers, producers, Source};
use super::{GraphError, Patch};
use crate::data::Layout;
use crate::onnx::pb::{GraphProto, NodeProto};
use crate::onnx::{attr, build, tensor_proto, Dim, Model};
use crate::tensor::{DType, Tensor};

/// The name of the pooled feature tensor mtpack appends.
pub const FEATURE: &str = "mtpack/feature";

/// How a feature with more than one vector per image becomes one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// The first token of `[N, T, D]` (a ViT's class token).
    Cls,
    /// The mean over tokens `[N, T, D]`, or over positions of a feature map.
    Mean,
    /// No pooling: the tensor is flattened to `[N, rest]` (fixed token count or map size).
    None,
}

impl std::str::FromStr for Pool {
    type Err = String;
    fn from_str(s: &str) -> Result<Pool, String> {
        match s {
            "cls" => Ok(Pool::Cls),
            "mean" => Ok(Pool::Mean),
            "none" => Ok(Pool::None),
            other => Err(format!("pool '{other}' is not cls, mean or none")),
        }
    }
}

impl Pool {
    pub fn name(self) -> &'static str {
        match self {
            Pool::Cls => "cls",
            Pool::Mean => "mean",
            Pool::None => "none",
        }
    }
}

/// Ops whose output is typically what a classifier reads: normalisations and poolings.
const FEATURE_OPS: &[&str] = &["LayerNormalization", "GlobalAveragePool", "ReduceMean", "Flatten", "Gemm"];

/// Tensors a head could hang from, in graph order: outputs of normalisations (including
/// LayerNorm written out by PyTorch) and poolings through which all data passes, and the
/// graph outputs. Shapes are not known here; a runtime probe adds them.
pub fn candidates(g: &GraphProto) -> Vec<(String, String)> {
    let prod = producers(g);
    let outputs: HashSet<&str> = g.output.iter().map(|o| o.name()).collect();
    let mut v = Vec::new();
    for n in &g.node {
        let Some(out) = n.output.first() else { continue };
        let written_out_ln = layer_norm_affine(g, &prod, n).is_some();
        let featureish = FEATURE_OPS.contains(&n.op_type()) || written_out_ln;
        if (featureish || outputs.contains(out.as_str())) && is_cut(g, out) {
            let op = if written_out_ln { "LayerNorm (decomposed)" } else { n.op_type() };
            v.push((out.clone(), op.to_string()));
        }
    }
    v
}

/// For the final Add of a LayerNorm written out as `Add(Mul(Div(Sub(x, mean), ...), scale),
/// bias)` (PyTorch before opset 17), its (scale, bias) inputs.
pub(crate) fn layer_norm_affine(
    g: &GraphProto,
    prod: &std::collections::HashMap<&str, Source>,
    n: &NodeProto,
) -> Option<(String, String)> {
    let (scale, bias, _) = written_out_affine(g, prod, n, "Div", |div| {
        div.input.first().and_then(|x| produced(g, prod, x, "Sub")).is_some()
    })?;
    Some((scale, bias))
}

/// For the final Add of a GroupNorm written out as `Add(Mul(Reshape(InstanceNormalization(
/// Reshape(x))), scale), bias)` (PyTorch before opset 18, whose InstanceNormalization runs
/// over the groups with a constant unit scale and zero bias), its per-channel (scale, bias)
/// inputs, then the InstanceNormalization's constant ones.
pub(crate) fn group_norm_affine(
    g: &GraphProto,
    prod: &std::collections::HashMap<&str, Source>,
    n: &NodeProto,
) -> Option<([String; 2], Vec<String>)> {
    let instance_norm = |r: &NodeProto| r.input.first().and_then(|x| produced(g, prod, x, "InstanceNormalization"));
    let (scale, bias, reshape) = written_out_affine(g, prod, n, "Reshape", |r| instance_norm(r).is_some())?;
    let constants = instance_norm(reshape)?.input.iter().skip(1).cloned().collect();
    Some(([scale, bias], constants))
}

/// The node of op `op` that produces `t`.
fn produced<'g>(
    g: &'g GraphProto,
    prod: &std::collections::HashMap<&str, Source>,
    t: &str,
    op: &str,
) -> Option<&'g NodeProto> {
    match prod.get(t) {
        Some(Source::Node(i)) => g.node.get(*i).filter(|p| p.op_type() == op),
        _ => None,
    }
}

/// (scale, bias, the normalisation's last node) of `Add(Mul(normalised, scale), bias)`
/// ending at `n`, either operand order, where `normalised` comes from a node of op `op` that
/// `is_norm` accepts.
fn written_out_affine<'g>(
    g: &'g GraphProto,
    prod: &std::collections::HashMap<&str, Source>,
    n: &NodeProto,
    op: &str,
    is_norm: impl Fn(&NodeProto) -> bool,
) -> Option<(String, String, &'g NodeProto)> {
    let from = |t: &str, op: &str| produced(g, prod, t, op);
    if n.op_type() != "Add" {
        return None;
    }
    let (mul_out, bias) = match n.input.as_slice() {
        [a, b] if from(a, "Mul").is_some() => (a, b),
        [a, b] if from(b, "Mul").is_some() => (b, a),
        _ => return None,
    };
    let mul = from(mul_out, "Mul")?;
    let (norm_out, scale) = match mul.input.as_slice() {
        [a, b] if from(a, op).is_some() => (a, b),
        [a, b] if from(b, op).is_some() => (b, a),
        _ => return None,
    };
    let norm = from(norm_out, op).filter(|norm| is_norm(norm))?;
    Some((scale.clone(), bias.clone(), norm))
}

/// Tensors computed from the graph inputs by data (a Shape node passes on no data), not
/// passing through `avoid`.
pub(crate) fn data_reach(g: &GraphProto, from: &[&str], avoid: &str) -> HashSet<String> {
    let cons = consumers(g);
    let mut reached: HashSet<String> = from.iter().map(|s| s.to_string()).collect();
    let mut stack: Vec<String> = from.iter().map(|s| s.to_string()).collect();
    while let Some(t) = stack.pop() {
        if t == avoid {
            continue;
        }
        for &i in cons.get(t.as_str()).map(Vec::as_slice).unwrap_or_default() {
            let Some(n) = g.node.get(i) else { continue };
            if n.op_type() == "Shape" {
                continue;
            }
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                if reached.insert(o.clone()) {
                    stack.push(o.clone());
                }
            }
        }
    }
    reached
}

/// Whether all image data reaching the outputs passes through `tensor`.
fn is_cut(g: &GraphProto, tensor: &str) -> bool {
    let inits: HashSet<&str> = g.initializer.iter().map(|t| t.name()).collect();
    let inputs: Vec<&str> = g.input.iter().map(|i| i.name()).filter(|n| !inits.contains(n)).collect();
    let before = data_reach(g, &inputs, tensor);
    if !before.contains(tensor) {
        return false;
    }
    let after = data_reach(g, &[tensor], "");
    // Every node downstream of the cut reads only the cut's descendants, constants and
    // shape arithmetic.
    g.node
        .iter()
        .filter(|n| n.op_type() != "Shape" && n.input.iter().any(|i| after.contains(i)))
        .all(|n| n.input.iter().all(|i| !before.contains(i) || after.contains(i)))
}

/// The backbone cut at `at` (everything after it dropped) with `pool` applied to a feature of
/// shape `dims` (batch first), ending in [`FEATURE`] `[N, width]`. Returns the width.
pub fn attach(
    model: &Model,
    at: &str,
    dims: &[usize],
    pool: Pool,
    layout: Layout,
) -> Result<(Model, usize), GraphError> {
    let cut = prefix(model, at)?;
    let bad = |problem: String| GraphError::Shape { tensor: at.to_string(), problem };
    let opset = model.opset("").unwrap_or(13);
    let mut p = Patch::new();
    let (op, width): (NodeProto, usize) = match (dims, pool) {
        ([_, d], _) => (build::node("Identity", "mtpack/pool", &[at], &[FEATURE], vec![]), *d),
        ([_, _, d], Pool::Cls) => {
            p.add_initializer(tensor_proto::from_tensor(
                "mtpack/pool_index",
                &Tensor::I64(ndarray::arr0(0).into_dyn()),
            ));
            let attrs = vec![attr::make_int("axis", 1)];
            (build::node("Gather", "mtpack/pool", &[at, "mtpack/pool_index"], &[FEATURE], attrs), *d)
        }
        ([_, _, d], Pool::Mean) => (mean_over(&mut p, at, &[1], opset), *d),
        ([_, _, _, _], Pool::Cls) => {
            return Err(bad("pool=cls needs a token sequence [N, T, D]; this is a feature map".into()))
        }
        ([_, c, _, _], Pool::Mean) if layout == Layout::Nchw => (mean_over(&mut p, at, &[2, 3], opset), *c),
        ([_, _, _, c], Pool::Mean) => (mean_over(&mut p, at, &[1, 2], opset), *c),
        ([_, rest @ ..], Pool::None) if !rest.is_empty() => {
            let attrs = vec![attr::make_int("axis", 1)];
            (build::node("Flatten", "mtpack/pool", &[at], &[FEATURE], attrs), rest.iter().product())
        }
        _ => return Err(bad(format!("a feature of shape {dims:?} cannot be pooled with pool={}", pool.name()))),
    };
    p.add_node(op);
    let out = build::value_info(FEATURE, DType::F32, Some(&[Dim::Named("batch".into()), Dim::Fixed(width as i64)]));
    p.set_outputs(vec![out]);
    Ok((p.apply(&cut)?, width))
}

/// ReduceMean over `axes` without keeping them (axes an attribute before opset 18).
fn mean_over(p: &mut Patch, at: &str, axes: &[i64], opset: i64) -> NodeProto {
    let keep = attr::make_int("keepdims", 0);
    if opset >= 18 {
        let axes_t = Tensor::I64(ndarray::Array1::from(axes.to_vec()).into_dyn());
        p.add_initializer(tensor_proto::from_tensor("mtpack/pool_axes", &axes_t));
        build::node("ReduceMean", "mtpack/pool", &[at, "mtpack/pool_axes"], &[FEATURE], vec![keep])
    } else {
        build::node("ReduceMean", "mtpack/pool", &[at], &[FEATURE], vec![attr::make_ints("axes", axes), keep])
    }
}
