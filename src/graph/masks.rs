//! Per-task weight masks inside the graph, with standard ops only, so one file serves every
//! task of a mask method: an int64 input `task` ([1]) selects the masks, each masked weight
//! `W` becomes `W/unmasked * keep(task)`, and each task's output is gated so that reading it
//! with another task's value gives NaN instead of a plausible wrong answer.
//!
//! - PackNet: one owner id per weight, two to a byte while ids fit in 4 bits (15 tasks),
//!   else a byte each. A 256-entry table `keep[o] = 0 < o <= task + 1` is computed from
//!   `task` (and from it a [256, 2] table of each byte's pair), and the packed ids index it.
//! - Piggyback: one packed bit row per task ([T, ceil(n/8)] uint8). The row is gathered by
//!   `task`, and its bytes index a constant [256, 8] table of their bits (Gather), which
//!   unpacks eight weights per lookup.
//!
//! - Parameters each task has its own copy of (biases, BatchNorm) are stacked, [1 + T, ...],
//!   and gathered by `task + 1`.
//!
//! `task = -1` selects the backbone's own head: PackNet's view after its first task,
//! Piggyback's unmasked backbone, and the backbone's own per-task parameters (row 0).

use std::collections::BTreeMap;

use ndarray::{Array1, Array2, ArrayD};

use super::{GraphError, Patch};
use crate::onnx::{attr, build, tensor_proto, Dim, Model};
use crate::tensor::{DType, Tensor};

pub const TASK_INPUT: &str = "task";
/// The `task` value of the backbone's own head.
pub const OWN_HEAD_TASK: i64 = -1;

/// A weight's masks as the pack stores them.
#[derive(Clone, Debug)]
pub enum StoredMask {
    /// PackNet: owner id per weight (0 = free), shaped like the weight.
    Owners(ArrayD<u8>),
    /// Piggyback: one packed row of bits per task ([tasks, ceil(len / 8)]) over the weight's
    /// `len` values; weight i is bit i % 8 of byte i / 8.
    Bits { rows: Array2<u8>, len: usize },
    /// A parameter each task has its own copy of, stacked: row 0 the backbone's (its own
    /// head), row k + 1 task k's.
    PerTask(ArrayD<f32>),
}

struct Builder {
    patch: Patch,
}

impl Builder {
    fn init(&mut self, name: &str, t: Tensor) {
        self.patch.add_initializer(tensor_proto::from_tensor(name, &t));
    }

    fn node(&mut self, op: &str, inputs: &[&str], output: &str, attrs: Vec<crate::onnx::pb::AttributeProto>) {
        self.patch.add_node(build::node(op, output, inputs, &[output], attrs));
    }

    fn cast(&mut self, input: &str, output: &str, to: DType) {
        self.node("Cast", &[input], output, vec![attr::make_int("to", i64::from(tensor_proto::onnx_code(to)))]);
    }

    /// `output` (shaped `shape`) from packed bytes `packed`: each byte indexes `table`, a
    /// [256, per_byte] float table of what it holds; the first `n` values are kept.
    fn unpack(
        &mut self,
        p: &str,
        packed: &str,
        (table, per_byte): (&str, usize),
        n: usize,
        shape: &[i64],
        output: &str,
    ) {
        self.cast(packed, &format!("{p}/bytes"), DType::I32);
        self.node("Gather", &[table, &format!("{p}/bytes")], &format!("{p}/values"), vec![attr::make_int("axis", 0)]);
        self.init(&format!("{p}/flat_shape"), i64s(&[-1]));
        self.node("Reshape", &[&format!("{p}/values"), &format!("{p}/flat_shape")], &format!("{p}/flat"), vec![]);
        let mut flat = format!("{p}/flat");
        if !n.is_multiple_of(per_byte) {
            self.init(&format!("{p}/start"), i64s(&[0]));
            self.init(&format!("{p}/end"), i64s(&[n as i64]));
            self.node("Slice", &[&flat, &format!("{p}/start"), &format!("{p}/end")], &format!("{p}/used"), vec![]);
            flat = format!("{p}/used");
        }
        self.init(&format!("{p}/shape"), i64s(shape));
        self.node("Reshape", &[&flat, &format!("{p}/shape")], output, vec![]);
    }
}

