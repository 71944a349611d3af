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

use std::collections::{BTreeMap, HashMap};

use ndarray::{Array1, Array2, ArrayD};

use super::{GraphError, Patch};
use crate::onnx::pb::TensorProto;
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
    ranks: &HashMap<String, usize>,
) -> Result<Model, GraphError> {
    // The mask ops need opset 12 (Max of int64); older models are raised where that changes
    // no node.
    let raised = super::opset::raise(model, 12)?;
    let model: &Model = &raised;
    let mut b = Builder { patch: Patch::new() };
    let mut masks = masks.clone();
    if masks.values().any(|s| matches!(s, StoredMask::PerTask(_))) {
        b.init("mask/one_row", i64s(&[1]));
        b.node("Add", &[TASK_INPUT, "mask/one_row"], "mask/per_task_row", vec![]);
        fold_per_task_batchnorm(model, &mut masks, ranks, &mut b)?;
    }
    let shapes = move_masked_weights(model, &masks, &mut b.patch)?;
    b.patch.add_input(build::value_info(TASK_INPUT, DType::I64, Some(&[Dim::Fixed(1)])));
    b.init("mask/zero", i64s(&[0]));
    b.node("Max", &[TASK_INPUT, "mask/zero"], "mask/row", vec![]);
    if masks.values().any(|s| matches!(s, StoredMask::Owners(_))) {
        owner_table(&mut b);
    }
    if masks.values().any(|s| matches!(s, StoredMask::Bits { .. })) {
        bit_tables(&mut b);
    }
    for (i, (name, stored)) in masks.iter().enumerate() {
        mask_weight(&mut b, i, name, stored, &shapes)?;
    }
    gate_outputs(model, gates, &mut b)?;
    b.patch.apply(model)
}

/// `mask/owner_table`: for each owner id, whether the task in `mask/row` sees its weights;
/// `mask/pair_table`: the same for both 4-bit ids of a byte.
fn owner_table(b: &mut Builder) {
    b.init("mask/ids", i64s(&(0..256).collect::<Vec<i64>>()));
    b.init("mask/one", i64s(&[1]));
    b.node("Add", &["mask/row", "mask/one"], "mask/limit", vec![]);
    b.node("Greater", &["mask/ids", "mask/limit"], "mask/later", vec![]);
    b.node("Not", &["mask/later"], "mask/up_to", vec![]);
    b.node("Greater", &["mask/ids", "mask/zero"], "mask/owned", vec![]);
    b.node("And", &["mask/owned", "mask/up_to"], "mask/visible", vec![]);
    b.cast("mask/visible", "mask/owner_table", DType::F32);
    // Two 4-bit owner ids a byte: each byte's pair of keep values, from the table above.
    let nibbles = ndarray::Array2::from_shape_fn((256, 2), |(v, k)| if k == 0 { v as i64 & 15 } else { v as i64 >> 4 });
    b.init("mask/nibbles", Tensor::I64(nibbles.into_dyn()));
    b.node("Gather", &["mask/owner_table", "mask/nibbles"], "mask/pair_table", vec![attr::make_int("axis", 0)]);
}

/// `mask/task_bit_table`: each byte's 8 keep values, all 1 for the backbone's own head.
fn bit_tables(b: &mut Builder) {
    b.init("mask/bit_table", bit_table());
    b.node("Less", &[TASK_INPUT, "mask/zero"], "mask/own_head", vec![]);
    b.cast("mask/own_head", "mask/all", DType::F32);
    // For the backbone's own head every bit reads 1; folded into the small table once
    // rather than applied to every weight.
    b.node("Max", &["mask/bit_table", "mask/all"], "mask/task_bit_table", vec![]);
}

