//! What a model is made of: the facts `mtpack inspect` reports and that surgery and training
//! build on (trainable layers, the classifier head and the feature tensor feeding it).

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::index::{consumers, producers, Source};
use crate::onnx::pb::{GraphProto, NodeProto};
use crate::onnx::{attr, constant, tensor_proto, tensor_type, Dim, Model};

pub const INSPECT_SCHEMA: &str = "mtpack.inspect/1";

/// Ops a classifier's output may pass through after its last linear layer.
const PASSTHROUGH: &[&str] = &["Identity", "Softmax", "LogSoftmax", "Sigmoid", "Dropout"];
/// Ops whose second input is a weight that training can update.
const WEIGHTED: &[&str] = &["Conv", "ConvTranspose", "Gemm", "MatMul"];

#[derive(Debug, Serialize, Clone)]
pub struct ValueDesc {
    pub name: String,
    pub dtype: String,
    /// None when the model does not declare a shape.
    pub shape: Option<Vec<Dim>>,
}

#[derive(Debug, Serialize, Clone)]
pub struct Layer {
    /// Name of the node that uses the weight.
    pub node: String,
    pub op: String,
    pub weight: String,
    pub shape: Vec<usize>,
    pub bias: Option<String>,
    pub params: usize,
}

#[derive(Debug, Serialize, Clone)]
pub struct Head {
    /// The nodes from the last linear layer to the output, in graph order.
    pub nodes: Vec<String>,
    pub output: String,
    /// The linear layer's output: logits even when the model ends in a softmax.
    pub logits: String,
    pub weight: String,
    pub bias: Option<String>,
    pub classes: usize,
    /// The output ends in Softmax/LogSoftmax/Sigmoid (probabilities, not logits).
    pub normalised: Option<String>,
}

#[derive(Debug, Serialize, Clone)]
pub struct Feature {
    pub tensor: String,
    pub dim: Option<usize>,
    /// "head input" when a head was found; for a headless backbone the input of the 1x1
    /// convolution that ends it as a classifier, else "graph output".
    pub from: &'static str,
}

/// A tensor new heads could attach to (`adapt --at`).
#[derive(Debug, Serialize, Clone)]
pub struct Candidate {
    pub tensor: String,
    pub op: String,
    /// For one image (batch 1); None when no runtime could compute it.
    pub shape: Option<Vec<usize>>,
}

#[derive(Debug, Serialize, Clone, Default)]
pub struct Parameters {
    pub tensors: usize,
    /// Elements of floating-point constants (weights, biases, statistics).
    pub count: usize,
    pub bytes: usize,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub file: String,
    pub ir_version: i64,
    pub producer: String,
    pub opsets: BTreeMap<String, i64>,
    pub inputs: Vec<ValueDesc>,
    pub outputs: Vec<ValueDesc>,
    pub nodes: usize,
    pub ops: BTreeMap<String, usize>,
    pub parameters: Parameters,
    pub trainable: Vec<Layer>,
    pub head: Option<Head>,
    pub feature: Option<Feature>,
    /// Tensors all image data passes through that a head could read, in graph order.
    pub candidates: Vec<Candidate>,
    /// Weights made by nodes (Constant, ConstantOfShape, Identity of an initializer), which
    /// mtpack folds into initializers before it trains them.
    pub weights_from_nodes: super::materialize::Folded,
    /// Ops outside the default ONNX domain (custom ops), as "domain:Op".
    pub custom_ops: Vec<String>,
    /// Ops the training engine cannot execute yet (empty: the whole graph can train).
    pub engine_missing_ops: Vec<String>,
    /// Bytes of the file that belong to fields newer than mtpack's ONNX schema.
    pub unknown_field_bytes: u64,
}

/// The declared shape of the graph's one input (initializers listed as inputs aside).
pub fn single_input_shape(g: &GraphProto) -> Option<Vec<Dim>> {
    let mut inputs = g.input.iter().filter(|i| !g.initializer.iter().any(|t| t.name() == i.name()));
    match (inputs.next(), inputs.next()) {
        (Some(i), None) => tensor_type(i).and_then(|(_, s)| s),
        _ => None,
    }
}

