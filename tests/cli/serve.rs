//! Serving one task from the multi-task artifact: the `mtpack::serve` library API, `mtpack run
//! --task`, verify's per-task checks and the Python recipe (scripts/specialize.py), each against
//! the whole artifact fed the task's value, in the real ONNX Runtime and tract; and that loading
//! folds the task selector away (the runtimes then compute what a task exported alone computes).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use mtpack::onnx::Model;
use mtpack::pack::specialize;
use mtpack::runtime::ort_rt::OrtSession;
use mtpack::runtime::tract_rt::TractSession;
use mtpack::runtime::Backend;
use mtpack::runtime::Runtime;
use mtpack::serve::Artifact;
use mtpack::tensor::{max_abs_diff, Tensor};

use crate::helpers::*;

const TASKS: [&str; 2] = ["low", "high"];

/// A two-task pack on the tiny backbone and its artifact.
fn exported(dir: &Path, method: &str) -> (PathBuf, PathBuf) {
    let pack = dir.join(method);
    let t1 = format!("low={}:classes=0,1,2,3,4", p(&digits()));
    let t2 = format!("high={}:classes=5,6,7,8,9", p(&digits()));
    mtpack(["adapt", "--method", method, "--task", &t1, "--task", &t2, "-o", p(&pack), "--quiet"]).expect(0);
    let out = dir.join(format!("{method}.onnx"));
    mtpack(["export", p(&pack), "-o", p(&out), "--quiet"]).expect(0);
    (pack, out)
}

/// The held-out digits as the tiny backbone takes them.
fn test_images() -> Tensor {
    let x = mtpack::data::Dataset::load(&digits()).unwrap().test.unwrap();
    Tensor::F32(mtpack::data::Preprocessing::default().apply(&x.x, 16.0).unwrap().into_dyn())
}

/// The whole artifact in ONNX Runtime fed `task`'s value: what every path serving one task
/// must reproduce.
fn whole(model: &Path, task: &str, x: &Tensor) -> Tensor {
    let m = Artifact::open(model, Runtime::Ort).unwrap().manifest().clone();
    let t = m.tasks.iter().find(|t| t.name == task).unwrap();
    let mut feed = vec![(m.input.clone(), x.clone())];
    if let (Some(input), Some(v)) = (&m.task_input, t.task_value) {
        feed.push((input.clone(), Tensor::I64(ndarray::arr1(&[v]).into_dyn())));
    }
    let out = OrtSession::from_bytes(&std::fs::read(model).unwrap(), "artifact").unwrap().run(&feed).unwrap();
    out.into_iter().find(|(n, _)| *n == t.output).unwrap().1
}

fn assert_close(want: &Tensor, got: &Tensor, what: &str) {
    let d = max_abs_diff(want, got).unwrap_or_else(|| panic!("{what}: shapes {:?} vs {:?}", want.shape(), got.shape()));
    let tol = 1e-5 * largest(&want.to_f64_vec());
    assert!(d <= tol, "{what}: differs from the whole artifact by {d:e} (tolerance {tol:e})");
}

/// The largest magnitude among `values`, at least 1: float32 differences grow with it.
fn largest(values: &[f64]) -> f64 {
    values.iter().fold(1.0f64, |m, v| m.max(v.abs()))
}

/// `task`'s model as mtpack specialises it.
fn specialised(model: &Path, task: &str) -> Model {
    let whole = Model::load(model).unwrap();
    let m = specialize::manifest_of(&whole, "artifact").unwrap();
    specialize::specialize(&whole, &m, specialize::find_task(&m, task).unwrap()).unwrap()
}

/// Operator counts of `model` as ONNX Runtime holds it after loading (constants folded).
fn ort_ops(model: &Model, dir: &Path) -> BTreeMap<String, usize> {
    let out = dir.join("optimised.onnx");
    OrtSession::write_optimized(&model.to_bytes(), "test", &out).unwrap();
    let mut ops = BTreeMap::new();
    for n in &Model::load(&out).unwrap().graph().node {
        *ops.entry(n.op_type().to_string()).or_insert(0) += 1;
    }
    ops
}

/// Operators of `model` in tract's optimised plan for a batch of held-out digits.
fn tract_ops(model: &Model) -> Vec<String> {
    let feed = [("input".to_string(), test_images())];
    let mut ops = TractSession::from_bytes(&model.to_bytes(), "test").unwrap().optimized_ops(&feed).unwrap();
    ops.sort();
    ops
}

#[test]
fn every_task_served_alone_equals_the_artifact_in_both_runtimes() {
    let dir = tempfile::tempdir().unwrap();
    let x = test_images();
    for method in ["packnet", "piggyback", "ewc", "finetune"] {
        let (_, model) = exported(dir.path(), method);
        for rt in [Runtime::Ort, Runtime::Tract] {
            let mut served = Artifact::open(&model, rt).unwrap();
            let what = |task: &str| format!("{method}, task {task}, {}", rt.name());
            for task in TASKS {
                let session = served.task(task).unwrap();
                assert_eq!(session.output(), format!("{task}/logits"));
                assert_close(&whole(&model, task, &x), &session.run(&x).unwrap(), &what(task));
            }
            assert_eq!(served.open_sessions(), 2, "sessions are made once per task and kept");
            // Every head at once (one backbone pass when the backbone is shared).
            let all = served.run_all(&x).unwrap();
            let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, ["low/logits", "high/logits"], "{method}");
            for ((_, got), task) in all.iter().zip(TASKS) {
                assert_close(&whole(&model, task, &x), got, &format!("{} (all heads)", what(task)));
            }
        }
    }
}

