//! The adaptation methods behind one trait. The runner (`adapt`) owns the data, the model and
//! the loop; a method decides what trains, adds its loss terms and masks through
//! [`Hooks`](crate::train::Hooks), and keeps its own state between tasks.

mod ewc;
mod lwf;
mod simple;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

pub use ewc::{Ewc, FisherKind};
pub use lwf::Lwf;
pub use simple::Simple;

use crate::engine::Engine;
use crate::train::{Hooks, TrainError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum MethodKind {
    /// Everything trains (low lr) with the new head; the baseline that forgets.
    Finetune,
    /// Only the new head trains on a frozen backbone (features cached through ONNX Runtime).
    FeatureExtract,
    /// Everything trains on interleaved batches of all tasks so far (needs the old data).
    Joint,
    /// Learning without Forgetting: distil old heads' recorded outputs on the new inputs.
    Lwf,
    /// Elastic Weight Consolidation: a diagonal-Fisher penalty towards earlier weights.
    Ewc,
    /// Per-task weight ownership by magnitude pruning (not available yet).
    Packnet,
    /// Per-task binary masks over a frozen backbone (not available yet).
    Piggyback,
}

impl MethodKind {
    pub fn name(self) -> &'static str {
        match self {
            MethodKind::Finetune => "finetune",
            MethodKind::FeatureExtract => "feature-extract",
            MethodKind::Joint => "joint",
            MethodKind::Lwf => "lwf",
            MethodKind::Ewc => "ewc",
            MethodKind::Packnet => "packnet",
            MethodKind::Piggyback => "piggyback",
        }
    }

    pub fn needs_old_data(self) -> bool {
        self == MethodKind::Joint
    }
}

/// Method parameters; unset values take the defaults the help text states.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodParams {
    /// LwF distillation temperature (paper: 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lwf_temperature: Option<f64>,
    /// LwF weight of the distillation terms (paper: 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lwf_lambda: Option<f64>,
    /// LwF epochs that train only the new head before everything trains (paper's warm-up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lwf_warmup_epochs: Option<u64>,
    /// EWC penalty strength on the Fisher normalised to a maximum of 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ewc_lambda: Option<f64>,
    /// EWC Fisher: "true" (labels sampled from the model) or "empirical" (true labels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ewc_fisher: Option<FisherKind>,
    /// Online EWC: keep one Fisher, decayed by this factor per task; unset accumulates one
    /// penalty per earlier task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ewc_decay: Option<f64>,
    /// Samples of the training set used for the Fisher (per-sample gradients).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ewc_samples: Option<usize>,
}

pub const LWF_TEMPERATURE: f64 = 2.0;
pub const LWF_LAMBDA: f64 = 1.0;
pub const EWC_LAMBDA: f64 = 100.0;
pub const EWC_SAMPLES: usize = 200;

impl MethodParams {
    pub fn validate(&self, method: MethodKind) -> Result<(), String> {
        if matches!(method, MethodKind::Packnet | MethodKind::Piggyback) {
            return Err(format!("method '{}' is not available in this version of mtpack", method.name()));
        }
        let positive = |v: Option<f64>, what: &str| match v {
            Some(x) if !(x.is_finite() && x > 0.0) => Err(format!("{what} must be a positive number, got {x}")),
            _ => Ok(()),
        };
        positive(self.lwf_temperature, "lwf_temperature")?;
        if let Some(l) = self.lwf_lambda.filter(|l| !(l.is_finite() && *l >= 0.0)) {
            return Err(format!("lwf_lambda must be >= 0, got {l}"));
        }
        if let Some(l) = self.ewc_lambda.filter(|l| !(l.is_finite() && *l >= 0.0)) {
            return Err(format!("ewc_lambda must be >= 0, got {l}"));
        }
        if let Some(d) = self.ewc_decay.filter(|d| !(0.0..=1.0).contains(d)) {
            return Err(format!("ewc_decay must be in [0, 1], got {d}"));
        }
        if self.ewc_samples == Some(0) {
            return Err("ewc_samples must be at least 1".into());
        }
        Ok(())
    }

