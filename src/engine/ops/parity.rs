//! Forward parity with ONNX Runtime for the ops that transformer and converted backbones use:
//! each case is a one-node model run by both, outputs compared element by element.

use crate::engine::session::CandleSession;
use crate::onnx::attr::{make_float, make_int, make_ints, make_string, make_tensor};
use crate::onnx::build::{model, node, value_info};
use crate::onnx::pb::{AttributeProto, GraphProto};
use crate::onnx::tensor_proto;
use crate::runtime::ort_rt::OrtSession;
use crate::runtime::Backend;
use crate::tensor::Tensor;

fn f32s(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut rng = crate::rng::Rng::new(seed);
    let v: Vec<f32> = (0..n).map(|_| (rng.uniform() * 4.0 - 2.0) as f32).collect();
    Tensor::F32(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), v).unwrap())
}

fn i64s(v: &[i64]) -> Tensor {
    Tensor::I64(ndarray::Array1::from(v.to_vec()).into_dyn())
}

/// Rank-0 tensors: Range and Pad take scalars.
fn i64_0(v: i64) -> Tensor {
    Tensor::I64(ndarray::arr0(v).into_dyn())
}

fn f32_0(v: f32) -> Tensor {
    Tensor::F32(ndarray::arr0(v).into_dyn())
}

fn f32v(v: &[f32]) -> Tensor {
    Tensor::F32(ndarray::Array1::from(v.to_vec()).into_dyn())
}

/// One node of `op` fed by `inputs` (name "" for an omitted optional input; `true` marks a
/// graph input, `false` an initializer), compared on all `outputs`.
fn case(op: &str, attrs: Vec<AttributeProto>, inputs: &[(&str, Tensor, bool)], outputs: usize, opset: i64) {
    let names: Vec<&str> = inputs.iter().map(|(n, _, _)| *n).collect();
    let outs: Vec<String> = (0..outputs).map(|i| format!("y{i}")).collect();
    let out_refs: Vec<&str> = outs.iter().map(String::as_str).collect();
    let graph = GraphProto {
        node: vec![node(op, "n", &names, &out_refs, attrs)],
        input: inputs
            .iter()
            .filter(|(n, _, g)| *g && !n.is_empty())
            .map(|(n, t, _)| value_info(n, t.dtype(), None))
            .collect(),
        initializer: inputs
            .iter()
            .filter(|(n, _, g)| !*g && !n.is_empty())
            .map(|(n, t, _)| tensor_proto::from_tensor(n, t))
            .collect(),
        output: outs
            .iter()
            .map(|o| crate::onnx::pb::ValueInfoProto { name: Some(o.clone()), ..Default::default() })
            .collect(),
        ..Default::default()
    };
    let m = model(graph, opset);
    let feeds: Vec<(String, Tensor)> =
        inputs.iter().filter(|(n, _, g)| *g && !n.is_empty()).map(|(n, t, _)| (n.to_string(), t.clone())).collect();
    let mut ort = OrtSession::from_bytes(&m.to_bytes(), op).unwrap_or_else(|e| panic!("{op}: ORT: {e:#}"));
    let want = ort.run(&feeds).unwrap_or_else(|e| panic!("{op}: ORT run: {e:#}"));
    let mut eng = CandleSession::new(&m, &candle_core::Device::Cpu).unwrap_or_else(|e| panic!("{op}: {e:#}"));
    let got = eng.run(&feeds).unwrap_or_else(|e| panic!("{op}: engine: {e:#}"));
    for ((name, w), (_, g)) in want.iter().zip(&got) {
        assert_eq!(w.shape(), g.shape(), "{op} {name}: shapes");
        let (w, g) = (w.to_f64_vec(), g.to_f64_vec());
        let worst = w.iter().zip(&g).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-5, "{op} {name}: differs from ONNX Runtime by {worst}\n ort {w:?}\n eng {g:?}");
    }
}

