//! Bad input never panics and never writes a half file: exit 2, one line naming file and problem.

use mtpack::onnx::{pb, Model};

use crate::helpers::*;

fn one_error_line(r: &Run) -> &str {
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected a one-line error, got:\n{}", r.stderr);
    assert!(lines[0].starts_with("error: "), "{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    lines[0]
}

fn edited_tiny(dir: &std::path::Path, name: &str, edit: impl FnOnce(&mut pb::GraphProto)) -> std::path::PathBuf {
    let mut m = Model::load(&tiny()).unwrap();
    edit(m.graph_mut());
    let path = dir.join(name);
    m.save(&path).unwrap();
    path
}

#[test]
fn truncated_model() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(tiny()).unwrap();
    let f = dir.path().join("truncated.onnx");
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    for cmd in [vec!["inspect", p(&f)], vec!["graph", "drop-head", p(&f), "-o", "never.onnx"]] {
        let r = mtpack(cmd).expect(2);
        let line = one_error_line(&r);
        assert!(line.contains("truncated.onnx") && line.contains("not a valid ONNX model"), "{line}");
    }
    assert!(!std::path::Path::new("never.onnx").exists());
}

#[test]
fn random_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("random.onnx");
    let mut rng = mtpack::rng::Rng::new(3);
    let bytes: Vec<u8> = (0..4096).map(|_| rng.next_u64() as u8).collect();
    std::fs::write(&f, bytes).unwrap();
    let r = mtpack(["inspect", p(&f)]).expect(2);
    assert!(one_error_line(&r).contains("random.onnx"), "{}", r.stderr);
}

#[test]
fn missing_file_and_empty_file() {
    let r = mtpack(["inspect", "/nonexistent/model.onnx"]).expect(2);
    assert!(one_error_line(&r).contains("cannot read /nonexistent/model.onnx"), "{}", r.stderr);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("empty.onnx");
    std::fs::write(&f, b"").unwrap();
    let r = mtpack(["inspect", p(&f)]).expect(2);
    assert!(one_error_line(&r).contains("empty.onnx: the model has no graph"), "{}", r.stderr);
}

#[test]
fn node_reading_a_missing_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let f = edited_tiny(dir.path(), "missing.onnx", |g| g.node[3].input[0] = "ghost".into());
    let r = mtpack(["run", p(&f), "--input", p(&digits())]).expect(2);
    let line = one_error_line(&r);
    assert!(line.contains("missing.onnx") && line.contains("node 'conv2' (Conv) reads tensor 'ghost'"), "{line}");
}

#[test]
fn unknown_op() {
    let dir = tempfile::tempdir().unwrap();
    let f = edited_tiny(dir.path(), "unknown.onnx", |g| g.node[2].op_type = Some("Rectify".into()));
    let r = mtpack(["inspect", p(&f)]).expect(2);
    let line = one_error_line(&r);
    assert!(line.contains("unknown.onnx") && line.contains("unknown operator 'Rectify'"), "{line}");
}

#[test]
fn hostile_tensor_size_is_refused_without_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let f = edited_tiny(dir.path(), "huge.onnx", |g| g.initializer[0].dims = vec![1 << 20, 1 << 20, 1 << 20]);
    let r = mtpack(["run", p(&f), "--input", p(&digits())]).expect(2);
    assert!(one_error_line(&r).contains("huge.onnx"), "{}", r.stderr);
}

#[test]
fn dataset_not_matching_the_model_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("wrong.safetensors");
    let csv = root().join("fixtures/digits/digits.csv.gz");
    mtpack(["data", "import", "csv", p(&csv), "--shape", "1x8x8", "--resize", "6x6", "-o", p(&d)]).expect(0);
    let r = mtpack(["run", p(&tiny()), "--input", p(&d)]).expect(2);
    let line = one_error_line(&r);
    assert!(line.contains("wrong.safetensors") && line.contains("expects [batch, 1, 8, 8]"), "{line}");
}

#[test]
fn labels_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("labels.safetensors");
    let mut d = mtpack::data::Dataset::load(&digits()).unwrap();
    d.labels.truncate(5);
    // Saving skips validation; loading must catch it.
    d.save(&f).unwrap();
    let r = mtpack(["run", p(&tiny()), "--input", p(&f)]).expect(2);
    let line = one_error_line(&r);
    assert!(line.contains("labels.safetensors") && line.contains("outside 0..5"), "{line}");
    let r = mtpack(["data", "show", p(&f)]).expect(2);
    one_error_line(&r);
}

#[test]
fn labels_beyond_the_model_classes() {
    let dir = tempfile::tempdir().unwrap();
    let two = dir.path().join("two.onnx");
    let m = Model::load(&tiny()).unwrap();
    let head = mtpack::graph::heads::LinearHead::init(3, 32, 0);
    let out = mtpack::graph::heads::add_heads(&m, "features", &[("three".into(), head)], true).unwrap();
    out.save(&two).unwrap();
    let r = mtpack(["run", p(&two), "--input", p(&digits())]).expect(2);
    assert!(one_error_line(&r).contains("outside the 3 classes"), "{}", r.stderr);
}

#[test]
fn external_data_outside_the_model_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = edited_tiny(dir.path(), "ext.onnx", |g| {
        let t = &mut g.initializer[0];
        t.raw_data = None;
        t.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
        t.external_data =
            vec![pb::StringStringEntryProto { key: Some("location".into()), value: Some("../../etc/passwd".into()) }];
    });
    let r = mtpack(["inspect", p(&f)]).expect(2);
    assert!(one_error_line(&r).contains("inside the model's directory"), "{}", r.stderr);
}

#[test]
fn external_data_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let m = Model::load(&tiny()).unwrap();
    // Move every initializer's bytes into one side file.
    let mut side = Vec::new();
    let mut ext = m.clone();
    for t in &mut ext.graph_mut().initializer {
        let raw = t.raw_data.take().unwrap_or_default();
        let entry = |k: &str, v: String| pb::StringStringEntryProto { key: Some(k.into()), value: Some(v) };
        t.external_data = vec![
            entry("location", "weights.bin".into()),
            entry("offset", side.len().to_string()),
            entry("length", raw.len().to_string()),
        ];
        t.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
        side.extend(raw);
    }
    std::fs::write(dir.path().join("weights.bin"), &side).unwrap();
    let f = dir.path().join("ext.onnx");
    ext.save(&f).unwrap();
    let j = mtpack(["run", p(&f), "--input", p(&digits()), "--json"]).expect(0).json();
    assert!((j["accuracy"].as_f64().unwrap() - 0.9861).abs() < 1e-3);
    // A side file cut short is an error naming it.
    std::fs::write(dir.path().join("weights.bin"), &side[..side.len() - 4]).unwrap();
    let r = mtpack(["inspect", p(&f)]).expect(2);
    assert!(one_error_line(&r).contains("weights.bin"), "{}", r.stderr);
}
