use crate::helpers::*;

#[test]
fn run_dataset_in_both_runtimes_agrees_and_reports_accuracy() {
    let j = mtpack(["run", p(&tiny()), "--input", p(&digits()), "--json"]).expect(0).json();
    assert_eq!(j["agree"], true);
    let diff = j["comparisons"][0]["max_abs_diff"].as_f64().unwrap();
    assert!(diff < 1e-4, "ort vs tract differ by {diff}");
    // The tiny backbone scores 0.9861 on these 360 held-out digits (fixtures/README.md).
    let acc = j["accuracy"].as_f64().unwrap();
    assert!((acc - 0.9861).abs() < 1e-3, "accuracy {acc}");
    assert_eq!(j["outputs"][0]["shape"], serde_json::json!([360, 10]));
}

#[test]
fn zero_tolerance_fails_the_check_with_exit_1() {
    // ort and tract sum in different orders: on these 360 digits they differ by about 1e-5.
    let r = mtpack(["run", p(&tiny()), "--input", p(&digits()), "--tolerance", "0"]).expect(1);
    assert!(r.stdout.contains("DIFFERS"), "{}", r.stdout);
}

#[test]
fn single_runtimes_run_alone() {
    for rt in ["ort", "tract"] {
        let r = mtpack(["run", p(&tiny()), "--input", p(&digits()), "--runtime", rt, "--limit", "5"]).expect(0);
        assert!(r.stdout.starts_with(rt), "{}", r.stdout);
        assert!(r.stdout.contains("[5, 10]"), "{}", r.stdout);
    }
}

#[test]
fn named_input_tensors_feed_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("in.safetensors");
    let x = mtpack::tensor::Tensor::F32(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[2, 1, 8, 8]), 0.5));
    mtpack::store::save(&f, &[("input", &x)], Default::default()).unwrap();
    let j = mtpack(["run", p(&tiny()), "--input", p(&f), "--json"]).expect(0).json();
    assert_eq!(j["outputs"][0]["shape"], serde_json::json!([2, 10]));
    assert!(j["accuracy"].is_null());
}

#[test]
fn cuda_is_refused_loudly_without_a_cuda_build() {
    for rt in ["ort", "candle"] {
        let r = mtpack(["run", p(&tiny()), "--input", p(&digits()), "--runtime", rt, "--device", "cuda"]).expect(2);
        assert!(r.stderr.contains("device 'cuda' is not available"), "{}", r.stderr);
    }
}

#[test]
fn an_output_that_is_also_an_input_comes_back_intact() {
    // ONNX Runtime hands such an output back as the input's own buffer (a cut model whose
    // feature is fed and listed as an output); the input must outlive the copy.
    use mtpack::onnx::build::{model, node, value_info};
    use mtpack::runtime::Backend;
    use mtpack::tensor::{DType, Tensor};
    let graph = mtpack::onnx::pb::GraphProto {
        node: vec![node("Relu", "relu", &["x"], &["y"], vec![])],
        input: vec![value_info("x", DType::F32, None)],
        output: vec![value_info("x", DType::F32, None), value_info("y", DType::F32, None)],
        ..Default::default()
    };
    let bytes = model(graph, 17).to_bytes();
    let x: Vec<f32> = (0..4096).map(|i| i as f32 - 2000.0).collect();
    let input = Tensor::F32(ndarray::ArrayD::from_shape_vec(vec![64, 64], x.clone()).unwrap());
    let mut session = mtpack::runtime::ort_rt::OrtSession::from_bytes(&bytes, "alias").unwrap();
    for _ in 0..3 {
        let out = session.run(&[("x".into(), input.clone())]).unwrap();
        let Tensor::F32(back) = &out[0].1 else { panic!("not f32") };
        assert_eq!(back.iter().copied().collect::<Vec<f32>>(), x);
    }
}
