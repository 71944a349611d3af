//! `mtpack check-device`: training on a GPU (or with the portable ops on the CPU) against the
//! CPU's kernels, on one model: forward outputs, weights after the same steps, step speed.

use std::path::PathBuf;

use anyhow::Context;

use super::{print_json, Outcome};
use crate::data::Layout;
use crate::onnx::{Dim, Model};
use crate::runtime::device::{candle_device, DeviceChoice};
use crate::train::device_check::{compare, CheckConfig, CheckReport, Distance, Side};

/// Check that training on a device computes what the CPU computes.
///
/// Three runs start from the backbone's weights with a new linear head and take the same SGD
/// steps on the same images and labels, every layer and BatchNorm training (batch
/// statistics): the CPU's kernels in float64 and in float32, and `--device` with candle's
/// portable ops in float32 (on the CPU too when the device is cpu, which checks a GPU's
/// computation without a GPU). Prints each float32 run's distance from float64 (outputs, and
/// the largest relative difference of any weight or running statistic after the first and the
/// last step); exit code 1 when the checked side is further than --tolerance and than 4x the
/// CPU's own float32. With --rate-steps, also the checked side's training images/s.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The ONNX model [default: the built-in tiny backbone].
    pub model: Option<PathBuf>,
    /// The side checked against the CPU's kernels.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Image size HxW of the seeded images [default: the model's, or 224x224 where it is
    /// not fixed].
    #[arg(long, value_parser = crate::data::parse_hw, conflicts_with = "data")]
    pub size: Option<[usize; 2]>,
    /// Train on a dataset's images and labels instead of seeded ones, as `adapt --task`
    /// names one: NAME=DATASET[:resize=HxW][:channels=N]...
    #[arg(long, value_parser = crate::plan::parse_task)]
    pub data: Option<crate::plan::TaskPlan>,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Training steps all runs take before the weights are compared (0: outputs only).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Timed training steps on the checked side (0: not timed).
    #[arg(long, default_value_t = 0)]
    pub rate_steps: usize,
    #[arg(long, default_value_t = 0.01)]
    pub lr: f64,
    /// BatchNorm while training: each batch's statistics, updating the running ones (batch),
    /// or the recorded ones (frozen).
    #[arg(long, value_enum, default_value = "batch")]
    pub batchnorm: crate::plan::BatchNormMode,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Distance from float64 that passes whatever the CPU's float32 distance.
    #[arg(long, default_value_t = 1e-3)]
    pub tolerance: f64,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args, quiet: bool) -> anyhow::Result<Outcome> {
    let path = a.model.clone().unwrap_or_else(crate::plan::default_backbone);
    if a.batch == 0 {
        anyhow::bail!("--batch must be at least 1");
    }
    let device = candle_device(a.device).context("--device")?;
    let rows = a.steps.max(1) * a.batch;
    let shape = crate::graph::analysis::single_input_shape(Model::load(&path)?.graph());
    let (model, x, labels, classes) = match &a.data {
        Some(t) => {
            let d = crate::plan::data::prepare(t, shape.as_deref(), a.seed)?;
            let x = crate::engine::to_candle(&d.train_x, candle_core::DType::F32)?;
            let n = rows.min(x.dim(0)?);
            let labels = d.train_y.get(..n).unwrap_or(&d.train_y).to_vec();
            (with_head(&path, d.labels.len(), a.seed)?, x.narrow(0, 0, n)?, Some(labels), d.labels.len())
        }
        None => {
            let dims =
                image_dims(shape.as_deref(), a.size).with_context(|| format!("{}: input shape", path.display()))?;
            (with_head(&path, CLASSES, a.seed)?, seeded_images(rows, &dims, a.seed)?, None, CLASSES)
        }
    };
    let dims = x.dims().get(1..).unwrap_or_default().to_vec();
    if !quiet {
        eprintln!(
            "checking {} with a new {classes}-class head on {} (candle's portable ops) against the CPU's kernels: {} steps of {} images {dims:?}",
            path.display(),
            label(a.device),
            a.steps,
            a.batch,
        );
    }
    let side = Side { device, kernels: crate::engine::kernels::Kernels::Portable };
    let batch_stats = a.batchnorm == crate::plan::BatchNormMode::Batch;
    let cfg = CheckConfig {
        steps: a.steps,
        rate_steps: a.rate_steps,
        batch: a.batch,
        lr: a.lr,
        momentum: 0.9,
        seed: a.seed,
        batch_stats,
    };
    let report =
        compare(&model, &x, labels.as_deref(), &side, &cfg).with_context(|| format!("checking {}", path.display()))?;
    let pass = report.passes(a.tolerance);
    if a.json {
        print_json(&serde_json::json!({ "model": path.display().to_string(), "device": label(a.device),
            "images": dims, "batch": a.batch, "tolerance": a.tolerance, "pass": pass, "report": report }))?;
    } else {
        print!("{}", table(&report, a.device, a.batch, &dims, a.tolerance));
    }
    Ok(if pass { Outcome::Ok } else { Outcome::CheckFailed })
}

