//! `mtpack check-device`: whether training somewhere else computes what the CPU computes.
//! Three runs start from the same weights and take the same SGD steps on the same batches,
//! with every convolution, linear and BatchNorm parameter training: the CPU's kernels in
//! float64 (the exact computation, near enough), the CPU's kernels in float32, and the checked
//! side in float32 (the engine on a GPU, where candle's portable ops run, or on the CPU with
//! the portable ops). The checked side passes when it is as close to float64 as the CPU's own
//! float32 is (within a factor of four), or within a tolerance.
//!
//! Comparing with float64, not with the CPU's float32, is what makes the check mean
//! something: a deep network training BatchNorm on batch statistics amplifies rounding
//! (MobileNetV2: about 1e6 over 20 steps at lr 0.01, measured), so two correct float32
//! implementations part by 1e-3 after one step and by O(1) after twenty. Each float32 run's
//! distance from float64 shows how much of that is float32 itself.

use std::collections::BTreeSet;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::{candle, train_epoch, EpochEnd, EpochRun, NoHooks, OptimConfig, Optimizer, Task, TrainError};
use crate::engine::kernels::Kernels;
use crate::engine::Engine;
use crate::onnx::Model;

/// One side of the comparison.
#[derive(Clone, Debug)]
pub struct Side {
    pub device: Device,
    pub kernels: Kernels,
}

#[derive(Clone, Debug)]
pub struct CheckConfig {
    /// Steps every engine trains before the last comparison (the first step is compared on
    /// its own as well; 0: outputs only).
    pub steps: usize,
    /// Timed training steps on the checked side (0: not timed).
    pub rate_steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub momentum: f64,
    pub seed: u64,
    /// BatchNorm on each batch's statistics (updating the running ones), or on the recorded
    /// ones.
    pub batch_stats: bool,
}

/// How far the CPU's float32 kernels and the checked side each are from the same
/// computation in float64 (the CPU kernels again), at one point of the check.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Distance {
    /// The CPU kernels in float32 against float64: float32's own error, the scale to judge by.
    pub cpu: f64,
    /// The checked side against float64.
    pub checked: f64,
    /// The tensor where the checked side is furthest (empty for outputs).
    pub worst: String,
}

impl Distance {
    /// The checked side is as accurate as the CPU's float32 kernels (within a factor of
    /// four) or within `tolerance` of float64.
    pub fn passes(&self, tolerance: f64) -> bool {
        self.checked.is_finite() && self.checked <= tolerance.max(ACCURACY_FACTOR * self.cpu)
    }
}

/// How much further from float64 than the CPU's float32 the checked side may be: float32
/// errors of two correct implementations differ by 1.5x on MobileNetV2's first step
/// (measured); a wrong op is off by orders of magnitude.
pub const ACCURACY_FACTOR: f64 = 4.0;

#[derive(Clone, Debug, serde::Serialize)]
pub struct CheckReport {
    /// Outputs of the first batch in inference mode: max |y - y64| / max |y64|.
    pub forward: Distance,
    /// Every trained parameter and running statistic after the first step: the largest
    /// relative difference of any tensor (2-norms, see FLOOR). None with no steps.
    pub first_step: Option<Distance>,
    /// The same after all `steps` steps.
    pub last_step: Option<Distance>,
    pub parameters: usize,
    pub steps: usize,
    /// Mean training loss over the steps: float64, CPU float32, checked side.
    pub loss: [f64; 3],
    /// Images per second of the checked side's training step, when timed.
    pub images_per_second: Option<f64>,
}

impl CheckReport {
    pub fn passes(&self, tolerance: f64) -> bool {
        std::iter::once(&self.forward).chain(&self.first_step).chain(&self.last_step).all(|d| d.passes(tolerance))
    }
}

/// What trains in the check: every layer weight and bias, and BatchNorm's scale and bias
/// (which makes BatchNorm use batch statistics and update its running averages).
fn trainable(model: &Model) -> BTreeSet<String> {
    let g = model.graph();
    let mut names = crate::graph::analysis::trainable_names(g);
    for n in g.node.iter().filter(|n| n.op_type() == "BatchNormalization") {
        names.extend(n.input.iter().skip(1).take(2).cloned());
    }
    names
}

/// An engine of `model` with its optimizer.
struct Run {
    engine: Engine,
    opt: Optimizer,
}

impl Run {
    fn new(model: &Model, side: &Side, float: DType, cfg: &CheckConfig) -> Result<Run, TrainError> {
        let names = trainable(model);
        let mut engine = Engine::new(model, &|n| names.contains(n), float, &side.device)?;
        engine.set_kernels(side.kernels);
        Ok(Run { engine, opt: Optimizer::new(OptimConfig::sgd(cfg.lr, cfg.momentum, 0.0)) })
    }

    fn on_device(&self, x: &Tensor) -> Result<Tensor, TrainError> {
        x.to_device(self.engine.device()).and_then(|t| t.to_dtype(self.engine.float())).map_err(candle("inputs"))
    }
}