/// Up to `n` tensor names of the graph closest to `wanted` (for "no such tensor" messages).
pub fn nearest_names(g: &GraphProto, wanted: &str, n: usize) -> Vec<String> {
    let mut names: Vec<(usize, &str)> = g
        .node
        .iter()
        .flat_map(|nd| nd.output.iter())
        .filter(|o| !o.is_empty())
        .map(|o| (edit_distance(&o.to_lowercase(), &wanted.to_lowercase()), o.as_str()))
        .collect();
    names.sort();
    names.into_iter().take(n).map(|(_, s)| s.to_string()).collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev.last().copied().unwrap_or(0)
}

pub fn describe(v: &crate::onnx::pb::ValueInfoProto) -> ValueDesc {
    let (dtype, shape) = match tensor_type(v) {
        Some((code, shape)) => (tensor_proto::data_type_name(code).to_lowercase(), shape),
        None => ("non-tensor".to_string(), None),
    };
    ValueDesc { name: v.name().to_string(), dtype, shape }
}

/// `engine_missing_ops`: the ops the training engine lacks, which the caller asks the engine for
/// (the graph layer sits below it).
pub fn inspect(model: &Model, engine_missing_ops: Vec<String>) -> Report {
    let g = model.graph();
    let mut ops = BTreeMap::new();
    let mut custom = Vec::new();
    for n in &g.node {
        *ops.entry(n.op_type().to_string()).or_insert(0) += 1;
        if !n.domain().is_empty() && n.domain() != "ai.onnx" {
            custom.push(format!("{}:{}", n.domain(), n.op_type()));
        }
    }
    custom.sort();
    custom.dedup();
    let (folded_model, folded) =
        super::materialize::weights_from_nodes(model).unwrap_or_else(|_| (model.clone(), Default::default()));
    let fg = folded_model.graph();
    let head = find_head(fg);
    let feature = find_feature(fg, head.as_ref());
    let mut candidates: Vec<Candidate> =
        super::features::candidates(fg).into_iter().map(|(tensor, op)| Candidate { tensor, op, shape: None }).collect();
    // The own classifier's input is always a candidate (the default cut).
    if let Some(f) = feature.as_ref().filter(|f| !candidates.iter().any(|c| c.tensor == f.tensor)) {
        candidates.push(Candidate { tensor: f.tensor.clone(), op: f.from.to_string(), shape: None });
    }
    Report {
        schema: INSPECT_SCHEMA,
        file: model.origin.display().to_string(),
        ir_version: model.proto.ir_version(),
        producer: format!("{} {}", model.proto.producer_name(), model.proto.producer_version()).trim().to_string(),
        opsets: model.proto.opset_import.iter().map(|o| (o.domain().to_string(), o.version())).collect(),
        inputs: g.input.iter().filter(|i| !g.initializer.iter().any(|t| t.name() == i.name())).map(describe).collect(),
        outputs: g.output.iter().map(describe).collect(),
        nodes: g.node.len(),
        ops,
        parameters: parameters(g),
        trainable: trainable_layers(fg),
        head,
        feature,
        candidates,
        weights_from_nodes: folded,
        custom_ops: custom,
        engine_missing_ops,
        unknown_field_bytes: model.unknown_bytes,
    }
}

fn parameters(g: &GraphProto) -> Parameters {
    let mut p = Parameters::default();
    let consts = g.initializer.iter().chain(
        g.node
            .iter()
            .filter(|n| n.op_type() == "Constant")
            .filter_map(|n| attr::find(n, "value"))
            .filter_map(|a| a.t.as_ref()),
    );
    for t in consts {
        let Ok(count) = tensor_proto::declared_len(t) else { continue };
        p.tensors += 1;
        let dtype = tensor_proto::dtype_of(t.data_type());
        p.bytes += dtype.map(|d| d.size()).unwrap_or(0) * count;
        if matches!(dtype, Some(crate::tensor::DType::F32 | crate::tensor::DType::F64)) {
            p.count += count;
        }
    }
    p
}

fn const_shape(g: &GraphProto, name: &str) -> Option<Vec<usize>> {
    let t = constant(g, name)?;
    let float =
        matches!(tensor_proto::dtype_of(t.data_type()), Some(crate::tensor::DType::F32 | crate::tensor::DType::F64));
    if !float {
        return None;
    }
    tensor_proto::shape_of(t).ok()
}

