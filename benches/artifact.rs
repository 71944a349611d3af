//! The exported artifact of every method on two real backbones fetched by scripts/fetch.sh,
//! MobileNetV2 (ImageNet weights, 3x64x64) and PP-LCNet (3x224x224): file size relative to
//! the backbone, mask storage in bits per masked weight per task, and the latency of one task
//! relative to the original backbone plus one linear head, measured in the same run, through
//! both serving paths: the universal one (the whole file, fed a `task` value) and the
//! task-specialised session (`mtpack::serve`, the selector a constant folded at load) in ONNX
//! Runtime and in tract. Also: session creation per task and resident memory per session.
//!
//! Packs are made here from small subsets of the bundled UCI digits (20 training images per
//! class, one epoch): size and latency do not depend on how well the tasks were learned.
//! Three and eight tasks for every method (the masks grow with the task count). Run: `cargo
//! bench --bench artifact` (MTPACK_BENCH_STEPS: timed runs; MTPACK_BENCH_METHODS and
//! MTPACK_BENCH_BACKBONES: comma-separated subsets of the methods and backbones).

use std::path::{Path, PathBuf};
use std::time::Instant;

use mtpack::adapt::Options;
use mtpack::data::{Dataset, Preprocessing};
use mtpack::methods::{packnet, MethodKind, MethodParams};
use mtpack::pack::export::{export, ExportOptions};
use mtpack::pack::lock::Wait;
use mtpack::pack::specialize;
use mtpack::plan::{Plan, TaskPlan};
use mtpack::runtime::ort_rt::OrtSession;
use mtpack::runtime::tract_rt::TractSession;
use mtpack::runtime::Backend;
use mtpack::runtime::Runtime;
use mtpack::serve::Artifact;
use mtpack::tensor::{max_abs_diff, Tensor};
use mtpack::train::Hyper;

const METHODS: &[MethodKind] = MethodKind::ALL;

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

fn tasks(data: &Path, count: usize, size: usize) -> Vec<TaskPlan> {
    (0..count)
        .map(|k| TaskPlan {
            name: format!("t{k}"),
            dataset: data.to_path_buf(),
            classes: Some(vec![(k % 10) as i64, ((k + 1) % 10) as i64, ((k + 2) % 10) as i64]),
            labels: None,
            test_fraction: None,
            train_per_class: None,
            preprocessing: Preprocessing { resize: Some([size, size]), channels: Some(3), ..Default::default() },
            hyper: Hyper::default(),
        })
        .collect()
}

/// Median milliseconds per call, after a warm-up call (tract optimises for the input shape
/// on its first run).
fn per_run_ms(steps: usize, f: &mut dyn FnMut()) -> f64 {
    f();
    let mut ms: Vec<f64> = (0..steps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    ms[ms.len() / 2]
}

fn resident_bytes() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: f64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("resident pages");
    pages * 4096.0
}

/// Resident memory that serving `path` adds, in MB: the whole file in one ONNX Runtime
/// session, and every task's specialised session. Measured in a fresh process each, because
/// memory this process freed earlier is reused without showing in its resident size.
fn memory_mb(path: &Path) -> [f64; 2] {
    let child = |mode: &str| -> f64 {
        let out = std::process::Command::new(std::env::current_exe().expect("the bench binary"))
            .env("MTPACK_BENCH_MEMORY_OF", path)
            .env("MTPACK_BENCH_MEMORY_MODE", mode)
            .output()
            .expect("memory child");
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim().parse().unwrap_or_else(|_| panic!("memory child: {text} {}", String::from_utf8_lossy(&out.stderr)))
    };
    [child("universal"), child("tasks")]
}

/// The child of [`memory_mb`]: loads, runs once at batch 1, prints the resident MB added.
fn memory_child(path: &Path, mode: &str) {
    let mut served = Artifact::open(path, Runtime::Ort).expect("artifact");
    let m = served.manifest().clone();
    let shape = if m.tasks[0].preprocessing.resize == Some([224, 224]) { 224 } else { 64 };
    let x = Tensor::F32(ndarray::ArrayD::from_elem(vec![1, 3, shape, shape], 0.5f32));
    let before = resident_bytes();
    if mode == "universal" {
        let mut ort = OrtSession::from_bytes(&std::fs::read(path).expect("artifact"), "artifact").expect("ort");
        let mut feed = vec![(m.input.clone(), x)];
        if let Some(t) = &m.task_input {
            feed.push((t.clone(), Tensor::I64(ndarray::arr1(&[0i64]).into_dyn())));
        }
        ort.run(&feed).expect("artifact run");
        println!("{}", (resident_bytes() - before) / 1e6);
        return;
    }
    for t in &m.tasks {
        served.task(&t.name).and_then(|s| s.run(&x)).expect("task run");
    }
    println!("{}", (resident_bytes() - before) / 1e6);
}