#[test]
fn comparisons_logic_and_selection_match_onnx_runtime() {
    let a = f32s(&[2, 3, 4], 1);
    let mut b = f32s(&[3, 1], 2);
    if let Tensor::F32(v) = &mut b {
        v[[1, 0]] = 0.0;
    }
    for op in ["Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"] {
        case(op, vec![], &[("a", a.clone(), true), ("b", b.clone(), true)], 1, 17);
    }
    case("Equal", vec![], &[("a", i64s(&[3, -1, 5]), true), ("b", i64s(&[-1]), false)], 1, 17);
    case("Min", vec![], &[("a", a.clone(), true), ("b", b.clone(), true)], 1, 17);
    case("Max", vec![], &[("a", a.clone(), true), ("b", b.clone(), true), ("c", f32v(&[0.1]), false)], 1, 17);
    for op in ["Floor", "Ceil", "Sign"] {
        case(op, vec![], &[("a", a.clone(), true)], 1, 17);
    }
    // Where(Equal(s, -1), ones, s): PyTorch's expand(-1, ...) in a shape subgraph.
    let graph_cond = {
        let c =
            Tensor::Bool(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[3, 1]), vec![true, false, true]).unwrap());
        ("c", c, false)
    };
    case("Where", vec![], &[graph_cond.clone(), ("x", a.clone(), true), ("y", b.clone(), true)], 1, 17);
    case("Where", vec![], &[graph_cond, ("x", i64s(&[1, 1, 1]), false), ("y", i64s(&[4, -1, 7]), false)], 1, 17);
}

#[test]
fn generators_and_rearrangements_match_onnx_runtime() {
    let value = tensor_proto::from_tensor("v", &f32v(&[1.5]));
    case("ConstantOfShape", vec![make_tensor("value", value)], &[("s", i64s(&[2, 3]), false)], 1, 17);
    case("ConstantOfShape", vec![], &[("s", i64s(&[4]), false)], 1, 17);
    case("Range", vec![], &[("a", i64_0(2), false), ("b", i64_0(11), false), ("d", i64_0(3), false)], 1, 17);
    let x = f32s(&[1, 3, 1], 3);
    case("Expand", vec![], &[("x", x.clone(), true), ("s", i64s(&[2, 1, 4]), false)], 1, 17);
    case("Expand", vec![], &[("x", x.clone(), true), ("s", i64s(&[5, 1, 1, 1]), false)], 1, 17);
    case("Tile", vec![], &[("x", f32s(&[2, 3], 4), true), ("r", i64s(&[2, 3]), false)], 1, 17);
    let y = f32s(&[2, 7, 3], 5);
    case("Split", vec![make_int("axis", 1)], &[("x", y.clone(), true), ("s", i64s(&[2, 5]), false)], 2, 17);
    case("Split", vec![make_int("axis", -1), make_int("num_outputs", 3)], &[("x", y.clone(), true)], 3, 18);
    case("Split", vec![make_int("axis", 1), make_ints("split", &[3, 4])], &[("x", y.clone(), true)], 2, 11);
    let p = f32s(&[1, 2, 4, 5], 6);
    for mode in ["constant", "reflect", "edge"] {
        let pads = ("p", i64s(&[0, 0, 1, 2, 0, 0, 2, 1]), false);
        case("Pad", vec![make_string("mode", mode)], &[("x", p.clone(), true), pads, ("v", f32_0(0.7), false)], 1, 17);
    }
    case(
        "Pad",
        vec![],
        &[
            ("x", p.clone(), true),
            ("p", i64s(&[1, -1, 0, 2]), false),
            ("", f32v(&[]), false),
            ("a", i64s(&[2, 3]), false),
        ],
        1,
        18,
    );
}

