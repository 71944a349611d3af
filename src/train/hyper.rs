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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<OptimizerName>,
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

/// The optimizers a plan can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerName {
    /// SGD with momentum (the default).
    Sgd,
    /// AdamW (decoupled weight decay); "adam" names it too.
    #[serde(alias = "adam")]
    #[value(alias = "adam")]
    Adamw,
}

impl std::str::FromStr for OptimizerName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        <Self as clap::ValueEnum>::from_str(s, true).map_err(|_| format!("optimizer '{s}' is not sgd or adamw"))
    }
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
            optimizer: self.optimizer.or(defaults.optimizer),
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
        let kind = match self.optimizer.unwrap_or(OptimizerName::Sgd) {
            OptimizerName::Sgd => {
                OptimKind::Sgd { momentum: self.momentum.unwrap_or(DEFAULT_MOMENTUM), nesterov: false }
            }
            OptimizerName::Adamw => OptimKind::Adamw { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
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