/// Weight `name` as the task in `mask/row` sees it: its stored weights times the unpacked
/// mask, or its per-task row.
fn mask_weight(
    b: &mut Builder,
    i: usize,
    name: &str,
    stored: &StoredMask,
    shapes: &BTreeMap<String, Vec<i64>>,
) -> Result<(), GraphError> {
    let shape = shapes.get(name).ok_or_else(|| GraphError::NoSuchTensor { tensor: name.to_string() })?;
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
        b.init(&format!("{p}/shape"), i64s(shape));
        b.node("Reshape", &[&format!("{p}/row"), &format!("{p}/shape")], name, vec![]);
        return Ok(());
    }
    match stored {
        StoredMask::PerTask(_) => return Ok(()),
        StoredMask::Owners(ids) if owner_bits(ids) == 4 => {
            b.init(&format!("{name}/owner"), Tensor::U8(ndarray::Array1::from(pack_nibbles(ids)).into_dyn()));
            b.unpack(&p, &format!("{name}/owner"), ("mask/pair_table", 2), ids.len(), shape, &keep);
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
            b.unpack(&p, &row, ("mask/task_bit_table", 8), *n, shape, &keep);
        }
    }
    b.node("Mul", &[&format!("{name}/unmasked"), &keep], name, vec![]);
    Ok(())
}

/// The inputs of the BatchNormalization nodes whose scale is kept per task: `embed` needs
/// their ranks, which the caller measures by running the model.
pub fn per_task_batchnorm_inputs(model: &Model, masks: &BTreeMap<String, StoredMask>) -> Vec<String> {
    let per_task = |s: &String| matches!(masks.get(s), Some(StoredMask::PerTask(_)));
    model
        .graph()
        .node
        .iter()
        .filter(|n| n.op_type() == "BatchNormalization" && n.input.get(1).is_some_and(per_task))
        .filter_map(|n| n.input.first().cloned())
        .collect()
}

/// Replaces each BatchNormalization whose parameters are per task by `x * k + b`, with
/// `k = scale / sqrt(var + eps)` and `b = bias - mean * k` computed here for every task and
/// gathered by task in the graph (runtimes such as tract need BatchNormalization's
/// parameters constant). Removes those parameters from `masks`.
fn fold_per_task_batchnorm(
    m: &Model,
    masks: &mut BTreeMap<String, StoredMask>,
    ranks: &HashMap<String, usize>,
    b: &mut Builder,
) -> Result<(), GraphError> {
    for (i, n) in m.graph().node.iter().enumerate() {
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
        let (Some(x), Some(y)) = (n.input.first().cloned(), n.output.first().cloned()) else {
            return Err(problem("a BatchNormalization needs an input and an output"));
        };
        // [C, 1, ...]: broadcast along axis 1 of an input of any rank (NCHW 4, NC 2, NCL 3).
        let rank = *ranks.get(&x).ok_or_else(|| problem(&format!("the rank of its input '{x}' was not measured")))?;
        let mut target = vec![channels as i64];
        target.extend(std::iter::repeat_n(1i64, rank.saturating_sub(2)));
        let p = format!("bn/{i}");
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
        b.patch.remove_producer(&y);
        b.node("Add", &[&format!("{p}/scaled"), &format!("{p}/b")], &y, vec![]);
        for name in n.input.iter().skip(1).take(4) {
            masks.remove(name);
        }
    }
    Ok(())
}

/// Replaces each masked initializer `W` by `W/unmasked` (the graph computes `W` from it and
/// the mask; per-task parameters are computed from their rows instead) and returns the
/// weights' shapes.
fn move_masked_weights(
    m: &Model,
    masks: &BTreeMap<String, StoredMask>,
    patch: &mut Patch,
) -> Result<BTreeMap<String, Vec<i64>>, GraphError> {
    let mut shapes = BTreeMap::new();
    for t in &m.graph().initializer {
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
        patch.remove_initializer(t.name());
        if !matches!(stored, StoredMask::PerTask(_)) {
            patch.add_initializer(TensorProto { name: Some(format!("{}/unmasked", t.name())), ..t.clone() });
        }
    }
    if let Some(missing) = masks.keys().find(|k| !shapes.contains_key(*k)) {
        return Err(GraphError::NoSuchTensor { tensor: missing.clone() });
    }
    Ok(shapes)
}

/// The task output before its gate (1 for its own task value, NaN for any other).
pub fn ungated(output: &str) -> String {
    format!("{output}/ungated")
}