    /// The values in effect, defaults filled in, for the manifest.
    pub fn effective(&self, method: MethodKind) -> serde_json::Value {
        match method {
            MethodKind::Lwf => serde_json::json!({
                "temperature": self.lwf_temperature.unwrap_or(LWF_TEMPERATURE),
                "lambda": self.lwf_lambda.unwrap_or(LWF_LAMBDA),
                "warmup_epochs": self.lwf_warmup_epochs.unwrap_or(0),
                "distillation": "cross-entropy between softmax(old/T) recorded once per task through ONNX Runtime and softmax(new/T), no T^2 factor (paper)",
            }),
            MethodKind::Ewc => serde_json::json!({
                "lambda": self.ewc_lambda.unwrap_or(EWC_LAMBDA),
                "fisher": self.ewc_fisher.unwrap_or(FisherKind::True),
                "online_decay": self.ewc_decay,
                "samples": self.ewc_samples.unwrap_or(EWC_SAMPLES),
                "fisher_normalisation": ewc::NORMALISATION,
                "penalty_step": ewc::PENALTY_STEP,
            }),
            _ => serde_json::json!({}),
        }
    }
}

/// What a method knows about the task being learned.
pub struct TaskCtx<'a> {
    /// Position in the sequence (0-based, the backbone's own head not counted).
    pub index: usize,
    /// The graph input the task's data feeds.
    pub input: &'a str,
    pub name: &'a str,
    /// The logits tensor of this task's head.
    pub logits: &'a str,
    /// Initializers of this task's head.
    pub head_params: &'a BTreeSet<String>,
    /// Initializers of the shared backbone that may train.
    pub backbone_params: &'a BTreeSet<String>,
    /// Logits tensors of earlier heads (including the backbone's own, if any).
    pub old_logits: &'a [String],
    /// Initializers of earlier heads.
    pub old_head_params: &'a BTreeSet<String>,
    pub seed: u64,
}

/// Runs the current model through ONNX Runtime on the task's training inputs and returns
/// the named outputs.
pub type Recorder<'a> = dyn FnMut(&[String]) -> Result<Vec<Tensor>, TrainError> + 'a;

pub trait Method {
    fn kind(&self) -> MethodKind;

    /// Whether an initializer trains while this task is learned.
    fn trainable(&self, name: &str, ctx: &TaskCtx) -> bool;

    /// Outputs beyond the task's logits that the hooks read (e.g. old heads for LwF).
    fn extra_outputs(&self, _ctx: &TaskCtx) -> Vec<String> {
        Vec::new()
    }

    /// Called once before the first epoch of a task, also when a task resumes. `record`
    /// runs the current model through ONNX Runtime on the task's training inputs and returns
    /// the named outputs.
    fn begin_task(
        &mut self,
        _ctx: &TaskCtx,
        _engine: &Engine,
        _record: &mut Recorder,
        _state: &Path,
    ) -> Result<(), TrainError> {
        Ok(())
    }

    /// The hooks for an epoch of the current task.
    fn hooks(&mut self, epoch: u64, lr: f64, engine: &Engine, ctx: &TaskCtx) -> Result<&mut dyn Hooks, TrainError>;

    /// Called after the last epoch of a task, with its training inputs and labels.
    fn end_task(&mut self, _ctx: &TaskCtx, _engine: &Engine, _x: &Tensor, _y: &[i64]) -> Result<(), TrainError> {
        Ok(())
    }

    /// Writes the state that must survive between tasks into `dir`.
    fn save(&self, _dir: &Path) -> Result<Vec<String>, TrainError> {
        Ok(Vec::new())
    }

    /// Reads the state `save` wrote.
    fn load(&mut self, _dir: &Path) -> Result<(), TrainError> {
        Ok(())
    }
}

/// The method for a plan.
pub fn create(kind: MethodKind, params: &MethodParams) -> Result<Box<dyn Method>, String> {
    params.validate(kind)?;
    Ok(match kind {
        MethodKind::Finetune | MethodKind::FeatureExtract | MethodKind::Joint => Box::new(Simple::new(kind)),
        MethodKind::Lwf => Box::new(Lwf::new(params)),
        MethodKind::Ewc => Box::new(Ewc::new(params)),
        MethodKind::Packnet | MethodKind::Piggyback => {
            return Err(format!("method '{}' is not available in this version of mtpack", kind.name()))
        }
    })
}

/// Zero masks for every parameter of `engine` that is not in `keep`.
pub(crate) fn freeze_all_but(engine: &Engine, keep: &BTreeSet<String>) -> candle_core::Result<HashMap<String, Tensor>> {
    engine
        .params()
        .iter()
        .filter(|(n, _)| !keep.contains(*n))
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().zeros_like()?)))
        .collect()
}
