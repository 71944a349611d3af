//! `mtpack bench`: one scenario (a backbone and a task sequence) learned with every method,
//! each in its own `mtpack adapt` process (so its wall time and peak memory are its own),
//! then exported and timed through ONNX Runtime: the comparison table users choose a method
//! from, measured on their backbone and data.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::data::Preprocessing;
use crate::methods::MethodKind;
use crate::pack::export::{export, ExportOptions};
use crate::plan::{Plan, TaskPlan};
use crate::runtime::ort_rt::OrtSession;
use crate::runtime::Backend;
use crate::tensor::Tensor;
use crate::train::Hyper;

pub const BENCH_SCHEMA: &str = "mtpack.bench/1";
/// Timed ONNX Runtime runs per task (batch 1) for the latency column.
pub const LATENCY_RUNS: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Invalid(String),
    #[error("{context}")]
    Step {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn step<E: std::error::Error + Send + Sync + 'static>(context: impl Into<String>) -> impl FnOnce(E) -> BenchError {
    let context = context.into();
    move |e| BenchError::Step { context, source: Box::new(e) }
}

/// One method's row of the table.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MethodRow {
    pub method: MethodKind,
    /// Held-out accuracy of each column after the last task (the accuracy matrix's last row).
    pub final_accuracy: Vec<Option<f64>>,
    pub average_accuracy: f64,
    pub bwt: f64,
    pub forgetting: f64,
    /// Wall time of `mtpack adapt` for the whole sequence.
    pub adapt_seconds: f64,
    /// Peak resident memory of the `mtpack adapt` process.
    pub peak_memory_mb: f64,
    pub artifact_bytes: u64,
    /// Artifact size over the backbone's file size.
    pub artifact_vs_backbone: f64,
    /// Median ONNX Runtime latency of each task through the artifact, batch 1.
    pub latency_ms: Vec<f64>,
    pub needs_old_data: bool,
    pub pack: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BenchReport {
    pub schema: String,
    pub backbone: String,
    /// The accuracy columns: "backbone" (agreement of its own head, when it has one) and
    /// the tasks in order.
    pub columns: Vec<String>,
    pub seed: u64,
    pub methods: Vec<MethodRow>,
}

/// The default scenario: MobileNetV2 (ImageNet) learns Fashion-MNIST, MNIST and the UCI
/// digits at 3x64x64 (files from scripts/fetch.sh and scripts/prepare_sequence.sh), 2 epochs
/// per task, batch 32, SGD lr 0.01 momentum 0.9 (Piggyback: its own Adam defaults), with 200
/// training images per class of Fashion-MNIST and MNIST and all 1437 of the digits, so that
/// all seven methods finish in well under 30 minutes on 2 cores. Held-out: 1000, 1000, 360.
pub fn default_scenario(root: &Path) -> Plan {
    let pre = Preprocessing::imagenet(64);
    let task = |name: &str, per_class: Option<usize>| TaskPlan {
        name: name.into(),
        dataset: root.join(".cache/sequence").join(format!("{name}.safetensors")),
        classes: None,
        labels: None,
        test_fraction: None,
        train_per_class: per_class,
        preprocessing: pre.clone(),
        hyper: Hyper::default(),
    };
    let tasks = vec![task("fashion", Some(200)), task("mnist", Some(200)), task("digits", None)];
    Plan {
        defaults: Hyper { epochs: Some(2), batch: Some(32), momentum: Some(0.9), ..Hyper::default() },
        ..Plan::new(Some(root.join(".cache/models/mobilenetv2_imagenet.onnx")), MethodKind::Finetune, tasks)
    }
}

/// `plan` with `method`: SGD where the plan sets no optimizer, except for methods that
/// train with their own (Piggyback); learning rate and BatchNorm as the plan sets them, else
/// the method's defaults for the backbone (LwF: frozen BatchNorm at lr 0.001). Neither the
/// linear probe before a task nor BatchNorm recalibration after it, where the plan does not
/// ask for them: the reference library does neither, and the bench compares like with like.
pub fn plan_for(plan: &Plan, method: MethodKind) -> Plan {
    let mut p = plan.clone();
    p.method = method;
    p.bn_recalibrate = p.bn_recalibrate.or(Some(false));
    p.linear_probe_epochs = p.linear_probe_epochs.or(Some(0));
    if method.hyper_defaults().optimizer.is_none() {
        p.defaults.optimizer = p.defaults.optimizer.or(Some(crate::train::OptimizerName::Sgd));
    }
    p
}

