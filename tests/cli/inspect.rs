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
    assert_eq!(j["inputs"][0]["shape"], serde_json::json!(["batch", 1, 8, 8]));
}
