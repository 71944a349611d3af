//! PackNet and Piggyback through the real binary: zero forgetting (bit for bit), ownership
//! and pruned fractions, the untouched backbone, capacity errors, resume after kill -9
//! mid-retraining, and the in-graph masks of the exported artifact.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mtpack::runtime::ort_rt::OrtSession;
use mtpack::runtime::Backend;
use mtpack::tensor::Tensor;

use crate::helpers::*;

fn task(name: &str, classes: &str) -> String {
    format!("{name}={}:classes={classes}", p(&digits()))
}

/// The held-out digits as the tiny backbone takes them.
fn test_images() -> Tensor {
    let x = mtpack::data::Dataset::load(&digits()).unwrap().test.unwrap();
    Tensor::F32(mtpack::data::Preprocessing::default().apply(&x.x, 16.0).unwrap().into_dyn())
}

/// Runs an artifact with a `task` value and returns one output.
fn run_task(model: &Path, task: i64, output: &str) -> Tensor {
    let feed = vec![
        ("input".to_string(), test_images()),
        ("task".to_string(), Tensor::I64(ndarray::arr1(&[task]).into_dyn())),
    ];
    let out = OrtSession::from_bytes(&std::fs::read(model).unwrap(), "artifact").unwrap().run(&feed).unwrap();
    out.into_iter().find(|(n, _)| n == output).unwrap().1
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.as_f32().unwrap().iter().map(|v| v.to_bits()).collect()
}

fn initializers(model: &Path) -> BTreeMap<String, Tensor> {
    let m = mtpack::onnx::Model::load(model).unwrap();
    m.graph()
        .initializer
        .iter()
        .map(|t| (t.name().to_string(), mtpack::onnx::tensor_proto::to_tensor(t).unwrap()))
        .collect()
}

/// Learns t1, exports, adds t2 and t3 with --resume, exports again; returns both artifacts.
fn three_tasks(dir: &Path, method: &str, extra: &[&str]) -> (PathBuf, PathBuf, PathBuf) {
    let pack = dir.join(method);
    let mut args = vec!["adapt", "--method", method, "-o", p(&pack), "--quiet"];
    args.extend_from_slice(extra);
    let t1 = task("t1", "0,1,2,3");
    args.extend(["--task", &t1]);
    mtpack(&args).expect(0);
    let first = dir.join(format!("{method}_after_t1.onnx"));
    mtpack(["export", p(&pack), "-o", p(&first), "--quiet"]).expect(0);
    std::fs::copy(pack.join("model.onnx"), dir.join(format!("{method}_model_after_t1.onnx"))).unwrap();
    let (t2, t3) = (task("t2", "4,5,6"), task("t3", "7,8,9"));
    mtpack(["adapt", "--resume", p(&pack), "--task", &t2, "--task", &t3, "--quiet"]).expect(0);
    let last = dir.join(format!("{method}_after_t3.onnx"));
    mtpack(["export", p(&pack), "-o", p(&last), "--quiet"]).expect(0);
    (pack, first, last)
}

#[test]
fn mask_methods_never_forget_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    // The papers' choices for biases and BatchNorm, and per-task copies (PackNet's default
    // on a BatchNorm backbone such as the tiny one).
    let setups: [(&str, &[&str]); 4] = [
        ("packnet", &["--packnet-shared", "first-task"]),
        ("piggyback", &[]),
        ("packnet", &[]),
        ("piggyback", &["--piggyback-shared", "per-task"]),
    ];
    for (k, (method, extra)) in setups.into_iter().enumerate() {
        let sub = dir.path().join(k.to_string());
        std::fs::create_dir_all(&sub).unwrap();
        let (pack, first, last) = three_tasks(&sub, method, extra);
        for (task, output) in [(0, "t1/logits"), (-1, "logits")] {
            let (a, b) = (run_task(&first, task, output), run_task(&last, task, output));
            assert_eq!(bits(&a), bits(&b), "{method}: {output} changed after tasks 2 and 3");
        }
        // Every column stays what it was right after its task (the backbone's own head: after
        // the first task, which for PackNet trains the whole backbone).
        let m = manifest(&pack);
        let rows = m["accuracy_matrix"].as_array().unwrap();
        for (r, row) in rows.iter().enumerate().skip(1) {
            for (c, v) in row.as_array().unwrap().iter().enumerate() {
                let learned = if c == 0 { 1 } else { c };
                if r > learned {
                    assert_eq!(*v, rows[learned][c], "{method}: column {c} moved in row {r}");
                }
            }
        }
        // Each task really learned (chance is 1/3 or 1/4).
        for (k, t) in m["tasks"].as_array().unwrap().iter().enumerate() {
            assert!(t["accuracy"].as_f64().unwrap() > 0.8, "{method} task {k}: {}", t["accuracy"]);
        }
        // The wrong task value gives NaN, not a plausible answer.
        assert!(run_task(&last, 1, "t1/logits").as_f32().unwrap().iter().all(|v| v.is_nan()));
    }
}

