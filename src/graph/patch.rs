//! The one way mtpack edits a graph: collect changes in a [`Patch`], then `apply` it, which
//! removes what became dead, restores topological order and validates the result. An edit
//! that would leave a broken graph fails instead of returning it.

use std::collections::HashSet;

use super::index::{ancestors, node_reads, topo_sort, validate};
use super::GraphError;
use crate::onnx::pb::{NodeProto, TensorProto, ValueInfoProto};
use crate::onnx::Model;

#[derive(Default, Debug)]
pub struct Patch {
    add_nodes: Vec<NodeProto>,
    add_initializers: Vec<TensorProto>,
    add_inputs: Vec<ValueInfoProto>,
    add_outputs: Vec<ValueInfoProto>,
    set_inputs: Option<Vec<ValueInfoProto>>,
    set_outputs: Option<Vec<ValueInfoProto>>,
    /// Tensor renames applied to every reference, as (old, new).
    renames: Vec<(String, String)>,
    /// Node renames applied by name prefix, for merging graphs.
    node_prefix: Option<String>,
    /// Tensors whose producing node is removed (an initializer or rename takes its place).
    unproduce: Vec<String>,
    /// Graph inputs that become these constants.
    fixed_inputs: Vec<TensorProto>,
    /// Initializers removed (an added node or initializer may take the name).
    remove_initializers: Vec<String>,
}

impl Patch {
    pub fn new() -> Patch {
        Patch::default()
    }

    pub fn add_node(&mut self, n: NodeProto) -> &mut Self {
        self.add_nodes.push(n);
        self
    }

    pub fn add_initializer(&mut self, t: TensorProto) -> &mut Self {
        self.add_initializers.push(t);
        self
    }

    pub fn add_input(&mut self, v: ValueInfoProto) -> &mut Self {
        self.add_inputs.push(v);
        self
    }

    pub fn add_output(&mut self, v: ValueInfoProto) -> &mut Self {
        self.add_outputs.push(v);
        self
    }

    pub fn set_inputs(&mut self, v: Vec<ValueInfoProto>) -> &mut Self {
        self.set_inputs = Some(v);
        self
    }

    pub fn set_outputs(&mut self, v: Vec<ValueInfoProto>) -> &mut Self {
        self.set_outputs = Some(v);
        self
    }

    /// Removes the node that produces `tensor`: the patch provides it otherwise (an added
    /// initializer of that name, or a rename of its readers).
    pub fn remove_producer(&mut self, tensor: &str) -> &mut Self {
        self.unproduce.push(tensor.to_string());
        self
    }

    /// The graph input named like `value` becomes this constant, so that runtimes fold what
    /// depends on it when they load the model (ONNX Runtime does not fold an initializer that
    /// is also a graph input, hence the input is removed, not shadowed).
    pub fn fix_input(&mut self, value: TensorProto) -> &mut Self {
        self.fixed_inputs.push(value);
        self
    }

    /// Removes the initializer `name`, and the graph input of that name that models before
    /// IR 4 declare for every initializer.
    pub fn remove_initializer(&mut self, name: &str) -> &mut Self {
        self.remove_initializers.push(name.to_string());
        self
    }

    /// Renames `old` in every reference: nodes, initializers, inputs, outputs, value_info.
    pub fn rename_tensor(&mut self, old: &str, new: &str) -> &mut Self {
        self.renames.push((old.to_string(), new.to_string()));
        self
    }

    pub fn prefix_node_names(&mut self, prefix: &str) -> &mut Self {
        self.node_prefix = Some(prefix.to_string());
        self
    }

    /// Applies the patch to a copy of `model`.
    pub fn apply(&self, model: &Model) -> Result<Model, GraphError> {
        let mut out = model.clone();
        for t in &self.fixed_inputs {
            fix_input(&mut out, t)?;
        }
        if !self.remove_initializers.is_empty() {
            let gone: HashSet<&str> = self.remove_initializers.iter().map(String::as_str).collect();
            let g = out.graph_mut();
            g.initializer.retain(|t| !gone.contains(t.name()));
            g.input.retain(|i| !gone.contains(i.name()));
        }
        if !self.unproduce.is_empty() {
            let gone: HashSet<&str> = self.unproduce.iter().map(String::as_str).collect();
            out.graph_mut().node.retain(|n| !n.output.iter().any(|o| gone.contains(o.as_str())));
        }
        let taken: HashSet<String> = {
            let g = out.graph();
            g.initializer
                .iter()
                .map(|t| t.name().to_string())
                .chain(g.node.iter().flat_map(|n| n.output.iter().cloned()))
                .chain(g.input.iter().map(|i| i.name().to_string()))
                .collect()
        };
        for t in &self.add_initializers {
            if taken.contains(t.name()) {
                return Err(GraphError::NameTaken { what: format!("initializer name '{}'", t.name()) });
            }
        }
        let g = out.graph_mut();
        if let Some(prefix) = &self.node_prefix {
            for n in &mut g.node {
                n.name = Some(format!("{prefix}{}", n.name()));
            }
        }
        for (old, new) in &self.renames {
            rename_everywhere(g, old, new);
        }
        let kept = g.node.len();
        g.node.extend(self.add_nodes.iter().cloned());
        name_apart(&mut g.node, kept);
        g.initializer.extend(self.add_initializers.iter().cloned());
        if let Some(v) = &self.set_inputs {
            g.input = v.clone();
        }
        g.input.extend(self.add_inputs.iter().cloned());
        if let Some(v) = &self.set_outputs {
            g.output = v.clone();
        }
        g.output.extend(self.add_outputs.iter().cloned());
        topo_sort(g)?;
        prune(&mut out);
        validate(out.graph())?;
        Ok(out)
    }
}

