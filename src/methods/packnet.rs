//! PackNet (Mallya & Lazebnik, arXiv 1711.05769).
//!
//! Every masked weight (Conv/Gemm/MatMul of the shared backbone) has an owner: 0 = free,
//! t = the t-th task of the sequence. Task t trains the free weights while using, frozen, the
//! ones earlier tasks own (gradient masks stop gradient, momentum and weight decay alike).
//! After its epochs it keeps, per layer, the largest free weights by magnitude, frees the
//! rest (set to 0), retrains the kept ones briefly and freezes them. Task t sees the weights
//! with 0 < owner <= t, so later tasks cannot change what it computes. Biases and
//! BatchNormalization train with the first task only.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::masks::{self, invalid};
use super::{positive, Method, Record, Recorder, Spec, TaskCtx, TrainingData};
use crate::engine::Engine;
use crate::graph::masks::StoredMask;
use crate::onnx::Model;
use crate::tensor::Tensor as Host;
use crate::train::{candle, Hooks, TrainError};

/// What happens to the shared parameters PackNet does not mask (biases, BatchNorm).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SharedParams {
    /// Train with the first task, frozen after it (the paper's).
    #[default]
    FirstTask,
    /// Never train: the backbone's values serve every task.
    Frozen,
    /// Each task trains its own copy, starting from the backbone's (BatchNorm in batch
    /// mode); the artifact selects them by task.
    PerTask,
}

/// PackNet's parameters (flags and `[params]` keys keep the method's prefix).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[group(skip)]
pub struct Params {
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
}

pub const PACKNET_PRUNE_FIRST: f64 = 0.5;
pub const PACKNET_PRUNE: f64 = 0.75;
pub const PACKNET_RETRAIN_EPOCHS: u64 = 1;
pub const PACKNET_RETRAIN_LR_SCALE: f64 = 0.1;

impl Params {
    pub fn validate(&self) -> Result<(), String> {
        for (v, what) in [(self.packnet_prune_first, "packnet_prune_first"), (self.packnet_prune, "packnet_prune")] {
            if let Some(p) = v.filter(|p| !(0.0..1.0).contains(p)) {
                return Err(format!("{what} must be in [0, 1), got {p}"));
            }
        }
        positive(self.packnet_retrain_lr_scale, "packnet_retrain_lr_scale")
    }
}

/// On a backbone with BatchNormalization, biases and BatchNorm default to per-task copies.
/// The paper's choice (train with the first task, then freeze) was made for a backbone
/// without BatchNorm; with it, later tasks train under the first task's statistics and
/// PackNet stays at chance on MNIST after Fashion-MNIST (README, measured).
pub const SPEC: Spec = Spec {
    masked: true,
    for_backbone: |p, has_bn| {
        if has_bn {
            p.packnet.packnet_shared = p.packnet.packnet_shared.or(Some(SharedParams::PerTask));
        }
    },
    effective: |p| effective(&p.packnet),
    ..Spec::plain(TrainingData::IMAGES, |p| Box::new(PackNet::new(&p.packnet)))
};

/// The record tables: owner ids per weight, and the flag of a task pruned mid-task.
const OWNER: &str = "owner";
const PACKNET: &str = "packnet";
const PRUNED: &str = "pruned";

fn effective(p: &Params) -> serde_json::Value {
    serde_json::json!({
        "prune_first": p.packnet_prune_first.unwrap_or(PACKNET_PRUNE_FIRST),
        "prune": p.packnet_prune.unwrap_or(PACKNET_PRUNE),
        "keep_last": p.packnet_keep_last.unwrap_or(false),
        "retrain_epochs": p.packnet_retrain_epochs.unwrap_or(PACKNET_RETRAIN_EPOCHS),
        "retrain_lr_scale": p.packnet_retrain_lr_scale.unwrap_or(PACKNET_RETRAIN_LR_SCALE),
        "shared": p.packnet_shared.unwrap_or_default(),
        "masked": "weights of Conv, ConvTranspose, Gemm and MatMul in the shared backbone; heads are not masked",
        "pruning": "per layer, by magnitude, among the weights the task trained; freed weights are set to 0",
        "storage": "one uint8 owner id per masked weight for all tasks (0 = free); task t sees 0 < owner <= t",
    })
}

