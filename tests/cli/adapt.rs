//! `mtpack adapt` through the real binary: the built-in default, resume after kill -9, the
//! methods' invariants, and bad plans failing before training.

use std::path::Path;

use mtpack::runtime::ort_rt::OrtSession;
use mtpack::runtime::Backend;

use crate::helpers::*;

#[test]
fn default_main_job_learns_both_digit_tasks_and_reruns_as_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("pack");
    let j = mtpack(["adapt", "-o", p(&pack), "--json", "--quiet"]).expect(0).json();
    assert_eq!(j["columns"], serde_json::json!(["backbone", "digits-0-4", "digits-5-9"]));
    assert_eq!(j["rows"], serde_json::json!(["initial", "digits-0-4", "digits-5-9"]));
    let last = j["accuracy_matrix"][2].as_array().unwrap();
    for (i, v) in last.iter().enumerate() {
        assert!(v.as_f64().unwrap() > 0.9, "column {i}: {v}");
    }
    let before = std::fs::read(pack.join("model.onnx")).unwrap();
    let again = mtpack(["adapt", "-o", p(&pack), "--json", "--quiet"]).expect(0).json();
    assert_eq!(again["accuracy_matrix"], j["accuracy_matrix"]);
    assert_eq!(std::fs::read(pack.join("model.onnx")).unwrap(), before, "a finished pack must not retrain");
    // The manifest records digests of the files it lists.
    let m = manifest(&pack);
    let sha = mtpack::pack::file_sha256(&pack.join("model.onnx")).unwrap();
    assert_eq!(m["files"]["model.onnx"], sha.as_str());
}

#[test]
fn killed_mid_epoch_resumes_to_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (killed, whole) = (dir.path().join("killed"), dir.path().join("whole"));
    let task = digits_task("d", ":epochs=60:lr=0.005");
    let args = |out: &Path| {
        vec![
            "adapt".to_string(),
            "--method".into(),
            "finetune".into(),
            "--task".into(),
            task.clone(),
            "-o".into(),
            p(out).into(),
            "--quiet".into(),
        ]
    };
    kill_after_epochs(&args(&killed), &killed, 3);
    let m = manifest(&killed);
    assert_eq!(m["tasks"][0]["done"], false, "the run must have been interrupted");
    mtpack(args(&killed)).expect(0);
    mtpack(args(&whole)).expect(0);
    assert_eq!(weights(&killed.join("model.onnx")), weights(&whole.join("model.onnx")));
    let (mk, mw) = (manifest(&killed), manifest(&whole));
    assert_eq!(mk["accuracy_matrix"], mw["accuracy_matrix"]);
    assert_eq!(mk["tasks"][0]["epochs_done"], 60);
}

#[test]
fn feature_extract_never_touches_the_backbone_or_old_heads() {
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("fe");
    let t1 = digits_task("low", ":classes=0,1,2,3,4");
    let t2 = digits_task("high", ":classes=5,6,7,8,9");
    mtpack(["adapt", "--method", "feature-extract", "--task", &t1, "-o", p(&pack), "--quiet"]).expect(0);
    let after_first = std::fs::read(pack.join("model.onnx")).unwrap();
    mtpack(["adapt", "--resume", p(&pack), "--task", &t2, "--quiet"]).expect(0);
    let (orig, now) = (weights(&pack.join("backbone.onnx")), weights(&pack.join("model.onnx")));
    for (name, bytes) in &orig {
        assert_eq!(now.get(name), Some(bytes), "backbone weight {name} changed");
    }
    // Task 1's head and every backbone output are bit-for-bit what they were after task 1.
    let x = mtpack::data::Dataset::load(&digits()).unwrap().test.unwrap();
    let x = mtpack::data::Preprocessing::default().apply(&x.x, 16.0).unwrap();
    let inputs = vec![("input".to_string(), mtpack::tensor::Tensor::F32(x.into_dyn()))];
    let run = |bytes: &[u8]| OrtSession::from_bytes(bytes, "m").unwrap().run(&inputs).unwrap();
    let (a, b) = (run(&after_first), run(&std::fs::read(pack.join("model.onnx")).unwrap()));
    for name in ["logits", "low/logits"] {
        let find = |o: &mtpack::runtime::Named| o.iter().find(|(n, _)| n == name).unwrap().1.clone();
        assert_eq!(find(&a), find(&b), "output {name} changed");
    }
    let m = manifest(&pack);
    assert_eq!(m["accuracy_matrix"][2][0], 1.0);
    assert_eq!(m["accuracy_matrix"][1][1], m["accuracy_matrix"][2][1]);
}