/// Compares `checked` against the CPU's kernels on images `x` (on the CPU, [N, ...]) with
/// `labels`, or each labelled with a seeded class of the model's output. All three runs
/// (float64 and float32 on the CPU's kernels, the checked side in float32) take the same
/// steps on the same batches in the same order.
pub fn compare(
    model: &Model,
    x: &Tensor,
    labels: Option<&[i64]>,
    checked: &Side,
    cfg: &CheckConfig,
) -> Result<CheckReport, TrainError> {
    let input = single_input(model)?;
    let logits = model
        .graph()
        .output
        .first()
        .map(|o| o.name().to_string())
        .ok_or_else(|| TrainError::Invalid("the model has no output to train against".into()))?;
    let cpu = Side { device: Device::Cpu, kernels: Kernels::Native };
    let mut runs = [
        Run::new(model, &cpu, DType::F64, cfg)?,
        Run::new(model, &cpu, DType::F32, cfg)?,
        Run::new(model, checked, DType::F32, cfg)?,
    ];
    let n = x.dim(0).map_err(candle("inputs"))?;
    let first = x.narrow(0, 0, cfg.batch.min(n)).map_err(candle("inputs"))?;
    let mut outs = Vec::with_capacity(3);
    for r in &runs {
        let out = r.engine.forward_to(&[(&input, r.on_device(&first)?)], &[&logits])?;
        outs.push(one(&out)?.clone());
    }
    let forward =
        Distance { cpu: rel_max(&outs[0], &outs[1])?, checked: rel_max(&outs[0], &outs[2])?, worst: String::new() };
    let &[_, classes] = outs[0].dims() else {
        return Err(TrainError::Invalid(format!(
            "output '{logits}' is {:?}; the check trains a classifier, whose first output is [batch, classes]",
            outs[0].dims()
        )));
    };
    let classes = classes.max(1);
    let mut rng = crate::rng::Rng::new(cfg.seed);
    let seeded: Vec<i64> = (0..n).map(|_| rng.below(classes) as i64).collect();
    let y = labels.unwrap_or(&seeded);
    let steps = cfg.steps.min(n / cfg.batch.max(1));
    let rows = |from: usize, to: usize| -> Result<(Tensor, &[i64]), TrainError> {
        let (a, b) = (from * cfg.batch, (to * cfg.batch).min(n));
        Ok((x.narrow(0, a, b - a).map_err(candle("inputs"))?, y.get(a..b).unwrap_or_default()))
    };
    let mut loss = [0.0; 3];
    let mut first_step = None;
    for (from, to) in [(0, steps.min(1)), (1, steps)] {
        if to <= from {
            continue;
        }
        let (xs, ys) = rows(from, to)?;
        for (k, r) in runs.iter_mut().enumerate() {
            loss[k] += train(r, &input, &logits, &xs, ys, cfg, from as u64)? * (to - from) as f64 / steps.max(1) as f64;
        }
        if first_step.is_none() {
            first_step = Some(weights_distance(&runs)?);
        }
    }
    let last_step = if steps > 0 { Some(weights_distance(&runs)?) } else { None };
    let images_per_second =
        if cfg.rate_steps > 0 { Some(rate(&mut runs[2], &input, &logits, &first, y, cfg)?) } else { None };
    Ok(CheckReport {
        forward,
        first_step,
        last_step,
        parameters: runs[0].engine.params().len(),
        steps,
        loss,
        images_per_second,
    })
}

fn single_input(model: &Model) -> Result<String, TrainError> {
    let g = model.graph();
    let inits: BTreeSet<&str> = g.initializer.iter().map(|t| t.name()).collect();
    let inputs: Vec<&str> = g.input.iter().map(|i| i.name()).filter(|n| !inits.contains(n)).collect();
    match inputs.as_slice() {
        [one] => Ok(one.to_string()),
        other => Err(TrainError::Invalid(format!("the check needs a model with one input, it has {}", other.len()))),
    }
}

fn one(v: &[Tensor]) -> Result<&Tensor, TrainError> {
    v.first().ok_or_else(|| TrainError::Invalid("the engine returned no output".into()))
}

fn host_f64(t: &Tensor) -> Result<Vec<f64>, TrainError> {
    t.flatten_all().and_then(|t| t.to_dtype(DType::F64)).and_then(|t| t.to_vec1()).map_err(candle("comparison"))
}

/// max |a - b| / max |a| (0 when both are all zeros).
fn rel_max(a: &Tensor, b: &Tensor) -> Result<f64, TrainError> {
    let (a, b) = (host_f64(a)?, host_f64(b)?);
    if a.len() != b.len() {
        return Err(TrainError::Invalid(format!("outputs of {} and {} elements", a.len(), b.len())));
    }
    let scale = a.iter().fold(0f64, |m, v| m.max(v.abs()));
    let diff = a.iter().zip(&b).fold(0f64, |m, (p, q)| m.max((p - q).abs()));
    Ok(if scale > 0.0 { diff / scale } else { diff })
}