/// Bits an owner id takes in the artifact: 4 (two ids a byte) while every id fits, else 8.
pub fn owner_bits(ids: &ArrayD<u8>) -> u32 {
    if ids.iter().all(|&v| v < 16) {
        4
    } else {
        8
    }
}

/// Two 4-bit ids a byte, the first in the low nibble.
fn pack_nibbles(ids: &ArrayD<u8>) -> Vec<u8> {
    let flat: Vec<u8> = ids.iter().copied().collect();
    flat.chunks(2).map(|c| c.first().copied().unwrap_or(0) | (c.get(1).copied().unwrap_or(0) << 4)).collect()
}

fn i64s(v: &[i64]) -> Tensor {
    Tensor::I64(Array1::from(v.to_vec()).into_dyn())
}

/// The [256, 8] table of each byte's bits, low bit first.
fn bit_table() -> Tensor {
    Tensor::F32(ndarray::Array2::from_shape_fn((256, 8), |(b, j)| ((b >> j) & 1) as f32).into_dyn())
}

/// `model` with a `task` input, the masks of `masks` applied in the graph to the weights they
/// name, and each `(output, task value)` of `gates` NaN unless `task` holds that value.
pub fn embed(
    model: &Model,
    masks: &BTreeMap<String, StoredMask>,
    gates: &[(String, i64)],
) -> Result<Model, GraphError> {
    let opset = model.opset("").unwrap_or(0);
    if opset < 11 {
        return Err(GraphError::Shape {
            tensor: TASK_INPUT.into(),
            problem: format!("masks in the graph need opset 11 or later, the model imports {opset}"),
        });
    }
    let mut m = model.clone();
    let mut b = Builder { patch: Patch::new() };
    let mut masks = masks.clone();
    if masks.values().any(|s| matches!(s, StoredMask::PerTask(_))) {
        b.init("mask/one_row", i64s(&[1]));
        b.node("Add", &[TASK_INPUT, "mask/one_row"], "mask/per_task_row", vec![]);
        fold_per_task_batchnorm(&mut m, &mut masks, &mut b)?;
    }
    let masks = &masks;
    let shapes = move_masked_weights(&mut m, masks)?;
    gate_outputs(&mut m, gates)?;
    b.patch.add_input(build::value_info(TASK_INPUT, DType::I64, Some(&[Dim::Fixed(1)])));
    b.init("mask/zero", i64s(&[0]));
    b.node("Max", &[TASK_INPUT, "mask/zero"], "mask/row", vec![]);
    if masks.values().any(|s| matches!(s, StoredMask::Owners(_))) {
        b.init("mask/ids", i64s(&(0..256).collect::<Vec<i64>>()));
        b.init("mask/one", i64s(&[1]));
        b.node("Add", &["mask/row", "mask/one"], "mask/limit", vec![]);
        b.node("Greater", &["mask/ids", "mask/limit"], "mask/later", vec![]);
        b.node("Not", &["mask/later"], "mask/up_to", vec![]);
        b.node("Greater", &["mask/ids", "mask/zero"], "mask/owned", vec![]);
        b.node("And", &["mask/owned", "mask/up_to"], "mask/visible", vec![]);
        b.cast("mask/visible", "mask/owner_table", DType::F32);
        // Two 4-bit owner ids a byte: each byte's pair of keep values, from the table above.
        let nibbles =
            ndarray::Array2::from_shape_fn((256, 2), |(v, k)| if k == 0 { v as i64 & 15 } else { v as i64 >> 4 });
        b.init("mask/nibbles", Tensor::I64(nibbles.into_dyn()));
        b.node("Gather", &["mask/owner_table", "mask/nibbles"], "mask/pair_table", vec![attr::make_int("axis", 0)]);
    }
    if masks.values().any(|s| matches!(s, StoredMask::Bits { .. })) {
        b.init("mask/bit_table", bit_table());
        b.node("Less", &[TASK_INPUT, "mask/zero"], "mask/own_head", vec![]);
        b.cast("mask/own_head", "mask/all", DType::F32);
        // For the backbone's own head every bit reads 1; folded into the small table once
        // rather than applied to every weight.
        b.node("Max", &["mask/bit_table", "mask/all"], "mask/task_bit_table", vec![]);
    }
    for (i, (name, stored)) in masks.iter().enumerate() {
        let shape = shapes.get(name).cloned().unwrap_or_default();
        let p = format!("mask/{i}");
        let keep = format!("{p}/keep");
        if let StoredMask::PerTask(rows) = stored {
            b.init(&format!("{name}/per_task"), Tensor::F32(rows.clone()));
            b.node(
                "Gather",
                &[&format!("{name}/per_task"), "mask/per_task_row"],
                &format!("{p}/row"),
                vec![attr::make_int("axis", 0)],
            );
            b.init(&format!("{p}/shape"), i64s(&shape));
            b.node("Reshape", &[&format!("{p}/row"), &format!("{p}/shape")], name, vec![]);
            continue;
        }
        match stored {
            StoredMask::PerTask(_) => continue,
            StoredMask::Owners(ids) if owner_bits(ids) == 4 => {
                b.init(&format!("{name}/owner"), Tensor::U8(ndarray::Array1::from(pack_nibbles(ids)).into_dyn()));
                b.unpack(&p, &format!("{name}/owner"), ("mask/pair_table", 2), ids.len(), &shape, &keep);
            }
            StoredMask::Owners(ids) => {
                b.init(&format!("{name}/owner"), Tensor::U8(ids.clone()));
                b.cast(&format!("{name}/owner"), &format!("{p}/ids"), DType::I32);
                b.node("Gather", &["mask/owner_table", &format!("{p}/ids")], &keep, vec![attr::make_int("axis", 0)]);
            }
            StoredMask::Bits { rows, len: n } => {
                b.init(&format!("{name}/bits"), Tensor::U8(rows.clone().into_dyn()));
                let row = format!("{p}/row");
                b.node("Gather", &[&format!("{name}/bits"), "mask/row"], &row, vec![attr::make_int("axis", 0)]);
                b.unpack(&p, &row, ("mask/task_bit_table", 8), *n, &shape, &keep);
            }
        }
        b.node("Mul", &[&format!("{name}/unmasked"), &keep], name, vec![]);
    }
    for (i, (output, value)) in gates.iter().enumerate() {
        let p = format!("gate/{i}");
        b.init(&format!("{p}/task"), i64s(&[*value]));
        b.node("Equal", &[TASK_INPUT, &format!("{p}/task")], &format!("{p}/is"), vec![]);
        b.node("Where", &[&format!("{p}/is"), "gate/one", "gate/nan"], &format!("{p}/factor"), vec![]);
        b.node("Mul", &[&ungated(output), &format!("{p}/factor")], output, vec![]);
    }
    if !gates.is_empty() {
        b.init("gate/one", Tensor::F32(ndarray::arr0(1.0f32).into_dyn()));
        b.init("gate/nan", Tensor::F32(ndarray::arr0(f32::NAN).into_dyn()));
    }
    b.patch.apply(&m)
}