struct Backbone {
    name: &'static str,
    file: &'static str,
    size: usize,
}

const BACKBONES: [Backbone; 2] = [
    Backbone { name: "MobileNetV2", file: "mobilenetv2_imagenet.onnx", size: 64 },
    Backbone { name: "PP-LCNet", file: "pplcnet_orientation.onnx", size: 224 },
];

/// Where one backbone's packs are made and timed.
struct Setup {
    steps: usize,
    dir: PathBuf,
    data: PathBuf,
    backbone: PathBuf,
    size: usize,
    xs: Vec<Tensor>,
}

impl Setup {
    fn plan(&self, method: MethodKind, count: usize) -> Plan {
        Plan {
            defaults: Hyper { epochs: Some(1), batch: Some(16), ..Hyper::default() },
            params: MethodParams {
                packnet: packnet::Params { packnet_retrain_epochs: Some(0), ..Default::default() },
                ..MethodParams::default()
            },
            ..Plan::new(Some(self.backbone.clone()), method, tasks(&self.data, count, self.size))
        }
    }

    /// Adapts and exports `count` tasks (or only the first task, standalone).
    fn artifact(&self, method: MethodKind, count: usize, standalone: bool) -> PathBuf {
        let tag = format!("{}-{count}{}", method.name(), if standalone { "-t0" } else { "" });
        let pack = self.dir.join(&tag);
        eprintln!("{tag}: adapting {count} tasks");
        let opts = Options { pack: pack.clone(), extend: false, quiet: true, wait: Wait::No };
        mtpack::adapt::run(&self.plan(method, count), &opts).expect("adapt");
        let out = self.dir.join(format!("{tag}.onnx"));
        let task = standalone.then(|| "t0".to_string());
        export(&pack, &out, &ExportOptions { task, ..Default::default() }).expect("export");
        out
    }

    /// Milliseconds per run of `run` at batch 1 and batch 32.
    fn latency(&self, run: &mut dyn FnMut(&Tensor)) -> [f64; 2] {
        let mut ms = [0.0; 2];
        for (m, x) in ms.iter_mut().zip(&self.xs) {
            let first = Instant::now();
            run(x);
            *m = per_run_ms(self.runs(first.elapsed().as_secs_f64()), &mut || run(x));
        }
        ms
    }

    /// Timed runs for a call taking `seconds`: about four seconds' worth, at least 5 and at
    /// most 5 x MTPACK_BENCH_STEPS.
    fn runs(&self, seconds: f64) -> usize {
        ((4.0 / seconds.max(1e-6)) as usize).clamp(5, (self.steps * 5).max(5))
    }

