//! Elastic Weight Consolidation (Kirkpatrick et al., arXiv 1612.00796).
//!
//! After each task, the diagonal Fisher of the shared weights is estimated from per-sample
//! gradients of log p(y|x): with y drawn from the model's own prediction ("true" Fisher, the
//! paper's) or the ground-truth label ("empirical"). Each task's Fisher is divided by its
//! mean entry, so lambda is the penalty on a weight of average importance whatever the scale
//! of the gradients. (Dividing by the largest entry, as first done here, left the median
//! weight 1e-6 of the stiffest one on MobileNetV2: EWC then barely differed from
//! fine-tuning below lambda 1e4.) Penalties of all earlier tasks add up (or, online, one
//! decayed Fisher is kept).
//!
//! A floor (default 0.01 of the mean) is added to every penalised weight's Fisher. Where an
//! old task's gradient is exactly zero (a unit that is dead or saturated on its data) the
//! Fisher is 0 and EWC alone lets a later task move those weights anywhere; with
//! BatchNorm kept per task, a unit revived that way lands 100 standard deviations off the
//! old task's statistics. Measured on the real sequence at lambda 1000 without the floor:
//! one first-layer filter grew 5.3x during the digits task and MNIST fell from 0.97 to 0.40.
//!
//! The penalty lambda/2 * sum_k F_k (theta - theta*_k)^2 is applied after every optimizer
//! step as its exact proximal step, theta <- (theta + c * sum F_k theta*_k) / (1 + c * sum F_k)
//! with c = lr * lambda. That minimises the same objective but cannot overshoot, so any
//! lambda stays finite, where an explicit gradient step diverges once lr * lambda * F > 2.

use std::collections::{BTreeMap, HashMap};

