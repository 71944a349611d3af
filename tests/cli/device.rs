//! Training's computation on other devices, checked without one: `check-device` runs
//! candle's portable ops (what a GPU engine runs) on the CPU against mtpack's kernels, on the
//! tiny backbone and on two real ones (MobileNetV2, and PP-LCNet, which is not a MobileNet);
//! `adapt --kernels portable` trains a pack with them.

use crate::helpers::*;

fn check(model: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["check-device", model, "--json", "-q"];
    args.extend_from_slice(extra);
    let v = mtpack(&args).expect(0).json();
    assert_eq!(v["pass"], true, "{v:#}");
    v
}

#[test]
fn portable_ops_train_the_tiny_backbone_as_the_kernels_do() {
    let v = check(tiny().to_str().unwrap(), &["--steps", "5"]);
    let r = &v["report"];
    // A float32 error of exactly 0 against float64 would mean float64 never ran.
    for point in ["forward", "first_step", "last_step"] {
        let (cpu, checked) = (r[point]["cpu"].as_f64().unwrap(), r[point]["checked"].as_f64().unwrap());
        assert!(cpu > 0.0 && checked > 0.0 && checked < 1e-4, "{point}: {r:#}");
    }
    assert_eq!(r["steps"], 5);
}

#[test]
fn portable_ops_train_two_real_backbones_as_the_kernels_do() {
    for model in ["models/mobilenetv2_imagenet.onnx", "models/pplcnet_orientation.onnx"] {
        let path = fetched(model);
        let v = check(path.to_str().unwrap(), &["--size", "32x32", "--batch", "8", "--steps", "2"]);
        let r = &v["report"];
        assert!(r["forward"]["checked"].as_f64().unwrap() < 1e-4, "{model}: {r:#}");
        assert!(r["parameters"].as_u64().unwrap() > 100, "{model}: {r:#}");
    }
}

#[test]
fn a_transformer_gets_a_head_and_is_checked_on_a_dataset() {
    let task = format!("d={}", digits().display());
    let v = check(root().join("fixtures/tiny/tiny_vit.onnx").to_str().unwrap(), &["--data", &task, "--steps", "3"]);
    assert_eq!(v["images"], serde_json::json!([1, 8, 8]), "{v:#}");
}

#[test]
fn check_device_refuses_what_it_cannot_check() {
    let out = mtpack(["check-device", "--batch", "0"]).expect(2);
    assert!(out.stderr.contains("--batch"), "{}", out.stderr);
    let missing = mtpack(["check-device", "no/such/model.onnx"]).expect(2);
    assert!(missing.stderr.contains("no/such/model.onnx"), "{}", missing.stderr);
}

#[test]
fn adapt_with_the_portable_ops_learns_what_the_kernels_learn() {
    let dir = tempfile::tempdir().unwrap();
    let mut acc = Vec::new();
    for k in ["native", "portable"] {
        let pack = dir.path().join(k);
        let out = mtpack(["adapt", "-o", pack.to_str().unwrap(), "--kernels", k, "--method", "finetune"]).expect(0);
        assert!(out.stderr.contains("runs on the CPU"), "{}", out.stderr);
        let m = manifest(&pack);
        let last = m["accuracy_matrix"].as_array().unwrap().last().unwrap().clone();
        acc.push(last.as_array().unwrap().iter().map(|v| v.as_f64().unwrap_or(0.0)).collect::<Vec<_>>());
    }
    for (a, b) in acc[0].iter().zip(&acc[1]) {
        assert!((a - b).abs() <= 0.02, "{acc:?}");
    }
}
