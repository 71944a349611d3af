//! Training hyper-parameters of one task as a plan states them (each may be set per task or
//! inherited), and their resolution into the optimizer, schedule, epochs and batch size the
//! epoch loop runs with.

use serde::{Deserialize, Serialize};

use super::{OptimConfig, OptimKind, StepLr};

/// Training settings of one task (each field may be set per task or inherited).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hyper {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
    /// "sgd" or "adamw".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub momentum: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    /// Multiply the learning rate by `lr_gamma` every `lr_step` epochs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr_step: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr_gamma: Option<f64>,
}

/// Fully resolved training settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Resolved {
    pub epochs: u64,
    pub batch: usize,
    pub optim: OptimConfig,
    pub schedule: StepLr,
}

pub const DEFAULT_EPOCHS: u64 = 2;
pub const DEFAULT_BATCH: usize = 32;
pub const DEFAULT_LR: f64 = 0.01;
pub const DEFAULT_MOMENTUM: f64 = 0.9;

impl Hyper {
    /// This task's settings over `defaults`.
    pub fn over(&self, defaults: &Hyper) -> Hyper {
        Hyper {
            epochs: self.epochs.or(defaults.epochs),
            batch: self.batch.or(defaults.batch),
            optimizer: self.optimizer.clone().or_else(|| defaults.optimizer.clone()),
            lr: self.lr.or(defaults.lr),
            momentum: self.momentum.or(defaults.momentum),
            weight_decay: self.weight_decay.or(defaults.weight_decay),
            lr_step: self.lr_step.or(defaults.lr_step),
            lr_gamma: self.lr_gamma.or(defaults.lr_gamma),
        }
    }

    pub fn resolve(&self, task: &str) -> Result<Resolved, String> {
        let lr = self.lr.unwrap_or(DEFAULT_LR);
        let wd = self.weight_decay.unwrap_or(0.0);
        let kind = match self.optimizer.as_deref().unwrap_or("sgd") {
            "sgd" => OptimKind::Sgd { momentum: self.momentum.unwrap_or(DEFAULT_MOMENTUM), nesterov: false },
            "adamw" | "adam" => OptimKind::Adamw { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
            other => return Err(format!("task '{task}': optimizer '{other}' is not sgd or adamw")),
        };
        let r = Resolved {
            epochs: self.epochs.unwrap_or(DEFAULT_EPOCHS),
            batch: self.batch.unwrap_or(DEFAULT_BATCH),
            optim: OptimConfig { kind, lr, weight_decay: wd },
            schedule: StepLr { step_epochs: self.lr_step.unwrap_or(0), gamma: self.lr_gamma.unwrap_or(1.0) },
        };
        if r.batch == 0 {
            return Err(format!("task '{task}': batch must be at least 1"));
        }
        if !(lr.is_finite() && lr > 0.0) {
            return Err(format!("task '{task}': lr must be a positive number, got {lr}"));
        }
        if !(wd.is_finite() && wd >= 0.0) {
            return Err(format!("task '{task}': weight_decay must be >= 0, got {wd}"));
        }
        Ok(r)
    }
}
