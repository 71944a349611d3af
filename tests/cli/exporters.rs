//! Backbones from other exporters, through the real binary: a committed fixture written the
//! way Caffe2, converted face and detection models and PyTorch's GroupNorm before opset 18
//! write theirs (opset 9, the batch fixed at 1 in the input and a Reshape, LRN, Sum, PRelu,
//! Elu, InstanceNormalization), and the nine real architectures of the onnx wheel (structure
//! with placeholder weights, in the venv scripts/fetch.sh makes).

use std::path::PathBuf;

use crate::helpers::*;

const METHODS: [&str; 7] = ["finetune", "feature-extract", "joint", "lwf", "ewc", "packnet", "piggyback"];

fn exporters() -> PathBuf {
    root().join("fixtures/tiny/tiny_digits_exporters.onnx")
}

#[test]
fn the_engine_runs_a_caffe2_style_backbone_as_onnx_runtime_and_tract_do() {
    let (model, data) = (exporters(), digits());
    let i = mtpack(["inspect", "--json", p(&model)]).expect(0).json();
    assert_eq!(i["engine_missing_ops"], serde_json::json!([]), "{i}");
    assert_eq!(i["head"]["classes"], 10, "{i}");
    // The model as exported takes one image: `run` feeds the 360 held-out digits one by one.
    let args = ["run", p(&model), "--input", p(&data), "--runtime", "all", "--json"];
    let j = mtpack(args).expect(0).json();
    assert_eq!(j["outputs"][0]["shape"], serde_json::json!([360, 10]), "{j}");
    assert_eq!(j["agree"], true, "{j}");
    for c in j["comparisons"].as_array().unwrap() {
        assert!(c["max_abs_diff"].as_f64().unwrap() < 1e-4, "{c}");
    }
}

#[test]
fn every_method_adapts_a_caffe2_style_backbone_and_its_artifact_takes_batches() {
    let dir = tempfile::tempdir().unwrap();
    let t1 = format!("low={}:classes=0,1,2,3,4", p(&digits()));
    let t2 = format!("high={}:classes=5,6,7,8,9", p(&digits()));
    let model = exporters();
    for method in METHODS {
        let pack = dir.path().join(method);
        let args = ["adapt", p(&model), "--method", method, "--task", &t1, "--task", &t2, "-o", p(&pack), "--json"];
        let r = mtpack(args).expect(0);
        assert!(r.stderr.contains("exported for a batch of 1: it takes batches here"), "{method}: {}", r.stderr);
        // Rows: before any task, after each; columns: the backbone's own head, then the tasks.
        let rows = r.json()["accuracy_matrix"].as_array().unwrap().clone();
        assert_eq!(rows.len(), 3, "{method}: {rows:?}");
        if ["finetune", "joint"].contains(&method) {
            // Training through LRN, PRelu, Sum, Elu and the GroupNorm (seeded random weights)
            // learns digits 0-4 well above chance (0.2).
            assert!(rows[1][1].as_f64().unwrap() > 0.5, "{method}: {rows:?}");
        }
        if ["packnet", "piggyback", "feature-extract"].contains(&method) {
            assert_eq!(rows[1][1], rows[2][1], "{method}: the first task is untouched by the second");
        }
        let out = dir.path().join(format!("{method}.onnx"));
        let e = mtpack(["export", p(&pack), "-o", p(&out), "--json"]).expect(0).json();
        assert_eq!(e["verified"]["accuracy_matches_pack"], true, "{method}");
        mtpack(["verify", p(&out)]).expect(0);
        let i = mtpack(["inspect", "--json", p(&out)]).expect(0).json();
        assert_eq!(i["inputs"][0]["shape"], serde_json::json!(["batch", 1, 8, 8]), "{method}");
        if ["ewc", "packnet", "piggyback"].contains(&method) {
            // Per-task parameters and masks in the graph: the opset-9 model raised to 12.
            assert_eq!(i["opsets"][""], 12, "{method}");
        }
    }
}

#[test]
fn the_onnx_wheel_s_real_architectures_have_every_op_the_engine_trains() {
    let lib = fetched("venv/lib");
    let light = std::fs::read_dir(&lib)
        .unwrap()
        .flatten()
        .map(|d| d.path().join("site-packages/onnx/backend/test/data/light"))
        .find(|d| d.is_dir())
        .expect("the onnx wheel's light models in .cache/venv");
    let mut models: Vec<PathBuf> = std::fs::read_dir(&light)
        .unwrap()
        .flatten()
        .map(|d| d.path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    models.sort();
    // AlexNet, DenseNet-121, GoogLeNet, Inception-v2, ResNet-50, ShuffleNet, SqueezeNet,
    // VGG-19, ZFNet-512.
    assert_eq!(models.len(), 9, "{models:?}");
    for m in models {
        let j = mtpack(["inspect", "--json", p(&m)]).expect(0).json();
        assert_eq!(j["engine_missing_ops"], serde_json::json!([]), "{}", m.display());
        // A Gemm head of 1000 classes (GoogLeNet's weight made by a Reshape), or for DenseNet
        // and SqueezeNet, whose classifier is a 1x1 convolution, that convolution's input.
        let conv_classifier = j["feature"]["from"] == "input of the 1x1-convolution classifier";
        assert!(j["head"]["classes"] == 1000 || conv_classifier, "{}: {j}", m.display());
    }
}
