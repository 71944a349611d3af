//! Training hyper-parameters of one task as a plan states them (each may be set per task or
//! inherited), and their resolution into the optimizer, schedule, epochs and batch size the
//! epoch loop runs with.

use serde::{Deserialize, Serialize};

use super::{OptimConfig, OptimKind, StepLr};

/// Defines [`Hyper`] from one list of fields: the struct (the plan's keys and `adapt`'s flags,
/// with the help text below), `over` (a task's settings over inherited ones) and `set` (a
/// `--task` option), so a new setting is one line here plus its use in `resolve`.
macro_rules! hyper_fields {
    ($( $(#[doc = $doc:literal])* $field:ident : $ty:ty, )*) => {
        /// Training settings of one task (each field may be set per task or inherited).
        #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, clap::Args)]
        #[serde(deny_unknown_fields)]
        pub struct Hyper {
            $(
                $(#[doc = $doc])*
                #[serde(default, skip_serializing_if = "Option::is_none")]
                #[arg(long)]
                pub $field: Option<$ty>,
            )*
        }

        impl Hyper {
            /// The keys a plan and `--task` options name.
            pub const KEYS: &'static [&'static str] = &[$( stringify!($field), )*];

            /// This task's settings over `defaults`.
            pub fn over(&self, defaults: &Hyper) -> Hyper {
                Hyper { $( $field: self.$field.clone().or_else(|| defaults.$field.clone()), )* }
            }

            /// Sets `key` from its text; `None` when `key` is not a training setting.
            pub fn set(&mut self, key: &str, value: &str) -> Option<Result<(), String>> {
                match key {
                    $( stringify!($field) => Some(parse_value(value).map(|v| self.$field = Some(v))), )*
                    _ => None,
                }
            }
        }
    };
}

hyper_fields! {
    /// Epochs per task [default: 2].
    epochs: u64,
    /// Mini-batch size [default: 32].
    batch: usize,
    /// Optimizer [default: sgd; piggyback: adamw].
    optimizer: OptimizerName,
    /// Learning rate [default: 0.01; with frozen BatchNorm 0.001, or 0.0001 after a linear
    /// probe; piggyback: 0.01 with adamw for the head].
    lr: f64,
    /// SGD momentum [default: 0.9].
    momentum: f64,
    /// Weight decay (coupled for SGD, decoupled for AdamW) [default: 0].
    weight_decay: f64,
    /// Multiply the learning rate by --lr-gamma every this many epochs [default: never].
    lr_step: u64,
    /// The factor --lr-step applies [default: 1].
    lr_gamma: f64,
}

fn parse_value<T: std::str::FromStr<Err: std::fmt::Display>>(v: &str) -> Result<T, String> {
    v.trim().parse::<T>().map_err(|e| format!("'{v}' is not a valid value ({e})"))
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
