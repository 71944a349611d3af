//! Who produces and who reads each tensor; graph validation and topological ordering.

use std::collections::{HashMap, HashSet};

use super::GraphError;
use crate::onnx::attr::node_label;
use crate::onnx::pb::{GraphProto, NodeProto};
use crate::onnx::standard_ops::is_standard_op;

/// Where a tensor comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Input,
    Initializer,
    Node(usize),
}

/// Producer of every tensor name in the top-level graph.
pub fn producers(graph: &GraphProto) -> HashMap<&str, Source> {
    let mut map = HashMap::new();
    for i in &graph.input {
        map.insert(i.name(), Source::Input);
    }
    // An initializer that is also listed as an input (IR < 4 style) is a constant.
    for t in &graph.initializer {
        map.insert(t.name(), Source::Initializer);
    }
    for (idx, n) in graph.node.iter().enumerate() {
        for o in n.output.iter().filter(|o| !o.is_empty()) {
            map.insert(o.as_str(), Source::Node(idx));
        }
    }
    map
}

/// Indices of the nodes reading each tensor (top level only).
pub fn consumers(graph: &GraphProto) -> HashMap<&str, Vec<usize>> {
    let mut map: HashMap<&str, Vec<usize>> = HashMap::new();
    for (idx, n) in graph.node.iter().enumerate() {
        for i in node_reads(n) {
            map.entry(i).or_default().push(idx);
        }
    }
    map
}

/// The tensors a node reads: its inputs and, for If/Loop/Scan, the outer-scope names its
/// subgraphs read.
pub fn node_reads(node: &NodeProto) -> Vec<&str> {
    let mut names: Vec<&str> = node.input.iter().filter(|s| !s.is_empty()).map(String::as_str).collect();
    for a in &node.attribute {
        for g in a.g.iter().chain(a.graphs.iter()) {
            names.extend(outer_reads(g));
        }
    }
    names
}

/// Names a subgraph reads that it does not define itself.
fn outer_reads(g: &GraphProto) -> Vec<&str> {
    let mut defined: HashSet<&str> = g.input.iter().map(|i| i.name()).collect();
    defined.extend(g.initializer.iter().map(|t| t.name()));
    let mut out = Vec::new();
    for n in &g.node {
        for r in node_reads(n) {
            if !defined.contains(r) {
                out.push(r);
            }
        }
        defined.extend(n.output.iter().map(String::as_str));
    }
    out
}

/// Checks that every node reads existing tensors in topological order, that no tensor is
/// produced twice, that default-domain ops exist, and that the outputs are produced.
pub fn validate(graph: &GraphProto) -> Result<(), GraphError> {
    let mut available: HashMap<&str, String> = HashMap::new();
    for i in &graph.input {
        available.insert(i.name(), "<input>".into());
    }
    for t in &graph.initializer {
        available.insert(t.name(), "<initializer>".into());
    }
    let all = producers(graph);
    for n in &graph.node {
        let domain = n.domain();
        if (domain.is_empty() || domain == "ai.onnx") && !is_standard_op(n.op_type()) {
            return Err(GraphError::UnknownOp { node: node_label(n), op: n.op_type().into() });
        }
        for r in node_reads(n) {
            if !available.contains_key(r) {
                // Produced later means the order is wrong or there is a cycle.
                return Err(match all.get(r) {
                    Some(_) => GraphError::Cycle { node: node_label(n), op: n.op_type().into() },
                    None => GraphError::MissingTensor { node: node_label(n), op: n.op_type().into(), tensor: r.into() },
                });
            }
        }
        for o in n.output.iter().filter(|o| !o.is_empty()) {
            if let Some(first) = available.insert(o, node_label(n)) {
                return Err(GraphError::DuplicateTensor { tensor: o.clone(), first, second: node_label(n) });
            }
        }
    }
    for o in &graph.output {
        if !available.contains_key(o.name()) {
            return Err(GraphError::MissingOutput { tensor: o.name().into() });
        }
    }
    Ok(())
}

/// Reorders nodes so that each comes after the producers of what it reads, keeping the
/// original order where it already is valid.
pub fn topo_sort(graph: &mut GraphProto) -> Result<(), GraphError> {
    let mut available: HashSet<String> = graph.input.iter().map(|i| i.name().to_string()).collect();
    available.extend(graph.initializer.iter().map(|t| t.name().to_string()));
    let produced: HashSet<String> = graph.node.iter().flat_map(|n| n.output.iter().cloned()).collect();
    let mut pending: Vec<NodeProto> = std::mem::take(&mut graph.node);
    let mut sorted = Vec::with_capacity(pending.len());
    while !pending.is_empty() {
        let ready =
            pending.iter().position(|n| node_reads(n).iter().all(|r| available.contains(*r) || !produced.contains(*r)));
        let Some(idx) = ready else {
            let n = &pending[0];
            return Err(GraphError::Cycle { node: node_label(n), op: n.op_type().into() });
        };
        let n = pending.remove(idx);
        available.extend(n.output.iter().cloned());
        sorted.push(n);
    }
    graph.node = sorted;
    Ok(())
}

/// Nodes needed to compute `targets`, not looking past the tensors in `stop`.
/// Returns node indices in graph order.
pub fn ancestors(graph: &GraphProto, targets: &[&str], stop: &HashSet<&str>) -> Vec<usize> {
    let prod = producers(graph);
    let mut keep = HashSet::new();
    let mut stack: Vec<&str> = targets.to_vec();
    let mut seen: HashSet<&str> = HashSet::new();
    while let Some(t) = stack.pop() {
        if stop.contains(t) || !seen.insert(t) {
            continue;
        }
        if let Some(Source::Node(idx)) = prod.get(t) {
            if keep.insert(*idx) {
                stack.extend(node_reads(&graph.node[*idx]));
            }
        }
    }
    let mut v: Vec<usize> = keep.into_iter().collect();
    v.sort_unstable();
    v
}