/// Replaces each BatchNormalization whose parameters are per task by `x * k + b`, with
/// `k = scale / sqrt(var + eps)` and `b = bias - mean * k` computed here for every task and
/// gathered by task in the graph (runtimes such as tract need BatchNormalization's
/// parameters constant). Removes those parameters from `masks`.
fn fold_per_task_batchnorm(
    m: &mut Model,
    masks: &mut BTreeMap<String, StoredMask>,
    b: &mut Builder,
) -> Result<(), GraphError> {
    let g = m.graph_mut();
    let mut folded = Vec::new();
    for (i, n) in g.node.iter().enumerate() {
        if n.op_type() != "BatchNormalization" || !n.input.get(1).is_some_and(|s| masks.contains_key(s)) {
            continue;
        }
        let label = attr::node_label(n);
        let problem = |p: &str| GraphError::Shape { tensor: label.clone(), problem: p.into() };
        let rows = |k: usize| -> Result<&ArrayD<f32>, GraphError> {
            match n.input.get(k).and_then(|name| masks.get(name)) {
                Some(StoredMask::PerTask(a)) => Ok(a),
                _ => Err(problem("per-task BatchNormalization needs scale, bias, mean and variance all per task")),
            }
        };
        let (scale, bias, mean, var) = (rows(1)?, rows(2)?, rows(3)?, rows(4)?);
        if n.output.len() != 1 || [bias.shape(), mean.shape(), var.shape()].iter().any(|s| *s != scale.shape()) {
            return Err(problem("per-task BatchNormalization must have one output and parameters of one shape"));
        }
        let eps = f64::from(attr::float_or(n, "epsilon", 1e-5).map_err(GraphError::Onnx)?);
        let k: Vec<f32> =
            scale.iter().zip(var.iter()).map(|(&s, &v)| (f64::from(s) / (f64::from(v) + eps).sqrt()) as f32).collect();
        let shift: Vec<f32> = bias.iter().zip(mean.iter()).zip(&k).map(|((&bb, &mu), &kk)| bb - mu * kk).collect();
        let channels = scale.shape().get(1).copied().unwrap_or(0);
        let rank = input_rank(g, n.input.first().map(String::as_str).unwrap_or_default()).unwrap_or(4);
        let mut target = vec![channels as i64];
        target.extend(std::iter::repeat_n(1i64, rank.saturating_sub(2)));
        let p = format!("bn/{i}");
        let x = n.input.first().cloned().unwrap_or_default();
        let y = n.output.first().cloned().unwrap_or_default();
        b.init(&format!("{p}/shape"), i64s(&target));
        for (part, values) in [("k", k), ("b", shift)] {
            let stacked = ArrayD::from_shape_vec(scale.raw_dim(), values).map_err(|e| problem(&e.to_string()))?;
            b.init(&format!("{p}/{part}_per_task"), Tensor::F32(stacked));
            b.node(
                "Gather",
                &[&format!("{p}/{part}_per_task"), "mask/per_task_row"],
                &format!("{p}/{part}_row"),
                vec![attr::make_int("axis", 0)],
            );
            b.node("Reshape", &[&format!("{p}/{part}_row"), &format!("{p}/shape")], &format!("{p}/{part}"), vec![]);
        }
        b.node("Mul", &[&x, &format!("{p}/k")], &format!("{p}/scaled"), vec![]);
        b.node("Add", &[&format!("{p}/scaled"), &format!("{p}/b")], &y, vec![]);
        folded.push(i);
        for name in n.input.iter().skip(1).take(4) {
            masks.remove(name);
        }
    }
    for i in folded.into_iter().rev() {
        g.node.remove(i);
    }
    Ok(())
}