#[derive(Clone, Debug)]
struct Owners {
    shape: Vec<usize>,
    ids: Vec<u8>,
}

pub struct PackNet {
    prune_first: f64,
    prune: f64,
    keep_last: bool,
    retrain_epochs: u64,
    retrain_lr_scale: f64,
    shared: SharedParams,
    owners: BTreeMap<String, Owners>,
    /// The current task has been pruned (it is retraining or done).
    pruned: bool,
    masks: HashMap<String, Tensor>,
    report: Option<serde_json::Value>,
    per_task: masks::PerTask,
}

fn owner_id(ctx: &TaskCtx) -> Result<u8, TrainError> {
    u8::try_from(ctx.index + 1).map_err(|_| {
        TrainError::Invalid(format!("packnet: task '{}' is past the 255 tasks owner ids can name", ctx.name))
    })
}

impl PackNet {
    pub fn new(p: &Params) -> PackNet {
        PackNet {
            prune_first: p.packnet_prune_first.unwrap_or(PACKNET_PRUNE_FIRST),
            prune: p.packnet_prune.unwrap_or(PACKNET_PRUNE),
            keep_last: p.packnet_keep_last.unwrap_or(false),
            retrain_epochs: p.packnet_retrain_epochs.unwrap_or(PACKNET_RETRAIN_EPOCHS),
            retrain_lr_scale: p.packnet_retrain_lr_scale.unwrap_or(PACKNET_RETRAIN_LR_SCALE),
            shared: p.packnet_shared.unwrap_or_default(),
            owners: BTreeMap::new(),
            pruned: false,
            masks: HashMap::new(),
            report: None,
            per_task: masks::PerTask::default(),
        }
    }

    /// The fraction of its weights task `ctx` frees again.
    fn fraction(&self, ctx: &TaskCtx) -> f64 {
        if self.keep_last && ctx.last {
            0.0
        } else if ctx.index == 0 {
            self.prune_first
        } else {
            self.prune
        }
    }

    /// Owner ids per weight (for tests and reports).
    pub fn owners(&self) -> BTreeMap<String, Vec<u8>> {
        self.owners.iter().map(|(k, o)| (k.clone(), o.ids.clone())).collect()
    }

    /// Keeps, per layer, the largest weights task `id` trained; frees and zeroes the rest.
    fn prune(&mut self, engine: &Engine, ctx: &TaskCtx) -> Result<(), TrainError> {
        let id = owner_id(ctx)?;
        let frac = self.fraction(ctx);
        for (name, own) in &mut self.owners {
            let var = engine
                .params()
                .get(name)
                .ok_or_else(|| TrainError::Invalid(format!("packnet: weight '{name}' is not trainable")))?;
            let mut w = masks::values(var.as_tensor()).map_err(candle("packnet pruning"))?;
            if w.len() != own.ids.len() {
                return Err(TrainError::Invalid(format!(
                    "packnet: weight '{name}' has {} values but {} owner ids",
                    w.len(),
                    own.ids.len()
                )));
            }
            let mut taken: Vec<usize> = (0..own.ids.len()).filter(|&i| own.ids.get(i) == Some(&0)).collect();
            let magnitude = |i: usize| w.get(i).map_or(0.0, |v| v.abs());
            taken.sort_by(|&a, &b| magnitude(a).total_cmp(&magnitude(b)).then(a.cmp(&b)));
            let freed = (frac * taken.len() as f64).round() as usize;
            for (rank, &i) in taken.iter().enumerate() {
                if rank < freed {
                    if let Some(v) = w.get_mut(i) {
                        *v = 0.0;
                    }
                } else if let Some(o) = own.ids.get_mut(i) {
                    *o = id;
                }
            }
            Tensor::from_vec(w, var.as_tensor().dims(), var.device())
                .and_then(|t| t.to_dtype(var.dtype()))
                .and_then(|t| var.set(&t))
                .map_err(candle("packnet pruning"))?;
        }
        self.pruned = true;
        Ok(())
    }

