//! Learning without Forgetting (Li & Hoiem, arXiv 1606.09282).
//!
//! Before training a task, the old heads' responses to the new task's training inputs are
//! recorded ONCE through ONNX Runtime (they are outputs of the frozen old model) and kept in
//! the pack's state, so a resumed task distils towards the same targets. The loss is
//! CE(new) + lambda * sum over old heads of CE(softmax(recorded/T), softmax(current/T)).
//! The paper's warm-up (the new head alone first) is the runner's linear probe, which every
//! method that trains the backbone gets (`--linear-probe-epochs`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use super::{non_negative, positive, Method, Spec, TaskCtx, TrainingData};
use crate::engine::Engine;
use crate::store;
use crate::train::loss::log_softmax;
use crate::train::{candle, BatchCtx, Hooks, TrainError};

/// LwF's parameters (flags and `[params]` keys keep the method's prefix).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[group(skip)]
pub struct Params {
    /// LwF: distillation temperature [default: 2, the paper's].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub lwf_temperature: Option<f64>,
    /// LwF: weight of the distillation terms [default: 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub lwf_lambda: Option<f64>,
    /// Replaced by --linear-probe-epochs; refused with a message saying so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long, hide = true)]
    pub lwf_warmup_epochs: Option<u64>,
}

pub const LWF_TEMPERATURE: f64 = 2.0;
pub const LWF_LAMBDA: f64 = 1.0;

impl Params {
    pub fn validate(&self) -> Result<(), String> {
        if self.lwf_warmup_epochs.is_some() {
            return Err("lwf_warmup_epochs is now the plan's linear_probe_epochs (--linear-probe-epochs): \
                        the new head is fitted alone on cached features before any method trains the backbone"
                .into());
        }
        positive(self.lwf_temperature, "lwf_temperature")?;
        non_negative(self.lwf_lambda, "lwf_lambda")
    }
}

/// LwF keeps the recorded BatchNorm statistics by default on a backbone that has them:
/// distillation cannot hold running averages, which with batch statistics follow the newest
/// task, and LwF then forgot more than fine-tuning on the real sequence (README).
pub const SPEC: Spec = Spec {
    frozen_batchnorm: true,
    effective: |p| {
        let p = &p.lwf;
        serde_json::json!({
            "temperature": p.lwf_temperature.unwrap_or(LWF_TEMPERATURE),
            "lambda": p.lwf_lambda.unwrap_or(LWF_LAMBDA),
            "distillation": "cross-entropy between softmax(old/T) recorded once per task through ONNX Runtime and softmax(new/T), no T^2 factor (paper)",
        })
    },
    ..Spec::plain(TrainingData::IMAGES, |p| Box::new(Lwf::new(&p.lwf)))
};

pub struct Lwf {
    temperature: f64,
    lambda: f64,
    /// Recorded logits of each old head on the current task's training inputs.
    targets: HashMap<String, Tensor>,
    /// Always empty: everything trains.
    masks: HashMap<String, Tensor>,
}

impl Lwf {
    pub fn new(p: &Params) -> Lwf {
        Lwf {
            temperature: p.lwf_temperature.unwrap_or(LWF_TEMPERATURE),
            lambda: p.lwf_lambda.unwrap_or(LWF_LAMBDA),
            targets: HashMap::new(),
            masks: HashMap::new(),
        }
    }

    /// The recorded targets; tests check them against the old model's outputs.
    pub fn targets(&self) -> &HashMap<String, Tensor> {
        &self.targets
    }
}

fn targets_file(state: &Path, task: &str) -> PathBuf {
    state.join(format!("lwf_targets_{task}.safetensors"))
}

/// Soft cross-entropy between temperature-softened distributions, mean over the batch:
/// -sum_k softmax(recorded/T)_k * log softmax(current/T)_k.
pub fn distillation(current: &Tensor, recorded: &Tensor, t: f64) -> candle_core::Result<Tensor> {
    let soft = log_softmax(&(recorded / t)?.detach())?.exp()?;
    let q = log_softmax(&(current / t)?)?;
    soft.mul(&q)?.sum(D::Minus1)?.neg()?.mean_all()
}