/// Root mean square below which a tensor's difference is measured against this instead of
/// its own size: BatchNorm statistics and biases of a few 1e-7 (MobileNetV2 has them) differ
/// relatively by 1e-2 in float32 after one step while differing by 1e-9 absolutely.
const FLOOR: f64 = 1e-3;

/// How far the float32 runs' parameters are from the float64 run's: for each, the largest
/// relative difference of any tensor, |a - b| / |a| in the 2-norm, |a| taken as at least
/// FLOOR per element.
fn weights_distance([exact, cpu, checked]: &[Run; 3]) -> Result<Distance, TrainError> {
    let mut d = Distance { cpu: 0.0, checked: 0.0, worst: String::new() };
    for (name, va) in exact.engine.params() {
        let missing = || TrainError::Invalid(format!("parameter '{name}' is missing"));
        let a = host_f64(va.as_tensor())?;
        let norm = a.iter().map(|v| v * v).sum::<f64>().sqrt().max(FLOOR * (a.len() as f64).sqrt());
        let dist = |r: &Run| -> Result<f64, TrainError> {
            let b = host_f64(r.engine.params().get(name).ok_or_else(missing)?.as_tensor())?;
            Ok(a.iter().zip(&b).map(|(u, v)| (u - v) * (u - v)).sum::<f64>().sqrt() / norm)
        };
        let (c, k) = (dist(cpu)?, dist(checked)?);
        d.cpu = d.cpu.max(c);
        if k > d.checked || d.worst.is_empty() || k.is_nan() {
            (d.checked, d.worst) = (k, name.clone());
        }
    }
    Ok(d)
}

/// One epoch over `x` in batches of `cfg.batch`, in the order `cfg.seed` and `epoch` give;
/// returns its mean loss.
fn train(
    r: &mut Run,
    input: &str,
    logits: &str,
    x: &Tensor,
    y: &[i64],
    cfg: &CheckConfig,
    epoch: u64,
) -> Result<f64, TrainError> {
    r.engine.set_training(cfg.batch_stats);
    let x = r.on_device(x)?;
    let task = Task { input, logits, extra_outputs: &[], x: &x, y };
    let mut progress = |_, _, _| std::ops::ControlFlow::Continue(());
    let run = EpochRun {
        epoch,
        batch: cfg.batch,
        seed: cfg.seed,
        lr: cfg.lr,
        done: Default::default(),
        progress: &mut progress,
    };
    let end = train_epoch(&r.engine, std::slice::from_ref(&task), run, &mut r.opt, &mut NoHooks::default());
    r.engine.set_training(false);
    match end? {
        EpochEnd::Complete(stats) => Ok(stats.loss),
        EpochEnd::Stopped(_) => Err(TrainError::Invalid("the check's training stopped early".into())),
    }
}

/// Training images per second over `cfg.rate_steps` one-batch steps after one untimed step
/// (allocation, kernel loading). The loss is read back every step, so a GPU's queued work
/// is finished inside the timing.
fn rate(r: &mut Run, input: &str, logits: &str, xb: &Tensor, y: &[i64], cfg: &CheckConfig) -> Result<f64, TrainError> {
    let n = xb.dim(0).map_err(candle("inputs"))?;
    let yb = y.get(..n).unwrap_or_default();
    // On the device once, outside the timing (`train` then finds it there and copies nothing).
    let xb = &r.on_device(xb)?;
    train(r, input, logits, xb, yb, cfg, 0)?;
    let started = Instant::now();
    for step in 0..cfg.rate_steps {
        train(r, input, logits, xb, yb, cfg, step as u64)?;
    }
    Ok((n * cfg.rate_steps) as f64 / started.elapsed().as_secs_f64().max(1e-9))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portable_training_on_the_tiny_backbone_matches_the_kernels() {
        let model = Model::load(&crate::plan::default_backbone()).unwrap();
        let shape = crate::graph::analysis::single_input_shape(model.graph()).unwrap();
        let dims: Vec<usize> =
            shape.iter().skip(1).map(|d| if let crate::onnx::Dim::Fixed(v) = d { *v as usize } else { 8 }).collect();
        let n = 16;
        let x = crate::engine::gradcheck::seeded(&[&[n][..], &dims].concat(), 3, DType::F32);
        let cfg =
            CheckConfig { steps: 4, rate_steps: 0, batch: 4, lr: 0.05, momentum: 0.9, seed: 1, batch_stats: true };
        let side = Side { device: Device::Cpu, kernels: Kernels::Portable };
        let r = compare(&model, &x, None, &side, &cfg).unwrap();
        assert!(r.passes(1e-4), "{r:?}");
        // float32 is measured against float64: an error of exactly 0 would mean the sides
        // compared were not the ones meant.
        assert!(r.forward.cpu > 0.0 && r.last_step.as_ref().is_some_and(|d| d.checked > 0.0), "{r:?}");
        assert!(r.parameters > 0 && r.steps == 4);
    }
}
