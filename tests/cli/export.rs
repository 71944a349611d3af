//! `mtpack export` and `mtpack verify` through the real binary: every method on the tiny
//! backbone, MobileNetV2, standalone tasks with preprocessing in the graph, and tampering.

use std::path::{Path, PathBuf};

use crate::helpers::*;

const METHODS: [&str; 7] = ["finetune", "feature-extract", "joint", "lwf", "ewc", "packnet", "piggyback"];

/// A finished two-task pack on the tiny backbone with `method`.
fn tiny_pack(dir: &Path, method: &str) -> PathBuf {
    let pack = dir.join(method);
    let t1 = format!("low={}:classes=0,1,2,3,4", p(&digits()));
    let t2 = format!("high={}:classes=5,6,7,8,9", p(&digits()));
    mtpack(["adapt", "--method", method, "--task", &t1, "--task", &t2, "-o", p(&pack), "--quiet"]).expect(0);
    pack
}

#[test]
fn every_method_exports_an_artifact_both_runtimes_verify() {
    let dir = tempfile::tempdir().unwrap();
    for method in METHODS {
        let pack = tiny_pack(dir.path(), method);
        let out = dir.path().join(format!("{method}.onnx"));
        let j = mtpack(["export", p(&pack), "-o", p(&out), "--json"]).expect(0).json();
        let outputs: Vec<&str> = j["tasks"].as_array().unwrap().iter().map(|t| t["output"].as_str().unwrap()).collect();
        assert_eq!(outputs, ["low/logits", "high/logits"], "{method}");
        assert_eq!(j["extra_outputs"], serde_json::json!(["logits"]));
        // The artifact's accuracy equals the pack's last accuracy row, task by task.
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(pack.join("manifest.json")).unwrap()).unwrap();
        let last = m["accuracy_matrix"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(j["tasks"][0]["accuracy"], last[1], "{method}");
        assert_eq!(j["tasks"][1]["accuracy"], last[2], "{method}");
        let v = mtpack(["verify", p(&out), "--json"]).expect(0).json();
        let runtimes: std::collections::BTreeSet<&str> =
            v["outputs"].as_array().unwrap().iter().map(|o| o["runtime"].as_str().unwrap()).collect();
        assert_eq!(runtimes, ["ort", "tract"].into_iter().collect(), "{method}");
        // One backbone pass: the artifact has the backbone's two convolutions, once.
        let i = mtpack(["inspect", "--json", p(&out)]).expect(0).json();
        assert_eq!(i["ops"]["Conv"], 2, "{method}");
    }
}

#[test]
fn tampering_is_caught_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let pack = tiny_pack(dir.path(), "lwf");
    let out = dir.path().join("model.onnx");
    mtpack(["export", p(&pack), "-o", p(&out), "--quiet"]).expect(0);
    // One byte of one weight.
    let mut m = mtpack::onnx::Model::load(&out).unwrap();
    let w = m.graph_mut().initializer.iter_mut().find(|t| t.name() == "conv2.weight").unwrap();
    w.raw_data.as_mut().unwrap()[5] ^= 0x01;
    let bad = dir.path().join("bad.onnx");
    m.save(&bad).unwrap();
    std::fs::copy(dir.path().join("model.probes.safetensors"), dir.path().join("bad.probes.safetensors")).unwrap();
    let r = mtpack(["verify", p(&bad)]).expect(1);
    assert!(r.stdout.contains("tensor 'conv2.weight': sha256"), "{}", r.stdout);
    // One byte of the manifest file.
    let manifest = dir.path().join("model.manifest.json");
    let mut text = std::fs::read(&manifest).unwrap();
    let at = text.windows(6).position(|w| w == b"\"lwf\",").unwrap() + 1;
    text[at] = b'L';
    std::fs::write(&manifest, &text).unwrap();
    let r = mtpack(["verify", p(&out), "--manifest", p(&manifest)]).expect(1);
    assert!(r.stdout.contains("manifest file differs from the manifest embedded"), "{}", r.stdout);
    // A truncated model cannot be read at all.
    let bytes = std::fs::read(&out).unwrap();
    let cut = dir.path().join("cut.onnx");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let r = mtpack(["verify", p(&cut)]).expect(2);
    assert!(r.stderr.contains("cut.onnx"), "{}", r.stderr);
}