#[test]
fn loading_folds_the_task_selector_away_in_both_runtimes() {
    let dir = tempfile::tempdir().unwrap();
    for method in ["packnet", "piggyback", "ewc"] {
        let (pack, model) = exported(dir.path(), method);
        // The task exported alone has its mask applied to the weights at export.
        let alone = dir.path().join(format!("{method}-high.onnx"));
        mtpack(["export", p(&pack), "--task", "high", "-o", p(&alone), "--quiet"]).expect(0);
        let (one, alone) = (specialised(&model, "high"), specialised(&alone, "high"));
        let in_graph = ort_ops(&one, dir.path());
        assert_eq!(in_graph, ort_ops(&alone, dir.path()), "{method}: ONNX Runtime still unpacks masks");
        assert!(!in_graph.contains_key("BitShift") && !in_graph.contains_key("Where"), "{method}: {in_graph:?}");
        assert_eq!(tract_ops(&one), tract_ops(&alone), "{method}: tract still unpacks masks");
    }
}

#[test]
fn run_task_serves_one_task_and_says_which() {
    let dir = tempfile::tempdir().unwrap();
    let (_, model) = exported(dir.path(), "packnet");
    let args = |task: &str| {
        let input = p(&digits()).to_string();
        ["run", p(&model), "--task", task, "--input", &input, "--ignore-labels", "--runtime", "both"]
            .map(str::to_string)
            .to_vec()
    };
    let mut json = args("high");
    json.push("--json".into());
    let j = mtpack(&json).expect(0).json();
    assert_eq!(j["task"], serde_json::json!({"name": "high", "output": "high/logits", "task_value": 1}));
    let want = whole(&model, "high", &test_images()).to_f64_vec();
    let outputs = j["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 2, "one output per runtime: the task's");
    for o in outputs {
        assert_eq!(o["name"], "high/logits");
        let got: Vec<f64> = o["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(got.len(), want.len());
        let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(d <= 1e-5 * largest(&want), "{}: {d:e}", o["runtime"]);
    }
    let text = mtpack(args("low")).expect(0).stdout;
    assert!(text.starts_with("task low: output low/logits (task value 0, fixed in the model)"), "{text}");

    let e = mtpack(args("nope")).expect(2).stderr;
    assert!(e.contains("no task 'nope'") && e.contains("low, high") && e.contains(p(&model)), "{e}");
    let plain = mtpack(["run", p(&tiny()), "--task", "low", "--input", p(&digits())]).expect(2).stderr;
    assert!(plain.contains("no mtpack manifest") && plain.contains("tiny_digits.onnx"), "{plain}");
}

#[test]
fn verify_checks_every_task_served_alone_in_both_runtimes() {
    let dir = tempfile::tempdir().unwrap();
    let (_, model) = exported(dir.path(), "piggyback");
    let v = mtpack(["verify", p(&model), "--json"]).expect(0).json();
    let checked: BTreeSet<(String, String)> = v["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| !o["task"].is_null())
        .map(|o| {
            assert_eq!(o["ok"], true, "{o}");
            assert_eq!(o["output"], format!("{}/logits", o["task"].as_str().unwrap()));
            (o["task"].as_str().unwrap().to_string(), o["runtime"].as_str().unwrap().to_string())
        })
        .collect();
    let want: BTreeSet<(String, String)> =
        TASKS.iter().flat_map(|t| ["ort", "tract"].map(|r| (t.to_string(), r.to_string()))).collect();
    assert_eq!(checked, want);
}

#[test]
fn the_python_recipe_serves_a_task_like_mtpack() {
    let dir = tempfile::tempdir().unwrap();
    let python = fetched("venv/bin/python");
    let x = test_images();
    for method in ["packnet", "ewc", "finetune"] {
        let (_, model) = exported(dir.path(), method);
        for task in TASKS {
            let out = dir.path().join(format!("py-{method}-{task}.onnx"));
            let run = std::process::Command::new(&python)
                .arg(root().join("scripts/specialize.py"))
                .args([p(&model), task, p(&out)])
                .output()
                .unwrap();
            assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
            let mut session = OrtSession::from_bytes(&std::fs::read(&out).unwrap(), "python").unwrap();
            let got = session.run(&[("input".to_string(), x.clone())]).unwrap();
            assert_eq!(got.len(), 1, "only the task's output");
            assert_close(&whole(&model, task, &x), &got[0].1, &format!("python, {method}, task {task}"));
            // ONNX Runtime folds it as it folds mtpack's own specialisation.
            let py = Model::load(&out).unwrap();
            let mine = specialised(&model, task);
            assert_eq!(ort_ops(&py, dir.path()), ort_ops(&mine, dir.path()), "{method}, task {task}");
        }
    }
}