/// Renames the nodes from `added` on whose names an earlier node already has, with a
/// numbered suffix. Added nodes are named after their output, and a model may already have a
/// node of that name (a Softmax `prob` writing `prob`, when the export gates `prob`): ONNX
/// Runtime refuses a graph with two nodes of one name.
fn name_apart(nodes: &mut [NodeProto], added: usize) {
    let (before, after) = nodes.split_at_mut(added.min(nodes.len()));
    let mut taken: HashSet<String> = before.iter().map(|n| n.name().to_string()).collect();
    for n in after.iter_mut().filter(|n| !n.name().is_empty()) {
        let base = n.name().to_string();
        let mut name = base.clone();
        let mut k = 1;
        while taken.contains(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        taken.insert(name.clone());
        n.name = Some(name);
    }
}

fn fix_input(model: &mut Model, value: &TensorProto) -> Result<(), GraphError> {
    // Before IR 4 every initializer is also an overridable input, which runtimes never fold.
    if model.proto.ir_version() < 4 {
        model.proto.ir_version = Some(4);
    }
    let g = model.graph_mut();
    let name = value.name();
    if !g.input.iter().any(|i| i.name() == name) {
        return Err(GraphError::NotAnInput { tensor: name.to_string() });
    }
    g.input.retain(|i| i.name() != name);
    g.initializer.retain(|t| t.name() != name);
    g.initializer.push(value.clone());
    Ok(())
}

fn rename_everywhere(g: &mut crate::onnx::pb::GraphProto, old: &str, new: &str) {
    let fix = |s: &mut String| {
        if s == old {
            *s = new.to_string();
        }
    };
    for n in &mut g.node {
        n.input.iter_mut().for_each(fix);
        n.output.iter_mut().for_each(fix);
    }
    for t in &mut g.initializer {
        if t.name() == old {
            t.name = Some(new.to_string());
        }
    }
    for v in g.input.iter_mut().chain(g.output.iter_mut()).chain(g.value_info.iter_mut()) {
        if v.name() == old {
            v.name = Some(new.to_string());
        }
    }
}

/// Removes nodes that no output needs, then initializers, inputs and value_info that nothing
/// references any more.
fn prune(model: &mut Model) {
    let g = model.graph_mut();
    let outputs: Vec<String> = g.output.iter().map(|o| o.name().to_string()).collect();
    let targets: Vec<&str> = outputs.iter().map(String::as_str).collect();
    let keep: HashSet<usize> = ancestors(g, &targets, &HashSet::new()).into_iter().collect();
    let nodes = std::mem::take(&mut g.node);
    g.node = nodes.into_iter().enumerate().filter(|(i, _)| keep.contains(i)).map(|(_, n)| n).collect();
    let mut used: HashSet<String> = g.node.iter().flat_map(|n| node_reads(n).into_iter().map(str::to_string)).collect();
    used.extend(outputs);
    g.initializer.retain(|t| used.contains(t.name()));
    g.input.retain(|i| used.contains(i.name()));
    let live: HashSet<String> = g.node.iter().flat_map(|n| n.output.iter().cloned()).collect();
    g.value_info.retain(|v| live.contains(v.name()));
}

#[cfg(test)]
mod tests {
    use super::Patch;
    use crate::onnx::build::{model, node, value_info};
    use crate::onnx::pb::GraphProto;
    use crate::tensor::DType;

    /// A model whose Softmax node is named like its output; the patch gates that output with
    /// an added node named after it too (as the export does).
    #[test]
    fn added_nodes_are_named_apart_from_the_model_s() {
        let graph = GraphProto {
            node: vec![node("Softmax", "prob", &["x"], &["prob"], vec![])],
            input: vec![value_info("x", DType::F32, None)],
            output: vec![value_info("prob", DType::F32, None)],
            ..Default::default()
        };
        let m = model(graph, 13);
        let mut p = Patch::new();
        p.rename_tensor("prob", "prob/ungated");
        p.add_node(node("Identity", "prob", &["prob/ungated"], &["prob"], vec![]));
        p.add_node(node("Identity", "prob", &["prob"], &["again"], vec![]));
        p.add_output(value_info("again", DType::F32, None));
        let out = p.apply(&m).unwrap();
        let mut names: Vec<&str> = out.graph().node.iter().map(|n| n.name()).collect();
        names.sort_unstable();
        assert_eq!(names, ["prob", "prob_1", "prob_2"]);
    }
}