#[test]
fn piggyback_leaves_the_backbone_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    // Per-task BatchNorm copies live in the method's state; the backbone in model.onnx stays.
    let (pack, _, last) = three_tasks(dir.path(), "piggyback", &["--piggyback-shared", "per-task"]);
    let (orig, now) = (initializers(&pack.join("backbone.onnx")), initializers(&pack.join("model.onnx")));
    for (name, t) in &orig {
        assert_eq!(now.get(name).map(|v| v.to_le_bytes()), Some(t.to_le_bytes()), "backbone weight {name} changed");
    }
    let m = manifest(&pack);
    assert_eq!(m["accuracy_matrix"].as_array().unwrap().last().unwrap()[0], 1.0, "own head must agree fully");
    assert_eq!(m["method_params"]["shared"], "per-task");
    let (per_task, _) = mtpack::store::load(&pack.join("state/after_t3/method.safetensors")).unwrap();
    assert_eq!(per_task["per_task/bn1.scale"].shape(), [4, 8], "backbone + 3 tasks");
    // One bit per masked weight per task in the artifact.
    let art: serde_json::Value =
        serde_json::from_slice(&std::fs::read(last.with_extension("manifest.json")).unwrap()).unwrap();
    assert_eq!(schema_violation(&schema("artifact.schema.json"), &art, "$"), None);
    assert_eq!(schema_violation(&schema("pack.schema.json"), &manifest(&pack), "$"), None);
    assert_eq!(art["masks"]["kind"], "piggyback-bits");
    let bpw = art["masks"]["bits_per_weight_per_task"].as_f64().unwrap();
    assert!((1.0..1.01).contains(&bpw), "{bpw}");
}