    fn layer_report(&self, id: u8) -> serde_json::Value {
        let layers: Vec<serde_json::Value> = self
            .owners
            .iter()
            .map(|(name, o)| {
                let owned: Vec<usize> = (1..=id).map(|t| o.ids.iter().filter(|&&v| v == t).count()).collect();
                let free = o.ids.iter().filter(|&&v| v == 0).count();
                serde_json::json!({ "weight": name, "params": o.ids.len(), "owned": owned, "free": free })
            })
            .collect();
        let total: usize = self.owners.values().map(|o| o.ids.len()).sum();
        let free: usize = self.owners.values().map(|o| o.ids.iter().filter(|&&v| v == 0).count()).sum();
        serde_json::json!({
            "method": "packnet",
            "masked_params": total,
            "free_params": free,
            "bits_per_weight_per_task": 8.0 / f64::from(id.max(1)),
            "layers": layers,
        })
    }
}

impl Hooks for PackNet {
    fn grad_masks(&self) -> &HashMap<String, Tensor> {
        &self.masks
    }
}

impl Method for PackNet {
    fn trainable(&self, name: &str, ctx: &TaskCtx) -> bool {
        let shared_trains = match self.shared {
            SharedParams::FirstTask => ctx.index == 0,
            SharedParams::Frozen => false,
            SharedParams::PerTask => true,
        };
        ctx.head_params.contains(name)
            || ctx.masked.contains(name)
            || (shared_trains && ctx.backbone_params.contains(name))
    }

    fn prepare_engine(&mut self, engine: &mut Engine, ctx: &TaskCtx) -> Result<(), TrainError> {
        if self.shared == SharedParams::PerTask {
            self.per_task.begin(engine, &masks::per_task_names(engine, ctx), ctx.index)?;
        }
        Ok(())
    }

    fn extra_epochs(&self, ctx: &TaskCtx) -> u64 {
        if self.fraction(ctx) > 0.0 {
            self.retrain_epochs
        } else {
            0
        }
    }

    fn lr_scale(&self, epoch: u64, ctx: &TaskCtx) -> f64 {
        if epoch >= ctx.epochs {
            self.retrain_lr_scale
        } else {
            1.0
        }
    }

    fn begin_task(
        &mut self,
        ctx: &TaskCtx,
        engine: &Engine,
        _record: &mut Recorder,
        _state: &Path,
    ) -> Result<(), TrainError> {
        owner_id(ctx)?;
        for name in ctx.masked {
            let var = engine
                .params()
                .get(name)
                .ok_or_else(|| TrainError::Invalid(format!("packnet: weight '{name}' is not trainable")))?;
            let shape = var.as_tensor().dims().to_vec();
            let own = self
                .owners
                .entry(name.clone())
                .or_insert_with(|| Owners { ids: vec![0; shape.iter().product()], shape: shape.clone() });
            if own.shape != shape {
                return Err(TrainError::Invalid(format!(
                    "packnet: weight '{name}' is {shape:?}, its owner ids {:?}",
                    own.shape
                )));
            }
            if !self.pruned && !own.ids.contains(&0) {
                return Err(TrainError::Invalid(format!(
                    "packnet: layer weight '{name}' has no free weights left for task '{}': all {} are owned by \
                     earlier tasks (lower packnet_prune or start a new pack)",
                    ctx.name,
                    own.ids.len()
                )));
            }
        }
        Ok(())
    }