#[test]
fn standalone_task_with_preprocessing_takes_raw_images() {
    let dir = tempfile::tempdir().unwrap();
    let pack = tiny_pack(dir.path(), "finetune");
    let out = dir.path().join("high.onnx");
    let j = mtpack(["export", p(&pack), "--task", "high", "--with-preprocessing", "-o", p(&out), "--json"])
        .expect(0)
        .json();
    assert_eq!(j["input"], "image");
    assert_eq!(j["input_type"], "uint8");
    assert_eq!(j["tasks"].as_array().unwrap().len(), 1);
    assert!(j["extra_outputs"].as_array().unwrap().is_empty());
    mtpack(["verify", p(&out)]).expect(0);
    let i = mtpack(["inspect", "--json", p(&out)]).expect(0).json();
    assert_eq!(i["inputs"][0]["dtype"], "uint8");
    let outs: Vec<&str> = i["outputs"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
    assert_eq!(outs, ["high/logits"]);
    // The other task's head was dropped with its output.
    assert!(!i["trainable"].as_array().unwrap().iter().any(|l| l["weight"] == "low/weight"));
    // Accuracy on raw images through the graph's own preprocessing matches the pack's.
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(pack.join("manifest.json")).unwrap()).unwrap();
    let recorded = m["accuracy_matrix"][2][2].as_f64().unwrap();
    assert!((j["tasks"][0]["accuracy"].as_f64().unwrap() - recorded).abs() < 0.01);
}

#[test]
fn mobilenetv2_exports_for_every_method() {
    let dir = tempfile::tempdir().unwrap();
    let mnv2 = fetched("models/mobilenetv2_imagenet.onnx");
    let task = |name: &str, classes: &str| {
        format!("{name}={}:classes={classes}:train_per_class=12:resize=32x32:channels=3:epochs=1:batch=8", p(&digits()))
    };
    // The second task's images are stored at another size (16x16): probes of tasks whose raw
    // images differ must still export.
    let big = dir.path().join("digits16.safetensors");
    let csv = root().join("fixtures/digits/digits.csv.gz");
    let import = ["data", "import", "csv", p(&csv), "--shape", "1x8x8", "--pixel-max", "16", "--resize", "16x16"];
    mtpack(import.iter().chain(&["-o", p(&big), "--quiet"])).expect(0);
    let (t1, t2) = (task("a", "0,1,2"), task("b", "3,4").replacen(p(&digits()), p(&big), 1));
    for method in METHODS {
        let pack = dir.path().join(method);
        let args = ["adapt", p(&mnv2), "--method", method, "--task", &t1, "--task", &t2, "-o", p(&pack), "--quiet"];
        mtpack(args).expect(0);
        let out = dir.path().join(format!("{method}.onnx"));
        let j = mtpack(["export", p(&pack), "-o", p(&out), "--json"]).expect(0).json();
        // 1e-4 per unit of the largest logit, as recorded for verify.
        let sidecar = dir.path().join(format!("{method}.manifest.json"));
        let a: serde_json::Value = serde_json::from_slice(&std::fs::read(sidecar).unwrap()).unwrap();
        let tol = a["probes"]["tolerance"].as_f64().unwrap();
        assert!((1e-4..1e-2).contains(&tol), "{method}: {tol}");
        assert!(j["verified"]["tract_max_abs_diff"].as_f64().unwrap() <= tol, "{method}");
        assert!(j["verified"]["ort_max_abs_diff"].as_f64().unwrap() <= tol, "{method}");
        assert_eq!(j["verified"]["accuracy_matches_pack"], true, "{method}");
        mtpack(["verify", p(&out)]).expect(0);
        let size = std::fs::metadata(&out).unwrap().len() as f64 / std::fs::metadata(&mnv2).unwrap().len() as f64;
        // Owner ids: 8 bits per 32-bit weight; bits: 1 per weight per task; plus heads and
        // the per-task BatchNorm copies.
        let limit = match method {
            "packnet" => 1.3,
            "piggyback" => 1.0 + 2.0 / 32.0 + 0.05,
            _ => 1.05,
        };
        assert!(size < limit, "{method}: artifact is {size:.3}x the backbone");
    }
}