#[test]
fn lwf_records_the_old_models_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("lwf");
    let t1 = digits_task("low", ":classes=0,1,2,3,4");
    let t2 = digits_task("high", ":classes=5,6,7,8,9");
    mtpack(["adapt", "--method", "lwf", "--task", &t1, "-o", p(&pack), "--quiet"]).expect(0);
    let old_model = std::fs::read(pack.join("model.onnx")).unwrap();
    mtpack(["adapt", "--resume", p(&pack), "--task", &t2, "--quiet"]).expect(0);
    // The targets are the model-after-task-1's outputs on task 2's training images.
    let plan: mtpack::plan::TaskPlan = mtpack::plan::parse_task(&t2).unwrap();
    let data = mtpack::plan::data::prepare(&plan, None, 0).unwrap();
    let out = OrtSession::from_bytes(&old_model, "old").unwrap().run(&[("input".into(), data.train_x)]).unwrap();
    let (targets, _) = mtpack::store::load(&pack.join("state/lwf_targets_high.safetensors")).unwrap();
    for name in ["logits", "low/logits"] {
        let want = &out.iter().find(|(n, _)| n == name).unwrap().1;
        assert_eq!(&targets[name], want, "recorded {name}");
    }
}

#[test]
fn ewc_with_lambda_zero_is_finetune() {
    let dir = tempfile::tempdir().unwrap();
    let (ewc, ft) = (dir.path().join("ewc"), dir.path().join("ft"));
    let t1 = digits_task("low", ":classes=0,1,2,3,4");
    let t2 = digits_task("high", ":classes=5,6,7,8,9");
    // Fine-tuning shares BatchNorm; so does EWC's penalised mode (the paper's).
    mtpack([
        "adapt",
        "--method",
        "ewc",
        "--ewc-lambda",
        "0",
        "--ewc-shared",
        "penalised",
        "--task",
        &t1,
        "--task",
        &t2,
        "-o",
        p(&ewc),
        "--quiet",
    ])
    .expect(0);
    mtpack(["adapt", "--method", "finetune", "--task", &t1, "--task", &t2, "-o", p(&ft), "--quiet"]).expect(0);
    assert_eq!(weights(&ewc.join("model.onnx")), weights(&ft.join("model.onnx")));
    // With a strong penalty the backbone stays closer to where task 1 left it.
    let strong = dir.path().join("strong");
    mtpack([
        "adapt",
        "--method",
        "ewc",
        "--ewc-lambda",
        "10000",
        "--task",
        &t1,
        "--task",
        &t2,
        "-o",
        p(&strong),
        "--quiet",
    ])
    .expect(0);
    let m = manifest(&strong);
    assert!(m["metrics"]["average_accuracy"].as_f64().unwrap().is_finite());
    assert!(m["tasks"][1]["history"][1]["loss"].as_f64().unwrap().is_finite());
}