use candle_core::{Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{masks, non_negative, Method, Record, Spec, TaskCtx, TrainingData};
use crate::engine::Engine;
use crate::graph::masks::StoredMask;
use crate::onnx::Model;
use crate::rng::Rng;
use crate::train::loss::log_softmax;
use crate::train::{candle, Hooks, TrainError};

mod proximal;

/// The record tables of sum_k F_k and sum_k F_k * theta*_k.
const FISHER: &str = "F";
const FISHER_THETA: &str = "FT";

pub const NORMALISATION: &str = "each task's diagonal Fisher (mean of squared per-sample gradients of log p(y|x)) is divided by its mean entry, so mean F = 1 over the penalised weights, and the floor (ewc_fisher_floor, default 0.01) is added to every entry";
pub const PENALTY_STEP: &str = "exact proximal step after each optimizer step: theta <- (theta + lr*lambda*sum_k F_k theta*_k) / (1 + lr*lambda*sum_k F_k)";

/// What EWC does with the backbone's biases and BatchNormalization.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum EwcShared {
    /// Shared by every task and in the penalty like any weight (the paper's).
    #[default]
    Penalised,
    /// Each task trains its own copy from the backbone's values and keeps the running
    /// statistics of its own data; the penalty covers the remaining shared weights.
    PerTask,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FisherKind {
    /// y sampled from the model's predictive distribution (the paper's Fisher).
    True,
    /// y = the ground-truth label.
    Empirical,
}

/// EWC's parameters (flags and `[params]` keys keep the method's prefix).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[group(skip)]
pub struct Params {
    /// EWC: penalty strength. Each task's Fisher is divided by its mean entry (mean F = 1)
    /// and the penalty is applied as an exact proximal step, so any lambda stays finite
    /// [default: 100].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub ewc_lambda: Option<f64>,
    /// EWC: Fisher from labels sampled from the model (true, the paper's) or the ground truth
    /// (empirical) [default: true].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub ewc_fisher: Option<FisherKind>,
    /// EWC: online decay of one running Fisher; unset keeps one penalty per earlier task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub ewc_decay: Option<f64>,
    /// EWC: training samples for the per-sample Fisher [default: 200].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub ewc_samples: Option<usize>,
    /// EWC: added to every penalised weight's normalised Fisher, so weights an old task
    /// shows no gradient for (dead or saturated units) stay anchored too [default: 0.01].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub ewc_fisher_floor: Option<f64>,
    /// EWC: biases and BatchNormalization are weights like any other, shared and in the
    /// penalty (penalised, the paper's), or each task trains its own copy and keeps its own
    /// BatchNorm statistics (per-task; the artifact then selects them with a `task` input)
    /// [default: per-task when the backbone has BatchNormalization, else penalised].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long, value_enum)]
    pub ewc_shared: Option<EwcShared>,
}

pub const EWC_LAMBDA: f64 = 100.0;
pub const EWC_SAMPLES: usize = 200;
pub const EWC_FISHER_FLOOR: f64 = 0.01;

impl Params {
    pub fn validate(&self) -> Result<(), String> {
        non_negative(self.ewc_lambda, "ewc_lambda")?;
        if let Some(d) = self.ewc_decay.filter(|d| !(0.0..=1.0).contains(d)) {
            return Err(format!("ewc_decay must be in [0, 1], got {d}"));
        }
        non_negative(self.ewc_fisher_floor, "ewc_fisher_floor")?;
        if self.ewc_samples == Some(0) {
            return Err("ewc_samples must be at least 1".into());
        }
        Ok(())
    }
}

/// On a backbone with BatchNormalization, biases and BatchNorm default to per-task copies:
/// the running statistics are not weights, no penalty can hold them, and with batch
/// statistics they follow the newest task (on the real sequence MNIST's held-out accuracy
/// under EWC fell from 0.97 with its own statistics to 0.80 with the last task's; README).
pub const SPEC: Spec = Spec {
    for_backbone: |p, has_bn| {
        if has_bn {
            p.ewc.ewc_shared = p.ewc.ewc_shared.or(Some(EwcShared::PerTask));
        }
    },
    effective: |p| {
        let p = &p.ewc;
        serde_json::json!({
            "lambda": p.ewc_lambda.unwrap_or(EWC_LAMBDA),
            "fisher": p.ewc_fisher.unwrap_or(FisherKind::True),
            "online_decay": p.ewc_decay,
            "samples": p.ewc_samples.unwrap_or(EWC_SAMPLES),
            "fisher_floor": p.ewc_fisher_floor.unwrap_or(EWC_FISHER_FLOOR),
            "shared": p.ewc_shared.unwrap_or_default(),
            "fisher_normalisation": NORMALISATION,
            "penalty_step": PENALTY_STEP,
        })
    },
    ..Spec::plain(TrainingData::IMAGES, |p| Box::new(Ewc::new(&p.ewc)))
};

pub struct Ewc {
    lambda: f64,
    kind: FisherKind,
    decay: Option<f64>,
    samples: usize,
    floor: f64,
    /// sum_k F_k and sum_k F_k * theta*_k per parameter.
    sum_f: HashMap<String, Tensor>,
    sum_f_theta: HashMap<String, Tensor>,
    lr: f64,
    masks: HashMap<String, Tensor>,
    shared: EwcShared,
    per_task: masks::PerTask,
}

impl Ewc {
    pub fn new(p: &Params) -> Ewc {
        Ewc {
            lambda: p.ewc_lambda.unwrap_or(EWC_LAMBDA),
            kind: p.ewc_fisher.unwrap_or(FisherKind::True),
            decay: p.ewc_decay,
            samples: p.ewc_samples.unwrap_or(EWC_SAMPLES),
            floor: p.ewc_fisher_floor.unwrap_or(EWC_FISHER_FLOOR),
            sum_f: HashMap::new(),
            sum_f_theta: HashMap::new(),
            lr: 0.0,
            masks: HashMap::new(),
            shared: p.ewc_shared.unwrap_or_default(),
            per_task: masks::PerTask::default(),
        }
    }

    /// Diagonal Fisher of `params` for the task, normalised to a mean of 1, plus the floor.
    pub fn fisher(
        &self,
        engine: &Engine,
        ctx: &TaskCtx,
        params: &[String],
        x: &Tensor,
        y: &[i64],
    ) -> Result<HashMap<String, Tensor>, TrainError> {
        let (input, logits, seed) = (ctx.input, ctx.logits, ctx.seed);
        let n = y.len();
        let mut rng = Rng::new(seed ^ 0xF15E);
        let mut idx: Vec<usize> = (0..n).collect();
        rng.shuffle(&mut idx);
        idx.truncate(self.samples.min(n));
        let mut acc: HashMap<String, Tensor> = HashMap::new();
        // As many samples at a time as the pool has threads: a single image's pass gains
        // nothing from a second thread (MobileNetV2 at 3x64x64: 1.84 s for 200 samples on
        // one, 1.85 s on two). The labels are drawn and the squares added in sample order,
        // so the Fisher is the one-at-a-time one whatever the thread count.
        for group in idx.chunks(rayon::current_num_threads().max(1)) {
            let logps = group
                .par_iter()
                .map(|&i| self.log_probs(engine, (input, logits), x, i))
                .collect::<Result<Vec<_>, TrainError>>()?;
            let mut picked = Vec::with_capacity(group.len());
            for (&i, logp) in group.iter().zip(&logps) {
                let label = match self.kind {
                    FisherKind::Empirical => y.get(i).copied().unwrap_or(0) as usize,
                    FisherKind::True => sample(logp, &mut rng).map_err(candle("Fisher sampling"))?,
                };
                picked.push(logp.get(label).map_err(candle("Fisher gradient"))?);
            }
            let grads = picked
                .par_iter()
                .map(|l| l.backward().map_err(candle("Fisher gradient")))
                .collect::<Result<Vec<_>, TrainError>>()?;
            for g in &grads {
                add_squares(&mut acc, engine, params, g)?;
            }
        }
        let count = idx.len().max(1) as f64;
        let (mut sum, mut len) = (0f64, 0usize);
        for t in acc.values() {
            let s: f64 = t
                .sum_all()
                .and_then(|m| m.to_dtype(candle_core::DType::F64))
                .and_then(|m| m.to_scalar())
                .map_err(candle("Fisher mean"))?;
            sum += s / count;
            len += t.elem_count();
        }
        let mean = sum / len.max(1) as f64;
        let scale = if mean > 0.0 && mean.is_finite() { 1.0 / (count * mean) } else { 0.0 };
        let floor = if scale > 0.0 { self.floor } else { 0.0 };
        acc.into_iter().map(|(k, t)| Ok((k, t.affine(scale, floor).map_err(candle("Fisher"))?))).collect()
    }

    /// log p(. | x_i): one training image through the network, as a vector of classes.
    fn log_probs(&self, engine: &Engine, (input, logits): (&str, &str), x: &Tensor, i: usize) -> Result<Tensor, TrainError> {
        let xi = x.narrow(0, i, 1).map_err(candle("Fisher sample"))?;
        let out = engine.forward_to(&[(input, xi)], &[logits])?;
        let first = out.into_iter().next().ok_or_else(|| TrainError::Invalid(format!("no output '{logits}'")))?;
        log_softmax(&first).and_then(|l| l.squeeze(0)).map_err(candle("Fisher log-probabilities"))
    }
}

/// Adds one sample's squared gradients of `params` to the running sums.
fn add_squares(
    acc: &mut HashMap<String, Tensor>,
    engine: &Engine,
    params: &[String],
    grads: &candle_core::backprop::GradStore,
) -> Result<(), TrainError> {
    for name in params {
        let Some(var) = engine.params().get(name) else { continue };
        // Detached, or every sample's graph stays reachable through the running sum.
        let Some(g) = grads.get(var.as_tensor()).map(candle_core::Tensor::detach) else { continue };
        let sq = g.sqr().map_err(candle("Fisher"))?;
        let next = match acc.remove(name) {
            Some(a) => (a + sq).map_err(candle("Fisher"))?,
            None => sq,
        };
        acc.insert(name.clone(), next);
    }
    Ok(())
}

/// Draws a class from log-probabilities.
fn sample(logp: &Tensor, rng: &mut Rng) -> candle_core::Result<usize> {
    let p: Vec<f64> = logp.exp()?.to_dtype(candle_core::DType::F64)?.to_vec1()?;
    let mut u = rng.uniform();
    for (k, pk) in p.iter().enumerate() {
        if u < *pk {
            return Ok(k);
        }
        u -= pk;
    }
    Ok(p.len().saturating_sub(1))
}

impl Hooks for Ewc {
    fn grad_masks(&self) -> &HashMap<String, Tensor> {
        &self.masks
    }

    fn after_step(&mut self, params: &BTreeMap<String, Var>) -> candle_core::Result<()> {
        let c = self.lr * self.lambda;
        if c == 0.0 {
            return Ok(());
        }
        for (name, f) in &self.sum_f {
            let (Some(var), Some(ft)) = (params.get(name), self.sum_f_theta.get(name)) else { continue };
            proximal::step(var, f, ft, c)?;
        }
        Ok(())
    }
}

impl Method for Ewc {
    fn trainable(&self, name: &str, ctx: &TaskCtx) -> bool {
        ctx.head_params.contains(name) || ctx.backbone_params.contains(name)
    }

    fn prepare_engine(&mut self, engine: &mut Engine, ctx: &TaskCtx) -> Result<(), TrainError> {
        if self.shared == EwcShared::PerTask {
            self.per_task.begin(engine, &masks::per_task_names(engine, ctx), ctx.index)?;
        }
        Ok(())
    }

    fn hooks(&mut self, _epoch: u64, lr: f64, _engine: &Engine, _ctx: &TaskCtx) -> Result<&mut dyn Hooks, TrainError> {
        self.lr = lr;
        Ok(self)
    }

    fn end_task(&mut self, ctx: &TaskCtx, engine: &Engine, x: &Tensor, y: &[i64]) -> Result<(), TrainError> {
        let own: std::collections::BTreeSet<String> = match self.shared {
            EwcShared::PerTask => masks::per_task_names(engine, ctx).into_iter().collect(),
            EwcShared::Penalised => Default::default(),
        };
        // Parameters each task has its own copy of need no penalty: no later task moves them.
        let params: Vec<String> = ctx.backbone_params.iter().filter(|n| !own.contains(*n)).cloned().collect();
        let f = self.fisher(engine, ctx, &params, x, y)?;
        for (name, fk) in f {
            let Some(var) = engine.params().get(&name) else { continue };
            let theta = var.as_tensor().detach();
            let ft = fk.mul(&theta).map_err(candle("EWC anchor"))?;
            let (sf, sft) = match (self.decay, self.sum_f.remove(&name), self.sum_f_theta.remove(&name)) {
                // Online: one Fisher, decayed, anchored at the latest weights.
                (Some(g), Some(old), _) => {
                    let f_new = (old.affine(g, 0.0).map_err(candle("EWC"))? + &fk).map_err(candle("EWC"))?;
                    let ft_new = f_new.mul(&theta).map_err(candle("EWC"))?;
                    (f_new, ft_new)
                }
                (None, Some(old_f), Some(old_ft)) => {
                    ((old_f + &fk).map_err(candle("EWC"))?, (old_ft + &ft).map_err(candle("EWC"))?)
                }
                _ => (fk, ft),
            };
            self.sum_f.insert(name.clone(), sf);
            self.sum_f_theta.insert(name, sft);
        }
        if self.shared == EwcShared::PerTask {
            self.per_task.end(engine, ctx.index)?;
        }
        Ok(())
    }

    fn view(&self, model: &Model, column: Option<usize>) -> Result<Option<Model>, TrainError> {
        if self.per_task.is_empty() {
            return Ok(None);
        }
        self.per_task.apply(model, column).map(Some)
    }

    fn canonical(&self, model: Model) -> Result<Model, TrainError> {
        self.per_task.canonical(model)
    }

    fn stored_masks(&self) -> Option<std::collections::BTreeMap<String, StoredMask>> {
        let mut out = std::collections::BTreeMap::new();
        self.per_task.add_stored(&mut out).ok()?;
        (!out.is_empty()).then_some(out)
    }

    fn record(&self) -> Result<Record, TrainError> {
        let mut r = Record::default();
        for (table, sums) in [(FISHER, &self.sum_f), (FISHER_THETA, &self.sum_f_theta)] {
            for (k, t) in sums {
                r.insert(table, k, crate::engine::from_candle(t).map_err(candle("EWC state"))?);
            }
        }
        self.per_task.record_into(&mut r)?;
        Ok(r)
    }

    fn restore(&mut self, record: &Record) -> Result<(), TrainError> {
        self.per_task.restore(record)?;
        for (table, sums) in [(FISHER, &mut self.sum_f), (FISHER_THETA, &mut self.sum_f_theta)] {
            if record.table(table).next().is_none() {
                continue;
            }
            sums.clear();
            for (k, v) in record.table(table) {
                let ct = crate::engine::to_candle(v, candle_core::DType::F32).map_err(candle("EWC state"))?;
                sums.insert(k.to_string(), ct);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use candle_core::{DType, Device};

    use super::*;
    use crate::tensor::Tensor as Host;

    /// y = x @ W with W [3, 4]: four classes from three inputs.
    fn matmul() -> Model {
        let w: Vec<f32> = (0..12).map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.4).collect();
        crate::onnx::build::matmul(&Host::F32(ndarray::Array2::from_shape_vec((3, 4), w).unwrap().into_dyn()))
    }

    /// The Fisher's samples run one per thread; its labels and sums keep sample order, so
    /// one thread and three give the same Fisher to the last bit.
    #[test]
    fn the_fisher_does_not_depend_on_the_thread_count() {
        let engine = Engine::new(&matmul(), &|n| n == "W", DType::F32, &Device::Cpu).unwrap();
        let x = crate::engine::gradcheck::seeded(&[11, 3], 5, DType::F32);
        let y: Vec<i64> = (0..11).map(|i| i % 4).collect();
        let (weights, empty) = (BTreeSet::from(["W".to_string()]), BTreeSet::new());
        let ctx = TaskCtx::single(&weights, &empty, 3);
        let ewc = Ewc::new(&Params { ewc_samples: Some(9), ..Default::default() });
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let f = pool.install(|| ewc.fisher(&engine, &ctx, &["W".to_string()], &x, &y)).unwrap();
            f["W"].flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let one = on(1);
        assert!(one.iter().any(|&v| v > EWC_FISHER_FLOOR as f32), "some weight matters more than the floor");
        assert_eq!(one, on(3));
    }
}
