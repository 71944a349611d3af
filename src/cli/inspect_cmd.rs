//! `mtpack inspect`: what a model is made of, and what mtpack would train in it.

use std::fmt::Write as _;
use std::path::PathBuf;

use super::{load, print_json, Outcome};
use crate::graph::analysis::{inspect, Report, ValueDesc};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The ONNX model to describe.
    pub model: PathBuf,
    /// Print the report as JSON (schema: schemas/inspect.schema.json).
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<Outcome> {
    let m = load::model(&a.model)?;
    let mut report = inspect(&m, crate::engine::missing_ops(&m));
    // Shapes of the candidates from one run in ONNX Runtime; without it they stay unknown.
    let names: Vec<String> = report.candidates.iter().map(|c| c.tensor.clone()).collect();
    let folded = crate::graph::materialize::weights_from_nodes(&m).map(|(f, _)| f).unwrap_or(m);
    if let Ok(shapes) = crate::runtime::probe::shapes(&folded, &names) {
        for c in &mut report.candidates {
            c.shape = shapes.get(&c.tensor).cloned();
        }
    }
    if a.json {
        print_json(&report)?;
    } else {
        print!("{}", text(&report));
    }
    Ok(Outcome::Ok)
}

fn value(v: &ValueDesc) -> String {
    let shape = match &v.shape {
        Some(d) => format!("[{}]", d.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")),
        None => "[?]".into(),
    };
    format!("{} {} {}", v.name, v.dtype, shape)
}

pub fn text(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "model       {}", r.file);
    let _ = writeln!(s, "ir version  {}   producer {}", r.ir_version, r.producer);
    let ops: Vec<String> =
        r.opsets.iter().map(|(d, v)| format!("{}={v}", if d.is_empty() { "ai.onnx" } else { d })).collect();
    let _ = writeln!(s, "opsets      {}", ops.join(", "));
    for i in &r.inputs {
        let _ = writeln!(s, "input       {}", value(i));
    }
    for o in &r.outputs {
        let _ = writeln!(s, "output      {}", value(o));
    }
    let p = &r.parameters;
    let _ = writeln!(s, "parameters  {} ({:.2} MB in {} tensors)", p.count, p.bytes as f64 / 1e6, p.tensors);
    let hist: Vec<String> = r.ops.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(s, "nodes       {}: {}", r.nodes, hist.join(", "));
    head_and_feature(&mut s, r);
    let f = &r.weights_from_nodes;
    if f.total() > 0 {
        let _ = writeln!(
            s,
            "from nodes  {} Constant, {} ConstantOfShape, {} Identity, {} Reshape outputs folded into initializers",
            f.constants, f.constant_of_shape, f.identities, f.reshapes
        );
    }
    let _ = writeln!(
        s,
        "trainable   {} layers, {} weights",
        r.trainable.len(),
        r.trainable.iter().map(|l| l.params).sum::<usize>()
    );
    for l in &r.trainable {
        let _ = writeln!(s, "  {:<12} {:<40} {:?}", l.op, l.weight, l.shape);
    }
    let _ = match r.engine_missing_ops.as_slice() {
        [] => writeln!(s, "engine      every op can train"),
        missing => writeln!(s, "engine      cannot execute yet: {}", missing.join(", ")),
    };
    if !r.custom_ops.is_empty() {
        let _ = writeln!(s, "custom ops  {}", r.custom_ops.join(", "));
    }
    s
}

/// The head found (or none), the feature tensor new heads read, and the other tensors
/// `--at` could name.
fn head_and_feature(s: &mut String, r: &Report) {
    let _ = match &r.head {
        Some(h) => writeln!(
            s,
            "head        {} classes via {} (weight {}{}){}",
            h.classes,
            h.nodes.join(" -> "),
            h.weight,
            h.bias.as_ref().map(|b| format!(", bias {b}")).unwrap_or_default(),
            h.normalised.as_ref().map(|n| format!(", ends in {n}")).unwrap_or_default()
        ),
        None => writeln!(s, "head        none (headless backbone)"),
    };
    if let Some(f) = &r.feature {
        let dim = f.dim.map(|d| d.to_string()).unwrap_or_else(|| "?".into());
        let _ = writeln!(s, "feature     {} (dim {dim}, {})", f.tensor, f.from);
    }
    if !r.candidates.is_empty() {
        let _ = writeln!(s, "candidates  for --at (shape for one image):");
        for c in &r.candidates {
            let shape = c.shape.as_ref().map(|d| format!("{d:?}")).unwrap_or_else(|| "[?]".into());
            let _ = writeln!(s, "  {:<18} {:<24} {}", shape, c.op, c.tensor);
        }
    }
}