/// The bias added right after a MatMul: the constant input of its single Add consumer.
fn matmul_bias(g: &GraphProto, cons: &HashMap<&str, Vec<usize>>, n: &NodeProto) -> Option<(usize, String)> {
    let out = n.output.first()?;
    let users = cons.get(out.as_str())?;
    let [only] = users.as_slice() else { return None };
    let add = g.node.get(*only)?;
    if add.op_type() != "Add" {
        return None;
    }
    let other = add.input.iter().find(|i| *i != out)?;
    const_shape(g, other)?;
    Some((*only, other.clone()))
}

pub fn trainable_layers(g: &GraphProto) -> Vec<Layer> {
    let cons = consumers(g);
    g.node
        .iter()
        .filter(|n| WEIGHTED.contains(&n.op_type()))
        .filter_map(|n| {
            let weight = n.input.get(1)?;
            let shape = const_shape(g, weight)?;
            let bias = match n.op_type() {
                "MatMul" => matmul_bias(g, &cons, n).map(|(_, b)| b),
                _ => n.input.get(2).filter(|b| !b.is_empty()).cloned(),
            };
            let params = shape.iter().product();
            Some(Layer {
                node: attr::node_label(n),
                op: n.op_type().into(),
                weight: weight.clone(),
                shape,
                bias,
                params,
            })
        })
        .collect()
}

/// Walks back from the first graph output through passthrough ops to a linear layer
/// (Gemm, MatMul, or MatMul + Add) with a constant 2-D weight.
pub fn find_head(g: &GraphProto) -> Option<Head> {
    let prod = producers(g);
    let cons = consumers(g);
    let output = g.output.first()?.name().to_string();
    let mut tensor = output.clone();
    let mut chain = Vec::new();
    let mut normalised = None;
    loop {
        let Some(Source::Node(idx)) = prod.get(tensor.as_str()) else { return None };
        let n = g.node.get(*idx)?;
        // A head's intermediate tensors belong to the head alone.
        if tensor != output && cons.get(tensor.as_str()).is_some_and(|c| c.len() > 1) {
            return None;
        }
        chain.push(*idx);
        match n.op_type() {
            op if PASSTHROUGH.contains(&op) => {
                if op != "Identity" && op != "Dropout" {
                    normalised = Some(op.to_string());
                }
                tensor = n.input.first()?.clone();
            }
            "Add" => {
                let (a, b) = (n.input.first()?, n.input.get(1)?);
                let (data, bias) = if const_shape(g, b).is_some() { (a, b) } else { (b, a) };
                let Some(Source::Node(m)) = prod.get(data.as_str()) else { return None };
                let mm = g.node.get(*m)?;
                if mm.op_type() != "MatMul" {
                    return None;
                }
                chain.push(*m);
                let logits = n.output.first()?.clone();
                return linear_head(g, mm, Some(bias.clone()), chain, (output, logits), normalised);
            }
            "Gemm" => {
                let bias = n.input.get(2).filter(|b| !b.is_empty()).cloned();
                let logits = n.output.first()?.clone();
                return linear_head(g, n, bias, chain, (output, logits), normalised);
            }
            "MatMul" => {
                let logits = n.output.first()?.clone();
                return linear_head(g, n, None, chain, (output, logits), normalised);
            }
            _ => return None,
        }
    }
}

fn linear_head(
    g: &GraphProto,
    n: &NodeProto,
    bias: Option<String>,
    mut chain: Vec<usize>,
    (output, logits): (String, String),
    normalised: Option<String>,
) -> Option<Head> {
    let weight = n.input.get(1)?.clone();
    let shape = const_shape(g, &weight)?;
    let [rows, cols] = shape.as_slice() else { return None };
    let trans_b = n.op_type() == "Gemm" && attr::int_or(n, "transB", 0).ok()? != 0;
    let classes = if trans_b { *rows } else { *cols };
    chain.sort_unstable();
    let nodes = chain.iter().filter_map(|i| g.node.get(*i)).map(attr::node_label).collect();
    Some(Head { nodes, output, logits, weight, bias, classes, normalised })
}