#[test]
fn ewc_per_task_batchnorm_keeps_each_tasks_copy_and_exports_with_a_task_input() {
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("ewc");
    let (t1, t2) = (digits_task("low", ":classes=0,1,2,3,4"), digits_task("high", ":classes=5,6,7,8,9"));
    // The tiny backbone has BatchNormalization: per-task copies are EWC's default there.
    mtpack(["adapt", "--method", "ewc", "--task", &t1, "--task", &t2, "-o", p(&pack), "--quiet"]).expect(0);
    let m = manifest(&pack);
    assert_eq!(m["method_params"]["shared"], "per-task");
    // The method's record after each task: per-task copies and Fisher sums in one file.
    let record =
        |task: &str| mtpack::store::load(&pack.join(format!("state/after_{task}/method.safetensors"))).unwrap().0;
    let rows = |task: &str| {
        record(task)
            .into_iter()
            .filter(|(k, _)| k.starts_with("per_task/"))
            .collect::<std::collections::HashMap<_, _>>()
    };
    let (after_low, after_high) = (rows("low"), rows("high"));
    let stats: Vec<&String> = after_high.keys().filter(|k| k.ends_with("bn1.mean") || k.ends_with("bn1.var")).collect();
    assert_eq!(stats.len(), 2, "running statistics are kept per task: {:?}", after_high.keys());
    let row = |t: &mtpack::tensor::Tensor, r: usize| t.as_f32().unwrap().index_axis(ndarray::Axis(0), r).to_owned();
    for name in after_high.keys() {
        // Row 0 is the backbone's; task 1's copy (row 1) is not touched by task 2, which
        // trained its own (row 2).
        assert_eq!(row(&after_low[name], 1), row(&after_high[name], 1), "{name}");
    }
    assert!(stats.iter().any(|n| row(&after_high[*n], 1) != row(&after_high[*n], 2)));
    // The copies are not in the penalty: no Fisher for them.
    let fisher = record("high");
    let own: Vec<&str> = after_high.keys().filter_map(|k| k.strip_prefix("per_task/")).collect();
    assert!(fisher.keys().all(|k| !own.contains(&k.trim_start_matches("F/").trim_start_matches("FT/"))));
    assert!(fisher.keys().any(|k| k.starts_with("F/")));
    // One task's Fisher: mean entry 1 plus the floor, no entry below the floor.
    let first = record("low");
    let entries: Vec<f32> = first
        .iter()
        .filter(|(k, _)| k.starts_with("F/"))
        .flat_map(|(_, t)| t.as_f32().unwrap().iter().copied())
        .collect();
    let mean = entries.iter().map(|&v| f64::from(v)).sum::<f64>() / entries.len() as f64;
    assert!((mean - 1.01).abs() < 1e-3, "mean Fisher {mean}");
    assert!(entries.iter().all(|&v| v >= 0.01 - 1e-6));
    let artifact = dir.path().join("ewc.onnx");
    mtpack(["export", p(&pack), "-o", p(&artifact), "--quiet"]).expect(0);
    let a = serde_json::from_slice::<serde_json::Value>(&std::fs::read(dir.path().join("ewc.manifest.json")).unwrap())
        .unwrap();
    assert_eq!(a["task_input"], "task");
    assert_eq!(a["masks"]["kind"], "per-task-parameters");
    assert_eq!(schema_violation(&schema("artifact.schema.json"), &a, "$"), None);
    mtpack(["verify", p(&artifact), "--quiet"]).expect(0);
}

#[test]
fn ewc_per_task_killed_in_the_second_task_resumes_to_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let (killed, whole) = (dir.path().join("killed"), dir.path().join("whole"));
    let (t1, t2) = (digits_task("low", ":classes=0,1,2,3,4"), digits_task("high", ":classes=5,6,7,8,9:epochs=40"));
    let args = |out: &Path| -> Vec<String> {
        ["adapt", "--method", "ewc", "--task", &t1, "--task", &t2, "-o", p(out), "--quiet"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    // Task 1 has 2 epochs: the third checkpointed epoch is task 2's.
    kill_after_epochs(&args(&killed), &killed, 3);
    assert_eq!(manifest(&killed)["tasks"][1]["done"], false, "the run must have been interrupted in task 2");
    mtpack(args(&killed)).expect(0);
    mtpack(args(&whole)).expect(0);
    assert_eq!(weights(&killed.join("model.onnx")), weights(&whole.join("model.onnx")));
    let state = |d: &Path| std::fs::read(d.join("state/after_high/method.safetensors")).unwrap();
    assert_eq!(state(&killed), state(&whole));
    assert_eq!(manifest(&killed)["accuracy_matrix"], manifest(&whole)["accuracy_matrix"]);
}

#[test]
fn joint_trains_on_every_task_so_far() {
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("joint");
    let t1 = digits_task("low", ":classes=0,1,2,3,4");
    let t2 = digits_task("high", ":classes=5,6,7,8,9");
    mtpack(["adapt", "--method", "joint", "--task", &t1, "--task", &t2, "-o", p(&pack), "--quiet"]).expect(0);
    let m = manifest(&pack);
    let (n1, n2) = (m["tasks"][0]["train_size"].as_u64().unwrap(), m["tasks"][1]["train_size"].as_u64().unwrap());
    assert_eq!(m["tasks"][0]["history"][0]["examples"].as_u64().unwrap(), n1);
    assert_eq!(m["tasks"][1]["history"][0]["examples"].as_u64().unwrap(), n1 + n2);
    assert_eq!(m["needs_old_data"], true);
}

#[test]
fn bad_plans_fail_before_training_naming_task_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("never");
    let nan = dir.path().join("nan.safetensors");
    let mut d = mtpack::data::Dataset::load(&digits()).unwrap();
    let mut x = mtpack::data::Preprocessing::default().apply(&d.train.x, 16.0).unwrap();
    x[[2, 0, 3, 3]] = f32::NAN;
    d.train.x = mtpack::tensor::Tensor::F32(x.into_dyn());
    d.test = None;
    d.save(&nan).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--task".into(), "a=/nonexistent/x.safetensors".into()],
            "task 'a': dataset /nonexistent/x.safetensors does not exist",
        ),
        (
            vec!["--task".into(), digits_task("a", ":labels=x,y")],
            "task 'a': labels lists 2 names but the data has 10 classes",
        ),
        (
            vec!["--task".into(), digits_task("a", ":resize=6x6")],
            "task 'a': images are [1, 6, 6] after preprocessing but the backbone input is [batch, 1, 8, 8]",
        ),
        (
            vec!["--task".into(), digits_task("a", ""), "--task".into(), digits_task("a", "")],
            "task name 'a' is used twice",
        ),
        (vec!["--task".into(), format!("a={}", p(&nan))], "task 'a'"),
        (vec!["--task".into(), digits_task("a", ":classes=3,11")], "task 'a': classes: 11 is not a class"),
        (vec!["--task".into(), digits_task("a", ":lr=-1")], "task 'a': lr must be a positive number"),
        (vec!["--method".into(), "bogus".into(), "--task".into(), digits_task("a", "")], "invalid value 'bogus'"),
        (
            vec![
                "--method".into(),
                "lwf".into(),
                "--bn-recalibrate".into(),
                "on".into(),
                "--task".into(),
                digits_task("a", ""),
            ],
            "bn_recalibrate needs batchnorm = batch",
        ),
        (
            vec![
                "--method".into(),
                "lwf".into(),
                "--lwf-warmup-epochs".into(),
                "2".into(),
                "--task".into(),
                digits_task("a", ""),
            ],
            "lwf_warmup_epochs is now the plan's linear_probe_epochs",
        ),
    ];
    for (extra, want) in cases {
        let mut args: Vec<String> = vec!["adapt".into(), "-o".into(), p(&pack).into()];
        args.extend(extra);
        let r = mtpack(&args).expect(2);
        assert!(r.stderr.contains(want), "{args:?}:\n{}", r.stderr);
        assert!(!pack.exists(), "{args:?} created the pack before failing");
    }
    let r = mtpack(["adapt", "-o", p(&pack), "--task", &format!("a={}", p(&nan))]).expect(2);
    assert!(r.stderr.contains("non-finite value"), "{}", r.stderr);
}

