use crate::helpers::*;

#[test]
fn inspect_tiny_names_head_and_feature() {
    let r = mtpack(["inspect", p(&tiny())]).expect(0);
    assert!(r.stdout.contains("head        10 classes via head"), "{}", r.stdout);
    assert!(r.stdout.contains("feature     features (dim 32, head input)"), "{}", r.stdout);
    assert!(r.stdout.contains("input       input float [batch, 1, 8, 8]"), "{}", r.stdout);
}

#[test]
fn inspect_json_has_every_section() {
    let j = mtpack(["inspect", "--json", p(&tiny())]).expect(0).json();
    assert_eq!(j["schema"], "mtpack.inspect/1");
    assert_eq!(j["head"]["classes"], 10);
    assert_eq!(j["feature"]["tensor"], "features");
    assert_eq!(j["parameters"]["count"], 9826);
    assert_eq!(j["ops"]["Conv"], 2);
    assert_eq!(j["opsets"][""], 17);
    assert_eq!(j["trainable"].as_array().unwrap().len(), 4);
    assert_eq!(j["engine_missing_ops"], serde_json::json!([]));
    assert_eq!(j["inputs"][0]["shape"], serde_json::json!(["batch", 1, 8, 8]));
}

#[test]
fn inspect_reports_ops_the_engine_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = mtpack::onnx::Model::load(&tiny()).unwrap();
    // Einsum is a valid ONNX op the engine does not execute.
    m.graph_mut().node[2].op_type = Some("Einsum".into());
    let f = dir.path().join("einsum.onnx");
    m.save(&f).unwrap();
    let j = mtpack(["inspect", "--json", p(&f)]).expect(0).json();
    assert_eq!(j["engine_missing_ops"], serde_json::json!(["Einsum"]));
    let r = mtpack(["run", p(&f), "--input", p(&digits()), "--runtime", "candle"]).expect(2);
    assert!(r.stderr.contains("node 'relu1': op Einsum is not supported by the training engine"), "{}", r.stderr);
    // adapt refuses before training, naming op and node, and says what still works.
    let task = format!("a={}:classes=0,1", p(&digits()));
    let r =
        mtpack(["adapt", p(&f), "--method", "finetune", "--task", &task, "-o", p(&dir.path().join("pack"))]).expect(2);
    assert!(r.stderr.contains("cannot execute Einsum (node 'relu1')") && r.stderr.contains("--at"), "{}", r.stderr);
}