impl Hooks for Lwf {
    fn extra_loss(&self, ctx: &BatchCtx) -> candle_core::Result<Option<Tensor>> {
        if self.lambda == 0.0 || self.targets.is_empty() {
            return Ok(None);
        }
        let dev = ctx.outputs.values().next().map(|t| t.device().clone()).unwrap_or(candle_core::Device::Cpu);
        let ids = Tensor::new(ctx.indices.iter().map(|&i| i as u32).collect::<Vec<u32>>(), &dev)?;
        let mut total: Option<Tensor> = None;
        for (name, recorded) in &self.targets {
            let Some(current) = ctx.outputs.get(name) else {
                return Err(candle_core::Error::Msg(format!("LwF: old head output '{name}' was not computed")));
            };
            let kd = distillation(current, &recorded.index_select(&ids, 0)?, self.temperature)?;
            total = Some(match total {
                Some(t) => (t + kd)?,
                None => kd,
            });
        }
        total.map(|t| t.affine(self.lambda, 0.0)).transpose()
    }

    fn grad_masks(&self) -> &HashMap<String, Tensor> {
        &self.masks
    }
}

impl Method for Lwf {
    fn trainable(&self, name: &str, ctx: &TaskCtx) -> bool {
        ctx.head_params.contains(name) || ctx.backbone_params.contains(name) || ctx.old_head_params.contains(name)
    }

    fn extra_outputs(&self, ctx: &TaskCtx) -> Vec<String> {
        ctx.old_logits.to_vec()
    }

    fn begin_task(
        &mut self,
        ctx: &TaskCtx,
        engine: &Engine,
        record: &mut super::Recorder,
        state: &Path,
    ) -> Result<(), TrainError> {
        self.targets.clear();
        if ctx.old_logits.is_empty() {
            return Ok(());
        }
        let file = targets_file(state, ctx.name);
        let dev = engine.device().clone();
        if file.exists() {
            let (t, _) = store::load(&file)?;
            for name in ctx.old_logits {
                let host = t
                    .get(name)
                    .ok_or_else(|| TrainError::Invalid(format!("{}: no targets for '{name}'", file.display())))?;
                let ct = crate::engine::to_candle_on(host, engine.float(), &dev).map_err(candle("LwF targets"))?;
                self.targets.insert(name.clone(), ct);
            }
            return Ok(());
        }
        let recorded = record(ctx.old_logits)?;
        let mut host = Vec::new();
        for (name, t) in ctx.old_logits.iter().zip(recorded) {
            host.push((name.clone(), crate::engine::from_candle(&t).map_err(candle("LwF targets"))?));
            self.targets.insert(name.clone(), t.to_dtype(engine.float()).map_err(candle("LwF targets"))?);
        }
        let refs: Vec<(&str, &crate::tensor::Tensor)> = host.iter().map(|(n, t)| (n.as_str(), t)).collect();
        store::save(&file, &refs, Default::default())?;
        Ok(())
    }

    fn hooks(&mut self, _epoch: u64, _lr: f64, _engine: &Engine, _ctx: &TaskCtx) -> Result<&mut dyn Hooks, TrainError> {
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::gradcheck::{check_gradients, seeded};
    use candle_core::DType;

    #[test]
    fn distillation_is_minimal_at_the_target_and_differentiable() {
        let rec = seeded(&[4, 5], 1, DType::F64);
        let at = distillation(&rec, &rec, 2.0).unwrap().to_scalar::<f64>().unwrap();
        let off = distillation(&(&rec * 3.0).unwrap(), &rec, 2.0).unwrap().to_scalar::<f64>().unwrap();
        assert!(off > at, "moving away from the target must cost: {off} vs {at}");
        check_gradients(&[seeded(&[4, 5], 2, DType::F64)], |v| distillation(&v[0], &rec, 2.0)?.unsqueeze(0), 1e-6)
            .unwrap();
    }
}