#[test]
fn resize_matches_onnx_runtime_in_every_mode() {
    let x = f32s(&[1, 2, 5, 6], 7);
    let sizes = ("s", i64s(&[1, 2, 8, 3]), false);
    for (mode, coords) in [
        ("cubic", "half_pixel"),
        ("cubic", "align_corners"),
        ("linear", "half_pixel"),
        ("linear", "pytorch_half_pixel"),
        ("linear", "asymmetric"),
        ("nearest", "asymmetric"),
        ("nearest", "half_pixel"),
    ] {
        let attrs = vec![
            make_string("mode", mode),
            make_string("coordinate_transformation_mode", coords),
            make_float("cubic_coeff_a", -0.75),
        ];
        case(
            "Resize",
            attrs,
            &[("x", x.clone(), true), ("", f32v(&[]), false), ("", f32v(&[]), false), sizes.clone()],
            1,
            13,
        );
    }
    let scales = ("sc", f32v(&[1.0, 1.0, 2.0, 0.5]), false);
    case(
        "Resize",
        vec![make_string("mode", "linear")],
        &[("x", x.clone(), true), ("", f32v(&[]), false), scales],
        1,
        13,
    );
    let ex = vec![make_string("mode", "cubic"), make_int("exclude_outside", 1), make_float("cubic_coeff_a", -0.5)];
    case("Resize", ex, &[("x", x, true), ("", f32v(&[]), false), ("", f32v(&[]), false), sizes], 1, 13);
}

#[test]
fn transformer_building_blocks_match_onnx_runtime() {
    let x = f32s(&[2, 5, 6], 8);
    let (g, b) = (f32s(&[6], 9), f32s(&[6], 10));
    case(
        "LayerNormalization",
        vec![make_float("epsilon", 1e-5)],
        &[("x", x.clone(), true), ("g", g, false), ("b", b, false)],
        1,
        17,
    );
    case("Gelu", vec![], &[("x", x.clone(), true)], 1, 20);
    case("Gelu", vec![make_string("approximate", "tanh")], &[("x", x.clone(), true)], 1, 20);
    case("Erf", vec![], &[("x", x.clone(), true)], 1, 14);
    case("Softmax", vec![make_int("axis", 1)], &[("x", x.clone(), true)], 1, 13);
    case("Softmax", vec![], &[("x", x.clone(), true)], 1, 14);
    // Attention's batched products: [B, H, T, d] x [B, H, d, T] and a broadcast weight.
    case("MatMul", vec![], &[("a", f32s(&[2, 3, 5, 4], 11), true), ("b", f32s(&[2, 3, 4, 5], 12), true)], 1, 14);
    case("MatMul", vec![], &[("a", f32s(&[2, 5, 6], 13), true), ("w", f32s(&[6, 7], 14), false)], 1, 14);
    case("MatMul", vec![], &[("a", f32s(&[2, 1, 5, 6], 15), true), ("b", f32s(&[3, 6, 2], 16), true)], 1, 14);
    case("ReduceMean", vec![make_ints("axes", &[-1])], &[("x", x.clone(), true)], 1, 14);
    case("ReduceMean", vec![make_int("keepdims", 0)], &[("x", x.clone(), true), ("a", i64s(&[0, 2]), false)], 1, 18);
    case("ReduceSum", vec![], &[("x", x.clone(), true), ("a", i64s(&[1]), false)], 1, 14);
    case("Transpose", vec![make_ints("perm", &[2, 0, 1])], &[("x", x.clone(), true)], 1, 14);
    case("Pow", vec![], &[("x", x, true), ("e", f32_0(2.0), false)], 1, 14);
}

#[test]
fn conv_transpose_matches_onnx_runtime() {
    let attrs =
        || vec![make_ints("kernel_shape", &[4, 4]), make_ints("pads", &[1, 1, 1, 1]), make_ints("strides", &[2, 2])];
    let feeds =
        [("x", f32s(&[2, 3, 5, 4], 17), true), ("w", f32s(&[3, 2, 4, 4], 18), false), ("b", f32s(&[2], 19), false)];
    case("ConvTranspose", attrs(), &feeds, 1, 14);
    case("ConvTranspose", vec![make_ints("strides", &[1, 1])], &feeds[..2], 1, 14);
}

