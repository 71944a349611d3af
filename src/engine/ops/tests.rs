//! Every differentiable op's gradient against central finite differences (double precision),
//! through the engine on one-node graphs built in code.

use candle_core::{DType, Device, Tensor};

use crate::engine::gradcheck::{bits, check_gradients, seeded};
use crate::engine::Engine;
use crate::onnx::attr::{make_float, make_int, make_ints};
use crate::onnx::build::{model, node, value_info};
use crate::onnx::pb::{AttributeProto, GraphProto};
use crate::tensor::DType as HostDType;

/// Checks d/d(inputs) of a single `op` node with `attrs`, on seeded inputs of `shapes`.
/// `fixed` inputs (index, tensor) are constants such as shapes and axes.
fn check(op: &str, attrs: Vec<AttributeProto>, shapes: &[&[usize]], fixed: &[(usize, Tensor)], opset: i64) {
    let n = shapes.len() + fixed.len();
    let names: Vec<String> = (0..n).map(|i| format!("x{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let graph = GraphProto {
        node: vec![node(op, "n", &refs, &["y"], attrs)],
        input: names.iter().map(|s| value_info(s, HostDType::F64, None)).collect(),
        output: vec![value_info("y", HostDType::F64, None)],
        ..Default::default()
    };
    let m = model(graph, opset);
    let engine = Engine::new(&m, &|_| false, DType::F64, &Device::Cpu).unwrap_or_else(|e| panic!("{op}: {e}"));
    let varying: Vec<Tensor> = shapes.iter().enumerate().map(|(i, s)| seeded(s, 10 + i as u64, DType::F64)).collect();
    let f = |v: &[Tensor]| -> candle_core::Result<Tensor> {
        let mut inputs: Vec<(&str, Tensor)> = Vec::new();
        let mut it = v.iter();
        for (i, name) in refs.iter().enumerate() {
            let t = match fixed.iter().find(|(j, _)| *j == i) {
                Some((_, t)) => t.clone(),
                None => it.next().cloned().ok_or_else(|| candle_core::Error::Msg("too few inputs".into()))?,
            };
            inputs.push((name, t));
        }
        let out = engine.forward(&inputs).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        out.into_iter().next().ok_or_else(|| candle_core::Error::Msg("no output".into()))
    };
    check_gradients(&varying, f, 1e-5).unwrap_or_else(|e| panic!("{op}: {e}"));
}

fn i64s(v: &[i64]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

fn f64s(v: &[f64]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

#[test]
fn convolutions_and_pools() {
    let conv = |k: usize, s: i64, g: i64, pads: &[i64]| {
        vec![
            make_ints("kernel_shape", &[k as i64, k as i64]),
            make_ints("strides", &[s, s]),
            make_int("group", g),
            make_ints("pads", pads),
        ]
    };
    check("Conv", conv(3, 1, 1, &[1, 1, 1, 1]), &[&[2, 3, 5, 5], &[4, 3, 3, 3], &[4]], &[], 17);
    check("Conv", conv(3, 2, 4, &[1, 1, 1, 1]), &[&[2, 4, 7, 7], &[4, 1, 3, 3]], &[], 17); // depthwise, strided
    check("Conv", conv(3, 2, 2, &[0, 1, 1, 0]), &[&[1, 4, 6, 6], &[2, 2, 3, 3]], &[], 17);
    check("Conv", vec![make_ints("kernel_shape", &[3])], &[&[2, 2, 7], &[3, 2, 3]], &[], 17); // 1-D
    let same = vec![
        crate::onnx::pb::AttributeProto {
            name: Some("auto_pad".into()),
            r#type: Some(crate::onnx::pb::attribute_proto::AttributeType::String as i32),
            s: Some(b"SAME_UPPER".to_vec()),
            ..Default::default()
        },
        make_ints("strides", &[2, 2]),
    ];
    check("Conv", same, &[&[1, 2, 5, 6], &[3, 2, 3, 3]], &[], 17);
    let pool = |k: i64, s: i64, pads: &[i64]| {
        vec![make_ints("kernel_shape", &[k, k]), make_ints("strides", &[s, s]), make_ints("pads", pads)]
    };
    check("MaxPool", pool(3, 2, &[1, 1, 1, 1]), &[&[2, 3, 7, 7]], &[], 17);
    check("AveragePool", pool(3, 2, &[1, 1, 1, 1]), &[&[2, 3, 7, 7]], &[], 17);
    check("GlobalAveragePool", vec![], &[&[2, 3, 4, 5]], &[], 17);
    let up = vec![make_ints("kernel_shape", &[4, 4]), make_ints("pads", &[1, 1, 1, 1]), make_ints("strides", &[2, 2])];
    check("ConvTranspose", up, &[&[1, 2, 3, 3], &[2, 3, 4, 4], &[3]], &[], 17);
    check("GlobalMaxPool", vec![], &[&[2, 3, 4, 5]], &[], 17);
}

#[test]
fn linear_layers() {
    check(
        "Gemm",
        vec![make_int("transB", 1), make_float("alpha", 0.5), make_float("beta", 2.0)],
        &[&[3, 4], &[5, 4], &[5]],
        &[],
        17,
    );
    check("Gemm", vec![make_int("transA", 1)], &[&[4, 3], &[4, 2]], &[], 17);
    check("MatMul", vec![], &[&[2, 3, 4], &[4, 5]], &[], 17);
    check("MatMul", vec![], &[&[4], &[4, 5]], &[], 17);
}

#[test]
fn elementwise_and_activations() {
    for op in ["Add", "Sub", "Mul", "Div"] {
        check(op, vec![], &[&[2, 3, 4], &[3, 1]], &[], 17);
    }
    for op in ["Relu", "Sigmoid", "Tanh", "Exp", "Neg", "Abs", "Erf", "HardSwish"] {
        check(op, vec![], &[&[3, 5]], &[], 17);
    }
    check("HardSigmoid", vec![make_float("alpha", 0.3), make_float("beta", 0.4)], &[&[3, 5]], &[], 17);
    check("LeakyRelu", vec![make_float("alpha", 0.1)], &[&[3, 5]], &[], 17);
    check("Clip", vec![], &[&[3, 5]], &[(1, f64s(&[-0.5])), (2, f64s(&[0.5]))], 17);
    check("Clip", vec![make_float("min", -0.3), make_float("max", 0.6)], &[&[3, 5]], &[], 6);
    check("Pow", vec![], &[&[3, 5]], &[(1, f64s(&[2.0]))], 17);
    check("Softmax", vec![], &[&[3, 5]], &[], 17);
    check("Softmax", vec![make_int("axis", 1)], &[&[2, 3, 4]], &[], 17);
    check("LogSoftmax", vec![], &[&[3, 5]], &[], 17);
    check("Gelu", vec![], &[&[3, 5]], &[], 20);
    check("Sum", vec![], &[&[2, 3, 4], &[3, 1], &[4]], &[], 13);
    check("Mean", vec![], &[&[2, 3, 4], &[3, 1]], &[], 13);
    check("PRelu", vec![], &[&[2, 3, 4], &[3, 1]], &[], 16);
    check("Elu", vec![make_float("alpha", 0.7)], &[&[3, 5]], &[], 6);
    check("Selu", vec![], &[&[3, 5]], &[], 6);
    check("Celu", vec![make_float("alpha", 1.5)], &[&[3, 5]], &[], 12);
    check("ThresholdedRelu", vec![make_float("alpha", 0.2)], &[&[3, 5]], &[], 10);
    for op in ["Softplus", "Softsign"] {
        check(op, vec![], &[&[3, 5]], &[], 1);
    }
    check("Mish", vec![], &[&[3, 5]], &[], 18);
    for op in ["Sin", "Cos"] {
        check(op, vec![], &[&[3, 5]], &[], 13);
    }
}

#[test]
fn normalisations_and_reductions() {
    // Gradients reach the input, scale and bias (mean and variance are statistics).
    let var = (seeded(&[3], 5, DType::F64).abs().unwrap() + 0.5).unwrap();
    check(
        "BatchNormalization",
        vec![make_float("epsilon", 1e-3)],
        &[&[2, 3, 4, 4], &[3], &[3]],
        &[(3, seeded(&[3], 4, DType::F64)), (4, var)],
        15,
    );
    check("LayerNormalization", vec![], &[&[2, 3, 6], &[6], &[6]], &[], 17);
    check("InstanceNormalization", vec![], &[&[2, 3, 4, 3], &[3], &[3]], &[], 6);
    let groups = || vec![make_int("num_groups", 2)];
    check("GroupNormalization", groups(), &[&[2, 4, 3, 2], &[4], &[4]], &[], 21);
    check("GroupNormalization", groups(), &[&[2, 4, 3, 2], &[2], &[2]], &[], 18);
    let lrn = vec![make_int("size", 3), make_float("alpha", 0.5), make_float("beta", 0.75), make_float("bias", 1.5)];
    check("LRN", lrn, &[&[2, 5, 3, 2]], &[], 13);
    for op in ["ReduceMin", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSumExp"] {
        check(op, vec![make_ints("axes", &[0, 2]), make_int("keepdims", 0)], &[&[2, 3, 4]], &[], 13);
    }
    check("LpNormalization", vec![make_int("axis", 1)], &[&[2, 3, 4]], &[], 13);
    check("LpNormalization", vec![make_int("axis", -1), make_int("p", 1)], &[&[2, 3, 4]], &[], 13);
    check("ReduceMean", vec![make_ints("axes", &[1]), make_int("keepdims", 0)], &[&[2, 3, 4]], &[], 13);
    check("ReduceSum", vec![], &[&[2, 3, 4]], &[(1, i64s(&[-1]))], 13);
    check("ReduceMean", vec![], &[&[2, 3, 4]], &[(1, i64s(&[0, 2]))], 18);
}

#[test]
fn shape_ops_pass_gradients_through() {
    check("Flatten", vec![make_int("axis", 2)], &[&[2, 3, 4]], &[], 17);
    check("Reshape", vec![], &[&[2, 3, 4]], &[(1, i64s(&[0, -1]))], 17);
    check("Transpose", vec![make_ints("perm", &[2, 0, 1])], &[&[2, 3, 4]], &[], 17);
    check("Concat", vec![make_int("axis", -1)], &[&[2, 3], &[2, 2]], &[], 17);
    check("Squeeze", vec![], &[&[2, 1, 3]], &[(1, i64s(&[1]))], 17);
    check("Unsqueeze", vec![], &[&[2, 3]], &[(1, i64s(&[0, 3]))], 17);
    check("Slice", vec![], &[&[4, 5]], &[(1, i64s(&[1, -3])), (2, i64s(&[3, 100])), (3, i64s(&[0, 1]))], 17);
    check("Gather", vec![make_int("axis", 1)], &[&[3, 4]], &[(1, i64s(&[3, 0, -1]))], 17);
    check("Identity", vec![], &[&[3]], &[], 17);
    check("SpaceToDepth", vec![make_int("blocksize", 2)], &[&[1, 2, 4, 6]], &[], 13);
    for mode in ["DCR", "CRD"] {
        let attrs = vec![make_int("blocksize", 2), crate::onnx::attr::make_string("mode", mode)];
        check("DepthToSpace", attrs, &[&[1, 8, 2, 3]], &[], 13);
    }
    check("Dropout", vec![], &[&[3]], &[], 17);
}

#[test]
fn transformer_and_converter_ops_have_exact_gradients() {
    let cond = Tensor::new(&[[1u8], [0], [1]], &Device::Cpu).unwrap();
    check("Where", vec![], &[&[3, 4], &[3, 1]], &[(0, cond)], 17);
    check("Expand", vec![], &[&[1, 3, 1]], &[(1, i64s(&[2, 1, 4]))], 17);
    check("Tile", vec![], &[&[2, 3]], &[(1, i64s(&[2, 2]))], 17);
    check("Split", vec![make_int("axis", 1)], &[&[2, 5]], &[(1, i64s(&[3, 2]))], 17);
    check("Max", vec![], &[&[3, 4], &[4]], &[], 17);
    check("Min", vec![], &[&[3, 4], &[3, 1]], &[], 17);
    let pads = i64s(&[0, 1, 2, 0, 2, 1]);
    for mode in ["constant", "reflect", "edge"] {
        let attrs = vec![crate::onnx::attr::make_string("mode", mode)];
        check("Pad", attrs, &[&[2, 4, 5]], &[(1, pads.clone()), (2, f64s(&[0.5]).squeeze(0).unwrap())], 17);
    }
    for mode in ["nearest", "linear", "cubic"] {
        let attrs = vec![crate::onnx::attr::make_string("mode", mode)];
        let (roi, scales) = (f64s(&[]), f64s(&[]));
        check("Resize", attrs, &[&[1, 2, 4, 3]], &[(1, roi), (2, scales), (3, i64s(&[1, 2, 6, 5]))], 13);
    }
}

/// BatchNormalization -> Clip (bounds as initializers, opset 13), optionally also exposing
/// the BatchNormalization output, which keeps the engine from folding the Clip in.
fn bn_clip_model(expose_bn: bool) -> crate::onnx::Model {
    let scalar = |name: &str, v: f64| {
        let host = crate::tensor::Tensor::F64(ndarray::arr0(v).into_dyn());
        crate::onnx::tensor_proto::from_tensor(name, &host)
    };
    let ins = ["x", "s", "b", "m", "v"];
    let mut output = vec![value_info("y", HostDType::F64, None)];
    if expose_bn {
        output.push(value_info("z", HostDType::F64, None));
    }
    let graph = GraphProto {
        node: vec![
            node("BatchNormalization", "bn", &ins, &["z"], vec![make_float("epsilon", 1e-3)]),
            node("Clip", "clip", &["z", "lo", "hi"], &["y"], vec![]),
        ],
        input: ins.iter().map(|s| value_info(s, HostDType::F64, None)).collect(),
        output,
        initializer: vec![scalar("lo", -0.2), scalar("hi", 0.4)],
        ..Default::default()
    };
    model(graph, 13)
}

#[test]
fn clip_after_batch_norm_is_folded_with_the_same_values_and_gradients() {
    let stats = [seeded(&[3], 4, DType::F64), (seeded(&[3], 5, DType::F64).abs().unwrap() + 0.5).unwrap()];
    let feeds = |v: &[Tensor]| {
        let names = ["x", "s", "b"];
        let mut f: Vec<(&str, Tensor)> = names.iter().copied().zip(v.iter().cloned()).collect();
        f.extend([("m", stats[0].clone()), ("v", stats[1].clone())]);
        f
    };
    let run = |engine: &Engine, v: &[Tensor]| -> candle_core::Result<Tensor> {
        let inputs = feeds(v);
        let out = engine.forward_to(&inputs, &["y"]).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        out.into_iter().next().ok_or_else(|| candle_core::Error::Msg("no output".into()))
    };
    let fused = Engine::new(&bn_clip_model(false), &|_| false, DType::F64, &Device::Cpu).unwrap();
    let plain = Engine::new(&bn_clip_model(true), &|_| false, DType::F64, &Device::Cpu).unwrap();
    let v = [seeded(&[2, 3, 4, 4], 1, DType::F64), seeded(&[3], 2, DType::F64), seeded(&[3], 3, DType::F64)];
    let ops =
        |e: &Engine| -> Vec<String> { e.profile_forward(&feeds(&v)).unwrap().into_iter().map(|(op, _)| op).collect() };
    assert_eq!(ops(&fused), ["BatchNormalization+Clip"]);
    assert!(ops(&plain).contains(&"Clip".to_string()), "a BatchNormalization output read twice stays unfolded");
    let (a, b) = (run(&fused, &v).unwrap(), run(&plain, &v).unwrap());
    let diff: f64 = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
    assert_eq!(diff, 0.0);
    check_gradients(&v, |t| run(&fused, t), 1e-6).unwrap();
}

/// BatchNormalization (trained, so in training it normalises by the batch's statistics) ->
/// Clip -> depthwise Conv with stride 2, all weights initializers; optionally also exposing
/// the Clip's output, which keeps the engine from fusing the three.
fn bn_depthwise_model(expose: bool) -> crate::onnx::Model {
    let init = |name: &str, t: Tensor| {
        let v: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
        let host = crate::tensor::Tensor::F64(ndarray::ArrayD::from_shape_vec(t.dims(), v).unwrap());
        crate::onnx::tensor_proto::from_tensor(name, &host)
    };
    let mut output = vec![value_info("y", HostDType::F64, None)];
    if expose {
        output.push(value_info("z", HostDType::F64, None));
    }
    let conv = vec![
        make_ints("kernel_shape", &[3, 3]),
        make_ints("strides", &[2, 2]),
        make_int("group", 3),
        make_ints("pads", &[1, 1, 1, 1]),
    ];
    let graph = GraphProto {
        node: vec![
            node("BatchNormalization", "bn", &["x", "s", "b", "m", "v"], &["n"], vec![make_float("epsilon", 1e-3)]),
            node("Clip", "clip", &["n", "lo", "hi"], &["z"], vec![]),
            node("Conv", "dw", &["z", "w"], &["y"], conv),
        ],
        input: vec![value_info("x", HostDType::F64, None)],
        output,
        initializer: vec![
            init("s", seeded(&[3], 2, DType::F64)),
            init("b", seeded(&[3], 3, DType::F64)),
            init("m", seeded(&[3], 4, DType::F64)),
            init("v", (seeded(&[3], 5, DType::F64).abs().unwrap() + 0.5).unwrap()),
            init("w", seeded(&[3, 1, 3, 3], 6, DType::F64)),
            init("lo", Tensor::new(-0.2f64, &Device::Cpu).unwrap()),
            init("hi", Tensor::new(0.4f64, &Device::Cpu).unwrap()),
        ],
        ..Default::default()
    };
    model(graph, 13)
}

#[test]
fn batch_norm_into_depthwise_runs_as_one_step_with_the_same_values_gradients_and_statistics() {
    let trains = |n: &str| ["s", "b", "w"].contains(&n);
    let x = ((seeded(&[2, 3, 33, 32], 1, DType::F64) * 3.0).unwrap() + 0.5).unwrap();
    let run = |expose: bool| {
        let engine = Engine::new(&bn_depthwise_model(expose), &trains, DType::F64, &Device::Cpu).unwrap();
        engine.set_training(true);
        let ops: Vec<String> =
            engine.profile_forward(&[("x", x.clone())]).unwrap().into_iter().map(|(op, _)| op).collect();
        let y = engine.forward_to(&[("x", x.clone())], &["y"]).unwrap().remove(0);
        let grads = y.mul(&seeded(y.dims(), 7, DType::F64)).unwrap().sum_all().unwrap().backward().unwrap();
        let params = engine.params();
        let value = |n: &str| bits(params[n].as_tensor());
        let grad = |n: &str| bits(grads.get(params[n].as_tensor()).unwrap());
        (ops, bits(&y), ["s", "b", "w"].map(grad), ["m", "v"].map(value))
    };
    let (fused, plain) = (run(false), run(true));
    assert_eq!(fused.0, ["BatchNormalization+Clip+Conv"]);
    assert!(plain.0.contains(&"Conv".to_string()), "an activation read twice stays unfused: {:?}", plain.0);
    assert!(fused.1 == plain.1, "output");
    assert!(fused.2 == plain.2, "gradients of scale, bias and filters");
    assert!(fused.3 == plain.3, "running statistics after the passes");
}

#[test]
fn shape_subgraphs_run_once_per_input_size() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny/tiny_vit.onnx");
    let (m, _) = crate::graph::materialize::weights_from_nodes(&crate::onnx::Model::load(&path).unwrap()).unwrap();
    let trainable = crate::graph::analysis::trainable_names(m.graph());
    // Written-out LayerNorms train their scale and bias; the tied projection is one weight.
    for name in ["norm.weight", "norm.bias", "block1/norm2.weight", "block0.attn.proj.weight"] {
        assert!(trainable.contains(name), "{name} not in {trainable:?}");
    }
    let engine = Engine::new(&m, &|n| trainable.contains(n), DType::F32, &Device::Cpu).unwrap();
    let x = |n: usize| vec![("pixels", seeded(&[n, 1, 8, 8], 3, DType::F32))];
    let ops =
        |n: usize| -> Vec<String> { engine.profile_forward(&x(n)).unwrap().into_iter().map(|(op, _)| op).collect() };
    let first = ops(2);
    assert!(first.contains(&"Shape".to_string()) && first.contains(&"Resize".to_string()), "{first:?}");
    let again = ops(2);
    for folded in ["Shape", "Resize", "ConstantOfShape", "Where", "Expand"] {
        assert!(!again.contains(&folded.to_string()), "{folded} ran again for the same size: {again:?}");
    }
    assert!(again.contains(&"MatMul".to_string()), "the data path still runs: {again:?}");
    assert!(ops(3).contains(&"Shape".to_string()), "a new batch size evaluates the shapes anew");
    // Cached or not, the values are the same.
    let run = |n: usize| engine.forward(&x(n)).unwrap().remove(0).flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let fresh = Engine::new(&m, &|n| trainable.contains(n), DType::F32, &Device::Cpu).unwrap();
    let reference = fresh.forward(&x(2)).unwrap().remove(0).flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(run(2), reference);
}

#[test]
fn the_whole_transformer_has_exact_gradients() {
    // End to end through every pattern of the PyTorch-style fixture (class token, resized
    // position embeddings, written-out LayerNorm, attention, Erf GELU), in double precision.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny/tiny_vit.onnx");
    let (m, _) = crate::graph::materialize::weights_from_nodes(&crate::onnx::Model::load(&path).unwrap()).unwrap();
    let engine = Engine::new(&m, &|_| false, DType::F64, &Device::Cpu).unwrap();
    let f = |v: &[Tensor]| -> candle_core::Result<Tensor> {
        let out = engine.forward(&[("pixels", v[0].clone())]).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        out.into_iter().next().ok_or_else(|| candle_core::Error::Msg("no output".into()))
    };
    check_gradients(&[seeded(&[2, 1, 8, 8], 21, DType::F64)], f, 1e-5).unwrap();
}

#[test]
fn written_out_layer_norm_and_gelu_run_fused_and_match_onnx_runtime() {
    use crate::runtime::Backend;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny/tiny_vit.onnx");
    let m = crate::onnx::Model::load(&path).unwrap();
    let engine = Engine::new(&m, &|_| false, DType::F32, &Device::Cpu).unwrap();
    let x = seeded(&[3, 1, 8, 8], 4, DType::F32);
    let ops: Vec<String> =
        engine.profile_forward(&[("pixels", x.clone())]).unwrap().into_iter().map(|(op, _)| op).collect();
    for fused in ["LayerNorm (written out)", "Gelu (written out)", "Softmax"] {
        assert!(ops.contains(&fused.to_string()), "{fused} missing from {ops:?}");
    }
    for gone in ["Erf", "Sqrt", "Pow", "ReduceMean"] {
        assert!(!ops.contains(&gone.to_string()), "{gone} still runs: {ops:?}");
    }
    let ours = engine.forward(&[("pixels", x.clone())]).unwrap().remove(0);
    let host = crate::engine::from_candle(&x).unwrap();
    let mut ort = crate::runtime::ort_rt::OrtSession::from_bytes(&m.to_bytes(), "tiny_vit").unwrap();
    let theirs = ort.run(&[("pixels".to_string(), host)]).unwrap().remove(0).1;
    let (a, b) = (ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(), theirs.as_f32().unwrap());
    assert_eq!(a.len(), b.len());
    let worst = a.iter().zip(b.iter()).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-4, "largest difference from ONNX Runtime {worst}");
}
