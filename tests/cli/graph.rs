use crate::helpers::*;

#[test]
fn cut_tiny_at_feature_gives_prefix_and_suffix_that_compose() {
    let dir = tempfile::tempdir().unwrap();
    let (pre, suf) = (dir.path().join("pre.onnx"), dir.path().join("suf.onnx"));
    mtpack(["graph", "cut", p(&tiny()), "--at", "features", "--prefix", p(&pre), "--suffix", p(&suf)]).expect(0);
    let j = mtpack(["inspect", "--json", p(&pre)]).expect(0).json();
    assert_eq!(j["outputs"][0]["name"], "features");
    let j = mtpack(["inspect", "--json", p(&suf)]).expect(0).json();
    assert_eq!(j["inputs"][0]["name"], "features");
    assert_eq!(j["ops"], serde_json::json!({"Gemm": 1}));
    // Both halves run in both runtimes.
    mtpack(["run", p(&pre), "--input", p(&digits()), "--limit", "16"]).expect(0);
}

#[test]
fn drop_head_then_add_two_heads_shares_one_backbone_pass() {
    let dir = tempfile::tempdir().unwrap();
    let (headless, two) = (dir.path().join("headless.onnx"), dir.path().join("two.onnx"));
    mtpack(["graph", "drop-head", p(&tiny()), "-o", p(&headless)]).expect(0);
    let j = mtpack(["inspect", "--json", p(&headless)]).expect(0).json();
    assert!(j["head"].is_null());
    assert_eq!(j["feature"]["tensor"], "features");
    mtpack(["graph", "add-head", p(&tiny()), "--classes", "3", "--name", "shapes", "-o", p(&two)]).expect(0);
    let j = mtpack(["inspect", "--json", p(&two)]).expect(0).json();
    let outs: Vec<&str> = j["outputs"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
    assert_eq!(outs, ["logits", "shapes/logits"]);
    // One backbone: still two convolutions.
    assert_eq!(j["ops"]["Conv"], 2);
    let r = mtpack(["run", p(&two), "--input", p(&digits()), "--limit", "8", "--json"]).expect(0).json();
    assert_eq!(r["outputs"][1]["shape"], serde_json::json!([8, 3]));
}

#[test]
fn merge_suffixes_on_one_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let (pre, suf) = (dir.path().join("pre.onnx"), dir.path().join("suf.onnx"));
    mtpack(["graph", "cut", p(&tiny()), "--at", "relu2.out", "--prefix", p(&pre), "--suffix", p(&suf)]).expect(0);
    let merged = dir.path().join("merged.onnx");
    let a = format!("a={}", p(&suf));
    let b = format!("b={}", p(&suf));
    mtpack(["graph", "merge", p(&pre), "--at", "relu2.out", "--suffix", &a, "--suffix", &b, "-o", p(&merged)])
        .expect(0);
    let r = mtpack(["run", p(&merged), "--input", p(&digits()), "--json"]).expect(0).json();
    let outs = r["outputs"].as_array().unwrap();
    assert_eq!(outs[0]["name"], "a/logits");
    assert_eq!(outs[1]["name"], "b/logits");
    // The merged model computes what the original did, in each branch.
    let orig = mtpack(["run", p(&tiny()), "--input", p(&digits()), "--runtime", "ort", "--json"]).expect(0).json();
    let (x, y) = (orig["outputs"][0]["values"].as_array().unwrap(), outs[0]["values"].as_array().unwrap());
    let max = x.iter().zip(y).map(|(a, b)| (a.as_f64().unwrap() - b.as_f64().unwrap()).abs()).fold(0.0, f64::max);
    assert!(max < 1e-5, "merged branch differs from the original by {max}");
}

#[test]
fn a_bad_cut_names_the_crossing_tensor_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.onnx");
    let r = mtpack(["graph", "cut", p(&tiny()), "--at", "nope", "--suffix", p(&out)]).expect(2);
    assert!(r.stderr.contains("no tensor named 'nope'"), "{}", r.stderr);
    let r = mtpack(["graph", "cut", p(&tiny()), "--at", "input", "--suffix", p(&out)]).expect(2);
    assert!(r.stderr.contains("graph input or a constant"), "{}", r.stderr);
    assert!(files_in(dir.path()).is_empty());
}
