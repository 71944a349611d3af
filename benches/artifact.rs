//! The exported artifact of every method on MobileNetV2 (ImageNet weights, fetched by
//! scripts/fetch.sh): file size relative to the backbone, mask storage in bits per masked
//! weight per task, and ONNX Runtime latency of one task relative to the original backbone
//! plus one linear head, measured in the same run at 3x64x64.
//!
//! Packs are made here from small subsets of the bundled UCI digits (20 training images per
//! class, one epoch): size and latency do not depend on how well the tasks were learned.
//! Three tasks for every method, and eight for PackNet and Piggyback, whose masks grow with
//! the task count. Run: `cargo bench --bench artifact` (MTPACK_BENCH_STEPS: timed runs;
//! MTPACK_BENCH_METHODS: a comma-separated subset of the methods).

use std::path::{Path, PathBuf};
use std::time::Instant;

use mtpack::adapt::plan::{Hyper, Plan, TaskPlan};
use mtpack::adapt::Options;
use mtpack::data::{Dataset, Preprocessing};
use mtpack::graph::heads::{add_heads, LinearHead};
use mtpack::methods::{MethodKind, MethodParams};
use mtpack::onnx::Model;
use mtpack::pack::export::{export, ExportOptions};
use mtpack::runtime::ort_rt::OrtSession;
use mtpack::runtime::Backend;
use mtpack::tensor::Tensor;

const METHODS: [MethodKind; 7] = MethodKind::ALL;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// 20 training and 10 held-out digits per class, written once.
fn small_digits(dir: &Path) -> PathBuf {
    let mut d = Dataset::load(&root().join("fixtures/digits/digits.safetensors")).expect("bundled digits");
    d.train = Dataset::limit_per_class(&d.train, 10, 20, 0);
    d.test = d.test.map(|t| Dataset::limit_per_class(&t, 10, 10, 0));
    let out = dir.join("digits_small.safetensors");
    d.save(&out).expect("writing the subset");
    out
}

fn tasks(data: &Path, count: usize) -> Vec<TaskPlan> {
    (0..count)
        .map(|k| TaskPlan {
            name: format!("t{k}"),
            dataset: data.to_path_buf(),
            classes: Some(vec![(k % 10) as i64, ((k + 1) % 10) as i64, ((k + 2) % 10) as i64]),
            labels: None,
            test_fraction: None,
            train_per_class: None,
            preprocessing: Preprocessing { resize: Some([64, 64]), channels: Some(3), ..Default::default() },
            hyper: Hyper::default(),
        })
        .collect()
}

fn per_run_ms(steps: usize, f: &mut dyn FnMut()) -> f64 {
    f(); // warm-up
    let t = Instant::now();
    for _ in 0..steps {
        f();
    }
    t.elapsed().as_secs_f64() * 1000.0 / steps as f64
}

struct Row {
    method: &'static str,
    tasks: usize,
    size_ratio: f64,
    bits: Option<f64>,
    latency: [f64; 2],
}

fn main() {
    mtpack::alloc::tune_for_training();
    let steps: usize = std::env::var("MTPACK_BENCH_STEPS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let backbone = root().join(".cache/models/mobilenetv2_imagenet.onnx");
    let backbone_size = std::fs::metadata(&backbone).expect("MobileNetV2: run scripts/fetch.sh first").len() as f64;
    let dir = root().join(".cache/bench_artifact");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench directory");
    let data = small_digits(&dir);

    // The baseline: the original backbone with one 3-class head, batch 1 and batch 32.
    let original = Model::load(&backbone).expect("backbone");
    let base = add_heads(&original, "features", &[("t0".into(), LinearHead::init(3, 1280, 0))], true).expect("head");
    let xs: Vec<Tensor> =
        [1usize, 32].iter().map(|&n| Tensor::F32(ndarray::ArrayD::from_elem(vec![n, 3, 64, 64], 0.5f32))).collect();
    let mut s = OrtSession::from_bytes(&base.to_bytes(), "baseline").expect("ort");
    let base_ms: Vec<f64> = xs
        .iter()
        .map(|x| {
            let feed = vec![("input".to_string(), x.clone())];
            per_run_ms(steps, &mut || {
                s.run(&feed).expect("baseline run");
            })
        })
        .collect();

    let mut rows = Vec::new();
    let only = std::env::var("MTPACK_BENCH_METHODS").ok();
    let wanted = |m: &MethodKind| only.as_deref().is_none_or(|o| o.split(',').any(|n| n.trim() == m.name()));
    let runs: Vec<(MethodKind, usize)> = METHODS
        .iter()
        .map(|&m| (m, 3))
        .chain([(MethodKind::Packnet, 8), (MethodKind::Piggyback, 8)])
        .filter(|(m, _)| wanted(m))
        .collect();
    for (method, count) in runs {
        let plan = Plan {
            backbone: Some(backbone.clone()),
            method,
            seed: 0,
            device: Default::default(),
            batchnorm: Default::default(),
            at: None,
            pool: None,
            layout: None,
            defaults: Hyper { epochs: Some(1), batch: Some(16), ..Hyper::default() },
            params: MethodParams { packnet_retrain_epochs: Some(0), ..MethodParams::default() },
            tasks: tasks(&data, count),
        };
        let pack = dir.join(format!("{}-{count}", method.name()));
        eprintln!("{}: adapting {count} tasks", method.name());
        mtpack::adapt::run(&plan, &Options { pack: pack.clone(), extend: false, quiet: true }).expect("adapt");
        let out = dir.join(format!("{}-{count}.onnx", method.name()));
        let done = export(&pack, &out, &ExportOptions { task: None, with_preprocessing: false }).expect("export");
        let size = std::fs::metadata(&out).expect("artifact").len() as f64;
        let m = &done.manifest;
        let mut s = OrtSession::from_bytes(&std::fs::read(&out).expect("artifact"), "artifact").expect("ort");
        let latency: Vec<f64> = xs
            .iter()
            .map(|x| {
                let mut feed = vec![(m.input.clone(), x.clone())];
                if let Some(t) = &m.task_input {
                    feed.push((t.clone(), Tensor::I64(ndarray::arr1(&[0i64]).into_dyn())));
                }
                per_run_ms(steps, &mut || {
                    s.run(&feed).expect("artifact run");
                })
            })
            .collect();
        rows.push(Row {
            method: method.name(),
            tasks: count,
            size_ratio: size / backbone_size,
            bits: m.masks.as_ref().filter(|k| k.masked_params > 0).map(|k| k.bits_per_weight_per_task),
            latency: [latency[0] / base_ms[0], latency[1] / base_ms[1]],
        });
    }
    println!(
        "MobileNetV2 backbone {:.2} MB; baseline (backbone + one head) in ONNX Runtime: {:.2} ms at batch 1, {:.2} ms at batch 32",
        backbone_size / 1e6,
        base_ms[0],
        base_ms[1]
    );
    println!("| method | tasks | artifact / backbone size | mask bits per weight per task | latency ratio, batch 1 | latency ratio, batch 32 |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in rows {
        let bits = r.bits.map_or("-".to_string(), |b| format!("{b:.2}"));
        println!(
            "| {} | {} | {:.3} | {bits} | {:.2} | {:.2} |",
            r.method, r.tasks, r.size_ratio, r.latency[0], r.latency[1]
        );
    }
}
