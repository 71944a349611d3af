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

/// A safetensors file whose header claims `x` [2^40, 2^40, 1, 1] and `y` [2^40] over 12 bytes.
fn hostile_safetensors(path: &std::path::Path) {
    let big = 1u64 << 40;
    let header = format!(
        r#"{{"x":{{"dtype":"U8","shape":[{big},{big},1,1],"data_offsets":[0,4]}},"y":{{"dtype":"I64","shape":[{big}],"data_offsets":[4,12]}}}}"#
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend([0u8; 12]);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn hostile_dataset_header_is_refused_without_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("huge.safetensors");
    hostile_safetensors(&f);
    let r = mtpack(["run", p(&tiny()), "--input", p(&f)]).expect(2);
    assert!(one_error_line(&r).contains("huge.safetensors"), "{}", r.stderr);
    let task = format!("t={}", p(&f));
    let r = mtpack(["adapt", "--task", &task, "-o", p(&dir.path().join("pack")), "--quiet"]).expect(2);
    assert!(one_error_line(&r).contains("huge.safetensors"), "{}", r.stderr);
}

#[test]
fn a_resize_beyond_memory_is_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let task = format!("t={}:resize=1000000x1000000", p(&digits()));
    let r = mtpack(["adapt", "--task", &task, "-o", p(&dir.path().join("pack")), "--quiet"]).expect(2);
    let line = one_error_line(&r);
    assert!(line.contains("task 't'") && line.contains("GiB needed"), "{line}");
}

#[test]
fn hostile_probes_and_mask_sizes_in_an_artifact_are_refused_without_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let (_, artifact) = packnet_pack_and_artifact(dir.path(), "a.onnx");
    let (_, probes) = mtpack::pack::export::sidecars(&artifact);
    let good_probes = std::fs::read(&probes).unwrap();
    hostile_safetensors(&probes);
    let r = mtpack(["verify", p(&artifact)]);
    assert!(r.code == 1 || r.code == 2, "exit {}: {}", r.code, r.stderr);
    assert!(r.stdout.contains("a.probes.safetensors") || r.stderr.contains("a.probes.safetensors"), "{}", r.stdout);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    std::fs::write(&probes, good_probes).unwrap();
    // The embedded masks: the packed mask bits claim a size no machine holds.
    let mut m = Model::load(&artifact).unwrap();
    let mask = m.graph_mut().initializer.iter_mut().find(|t| t.name().contains("mask")).expect("a mask initializer");
    let name = mask.name().to_string();
    mask.dims = vec![1 << 40, 1 << 40];
    m.save(&artifact).unwrap();
    let r = mtpack(["verify", p(&artifact)]).expect(2);
    let line = one_error_line(&r);
    assert!(line.contains(&name) && line.contains("a.onnx"), "{line}");
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn a_runtime_failing_on_a_damaged_artifact_is_a_problem_named_in_the_report_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (_, artifact) = packnet_pack_and_artifact(dir.path(), "a.onnx");
    // One index of the mask unpacking table made out of range: tract panics while folding
    // it (caught), ONNX Runtime returns an error; both become problems of the report.
    let mut m = Model::load(&artifact).unwrap();
    let t = m.graph_mut().initializer.iter_mut().find(|t| t.name() == "mask/nibbles").expect("the unpacking table");
    let mtpack::tensor::Tensor::I64(mut a) = mtpack::onnx::tensor_proto::to_tensor(t).unwrap() else {
        panic!("the table holds int64 indices")
    };
    a[[3, 1]] = 1 << 40;
    *t = mtpack::onnx::tensor_proto::from_tensor("mask/nibbles", &mtpack::tensor::Tensor::I64(a));
    m.save(&artifact).unwrap();
    let r = mtpack(["verify", p(&artifact)]).expect(1);
    assert!(r.stdout.contains("tensor 'mask/nibbles': sha256"), "{}", r.stdout);
    assert!(r.stdout.contains("tract") && r.stdout.contains("index out of bounds"), "{}", r.stdout);
    assert!(
        r.stdout.contains("Gather node. Name:'mask/pair_table'"),
        "the ONNX Runtime error keeps its message: {}",
        r.stdout
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}