#[test]
fn packnet_owns_each_weight_once_and_prunes_as_set() {
    let dir = tempfile::tempdir().unwrap();
    let (pack, _, _) = three_tasks(dir.path(), "packnet", &["--packnet-shared", "first-task"]);
    let (record, _) = mtpack::store::load(&pack.join("state/after_t3/method.safetensors")).unwrap();
    let owners: Vec<_> = record.iter().filter(|(k, _)| k.starts_with("owner/")).collect();
    let after_t1 = initializers(&dir.path().join("packnet_model_after_t1.onnx"));
    let now = initializers(&pack.join("model.onnx"));
    assert_eq!(owners.len(), 3, "conv1, conv2 and fc1 are masked; heads are not");
    for (key, ids) in owners {
        let name = key.strip_prefix("owner/").unwrap();
        let Tensor::U8(ids) = ids else { panic!("{key} is not uint8") };
        let n = ids.len() as f64;
        let count = |t: u8| ids.iter().filter(|&&v| v == t).count() as f64;
        // Task 1 keeps half of all weights, task 2 a quarter of what was left, task 3 too.
        let kept1 = n - (0.5 * n).round();
        assert!((count(1) - kept1).abs() <= 1.0, "{name}: task 1 owns {}", count(1));
        let free1 = n - kept1;
        let kept2 = free1 - (0.75 * free1).round();
        assert!((count(2) - kept2).abs() <= 1.0, "{name}: task 2 owns {}", count(2));
        let free2 = free1 - kept2;
        assert!((count(3) - (free2 - (0.75 * free2).round())).abs() <= 1.0, "{name}: task 3 owns {}", count(3));
        // Weights task 1 owns did not move; free weights are zero.
        let (w1, w3) = (after_t1[name].as_f32().unwrap(), now[name].as_f32().unwrap());
        for ((&id, a), b) in ids.iter().zip(w1.iter()).zip(w3.iter()) {
            if id == 1 {
                assert_eq!(a.to_bits(), b.to_bits(), "{name}: a weight of task 1 moved");
            }
            if id == 0 {
                assert_eq!(*b, 0.0, "{name}: a free weight is not zero");
            }
        }
    }
    // Biases and BatchNorm train with the first task only.
    for name in ["bn1.scale", "bn1.bias", "bn1.mean", "bn1.var", "conv2.bias", "fc1.bias"] {
        assert_eq!(after_t1[name].to_le_bytes(), now[name].to_le_bytes(), "{name} moved after task 1");
    }
    // Capacity is reported per layer after each task.
    let m = manifest(&pack);
    let layers = m["tasks"][2]["method_report"]["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    assert_eq!(layers[0]["owned"].as_array().unwrap().len(), 3);
}

#[test]
fn packnet_refuses_a_task_when_a_layer_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("full");
    let t1 = task("t1", "0,1,2,3,4");
    let args = ["adapt", "--method", "packnet", "--packnet-keep-last", "true", "--task", &t1, "-o", p(&pack)];
    mtpack(args.iter().chain(&["--quiet"])).expect(0);
    let r = mtpack(["adapt", "--resume", p(&pack), "--task", &task("t2", "5,6,7,8,9"), "--quiet"]).expect(2);
    assert!(r.stderr.contains("has no free weights left for task 't2'"), "{}", r.stderr);
    assert!(r.stderr.contains("conv1.weight"), "{}", r.stderr);
}

#[test]
fn packnet_killed_while_retraining_resumes_to_the_same_weights_and_owners() {
    let dir = tempfile::tempdir().unwrap();
    let (killed, whole) = (dir.path().join("killed"), dir.path().join("whole"));
    let t1 = task("d", "0,1,2,3,4:epochs=5:lr=0.005");
    let args = |out: &Path| {
        ["adapt", "--method", "packnet", "--packnet-retrain-epochs", "60", "--task", &t1, "-o", p(out), "--quiet"]
            .map(String::from)
    };
    // Past the 5 training epochs: pruned, retraining.
    kill_after_epochs(&args(&killed), &killed, 8);
    assert_eq!(manifest(&killed)["tasks"][0]["done"], false, "the run must have been interrupted");
    mtpack(args(&killed)).expect(0);
    mtpack(args(&whole)).expect(0);
    let bytes = |d: &Path| {
        initializers(&d.join("model.onnx")).into_iter().map(|(k, v)| (k, v.to_le_bytes())).collect::<Vec<_>>()
    };
    assert_eq!(bytes(&killed), bytes(&whole));
    let owners = |d: &Path| std::fs::read(d.join("state/after_d/method.safetensors")).unwrap();
    assert_eq!(owners(&killed), owners(&whole));
    assert_eq!(manifest(&killed)["tasks"][0]["epochs_done"], 65);
}

#[test]
fn a_flipped_mask_byte_is_named_by_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, last) = three_tasks(dir.path(), "packnet", &[]);
    let mut m = mtpack::onnx::Model::load(&last).unwrap();
    let t = m.graph_mut().initializer.iter_mut().find(|t| t.name() == "conv2.weight/owner").unwrap();
    t.raw_data.as_mut().unwrap()[3] ^= 0x01;
    let bad = dir.path().join("bad.onnx");
    m.save(&bad).unwrap();
    std::fs::copy(last.with_extension("probes.safetensors"), dir.path().join("bad.probes.safetensors")).unwrap();
    let r = mtpack(["verify", p(&bad)]).expect(1);
    assert!(r.stdout.contains("tensor 'conv2.weight/owner': sha256"), "{}", r.stdout);
}
