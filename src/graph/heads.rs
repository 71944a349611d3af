//! Classifier heads: drop the backbone's own, append new linear heads on the feature tensor,
//! prefix names, and merge several heads so that one backbone pass feeds them all.

use ndarray::{Array1, Array2};

use super::analysis::{find_feature, find_head};
use super::cut::value_info_for;
use super::{GraphError, Patch};
use crate::onnx::{attr, build, tensor_proto, Dim, Model};
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};

/// Weights of a linear classifier: `logits = flatten(feature) @ weight.T + bias`.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearHead {
    /// [classes, features]
    pub weight: Array2<f32>,
    /// [classes]
    pub bias: Array1<f32>,
}

impl LinearHead {
    /// Uniform init in ±1/sqrt(features) (the usual default for a fresh linear layer).
    pub fn init(classes: usize, features: usize, seed: u64) -> LinearHead {
        let mut rng = Rng::new(seed);
        let bound = 1.0 / (features.max(1) as f64).sqrt();
        let weight = Array2::from_shape_fn((classes, features), |_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32);
        LinearHead { weight, bias: Array1::zeros(classes) }
    }

    pub fn classes(&self) -> usize {
        self.weight.nrows()
    }

    pub fn features(&self) -> usize {
        self.weight.ncols()
    }
}

/// Names used for the nodes and tensors of a head called `name`.
pub struct HeadNames {
    pub flatten: String,
    pub gemm: String,
    pub weight: String,
    pub bias: String,
    pub flat: String,
    pub logits: String,
}

impl HeadNames {
    pub fn of(name: &str) -> HeadNames {
        HeadNames {
            flatten: format!("{name}/flatten"),
            gemm: format!("{name}/gemm"),
            weight: format!("{name}/weight"),
            bias: format!("{name}/bias"),
            flat: format!("{name}/features"),
            logits: format!("{name}/logits"),
        }
    }
}

/// Removes the classifier head; the feature tensor becomes the only output.
pub fn drop_head(model: &Model) -> Result<Model, GraphError> {
    let g = model.graph();
    let head = find_head(g).ok_or_else(|| GraphError::NoHead {
        why: "no linear layer (Gemm, MatMul, MatMul+Add) feeds the first output".into(),
    })?;
    let feature = find_feature(g, Some(&head)).ok_or_else(|| GraphError::NoHead {
        why: format!(
            "the input of head layer '{}' was not found",
            head.nodes.first().map(String::as_str).unwrap_or("?")
        ),
    })?;
    let vi = value_info_for(g, &feature.tensor);
    Patch::new().set_outputs(vec![vi]).apply(model)
}

/// Appends linear heads on `feature`, each with output `<name>/logits`. With `replace`, the
/// model's existing outputs are dropped; otherwise they are kept next to the new ones.
/// One backbone pass feeds every head.
pub fn add_heads(
    model: &Model,
    feature: &str,
    heads: &[(String, LinearHead)],
    replace: bool,
) -> Result<Model, GraphError> {
    let g = model.graph();
    if !g.node.iter().any(|n| n.output.iter().any(|o| o == feature)) && !g.input.iter().any(|i| i.name() == feature) {
        return Err(GraphError::NoSuchTensor { tensor: feature.into() });
    }
    let mut patch = Patch::new();
    if replace {
        patch.set_outputs(Vec::new());
    }
    for (name, head) in heads {
        let names = HeadNames::of(name);
        if g.output.iter().any(|o| o.name() == names.logits) {
            return Err(GraphError::NameTaken { what: format!("head output '{}'", names.logits) });
        }
        if head.bias.len() != head.classes() {
            return Err(GraphError::Shape {
                tensor: names.bias,
                problem: format!("{} values for {} classes", head.bias.len(), head.classes()),
            });
        }
        let w = Tensor::F32(head.weight.clone().into_dyn());
        let b = Tensor::F32(head.bias.clone().into_dyn());
        patch
            .add_initializer(tensor_proto::from_tensor(&names.weight, &w))
            .add_initializer(tensor_proto::from_tensor(&names.bias, &b))
            .add_node(build::node(
                "Flatten",
                &names.flatten,
                &[feature],
                &[&names.flat],
                vec![attr::make_int("axis", 1)],
            ))
            .add_node(build::node(
                "Gemm",
                &names.gemm,
                &[&names.flat, &names.weight, &names.bias],
                &[&names.logits],
                vec![attr::make_int("transB", 1)],
            ))
            .add_output(build::value_info(
                &names.logits,
                DType::F32,
                Some(&[Dim::Unknown, Dim::Fixed(head.classes() as i64)]),
            ));
    }
    patch.apply(model)
}

/// Renames every node and every tensor except graph inputs with `prefix`, so that graphs can
/// be merged without name clashes.
pub fn prefix_names(model: &Model, prefix: &str) -> Result<Model, GraphError> {
    let g = model.graph();
    let inputs: std::collections::HashSet<&str> = g.input.iter().map(|i| i.name()).collect();
    let mut names: Vec<String> = g.initializer.iter().map(|t| t.name().to_string()).collect();
    names.extend(g.node.iter().flat_map(|n| n.output.iter().filter(|o| !o.is_empty()).cloned()));
    names.retain(|n| !inputs.contains(n.as_str()) || g.initializer.iter().any(|t| t.name() == n));
    let mut patch = Patch::new();
    patch.prefix_node_names(prefix);
    for n in &names {
        patch.rename_tensor(n, &format!("{prefix}{n}"));
    }
    patch.apply(model)
}

/// Attaches several suffix graphs to the tensor `at` of `base`: each suffix's single input is
/// wired to `at`, its names are prefixed with `<name>/`, and its outputs join the merged
/// model's outputs (the base's outputs are dropped). One pass of `base` feeds them all.
pub fn merge_suffixes(base: &Model, at: &str, suffixes: &[(String, Model)]) -> Result<Model, GraphError> {
    let mut patch = Patch::new();
    patch.set_outputs(Vec::new());
    let mut merged = base.clone();
    for (name, suffix) in suffixes {
        let input = match suffix
            .graph()
            .input
            .iter()
            .filter(|i| !suffix.graph().initializer.iter().any(|t| t.name() == i.name()))
            .collect::<Vec<_>>()
            .as_slice()
        {
            [one] => one.name().to_string(),
            other => {
                return Err(GraphError::Shape {
                    tensor: name.clone(),
                    problem: format!("a suffix to merge needs exactly one input, this one has {}", other.len()),
                })
            }
        };
        let renamed = prefix_names(suffix, &format!("{name}/"))?;
        let g = renamed.graph();
        for n in &g.node {
            let mut n = n.clone();
            n.input.iter_mut().filter(|i| **i == input).for_each(|i| *i = at.to_string());
            patch.add_node(n);
        }
        for t in &g.initializer {
            patch.add_initializer(t.clone());
        }
        for o in &g.output {
            patch.add_output(o.clone());
        }
        merge_opsets(&mut merged, &renamed);
    }
    patch.apply(&merged)
}

fn merge_opsets(into: &mut Model, from: &Model) {
    for o in &from.proto.opset_import {
        match into.proto.opset_import.iter_mut().find(|x| x.domain() == o.domain()) {
            Some(x) => x.version = Some(x.version().max(o.version())),
            None => into.proto.opset_import.push(o.clone()),
        }
    }
}