/// Runs `mtpack adapt` on `plan` in a child process; returns (seconds, peak RSS in MB).
fn adapt_child(plan: &Plan, pack: &Path, quiet: bool) -> Result<(f64, f64), BenchError> {
    let text = toml::to_string(plan).map_err(step("writing the plan"))?;
    let plan_file = pack.with_extension("toml");
    crate::fsutil::write_atomic(&plan_file, text.as_bytes()).map_err(step(format!("{}", plan_file.display())))?;
    let exe = std::env::current_exe().map_err(step("finding the mtpack executable"))?;
    let started = Instant::now();
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["adapt", "--plan"]).arg(&plan_file).arg("-o").arg(pack);
    if quiet {
        cmd.arg("--quiet");
    }
    cmd.stdout(std::process::Stdio::null());
    let child = cmd.spawn().map_err(step("starting mtpack adapt"))?;
    let (ok, peak_kb) = wait_with_peak(child)?;
    let secs = started.elapsed().as_secs_f64();
    if !ok {
        return Err(BenchError::Invalid(format!(
            "mtpack adapt --plan {} failed (its error is above)",
            plan_file.display()
        )));
    }
    Ok((secs, peak_kb / 1024.0))
}

/// Waits for `child`; whether it succeeded and its peak resident memory in KiB (NaN where
/// the platform does not say). The kernel counts the parent's resident memory at the fork
/// into the child's peak, so spawn from a small process.
pub fn wait_with_peak(child: std::process::Child) -> Result<(bool, f64), BenchError> {
    #[cfg(target_os = "linux")]
    {
        let pid = child.id() as libc::pid_t;
        let mut status: libc::c_int = 0;
        // SAFETY: rusage is plain data (all-zero is valid) that wait4 fills; pid is our own
        // child, reaped exactly once here (std's Child is not waited on afterwards).
        let (r, usage) = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            (libc::wait4(pid, &mut status, 0, &mut usage), usage)
        };
        if r != pid {
            return Err(BenchError::Invalid(format!(
                "waiting for a child process: {}",
                std::io::Error::last_os_error()
            )));
        }
        drop(child);
        let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
        Ok((ok, usage.ru_maxrss as f64))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let mut child = child;
        let status = child.wait().map_err(step("waiting for a child process"))?;
        Ok((status.success(), f64::NAN))
    }
}

/// Median ONNX Runtime latency of every task of an exported artifact at batch 1, in ms.
fn latencies(model: &Path, m: &crate::pack::artifact::ArtifactManifest) -> Result<Vec<f64>, BenchError> {
    let bytes = std::fs::read(model).map_err(step(format!("reading {}", model.display())))?;
    let mut s = OrtSession::from_bytes(&bytes, "artifact").map_err(step("ONNX Runtime"))?;
    let shape = probe_shape(model)?;
    let x = Tensor::F32(ndarray::ArrayD::from_elem(shape, 0.5f32));
    let mut out = Vec::new();
    for t in &m.tasks {
        let mut feed = vec![(m.input.clone(), x.clone())];
        if let (Some(name), Some(v)) = (&m.task_input, t.task_value) {
            feed.push((name.clone(), Tensor::I64(ndarray::arr1(&[v]).into_dyn())));
        }
        s.run(&feed).map_err(step("warm-up run"))?;
        let mut times: Vec<f64> = (0..LATENCY_RUNS)
            .map(|_| {
                let t0 = Instant::now();
                s.run(&feed).map(|_| t0.elapsed().as_secs_f64() * 1000.0)
            })
            .collect::<Result<_, _>>()
            .map_err(step("timed run"))?;
        times.sort_by(f64::total_cmp);
        out.push(times.get(times.len() / 2).copied().unwrap_or(f64::NAN));
    }
    Ok(out)
}

/// One image of the artifact's probe input shape.
fn probe_shape(model: &Path) -> Result<Vec<usize>, BenchError> {
    let (_, probes) = crate::pack::export::sidecars(model);
    let (t, _) = crate::store::load(&probes).map_err(step(format!("{}", probes.display())))?;
    let input = t.get("input").ok_or_else(|| BenchError::Invalid(format!("{}: no 'input'", probes.display())))?;
    let mut shape = input.shape().to_vec();
    if let Some(n) = shape.first_mut() {
        *n = 1;
    }
    Ok(shape)
}

