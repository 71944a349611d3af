//! The adaptation methods behind one trait. The runner (`adapt`) owns the data, the model and
//! the loop; a method decides what trains, adds its loss terms and masks through
//! [`Hooks`](crate::train::Hooks), and keeps its own state between tasks.

mod ewc;
mod lwf;
pub mod masks;
mod packnet;
mod piggyback;
mod simple;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

pub use ewc::{Ewc, EwcShared, FisherKind};
pub use lwf::Lwf;
pub use packnet::{PackNet, SharedParams};
pub use piggyback::Piggyback;
pub use simple::Simple;

use crate::engine::Engine;
use crate::onnx::Model;
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
    /// PackNet: each task trains the weights still free, keeps the largest by magnitude and
    /// frees the rest; earlier tasks' weights are used but frozen.
    Packnet,
    /// Piggyback: a learned binary mask per weight per task over a backbone that never changes.
    Piggyback,
}

impl std::fmt::Display for MethodKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl MethodKind {
    /// Every method, in the order tables list them.
    pub const ALL: [MethodKind; 7] = [
        MethodKind::Finetune,
        MethodKind::FeatureExtract,
        MethodKind::Joint,
        MethodKind::Lwf,
        MethodKind::Ewc,
        MethodKind::Packnet,
        MethodKind::Piggyback,
    ];

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

    /// Whether tasks see the backbone through per-task weight masks.
    pub fn masked(self) -> bool {
        matches!(self, MethodKind::Packnet | MethodKind::Piggyback)
    }

    /// Training settings the method's paper uses where the plan sets none: Piggyback trains
    /// its masks and head with Adam.
    pub fn hyper_defaults(self) -> crate::train::Hyper {
        match self {
            MethodKind::Piggyback => crate::train::Hyper {
                optimizer: Some(crate::train::OptimizerName::Adamw),
                lr: Some(PIGGYBACK_HEAD_LR),
                ..Default::default()
            },
            _ => Default::default(),
        }
    }
}

/// Method parameters; unset values take the defaults the help text states. The same
/// fields are the plan file's `[params]` table and `adapt`'s flags.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct MethodParams {
    /// LwF: distillation temperature [default: 2, the paper's].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub lwf_temperature: Option<f64>,
    /// LwF: weight of the distillation terms [default: 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub lwf_lambda: Option<f64>,
    /// LwF: epochs training only the new head before everything trains (the paper's warm-up)
    /// [default: 0].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub lwf_warmup_epochs: Option<u64>,
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
    /// PackNet: fraction of the first task's weights freed again after it, per layer
    /// [default: 0.5, the paper's].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub packnet_prune_first: Option<f64>,
    /// PackNet: fraction of each later task's weights freed again [default: 0.75].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub packnet_prune: Option<f64>,
    /// PackNet: the plan's last task keeps every free weight (no pruning, no retraining);
    /// no task can be added after it [default: false].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub packnet_keep_last: Option<bool>,
    /// PackNet: epochs of retraining the kept weights after pruning [default: 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub packnet_retrain_epochs: Option<u64>,
    /// PackNet: learning rate of retraining relative to the task's [default: 0.1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub packnet_retrain_lr_scale: Option<f64>,
    /// PackNet: biases and BatchNormalization train with the first task and are frozen after
    /// it (first-task, the paper's), never train (frozen), or train per task, each task
    /// keeping its own copy (per-task) [default: per-task when the backbone has
    /// BatchNormalization, else first-task].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long, value_enum)]
    pub packnet_shared: Option<SharedParams>,
    /// Piggyback: biases and BatchNormalization stay the backbone's (frozen, the paper's) or
    /// each task trains its own copy (per-task) [default: frozen].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long, value_enum)]
    pub piggyback_shared: Option<SharedParams>,
    /// Piggyback: initial value of the real-valued mask scores [default: 0.01, the paper's].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub piggyback_init: Option<f64>,
    /// Piggyback: scores above this threshold keep their weight [default: 0.005].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub piggyback_threshold: Option<f64>,
    /// Piggyback: learning rate of the mask scores; the task's lr trains its head
    /// [default: 0.0001, the paper's].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub piggyback_mask_lr: Option<f64>,
}

pub const LWF_TEMPERATURE: f64 = 2.0;
pub const LWF_LAMBDA: f64 = 1.0;
pub const EWC_LAMBDA: f64 = 100.0;
pub const EWC_SAMPLES: usize = 200;
pub const EWC_FISHER_FLOOR: f64 = 0.01;
pub const PACKNET_PRUNE_FIRST: f64 = 0.5;
pub const PACKNET_PRUNE: f64 = 0.75;
pub const PACKNET_RETRAIN_EPOCHS: u64 = 1;
pub const PACKNET_RETRAIN_LR_SCALE: f64 = 0.1;
pub const PIGGYBACK_INIT: f64 = 1e-2;
pub const PIGGYBACK_THRESHOLD: f64 = 5e-3;
pub const PIGGYBACK_MASK_LR: f64 = 1e-4;
pub const PIGGYBACK_HEAD_LR: f64 = 1e-2;

