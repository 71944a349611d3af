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