/// The rank of `tensor` when a Conv produces it (its weight's rank) or value_info says.
fn input_rank(g: &crate::onnx::pb::GraphProto, tensor: &str) -> Option<usize> {
    let producer = g.node.iter().find(|n| n.output.iter().any(|o| o == tensor))?;
    if producer.op_type() == "Conv" {
        let w = producer.input.get(1)?;
        return g.initializer.iter().find(|t| t.name() == w).map(|t| t.dims.len());
    }
    None
}

/// Renames each masked initializer `W` to `W/unmasked` and returns the weights' shapes.
fn move_masked_weights(
    m: &mut Model,
    masks: &BTreeMap<String, StoredMask>,
) -> Result<BTreeMap<String, Vec<i64>>, GraphError> {
    let mut shapes = BTreeMap::new();
    let g = m.graph_mut();
    for t in &mut g.initializer {
        let Some(stored) = masks.get(t.name()) else { continue };
        let shape: Vec<i64> = t.dims.clone();
        let n: usize = tensor_proto::declared_len(t)?;
        let fits = match stored {
            StoredMask::Owners(ids) => ids.shape().iter().map(|&d| d as i64).eq(shape.iter().copied()),
            StoredMask::Bits { rows, len } => *len == n && rows.shape().get(1) == Some(&n.div_ceil(8)),
            StoredMask::PerTask(rows) => {
                rows.shape().get(1..).is_some_and(|s| s.iter().map(|&d| d as i64).eq(shape.iter().copied()))
            }
        };
        if !fits || tensor_proto::dtype_of(t.data_type()) != Some(DType::F32) {
            return Err(GraphError::Shape {
                tensor: t.name().into(),
                problem: "its mask does not fit it (or it is not float32)".into(),
            });
        }
        shapes.insert(t.name().to_string(), shape);
        let suffix = if matches!(stored, StoredMask::PerTask(_)) { "per_task_unused" } else { "unmasked" };
        t.name = Some(format!("{}/{suffix}", t.name()));
    }
    if let Some(missing) = masks.keys().find(|k| !shapes.contains_key(*k)) {
        return Err(GraphError::NoSuchTensor { tensor: missing.clone() });
    }
    g.input.retain(|i| !masks.contains_key(i.name()));
    Ok(shapes)
}

/// The task output before its gate (1 for its own task value, NaN for any other).
pub fn ungated(output: &str) -> String {
    format!("{output}/ungated")
}