/// Learns `plan`'s tasks with each of `methods` into `out/<method>`, exports and times each.
pub fn run(plan: &Plan, methods: &[MethodKind], out: &Path, quiet: bool) -> Result<BenchReport, BenchError> {
    std::fs::create_dir_all(out).map_err(step(format!("creating {}", out.display())))?;
    let backbone = plan.backbone.clone().unwrap_or_else(crate::plan::default_backbone);
    let backbone_bytes = std::fs::metadata(&backbone).map_err(step(format!("{}", backbone.display())))?.len();
    let mut rows = Vec::new();
    let mut columns = Vec::new();
    for &method in methods {
        let p = plan_for(plan, method);
        let pack = out.join(method.name());
        if !quiet {
            eprintln!("bench: {} ...", method.name());
        }
        // A finished pack from an earlier run of the same plan is reused by adapt itself;
        // its time and memory are then those of checking it, so start clean.
        let _ = std::fs::remove_dir_all(&pack);
        let (adapt_seconds, peak_memory_mb) = adapt_child(&p, &pack, quiet)?;
        let manifest = crate::pack::Pack::new(&pack).load_manifest().map_err(step("reading the pack"))?;
        let artifact: PathBuf = out.join(format!("{}.onnx", method.name()));
        let done = export(&pack, &artifact, &ExportOptions::default())
            .map_err(step(format!("exporting {}", pack.display())))?;
        let artifact_bytes = std::fs::metadata(&artifact).map_err(step("artifact size"))?.len();
        columns = manifest.columns.clone();
        rows.push(MethodRow {
            method,
            final_accuracy: manifest.accuracy_matrix.last().cloned().unwrap_or_default(),
            average_accuracy: manifest.metrics.average_accuracy,
            bwt: manifest.metrics.bwt,
            forgetting: manifest.metrics.forgetting,
            adapt_seconds,
            peak_memory_mb,
            artifact_bytes,
            artifact_vs_backbone: artifact_bytes as f64 / backbone_bytes.max(1) as f64,
            latency_ms: latencies(&artifact, &done.manifest)?,
            needs_old_data: method.needs_old_data(),
            pack: pack.display().to_string(),
        });
    }
    Ok(BenchReport {
        schema: BENCH_SCHEMA.into(),
        backbone: backbone.display().to_string(),
        columns,
        seed: plan.seed,
        methods: rows,
    })
}

/// The comparison table: its header and one row of cells per method.
pub fn table(r: &BenchReport) -> (Vec<String>, Vec<Vec<String>>) {
    let mut header = vec!["method".to_string()];
    header.extend(r.columns.iter().map(|t| format!("{t} acc")));
    header.extend(
        [
            "average",
            "BWT",
            "forgetting",
            "adapt s",
            "peak MB",
            "artifact MB (x backbone)",
            "latency ms/task",
            "old data",
        ]
        .map(String::from),
    );
    let rows = r
        .methods
        .iter()
        .map(|m| {
            let mut row = vec![m.method.to_string()];
            row.extend(m.final_accuracy.iter().map(|a| a.map_or("-".to_string(), |v| format!("{v:.3}"))));
            row.extend([
                format!("{:.3}", m.average_accuracy),
                format!("{:+.3}", m.bwt),
                format!("{:.3}", m.forgetting),
                format!("{:.1}", m.adapt_seconds),
                format!("{:.0}", m.peak_memory_mb),
                format!("{:.2} ({:.2}x)", m.artifact_bytes as f64 / 1e6, m.artifact_vs_backbone),
                format!("{:.3}", m.mean_latency_ms()),
                if m.needs_old_data { "yes" } else { "no" }.to_string(),
            ]);
            row
        })
        .collect();
    (header, rows)
}

impl MethodRow {
    /// The mean over tasks of the median batch-1 latency.
    pub fn mean_latency_ms(&self) -> f64 {
        self.latency_ms.iter().sum::<f64>() / self.latency_ms.len().max(1) as f64
    }
}

/// The comparison table as Markdown.
pub fn markdown(r: &BenchReport) -> String {
    use std::fmt::Write as _;
    let (header, rows) = table(r);
    let mut s = String::new();
    let _ = writeln!(s, "backbone {}, columns {} (seed {})\n", r.backbone, r.columns.join(", "), r.seed);
    let _ = writeln!(s, "| {} |", header.join(" | "));
    let _ = writeln!(s, "|---|{}---|", "---:|".repeat(header.len() - 2));
    for row in rows {
        let _ = writeln!(s, "| {} |", row.join(" | "));
    }
    s
}