/// `rows` seeded images shaped like photographs after normalisation: each channel a sum of
/// a few low-frequency waves with a little noise, values within about [-2, 2] (uniform noise
/// pixels give a network activations no photograph gives).
fn seeded_images(rows: usize, dims: &[usize], seed: u64) -> anyhow::Result<candle_core::Tensor> {
    let mut rng = crate::rng::Rng::new(seed ^ 0x5eed);
    let shape = [&[rows][..], dims].concat();
    let (planes, h, w) = match dims {
        [c, h, w] if *c <= 4 => (rows * c, *h, *w),
        [h, w, c] => (rows * c, *h, *w),
        _ => (rows, 1, dims.iter().product()),
    };
    let mut v = vec![0f32; planes * h * w];
    for plane in v.chunks_mut(h * w) {
        let waves: Vec<[f64; 4]> = (0..4)
            .map(|_| [rng.uniform() * 3.0, rng.uniform() * 3.0, rng.uniform() * 6.3, rng.uniform() * 0.8])
            .collect();
        for (i, px) in plane.iter_mut().enumerate() {
            let (y, x) = ((i / w) as f64 / h as f64, (i % w) as f64 / w as f64);
            let s: f64 =
                waves.iter().map(|[fy, fx, p, a]| a * (std::f64::consts::TAU * (fy * y + fx * x) + p).sin()).sum();
            *px = (s + 0.1 * (rng.uniform() - 0.5)) as f32;
        }
    }
    if let [h2, w2, c] = dims {
        if *c <= 4 && !matches!(dims, [c0, _, _] if *c0 <= 4) {
            // NHWC: the planes were written channel-major; move channels last.
            let t = candle_core::Tensor::from_vec(v, (rows, *c, *h2, *w2), &candle_core::Device::Cpu)?;
            return Ok(t.permute((0, 2, 3, 1))?.contiguous()?);
        }
    }
    Ok(candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu)?)
}

/// Classes of the head the check trains on seeded labels.
const CLASSES: usize = 10;

/// The backbone as `adapt` reads it (weights from nodes folded, the feature tensor found,
/// token sequences pooled) with one new linear head of `classes` classes in place of its
/// outputs: the network `adapt` would train.
fn with_head(path: &std::path::Path, classes: usize, seed: u64) -> anyhow::Result<Model> {
    let plan = crate::plan::Plan::new(Some(path.to_path_buf()), crate::methods::MethodKind::Finetune, Vec::new());
    let (model, backbone) = crate::adapt::analyse_backbone(path, &plan)?;
    let head = crate::graph::heads::LinearHead::init(classes.max(1), backbone.record.feature_dim, seed);
    let with = crate::graph::heads::add_heads(&model, &backbone.record.feature, &[("check".into(), head)], true)?;
    Ok(with)
}

fn label(d: DeviceChoice) -> &'static str {
    match d {
        DeviceChoice::Cpu => "cpu",
        DeviceChoice::Cuda => "cuda",
    }
}

/// One image's dimensions in the model's layout, with `size` (or 224x224) where the model
/// leaves the spatial size open and 3 channels where it leaves those open.
fn image_dims(shape: Option<&[Dim]>, size: Option<[usize; 2]>) -> anyhow::Result<Vec<usize>> {
    let shape = shape.ok_or_else(|| anyhow::anyhow!("the model needs exactly one input with a known rank"))?;
    let fixed = |d: Option<&Dim>, default: usize| match d {
        Some(Dim::Fixed(v)) if *v > 0 => *v as usize,
        _ => default,
    };
    if shape.len() != 4 {
        return Ok(shape.iter().skip(1).map(|d| fixed(Some(d), 1)).collect());
    }
    let (c, h, w) = match Layout::of_input(shape) {
        Layout::Nchw => (1, 2, 3),
        Layout::Nhwc => (3, 1, 2),
    };
    let [sh, sw] = size.unwrap_or([fixed(shape.get(h), 224), fixed(shape.get(w), 224)]);
    let mut dims = vec![0; 3];
    dims[c - 1] = fixed(shape.get(c), 3);
    dims[h - 1] = sh;
    dims[w - 1] = sw;
    Ok(dims)
}

fn table(r: &CheckReport, d: DeviceChoice, batch: usize, dims: &[usize], tol: f64) -> String {
    let side = label(d);
    let mut s = format!(
        "| distance from float64 | CPU kernels, float32 | {side}, portable ops, float32 | limit | result |\n|---|---|---|---|---|\n"
    );
    let mut row = |what: String, x: &Distance| {
        let limit = tol.max(crate::train::device_check::ACCURACY_FACTOR * x.cpu);
        let verdict = if x.passes(tol) { "pass" } else { "FAIL" };
        s += &format!("| {what} | {:.2e} | {:.2e} | {limit:.1e} | {verdict} |\n", x.cpu, x.checked);
    };
    row("outputs, inference".into(), &r.forward);
    if let Some(d) = &r.first_step {
        row(format!("{} parameters after step 1 (worst: {})", r.parameters, d.worst), d);
    }
    if let Some(d) = &r.last_step {
        row(format!("after step {} (worst: {})", r.steps, d.worst), d);
    }
    if r.steps > 0 {
        s += &format!(
            "\nmean training loss: float64 {:.5}, CPU float32 {:.5}, {side} {:.5}\n",
            r.loss[0], r.loss[1], r.loss[2]
        );
    }
    if let Some(rate) = r.images_per_second {
        s += &format!("training step on {side}, batch {batch} of {dims:?}: {rate:.1} images/s\n");
    }
    s
}