/// Gates each `(output, task value)`: every producer and reader of the output now uses
/// `<output>/ungated`, and the graph output is that times 1 when `task` holds the value, NaN
/// otherwise.
fn gate_outputs(model: &Model, gates: &[(String, i64)], b: &mut Builder) -> Result<(), GraphError> {
    for (i, (output, value)) in gates.iter().enumerate() {
        if !model.graph().node.iter().any(|n| n.output.contains(output)) {
            return Err(GraphError::MissingOutput { tensor: output.clone() });
        }
        b.patch.rename_tensor(output, &ungated(output));
        let p = format!("gate/{i}");
        b.init(&format!("{p}/task"), i64s(&[*value]));
        b.node("Equal", &[TASK_INPUT, &format!("{p}/task")], &format!("{p}/is"), vec![]);
        b.node("Where", &[&format!("{p}/is"), "gate/one", "gate/nan"], &format!("{p}/factor"), vec![]);
        b.node("Mul", &[&ungated(output), &format!("{p}/factor")], output, vec![]);
    }
    if !gates.is_empty() {
        b.init("gate/one", Tensor::F32(ndarray::arr0(1.0f32).into_dyn()));
        b.init("gate/nan", Tensor::F32(ndarray::arr0(f32::NAN).into_dyn()));
        // The renames above reach the graph outputs too; the gates produce the originals.
        b.patch.set_outputs(model.graph().output.clone());
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
        crate::onnx::build::matmul(&Tensor::F32(ArrayD::from_shape_vec(ndarray::IxDyn(&[3, 3]), w.to_vec()).unwrap()))
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
            let m = embed(&matmul(&w), &masks, &[], &HashMap::new()).unwrap();
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
        let m = embed(&matmul(&w), &masks, &[], &HashMap::new()).unwrap();
        for (task, keep) in [(0i64, t0), (1, t1), (-1, [true; 9])] {
            let kept: Vec<f32> = keep.iter().zip(&w).map(|(&k, &v)| if k { v } else { 0.0 }).collect();
            let want: Vec<f32> = (0..3).map(|j| kept[j] + 10.0 * kept[3 + j] + 100.0 * kept[6 + j]).collect();
            assert_eq!(run(&m, task), want, "task {task}");
        }
    }

    /// y = BatchNormalization(x) on a [batch, 3] input: rank 2, as after a Gemm.
    fn batchnorm_rank2() -> Model {
        let c = |name: &str, v: [f32; 3]| tensor_proto::from_tensor(name, &Tensor::F32(ndarray::arr1(&v).into_dyn()));
        let graph = GraphProto {
            node: vec![node("BatchNormalization", "bn", &["x", "s", "b", "m", "v"], &["y"], vec![])],
            input: vec![value_info("x", DType::F32, None)],
            output: vec![value_info("y", DType::F32, None)],
            initializer: vec![c("s", [1.0; 3]), c("b", [0.0; 3]), c("m", [0.0; 3]), c("v", [1.0; 3])],
            ..Default::default()
        };
        model(graph, 13)
    }

    #[test]
    fn per_task_batchnorm_broadcasts_over_the_measured_rank_and_refuses_an_unmeasured_one() {
        let rows =
            |backbone: [f32; 3], task: [f32; 3]| StoredMask::PerTask(ndarray::arr2(&[backbone, task]).into_dyn());
        let masks = BTreeMap::from([
            ("s".to_string(), rows([1.0; 3], [2.0, 3.0, 4.0])),
            ("b".to_string(), rows([0.0; 3], [1.0, 1.0, 1.0])),
            ("m".to_string(), rows([0.0; 3], [0.0; 3])),
            ("v".to_string(), rows([1.0; 3], [1.0; 3])),
        ]);
        let bn = batchnorm_rank2();
        assert_eq!(per_task_batchnorm_inputs(&bn, &masks), ["x"]);
        let err = embed(&bn, &masks, &[], &HashMap::new()).unwrap_err();
        assert!(err.to_string().contains("the rank of its input 'x' was not measured"), "{err}");
        let m = embed(&bn, &masks, &[], &HashMap::from([("x".to_string(), 2)])).unwrap();
        let eps = (1.0f32 + 1e-5).sqrt();
        let want: Vec<f32> = [(2.0, 1.0), (3.0, 10.0), (4.0, 100.0)].iter().map(|(k, x)| k * x / eps + 1.0).collect();
        let got = run(&m, 0);
        assert_eq!(got.len(), 3, "one row of 3 channels, not a broadcast over an assumed rank 4: {got:?}");
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4, "{got:?} vs {want:?}");
        }
    }
}