impl MethodParams {
    pub fn validate(&self, method: MethodKind) -> Result<(), String> {
        let _ = method;
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
        if let Some(f) = self.ewc_fisher_floor.filter(|f| !(f.is_finite() && *f >= 0.0)) {
            return Err(format!("ewc_fisher_floor must be >= 0, got {f}"));
        }
        if self.ewc_samples == Some(0) {
            return Err("ewc_samples must be at least 1".into());
        }
        for (v, what) in [(self.packnet_prune_first, "packnet_prune_first"), (self.packnet_prune, "packnet_prune")] {
            if let Some(p) = v.filter(|p| !(0.0..1.0).contains(p)) {
                return Err(format!("{what} must be in [0, 1), got {p}"));
            }
        }
        positive(self.packnet_retrain_lr_scale, "packnet_retrain_lr_scale")?;
        positive(self.piggyback_init, "piggyback_init")?;
        if self.piggyback_shared == Some(SharedParams::FirstTask) {
            return Err("piggyback_shared must be frozen or per-task: Piggyback never changes the backbone".into());
        }
        positive(self.piggyback_mask_lr, "piggyback_mask_lr")?;
        if let Some(t) = self.piggyback_threshold.filter(|t| !t.is_finite()) {
            return Err(format!("piggyback_threshold must be a finite number, got {t}"));
        }
        Ok(())
    }

    /// The parameters for `model`: where the plan leaves PackNet's or EWC's biases and
    /// BatchNorm unset and the backbone has BatchNormalization, each task gets its own copy
    /// (per-task). For EWC the running statistics are the reason: they are not weights, no
    /// penalty can hold them, and with batch statistics they follow the newest task (on the
    /// real sequence MNIST's held-out accuracy under EWC fell from 0.97 with its own
    /// statistics to 0.80 with the last task's; README). The paper's choice (train with the first task, then freeze) was made for
    /// a backbone without BatchNorm; with it, later tasks train under the first task's
    /// statistics and PackNet stays at chance on MNIST after Fashion-MNIST (README,
    /// measured). Piggyback keeps the paper's frozen BatchNorm, which measured better than
    /// per-task copies on the same sequence.
    pub fn for_backbone(&self, method: MethodKind, model: &Model) -> MethodParams {
        let has_bn = has_batchnorm(model);
        let mut p = self.clone();
        if has_bn && method == MethodKind::Packnet {
            p.packnet_shared = p.packnet_shared.or(Some(SharedParams::PerTask));
        }
        if has_bn && method == MethodKind::Ewc {
            p.ewc_shared = p.ewc_shared.or(Some(EwcShared::PerTask));
        }
        p
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
                "fisher_floor": self.ewc_fisher_floor.unwrap_or(EWC_FISHER_FLOOR),
                "shared": self.ewc_shared.unwrap_or_default(),
                "fisher_normalisation": ewc::NORMALISATION,
                "penalty_step": ewc::PENALTY_STEP,
            }),
            MethodKind::Packnet => packnet::effective(self),
            MethodKind::Piggyback => piggyback::effective(self),
            _ => serde_json::json!({}),
        }
    }
}

/// Whether `model` has BatchNormalization (whose statistics several defaults depend on).
pub fn has_batchnorm(model: &Model) -> bool {
    model.graph().node.iter().any(|n| n.op_type() == "BatchNormalization")
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
    /// Conv/Gemm/MatMul weights of the shared backbone: what mask methods mask.
    pub masked: &'a BTreeSet<String>,
    /// Epochs the plan gives this task (before any the method adds).
    pub epochs: u64,
    /// Whether this is the plan's last task.
    pub last: bool,
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

    /// Called on a fresh engine before a checkpoint is restored into it: add parameters and
    /// re-parameterisations (masks) the method trains.
    fn prepare_engine(&mut self, _engine: &mut Engine, _ctx: &TaskCtx) -> Result<(), TrainError> {
        Ok(())
    }

    /// Epochs the method adds after the plan's (e.g. retraining after pruning).
    fn extra_epochs(&self, _ctx: &TaskCtx) -> u64 {
        0
    }

    /// Factor on the scheduled learning rate for `epoch`.
    fn lr_scale(&self, _epoch: u64, _ctx: &TaskCtx) -> f64 {
        1.0
    }

    /// Mid-task state that a checkpoint must carry besides the weights.
    fn checkpoint_state(&self) -> Result<Vec<(String, crate::tensor::Tensor)>, TrainError> {
        Ok(Vec::new())
    }

    /// Restores what `checkpoint_state` gave.
    fn restore_checkpoint_state(&mut self, _state: &HashMap<String, crate::tensor::Tensor>) -> Result<(), TrainError> {
        Ok(())
    }

    /// The model as task `column` sees it (`None`: the backbone's own head), when that
    /// differs from `model` itself (masked weights).
    fn view(&self, _model: &Model, _column: Option<usize>) -> Result<Option<Model>, TrainError> {
        Ok(None)
    }

    /// The model the pack stores after a task: parameters kept per task hold the backbone's
    /// values there (the tasks' own copies live in the method's state).
    fn canonical(&self, model: Model) -> Result<Model, TrainError> {
        Ok(model)
    }

    /// The per-task masks in the form the pack stores and the artifact embeds (mask methods).
    fn stored_masks(&self) -> Option<std::collections::BTreeMap<String, crate::graph::masks::StoredMask>> {
        None
    }

    /// What the method has to say about the task just learned (stored in the manifest).
    fn task_report(&self) -> Option<serde_json::Value> {
        None
    }

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
        MethodKind::Packnet => Box::new(PackNet::new(params)),
        MethodKind::Piggyback => Box::new(Piggyback::new(params)),
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