    /// `b`'s median latency over `a`'s at batch 1 and batch 32, the two called alternately so
    /// that whatever else the machine does slows both alike.
    fn ratio(&self, a: &mut dyn FnMut(&Tensor), b: &mut dyn FnMut(&Tensor)) -> [f64; 2] {
        let mut ratio = [0.0; 2];
        for (r, x) in ratio.iter_mut().zip(&self.xs) {
            a(x);
            let first = Instant::now();
            b(x);
            let n = self.runs(first.elapsed().as_secs_f64());
            let (mut ta, mut tb) = (Vec::with_capacity(n), Vec::with_capacity(n));
            let timed = |f: &mut dyn FnMut(&Tensor)| {
                let start = Instant::now();
                f(x);
                start.elapsed().as_secs_f64()
            };
            for _ in 0..n {
                ta.push(timed(&mut *a));
                tb.push(timed(&mut *b));
            }
            *r = median(tb) / median(ta);
        }
        ratio
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The original backbone plus one head, in ONNX Runtime and in tract.
struct Baseline {
    input: String,
    ort: OrtSession,
    tract: TractSession,
}

impl Baseline {
    fn load(path: &Path) -> Baseline {
        // Without the backbone's own head, which the standalone file also outputs.
        let model = mtpack::onnx::Model::load(path).expect("baseline");
        let m = specialize::manifest_of(&model, "baseline").expect("manifest");
        let one = specialize::specialize(&model, &m, &m.tasks[0]).expect("one output");
        let bytes = one.to_bytes();
        let ort = OrtSession::from_bytes(&bytes, "baseline").expect("ort");
        let tract = TractSession::from_bytes(&bytes, "baseline").expect("tract");
        Baseline { input: m.input, ort, tract }
    }

    /// Milliseconds per run in ONNX Runtime and in tract, batch 1 and 32.
    fn ms(&mut self, s: &Setup) -> [[f64; 2]; 2] {
        let Baseline { input, ort, tract } = self;
        let ort = s.latency(&mut |x| {
            ort.run(&[(input.clone(), x.clone())]).expect("baseline run");
        });
        let tract = s.latency(&mut |x| {
            tract.run(&[(input.clone(), x.clone())]).expect("baseline run in tract");
        });
        [ort, tract]
    }
}

struct Row {
    backbone: &'static str,
    method: &'static str,
    tasks: usize,
    size_ratio: f64,
    bits: Option<f64>,
    universal: [f64; 2],
    ort: [f64; 2],
    tract: [f64; 2],
    /// Mean session creation per task, ONNX Runtime and tract (tract's optimisation for one
    /// input shape included), in ms.
    create_ms: [f64; 2],
    /// Resident memory of the whole file in one ONNX Runtime session, and of all the task
    /// sessions together, MB.
    memory_mb: [f64; 2],
    /// Largest |specialised - universal| over every task's output at batch 1, and the
    /// largest |score| it is a difference of.
    max_diff: [f64; 2],
}

/// Every task's specialised session against the universal path's output for that task.
fn largest_difference(whole: &mut OrtSession, served: &mut Artifact, x: &Tensor) -> [f64; 2] {
    let m = served.manifest().clone();
    let (mut worst, mut largest) = (0.0f64, 0.0f64);
    for t in &m.tasks {
        let mut feed = vec![(m.input.clone(), x.clone())];
        if let (Some(input), Some(v)) = (&m.task_input, t.task_value) {
            feed.push((input.clone(), Tensor::I64(ndarray::arr1(&[v]).into_dyn())));
        }
        let want = whole.run(&feed).expect("artifact run");
        let want = &want.iter().find(|(n, _)| *n == t.output).expect("task output").1;
        let got = served.task(&t.name).expect("task session").run(x).expect("task run");
        worst = worst.max(max_abs_diff(want, &got).expect("same shape"));
        largest = want.to_f64_vec().iter().fold(largest, |l, v| l.max(v.abs()));
    }
    [worst, largest]
}

fn measure(s: &Setup, base: &mut Baseline, backbone: &'static str, method: MethodKind, count: usize) -> Row {
    let path = s.artifact(method, count, false);
    let memory_mb = memory_mb(&path);
    let mut ort = Artifact::open(&path, Runtime::Ort).expect("artifact");
    let m = ort.manifest().clone();
    let names: Vec<String> = m.tasks.iter().map(|t| t.name.clone()).collect();
    let mut create = [0.0; 2];
    for n in &names {
        create[0] += ort.task(n).expect("task session").created_in().as_secs_f64() * 1000.0;
    }
    let Baseline { input, ort: base_ort, tract: base_tract } = base;
    let mut base_ort = |x: &Tensor| {
        base_ort.run(&[(input.clone(), x.clone())]).expect("baseline run");
    };
    // The universal path: the whole file, fed task 0's value.
    let mut whole = OrtSession::from_bytes(&std::fs::read(&path).expect("artifact"), "artifact").expect("ort");
    let universal = s.ratio(&mut base_ort, &mut |x| {
        let mut feed = vec![(m.input.clone(), x.clone())];
        if let Some(t) = &m.task_input {
            feed.push((t.clone(), Tensor::I64(ndarray::arr1(&[0i64]).into_dyn())));
        }
        whole.run(&feed).expect("artifact run");
    });
    let t0 = &names[0];
    let ort_ratio = s.ratio(&mut base_ort, &mut |x| {
        ort.task(t0).and_then(|t| t.run(x)).expect("task run");
    });
    let mut tract = Artifact::open(&path, Runtime::Tract).expect("artifact");
    let tract_ratio = s.ratio(
        &mut |x| {
            base_tract.run(&[(input.clone(), x.clone())]).expect("baseline run in tract");
        },
        &mut |x| {
            tract.task(t0).and_then(|t| t.run(x)).expect("task run in tract");
        },
    );
    let start = Instant::now();
    tract.task(&names[names.len() - 1]).and_then(|t| t.run(&s.xs[0])).expect("task run in tract");
    create[1] = start.elapsed().as_secs_f64() * 1000.0;
    let max_diff = largest_difference(&mut whole, &mut ort, &s.xs[0]);
    let size = std::fs::metadata(&path).expect("artifact").len() as f64;
    Row {
        backbone,
        method: method.name(),
        tasks: count,
        size_ratio: size / std::fs::metadata(&s.backbone).expect("backbone").len() as f64,
        bits: m.masks.as_ref().filter(|k| k.masked_params > 0).map(|k| k.bits_per_weight_per_task),
        universal,
        ort: ort_ratio,
        tract: tract_ratio,
        create_ms: [create[0] / names.len() as f64, create[1]],
        memory_mb,
        max_diff,
    }
}

/// Large freed blocks kept for reuse, as the `mtpack` binary does (see `mtpack::alloc`).
#[global_allocator]
static ALLOC: mtpack::alloc::Recycling = mtpack::alloc::Recycling::new();

fn main() {
    if let Some(path) = std::env::var_os("MTPACK_BENCH_MEMORY_OF") {
        let mode = std::env::var("MTPACK_BENCH_MEMORY_MODE").unwrap_or_default();
        return memory_child(Path::new(&path), &mode);
    }
    mtpack::alloc::tune_for_training();
    let steps: usize = std::env::var("MTPACK_BENCH_STEPS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let only = std::env::var("MTPACK_BENCH_METHODS").ok();
    let only_backbone = std::env::var("MTPACK_BENCH_BACKBONES").ok();
    let wanted = |m: &MethodKind| only.as_deref().is_none_or(|o| o.split(',').any(|n| n.trim() == m.name()));
    let runs: Vec<(MethodKind, usize)> =
        [3, 8].into_iter().flat_map(|n| METHODS.iter().filter(|m| wanted(m)).map(move |&m| (m, n))).collect();
    let root_dir = root().join(".cache/bench_artifact");
    let _ = std::fs::remove_dir_all(&root_dir);
    let mut rows = Vec::new();
    let mut baselines = Vec::new();
    for b in BACKBONES.iter().filter(|b| only_backbone.as_deref().is_none_or(|o| o.contains(b.name))) {
        let dir = root_dir.join(b.name);
        std::fs::create_dir_all(&dir).expect("bench directory");
        let backbone = root().join(".cache/models").join(b.file);
        assert!(backbone.is_file(), "{}: run scripts/fetch.sh first", backbone.display());
        let xs = [1usize, 32]
            .iter()
            .map(|&n| Tensor::F32(ndarray::ArrayD::from_elem(vec![n, 3, b.size, b.size], 0.5f32)))
            .collect();
        let s = Setup { steps, data: small_digits(&dir), dir, backbone, size: b.size, xs };
        // The backbone with one linear head is exactly a feature-extract task exported alone.
        let mut base = Baseline::load(&s.artifact(MethodKind::FeatureExtract, 1, true));
        for &(method, count) in &runs {
            rows.push(measure(&s, &mut base, b.name, method, count));
        }
        baselines.push((b, base.ms(&s)));
    }
    print_table(&baselines, &rows);
}

fn print_table(baselines: &[(&Backbone, [[f64; 2]; 2])], rows: &[Row]) {
    for (b, base) in baselines {
        println!(
            "{} at {}x{}: backbone + one head {:.2} / {:.2} ms in ONNX Runtime, {:.2} / {:.2} ms in tract (batch 1 / 32)",
            b.name, b.size, b.size, base[0][0], base[0][1], base[1][0], base[1][1]
        );
    }
    println!("| backbone | method | tasks | artifact / backbone size | mask bits per weight per task | universal (ort) b1 / b32 | task session (ort) b1 / b32 | task session (tract) b1 / b32 | session creation ort / tract ms | ort memory, whole file / all task sessions MB | max diff (largest score) |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let bits = r.bits.map_or("-".to_string(), |b| format!("{b:.2}"));
        println!(
            "| {} | {} | {} | {:.3} | {bits} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} / {:.2} | {:.0} / {:.0} | {:.0} / {:.0} | {:.1e} ({:.0}) |",
            r.backbone, r.method, r.tasks, r.size_ratio, r.universal[0], r.universal[1], r.ort[0], r.ort[1],
            r.tract[0], r.tract[1], r.create_ms[0], r.create_ms[1], r.memory_mb[0], r.memory_mb[1], r.max_diff[0], r.max_diff[1]
        );
    }
}