#[test]
fn a_task_starts_from_a_linear_probe_and_ends_with_recalibrated_batchnorm() {
    // The default backbone has BatchNormalization; fine-tuning trains it with batch statistics.
    let dir = tempfile::tempdir().unwrap();
    let (on, off, fe) = (dir.path().join("on"), dir.path().join("off"), dir.path().join("fe"));
    let task = digits_task("d", ":classes=0,1,2,3,4:epochs=1");
    let adapt = |out: &Path, extra: &[&str]| {
        let mut args = vec!["adapt", "--task", &task, "-o", p(out), "--json", "--quiet"];
        args.extend(extra);
        mtpack(&args).expect(0).json()
    };
    let j = adapt(&on, &["--method", "finetune", "--linear-probe-epochs", "10", "--bn-recalibrate", "on"]);
    let probe = &j["tasks"][0]["linear_probe"];
    assert_eq!(probe["epochs"], 10, "{probe}");
    assert!(probe["accuracy"].as_f64().unwrap() > 0.5, "a head on the frozen backbone learns: {probe}");
    assert!(j["tasks"][0]["batchnorm_recalibrated"].as_u64().unwrap() >= 1, "{j}");
    let m = manifest(&on);
    assert_eq!((&m["plan"]["bn_recalibrate"], &m["plan"]["linear_probe_epochs"]), (&true.into(), &10.into()));
    assert_eq!(schema_violation(&schema("pack.schema.json"), &m, "$"), None);
    // Off: the task starts from a random head and keeps the moving averages.
    let j = adapt(&off, &["--method", "finetune", "--bn-recalibrate", "off"]);
    let m = manifest(&off);
    assert_eq!((&m["plan"]["bn_recalibrate"], &m["plan"]["linear_probe_epochs"]), (&false.into(), &0.into()));
    assert!(j["tasks"][0]["linear_probe"].is_null() && j["tasks"][0]["batchnorm_recalibrated"].is_null(), "{j}");
    assert_ne!(weights(&on.join("model.onnx")), weights(&off.join("model.onnx")));
    // The default where BatchNorm trains with batch statistics: recalibrated, no probe.
    let j = adapt(&fe.with_extension("default"), &["--method", "finetune"]);
    assert!(j["tasks"][0]["linear_probe"].is_null() && j["tasks"][0]["batchnorm_recalibrated"].as_u64() >= Some(1));
    // Feature extraction is the probe itself: neither applies.
    let j = adapt(&fe, &["--method", "feature-extract", "--linear-probe-epochs", "10", "--bn-recalibrate", "on"]);
    assert!(j["tasks"][0]["linear_probe"].is_null() && j["tasks"][0]["batchnorm_recalibrated"].is_null(), "{j}");
}