/// The linear layer's data input and its width; for a headless model, the graph output.
pub fn find_feature(g: &GraphProto, head: Option<&Head>) -> Option<Feature> {
    if let Some(h) = head {
        let first = g.node.iter().find(|n| h.nodes.first().is_some_and(|f| *f == attr::node_label(n)))?;
        let shape = const_shape(g, &h.weight)?;
        let trans_b = first.op_type() == "Gemm" && attr::int_or(first, "transB", 0).ok()? != 0;
        let dim = if trans_b { shape.get(1) } else { shape.first() };
        return Some(Feature { tensor: first.input.first()?.clone(), dim: dim.copied(), from: "head input" });
    }
    let out = g.output.first()?;
    if let Some((tensor, dim)) = conv_classifier_input(g, out.name()) {
        return Some(Feature { tensor, dim: Some(dim), from: "input of the 1x1-convolution classifier" });
    }
    let dim = match tensor_type(out).and_then(|(_, s)| s) {
        Some(dims) if dims.len() == 2 => match dims.get(1) {
            Some(Dim::Fixed(n)) if *n > 0 => Some(*n as usize),
            _ => None,
        },
        _ => None,
    };
    Some(Feature { tensor: out.name().to_string(), dim, from: "graph output" })
}

/// Ops a classifier's output passes through after a 1x1 convolution: pooling its map,
/// flattening or squeezing it, Relu (SqueezeNet), Softmax.
const CONV_CLASSIFIER_TAIL: &[&str] =
    &["Identity", "Dropout", "Softmax", "LogSoftmax", "Relu", "GlobalAveragePool", "Flatten", "Reshape", "Squeeze"];

/// The input and channels of the 1x1 convolution that ends a headless classifier (DenseNet's
/// pooled features into a 1x1 Conv, SqueezeNet's Conv, Relu, pool, Softmax, TF-slim's
/// logits convolution): new heads read what the old classifier read, pooled, rather than
/// its logits. None where the output comes from anything else.
fn conv_classifier_input(g: &GraphProto, output: &str) -> Option<(String, usize)> {
    let prod = producers(g);
    let mut tensor = output.to_string();
    loop {
        let Some(Source::Node(i)) = prod.get(tensor.as_str()) else { return None };
        let n = g.node.get(*i)?;
        match n.op_type() {
            op if CONV_CLASSIFIER_TAIL.contains(&op) => tensor = n.input.first()?.clone(),
            "Conv" if attr::int_or(n, "group", 1).ok()? == 1 => {
                let shape = const_shape(g, n.input.get(1)?)?;
                return match shape.as_slice() {
                    [_, c, 1, 1] => Some((n.input.first()?.clone(), *c)),
                    _ => None,
                };
            }
            _ => return None,
        }
    }
}

/// Initializers that training may update: weights and biases of Conv/ConvTranspose/Gemm/MatMul
/// layers (with a MatMul's Add bias), the scale and bias of BatchNormalization,
/// LayerNormalization (also when written out as ReduceMean/Sub/.../Mul/Add),
/// InstanceNormalization and GroupNormalization, and PRelu's slope. Running statistics and
/// shape constants never train.
pub fn trainable_names(g: &GraphProto) -> std::collections::BTreeSet<String> {
    let mut names: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    for l in trainable_layers(g) {
        names.insert(l.weight);
        names.extend(l.bias);
    }
    let prod = producers(g);
    let mut fixed = std::collections::BTreeSet::new();
    for n in &g.node {
        // LayerNorm and GroupNorm written out by exporters: their scale and bias train like
        // LayerNormalization's (a GroupNorm's inner unit scale and zero bias stay constant).
        if let Some((scale, bias)) = super::features::layer_norm_affine(g, &prod, n) {
            names.extend([scale, bias].into_iter().filter(|t| const_shape(g, t).is_some()));
        }
        if let Some((affine, constants)) = super::features::group_norm_affine(g, &prod, n) {
            names.extend(affine.into_iter().filter(|t| const_shape(g, t).is_some()));
            fixed.extend(constants);
        }
        // A normalisation's scale and bias, PRelu's slope: per-channel parameters PyTorch
        // trains.
        let params = match n.op_type() {
            "BatchNormalization" | "LayerNormalization" | "InstanceNormalization" | "GroupNormalization" => 2,
            "PRelu" => 1,
            _ => 0,
        };
        if params > 0 {
            for i in n.input.iter().skip(1).take(params).filter(|i| !i.is_empty()) {
                if const_shape(g, i).is_some() {
                    names.insert(i.clone());
                }
            }
        }
    }
    names.retain(|n| !fixed.contains(n) && g.initializer.iter().any(|t| t.name() == n));
    names
}