/// The ops of backbones from other exporters: Caffe2's ResNet and ShuffleNet (Sum), AlexNet
/// and GoogLeNet (LRN), converted face and detection models (PRelu, Elu, Mish), GroupNorm
/// networks (InstanceNormalization, GroupNormalization).
#[test]
fn other_exporters_ops_match_onnx_runtime() {
    let x = f32s(&[2, 6, 3, 4], 20);
    let (b, c) = (f32s(&[6, 1, 1], 21), f32s(&[3, 4], 22));
    case("Sum", vec![], &[("a", x.clone(), true), ("b", b.clone(), true), ("c", c.clone(), false)], 1, 13);
    case("Sum", vec![], &[("a", x.clone(), true)], 1, 13);
    case("Mean", vec![], &[("a", x.clone(), true), ("b", b.clone(), true), ("c", c, false)], 1, 13);
    case("PRelu", vec![], &[("x", x.clone(), true), ("s", b, false)], 1, 16);
    case("PRelu", vec![], &[("x", x.clone(), true), ("s", f32v(&[0.25]), false)], 1, 9);
    for (op, attrs, opset) in [
        ("Elu", vec![make_float("alpha", 0.7)], 6),
        ("Selu", vec![], 6),
        ("Celu", vec![make_float("alpha", 1.5)], 12),
        ("ThresholdedRelu", vec![make_float("alpha", 0.3)], 10),
        ("Softplus", vec![], 1),
        ("Softsign", vec![], 1),
        ("Mish", vec![], 18),
    ] {
        case(op, attrs, &[("x", x.clone(), true)], 1, opset);
    }
    // Large inputs: Softplus and Mish must not overflow where exp(x) would.
    let big = f32v(&[-100.0, -20.0, 0.0, 20.0, 100.0]);
    case("Softplus", vec![], &[("x", big.clone(), true)], 1, 1);
    case("Mish", vec![], &[("x", big, true)], 1, 18);
    // ONNX Runtime takes odd sizes only.
    for size in [3, 5] {
        let attrs =
            vec![make_int("size", size), make_float("alpha", 0.3), make_float("beta", 0.75), make_float("bias", 2.0)];
        case("LRN", attrs, &[("x", x.clone(), true)], 1, 13);
    }
    case("LRN", vec![make_int("size", 5)], &[("x", x.clone(), true)], 1, 1);
    let (g, h) = (f32s(&[6], 23), f32s(&[6], 24));
    case(
        "InstanceNormalization",
        vec![],
        &[("x", x.clone(), true), ("g", g.clone(), false), ("h", h.clone(), false)],
        1,
        6,
    );
    let three = f32s(&[2, 6, 5], 25);
    case(
        "InstanceNormalization",
        vec![make_float("epsilon", 1e-3)],
        &[("x", three, true), ("g", g.clone(), false), ("h", h.clone(), false)],
        1,
        6,
    );
    let groups = vec![make_int("num_groups", 3)];
    case("GroupNormalization", groups.clone(), &[("x", x.clone(), true), ("g", g, false), ("h", h, false)], 1, 21);
    let (g3, h3) = (f32s(&[3], 26), f32s(&[3], 27));
    case("GroupNormalization", groups, &[("x", x, true), ("g", g3, false), ("h", h3, false)], 1, 18);
}

/// Block rearrangements, the other reductions, Lp normalisation and the sinusoids.
#[test]
fn rearrangements_reductions_and_sinusoids_match_onnx_runtime() {
    let x = f32s(&[2, 8, 4, 6], 28);
    case("SpaceToDepth", vec![make_int("blocksize", 2)], &[("x", x.clone(), true)], 1, 13);
    for mode in ["DCR", "CRD"] {
        case(
            "DepthToSpace",
            vec![make_int("blocksize", 2), make_string("mode", mode)],
            &[("x", x.clone(), true)],
            1,
            13,
        );
    }
    let y = f32s(&[2, 5, 6], 29);
    for op in ["ReduceMin", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSumExp"] {
        case(op, vec![make_ints("axes", &[1, -1]), make_int("keepdims", 0)], &[("x", y.clone(), true)], 1, 13);
        case(op, vec![], &[("x", y.clone(), true), ("a", i64s(&[1]), false)], 1, 18);
    }
    for p in [1, 2] {
        case("LpNormalization", vec![make_int("p", p), make_int("axis", 1)], &[("x", y.clone(), true)], 1, 13);
    }
    for op in ["Sin", "Cos"] {
        case(op, vec![], &[("x", y.clone(), true)], 1, 13);
    }
}