#[test]
fn a_later_tasks_probe_sees_the_network_that_task_starts_from() {
    // EWC keeps BatchNorm per task: each task starts from the backbone's statistics and
    // scales, under weights that the earlier tasks moved. The probe must fit its head to that
    // network, normalised as training normalises (batch statistics), not to the stored one.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p");
    let (a, b) = (digits_task("a", ":classes=0,1,2,3,4:lr=0.05"), digits_task("b", ":classes=5,6,7,8,9:lr=0.05"));
    let args = ["adapt", "--method", "ewc", "--task", &a, "--task", &b, "--epochs", "2"];
    let more = ["--linear-probe-epochs", "10", "--bn-recalibrate", "on", "-o", p(&out), "--json", "--quiet"];
    let j = mtpack(args.iter().chain(&more)).expect(0).json();
    for t in 0..2 {
        let probe = j["tasks"][t]["linear_probe"]["accuracy"].as_f64().unwrap();
        assert!(probe > 0.6, "task {t}: a head on the starting network separates the classes: {probe}");
    }
}

#[test]
fn a_task_that_ends_below_its_linear_probe_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    // A learning rate that wrecks the backbone in a few steps.
    let task = digits_task("d", ":classes=0,1,2,3,4:epochs=1:lr=5");
    let out = dir.path().join("p");
    let r = mtpack([
        "adapt",
        "--method",
        "finetune",
        "--linear-probe-epochs",
        "10",
        "--task",
        &task,
        "-o",
        p(&out),
        "--quiet",
    ]);
    let r = r.expect(0);
    assert!(r.stderr.contains("warning: task 'd' ended at"), "{}", r.stderr);
    assert!(r.stderr.contains("--method feature-extract"), "{}", r.stderr);
}

#[test]
fn tune_chooses_each_tasks_learning_rate_on_its_own_training_data_and_records_the_trials() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p");
    let (a, b) = (digits_task("a", ":classes=0,1,2:epochs=1"), digits_task("b", ":classes=3,4,5:epochs=1"));
    let r = mtpack(["adapt", "--method", "ewc", "--task", &a, "--task", &b, "--tune", "-o", p(&out), "--json"]);
    let r = r.expect(0);
    assert!(r.stderr.contains("b: --tune lr 0.001: validation accuracy"), "{}", r.stderr);
    let m = manifest(&out);
    assert_eq!(schema_violation(&schema("pack.schema.json"), &m, "$"), None);
    assert_eq!(m["plan"]["tune"], true);
    for t in m["tasks"].as_array().unwrap() {
        let tune = &t["tune"];
        let trials = tune["trials"].as_array().unwrap();
        let lrs: Vec<f64> = trials.iter().map(|r| r["lr"].as_f64().unwrap()).collect();
        assert_eq!(lrs.len(), 3, "{tune}");
        assert!((lrs[1] / lrs[0] - 0.1).abs() < 1e-9 && (lrs[2] / lrs[0] - 10.0).abs() < 1e-9, "{lrs:?}");
        let score = |r: &serde_json::Value| r["accuracy"].as_f64().unwrap_or(-1.0);
        let top = trials.iter().map(score).fold(f64::MIN, f64::max);
        let chosen = tune["chosen_lr"].as_f64().unwrap();
        let chosen_trial = trials.iter().find(|r| r["lr"].as_f64() == Some(chosen)).unwrap();
        assert_eq!(score(chosen_trial), top, "the best trial is chosen: {tune}");
        assert_eq!(t["hyper"]["optim"]["lr"].as_f64(), Some(chosen), "and the task trains at it: {t}");
        // Each class of the task's 60%-of-digits training split gives a fifth.
        let n = tune["validation_size"].as_u64().unwrap();
        assert!(n > 0 && n < t["train_size"].as_u64().unwrap() / 3, "{tune}");
    }
    assert!(!out.join("state/tune").exists() || std::fs::read_dir(out.join("state/tune")).unwrap().next().is_none());
    // The printed summary names the choice (the same command again: the pack is complete).
    let text =
        mtpack(["adapt", "--method", "ewc", "--task", &a, "--task", &b, "--tune", "-o", p(&out)]).expect(0).stdout;
    assert!(text.contains("--tune chose lr"), "{text}");
}