    fn hooks(&mut self, epoch: u64, _lr: f64, engine: &Engine, ctx: &TaskCtx) -> Result<&mut dyn Hooks, TrainError> {
        if epoch >= ctx.epochs && !self.pruned {
            self.prune(engine, ctx)?;
        }
        // Before pruning the task trains the free weights; after, only those it kept.
        let target = if self.pruned { owner_id(ctx)? } else { 0 };
        self.masks.clear();
        for (name, own) in &self.owners {
            let Some(var) = engine.params().get(name) else { continue };
            let keep: Vec<bool> = own.ids.iter().map(|&v| v == target).collect();
            self.masks
                .insert(name.clone(), masks::mask_tensor(&keep, var.as_tensor()).map_err(candle("packnet mask"))?);
        }
        Ok(self)
    }

    fn end_task(&mut self, ctx: &TaskCtx, engine: &Engine, _x: &Tensor, _y: &[i64]) -> Result<(), TrainError> {
        if !self.pruned {
            self.prune(engine, ctx)?;
        }
        self.report = Some(self.layer_report(owner_id(ctx)?));
        if self.shared == SharedParams::PerTask {
            self.per_task.end(engine, ctx.index)?;
        }
        self.pruned = false;
        self.masks.clear();
        Ok(())
    }

    fn stored_masks(&self) -> Option<BTreeMap<String, StoredMask>> {
        let mut out = BTreeMap::new();
        for (name, o) in &self.owners {
            let a = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&o.shape), o.ids.clone()).ok()?;
            out.insert(name.clone(), StoredMask::Owners(a));
        }
        self.per_task.add_stored(&mut out).ok()?;
        (!out.is_empty()).then_some(out)
    }

    fn canonical(&self, model: Model) -> Result<Model, TrainError> {
        self.per_task.canonical(model)
    }

    fn task_report(&self) -> Option<serde_json::Value> {
        self.report.clone()
    }

    fn view(&self, model: &Model, column: Option<usize>) -> Result<Option<Model>, TrainError> {
        if self.owners.is_empty() {
            return Ok(None);
        }
        // The backbone's own head sees what the first task left.
        let id = u8::try_from(column.unwrap_or(0) + 1).map_err(invalid("packnet: a task past the 255 owner ids"))?;
        let m: BTreeMap<String, Vec<bool>> =
            self.owners.iter().map(|(k, o)| (k.clone(), o.ids.iter().map(|&v| v > 0 && v <= id).collect())).collect();
        let masked = masks::apply(model, &m)?;
        if self.per_task.is_empty() {
            return Ok(Some(masked));
        }
        self.per_task.apply(&masked, column).map(Some)
    }

    fn record(&self) -> Result<Record, TrainError> {
        let mut r = Record::default();
        for (k, o) in &self.owners {
            let a = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&o.shape), o.ids.clone())
                .map_err(invalid(format!("packnet owner ids of '{k}'")))?;
            r.insert(OWNER, k, Host::U8(a));
        }
        r.insert(PACKNET, PRUNED, Host::U8(ndarray::arr1(&[u8::from(self.pruned)]).into_dyn()));
        self.per_task.record_into(&mut r)?;
        Ok(r)
    }

    fn restore(&mut self, record: &Record) -> Result<(), TrainError> {
        self.per_task.restore(record)?;
        if record.table(OWNER).next().is_some() {
            self.owners.clear();
        }
        for (name, v) in record.table(OWNER) {
            let Host::U8(a) = v else {
                return Err(TrainError::Invalid(format!("packnet owner ids of '{name}' must be uint8")));
            };
            self.owners
                .insert(name.to_string(), Owners { shape: a.shape().to_vec(), ids: a.iter().copied().collect() });
        }
        if let Some(flag) = record.get(PACKNET, PRUNED) {
            self.pruned = matches!(flag, Host::U8(a) if a.iter().any(|&v| v == 1));
        }
        Ok(())
    }
}