#[cfg(test)]
mod tests {
    use crate::onnx::build::{model, node, value_info};
    use crate::onnx::pb::GraphProto;
    use crate::onnx::tensor_proto;
    use crate::tensor::{DType, Tensor};

    fn init(name: &str, shape: &[usize]) -> crate::onnx::pb::TensorProto {
        let n = shape.iter().product();
        let t = Tensor::F32(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), vec![1.0; n]).unwrap());
        tensor_proto::from_tensor(name, &t)
    }

    /// PRelu's slope, InstanceNormalization's and GroupNormalization's scale and bias train;
    /// in GroupNorm as PyTorch writes it before opset 18 the outer per-channel Mul and Add
    /// train and the inner InstanceNormalization's unit scale and zero bias do not.
    #[test]
    fn per_channel_parameters_of_other_normalisations_train() {
        let graph = GraphProto {
            node: vec![
                node("PRelu", "act", &["x", "slope"], &["a"], vec![]),
                node("InstanceNormalization", "in", &["a", "in_s", "in_b"], &["b"], vec![]),
                node("GroupNormalization", "gn", &["b", "gn_s", "gn_b"], &["c"], vec![]),
                node("Reshape", "grouped", &["c", "groups"], &["d"], vec![]),
                node("InstanceNormalization", "gn2", &["d", "ones", "zeros"], &["e"], vec![]),
                node("Shape", "shape", &["c"], &["c_shape"], vec![]),
                node("Reshape", "back", &["e", "c_shape"], &["f"], vec![]),
                node("Mul", "scale", &["f", "gn2_weight"], &["g"], vec![]),
                node("Add", "bias", &["gn2_bias", "g"], &["y"], vec![]),
            ],
            input: vec![value_info("x", DType::F32, None)],
            output: vec![value_info("y", DType::F32, None)],
            initializer: vec![
                init("slope", &[4, 1, 1]),
                init("in_s", &[4]),
                init("in_b", &[4]),
                init("gn_s", &[4]),
                init("gn_b", &[4]),
                tensor_proto::from_tensor("groups", &Tensor::I64(ndarray::arr1(&[0i64, 2, -1]).into_dyn())),
                init("ones", &[2]),
                init("zeros", &[2]),
                init("gn2_weight", &[4, 1, 1]),
                init("gn2_bias", &[4, 1, 1]),
            ],
            ..Default::default()
        };
        let names = super::trainable_names(model(graph, 21).graph());
        let want = ["gn2_bias", "gn2_weight", "gn_b", "gn_s", "in_b", "in_s", "slope"];
        assert_eq!(names.iter().map(String::as_str).collect::<Vec<_>>(), want);
    }

    /// DenseNet's pooled features into a 1x1 Conv and SqueezeNet's Conv, Relu, pool, Softmax
    /// end as classifiers: heads read the convolution's input; a 3x3 or grouped last
    /// convolution is not a classifier.
    #[test]
    fn a_headless_classifier_ending_in_a_1x1_convolution_gives_its_input() {
        let graph = |tail: Vec<crate::onnx::pb::NodeProto>, kernel: usize, group: i64| GraphProto {
            node: [
                vec![node("Conv", "c", &["x", "w"], &["z"], vec![crate::onnx::attr::make_int("group", group)])],
                tail,
            ]
            .concat(),
            input: vec![value_info("x", DType::F32, None)],
            output: vec![value_info("y", DType::F32, None)],
            initializer: vec![init("w", &[10, 6, kernel, kernel])],
            ..Default::default()
        };
        let squeeze = || {
            vec![
                node("Relu", "r", &["z"], &["a"], vec![]),
                node("GlobalAveragePool", "p", &["a"], &["b"], vec![]),
                node("Softmax", "s", &["b"], &["y"], vec![]),
            ]
        };
        let dense = || vec![node("Identity", "i", &["z"], &["y"], vec![])];
        for (tail, kernel, group, want) in [
            (squeeze(), 1, 1, Some(("x".to_string(), 6))),
            (dense(), 1, 1, Some(("x".to_string(), 6))),
            (squeeze(), 3, 1, None),
            (dense(), 1, 2, None),
        ] {
            let g = graph(tail, kernel, group);
            assert_eq!(super::conv_classifier_input(&g, "y"), want, "kernel {kernel} group {group}");
            let f = super::find_feature(&g, None).unwrap();
            assert_eq!(f.tensor == "x", want.is_some());
        }
    }
}
