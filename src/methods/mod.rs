//! The adaptation methods behind one trait. The runner (`adapt`) owns the data, the model and
//! the loop; a method decides what trains, adds its loss terms and masks through
//! [`Hooks`](crate::train::Hooks), and keeps its own state between tasks.
//!
//! Each method is one file with a [`Spec`] (what it trains on, its defaults, how it is made)
//! and, if it has any, its parameters; the registry below lists them, one line each (see
//! `registry.rs` for what the lines generate).

pub mod masks;
pub mod record;
mod registry;
mod simple;

registry::registry! {
    /// Everything trains (low lr) with the new head; the baseline that forgets.
    Finetune = "finetune" => finetune,
    /// Only the new head trains on a frozen backbone (features cached through ONNX Runtime).
    FeatureExtract = "feature-extract" => feature_extract,
    /// Everything trains on interleaved batches of all tasks so far (needs the old data).
    Joint = "joint" => joint,
    /// Learning without Forgetting: distil old heads' recorded outputs on the new inputs.
    Lwf = "lwf" => lwf + params lwf,
    /// Elastic Weight Consolidation: a diagonal-Fisher penalty towards earlier weights.
    Ewc = "ewc" => ewc + params ewc,
    /// PackNet: each task trains the weights still free, keeps the largest by magnitude and
    /// frees the rest; earlier tasks' weights are used but frozen.
    Packnet = "packnet" => packnet + params packnet,
    /// Piggyback: a learned binary mask per weight per task over a backbone that never changes.
    Piggyback = "piggyback" => piggyback + params piggyback,
}

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::Tensor;

pub use ewc::{Ewc, EwcShared, FisherKind};
pub use lwf::Lwf;
pub use packnet::{PackNet, SharedParams};
pub use piggyback::Piggyback;
pub use record::Record;

use crate::engine::Engine;
use crate::onnx::Model;
use crate::train::{Hooks, TrainError};

/// What the runner trains a task on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inputs {
    /// The task's images through the whole model.
    Images,
    /// Features of the frozen backbone, computed once through ONNX Runtime and cached in the
    /// pack; only the part after the feature tensor trains.
    FrozenFeatures,
}

/// Whose data an epoch mixes into its batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tasks {
    /// The current task's.
    Current,
    /// Every task's so far, interleaved (needs the old data).
    AllSoFar,
}

/// The data a method trains on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrainingData {
    pub inputs: Inputs,
    pub tasks: Tasks,
}

impl TrainingData {
    /// Images of the current task: what most methods train on.
    pub const IMAGES: TrainingData = TrainingData { inputs: Inputs::Images, tasks: Tasks::Current };
}

/// What a method is before it has learned anything: the registry's entry for it, defined in
/// the method's own file.
pub struct Spec {
    /// What the runner feeds the training loop.
    pub data: TrainingData,
    /// Whether tasks see the backbone through per-task weight masks.
    pub masked: bool,
    /// Whether BatchNorm keeps its recorded statistics by default on a backbone that has it
    /// (the plan's `batchnorm`, see `Plan::for_backbone`).
    pub frozen_batchnorm: bool,
    /// Whether, with these parameters, nothing in the network trains with batch statistics
    /// even where the plan's BatchNorm mode is batch (Piggyback's frozen shared parameters):
    /// then BatchNorm keeps the backbone's recorded statistics, as with `frozen`.
    pub keeps_recorded_batchnorm: fn(&MethodParams) -> bool,
    /// Training settings the method's paper uses where the plan sets none.
    pub hyper_defaults: fn() -> crate::train::Hyper,
    /// Fills in parameter defaults that depend on whether the backbone has BatchNormalization.
    pub for_backbone: fn(&mut MethodParams, bool),
    /// The parameter values in effect, defaults filled in, for the manifest.
    pub effective: fn(&MethodParams) -> serde_json::Value,
    /// The method, ready for its first task (parameters already validated).
    pub create: fn(&MethodParams) -> Box<dyn Method>,
}

impl Spec {
    /// A method without parameters, training on `data` with the plan's settings.
    pub const fn plain(data: TrainingData, create: fn(&MethodParams) -> Box<dyn Method>) -> Spec {
        Spec {
            data,
            masked: false,
            frozen_batchnorm: false,
            keeps_recorded_batchnorm: |_| false,
            hyper_defaults: crate::train::Hyper::default,
            for_backbone: |_, _| {},
            effective: |_| serde_json::json!({}),
            create,
        }
    }
}

/// A number parameter that must be positive when set.
pub(crate) fn positive(v: Option<f64>, what: &str) -> Result<(), String> {
    match v {
        Some(x) if !(x.is_finite() && x > 0.0) => Err(format!("{what} must be a positive number, got {x}")),
        _ => Ok(()),
    }
}

/// A number parameter that must be >= 0 when set.
pub(crate) fn non_negative(v: Option<f64>, what: &str) -> Result<(), String> {
    match v {
        Some(x) if !(x.is_finite() && x >= 0.0) => Err(format!("{what} must be >= 0, got {x}")),
        _ => Ok(()),
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

impl<'a> TaskCtx<'a> {
    /// For tests: the only task of a plan over a model `x -> y`, training and masking
    /// `weights`, with no head of its own (`none`: an empty set) and no earlier heads.
    #[cfg(test)]
    pub fn single(weights: &'a BTreeSet<String>, none: &'a BTreeSet<String>, seed: u64) -> TaskCtx<'a> {
        TaskCtx {
            index: 0,
            input: "x",
            name: "t",
            logits: "y",
            head_params: none,
            backbone_params: weights,
            masked: weights,
            epochs: 1,
            last: true,
            old_logits: &[],
            old_head_params: none,
            seed,
        }
    }
}

/// Runs the current model through ONNX Runtime on the task's training inputs and returns
/// the named outputs.
pub type Recorder<'a> = dyn FnMut(&[String]) -> Result<Vec<Tensor>, TrainError> + 'a;

pub trait Method {
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

    /// The state that must survive: the pack stores it after each task and in every
    /// checkpoint.
    fn record(&self) -> Result<Record, TrainError> {
        Ok(Record::default())
    }

    /// Takes back what `record` gave, after a task or mid-task from a checkpoint: each table
    /// the record holds replaces the method's; tables it lacks (a checkpoint of an earlier
    /// version) leave the method's as they are.
    fn restore(&mut self, _record: &Record) -> Result<(), TrainError> {
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
}