/// Points every producer and reader of each gated output at `<output>/ungated`, leaving
/// the graph output itself to the gate.
fn gate_outputs(m: &mut Model, gates: &[(String, i64)]) -> Result<(), GraphError> {
    let g = m.graph_mut();
    for (output, _) in gates {
        let ungated = ungated(output);
        let mut produced = false;
        for n in &mut g.node {
            for o in n.output.iter_mut().filter(|o| *o == output) {
                *o = ungated.clone();
                produced = true;
            }
            for i in n.input.iter_mut().filter(|i| *i == output) {
                *i = ungated.clone();
            }
        }
        if !produced {
            return Err(GraphError::MissingOutput { tensor: output.clone() });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::build::{model, node, value_info};
    use crate::onnx::pb::GraphProto;
    use crate::runtime::tract_rt::TractSession;
    use crate::runtime::Backend;

    /// y = x @ W, W [3, 3] (9 weights: an odd count exercises the slice).
    fn matmul(w: &[f32]) -> Model {
        let w = Tensor::F32(ArrayD::from_shape_vec(ndarray::IxDyn(&[3, 3]), w.to_vec()).unwrap());
        let graph = GraphProto {
            node: vec![node("MatMul", "mm", &["x", "W"], &["y"], vec![])],
            input: vec![value_info("x", DType::F32, None)],
            output: vec![value_info("y", DType::F32, None)],
            initializer: vec![tensor_proto::from_tensor("W", &w)],
            ..Default::default()
        };
        model(graph, 13)
    }

    fn run(m: &Model, task: i64) -> Vec<f32> {
        let mut s = TractSession::from_bytes(&m.to_bytes(), "test").unwrap();
        let x = Tensor::F32(ndarray::arr2(&[[1.0f32, 10.0, 100.0]]).into_dyn());
        let out =
            s.run(&[("x".into(), x), (TASK_INPUT.into(), Tensor::I64(ndarray::arr1(&[task]).into_dyn()))]).unwrap();
        out[0].1.as_f32().unwrap().iter().copied().collect()
    }

    #[test]
    fn owner_ids_unpack_in_the_graph_in_both_widths() {
        let w: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        // 4-bit ids (all < 16) and 8-bit ids (one is 20).
        for ids in [[1u8, 0, 2, 3, 1, 2, 0, 3, 1], [1, 0, 2, 20, 1, 2, 0, 3, 1]] {
            let owners = ArrayD::from_shape_vec(ndarray::IxDyn(&[3, 3]), ids.to_vec()).unwrap();
            let masks = BTreeMap::from([("W".to_string(), StoredMask::Owners(owners))]);
            let m = embed(&matmul(&w), &masks, &[]).unwrap();
            for task in [0i64, 1, 2, 19] {
                let keep: Vec<f32> = ids
                    .iter()
                    .zip(&w)
                    .map(|(&o, &v)| if o > 0 && i64::from(o) <= task + 1 { v } else { 0.0 })
                    .collect();
                let want: Vec<f32> = (0..3).map(|j| keep[j] + 10.0 * keep[3 + j] + 100.0 * keep[6 + j]).collect();
                assert_eq!(run(&m, task), want, "ids {ids:?}, task {task}");
            }
        }
    }

    #[test]
    fn packed_bits_unpack_per_task_and_task_minus_one_is_unmasked() {
        let w: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        let t0 = [true, false, true, true, false, true, true, true, false];
        let t1 = [false, true, true, false, true, true, false, false, true];
        let rows = ndarray::Array2::from_shape_vec(
            (2, 2),
            [crate::methods::masks::pack_bits(&t0), crate::methods::masks::pack_bits(&t1)].concat(),
        )
        .unwrap();
        let masks = BTreeMap::from([("W".to_string(), StoredMask::Bits { rows, len: 9 })]);
        let m = embed(&matmul(&w), &masks, &[]).unwrap();
        for (task, keep) in [(0i64, t0), (1, t1), (-1, [true; 9])] {
            let kept: Vec<f32> = keep.iter().zip(&w).map(|(&k, &v)| if k { v } else { 0.0 }).collect();
            let want: Vec<f32> = (0..3).map(|j| kept[j] + 10.0 * kept[3 + j] + 100.0 * kept[6 + j]).collect();
            assert_eq!(run(&m, task), want, "task {task}");
        }
    }
}
