//! Piggyback (Mallya, Davis & Lazebnik, arXiv 1801.06519).
//!
//! The backbone never changes. Each task learns, per masked weight (Conv/Gemm/MatMul of the
//! shared backbone), a real-valued score; the task sees W * (score > threshold). The
//! comparison has no gradient, so the scores get the gradient of the binary mask straight
//! through (the mask is written `bin + (s - detach(s))`, whose value is exactly `bin`). After
//! the task only the binary mask is kept, packed one bit per weight.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::masks;

mod straight_through;
use super::{positive, Method, Record, SharedParams, Spec, TaskCtx, TrainingData};
use crate::engine::Engine;
use crate::graph::masks::StoredMask;
use crate::onnx::Model;
use crate::tensor::Tensor as Host;
use crate::train::{candle, Hooks, TrainError};

/// Piggyback's parameters (flags and `[params]` keys keep the method's prefix).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[group(skip)]
pub struct Params {
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

pub const PIGGYBACK_INIT: f64 = 1e-2;
pub const PIGGYBACK_THRESHOLD: f64 = 5e-3;
pub const PIGGYBACK_MASK_LR: f64 = 1e-4;
pub const PIGGYBACK_HEAD_LR: f64 = 1e-2;

impl Params {
    pub fn validate(&self) -> Result<(), String> {
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
}

/// Piggyback trains its masks and head with Adam (the paper's); it keeps the paper's frozen
/// BatchNorm, which measured better than per-task copies on the real sequence.
pub const SPEC: Spec = Spec {
    masked: true,
    keeps_recorded_batchnorm: |p| keeps_backbone_batchnorm(&p.piggyback),
    hyper_defaults: || crate::train::Hyper {
        optimizer: Some(crate::train::OptimizerName::Adamw),
        lr: Some(PIGGYBACK_HEAD_LR),
        ..Default::default()
    },
    effective: |p| effective(&p.piggyback),
    ..Spec::plain(TrainingData::IMAGES, |p| Box::new(Piggyback::new(&p.piggyback)))
};

/// The record tables: each task's packed mask bits per weight, and the weight's shape.
const BITS: &str = "bits";
const SHAPE: &str = "shape";

/// Whether Piggyback, with `p`, leaves the backbone's BatchNorm as recorded (the paper's
/// default): then nothing in the network trains with batch statistics.
fn keeps_backbone_batchnorm(p: &Params) -> bool {
    p.piggyback_shared.unwrap_or(SharedParams::Frozen) == SharedParams::Frozen
}

fn effective(p: &Params) -> serde_json::Value {
    serde_json::json!({
        "init": p.piggyback_init.unwrap_or(PIGGYBACK_INIT),
        "threshold": p.piggyback_threshold.unwrap_or(PIGGYBACK_THRESHOLD),
        "mask_lr": p.piggyback_mask_lr.unwrap_or(PIGGYBACK_MASK_LR),
        "shared": p.piggyback_shared.unwrap_or(SharedParams::Frozen),
        "masked": "weights of Conv, ConvTranspose, Gemm and MatMul in the shared backbone; heads are not masked",
        "estimator": "straight-through: d(loss)/d(score) = d(loss)/d(W_masked) * W",
        "storage": "1 bit per masked weight per task, packed little-endian (weight i is bit i%8 of byte i/8)",
    })
}

pub const SCORES: &str = "piggyback.scores/";

/// The name under which the engine trains the scores of `weight`.
pub fn score_name(weight: &str) -> String {
    format!("{SCORES}{weight}")
}

#[derive(Clone, Debug)]
struct MaskBits {
    shape: Vec<usize>,
    /// One packed row per task.
    rows: Vec<Vec<u8>>,
}

pub struct Piggyback {
    init: f64,
    threshold: f64,
    mask_lr: f64,
    bits: BTreeMap<String, MaskBits>,
    scores: BTreeMap<String, Var>,
    no_masks: HashMap<String, Tensor>,
    scales: HashMap<String, f64>,
    report: Option<serde_json::Value>,
    shared: SharedParams,
    per_task: masks::PerTask,
}

impl Piggyback {
    pub fn new(p: &Params) -> Piggyback {
        Piggyback {
            init: p.piggyback_init.unwrap_or(PIGGYBACK_INIT),
            threshold: p.piggyback_threshold.unwrap_or(PIGGYBACK_THRESHOLD),
            mask_lr: p.piggyback_mask_lr.unwrap_or(PIGGYBACK_MASK_LR),
            bits: BTreeMap::new(),
            scores: BTreeMap::new(),
            no_masks: HashMap::new(),
            scales: HashMap::new(),
            report: None,
            shared: p.piggyback_shared.unwrap_or(SharedParams::Frozen),
            per_task: masks::PerTask::default(),
        }
    }

    /// Task `k`'s binary mask of each weight.
    fn task_masks(&self, k: usize) -> Result<BTreeMap<String, Vec<bool>>, TrainError> {
        self.bits
            .iter()
            .map(|(name, b)| {
                let row = b.rows.get(k).ok_or_else(|| {
                    TrainError::Invalid(format!("piggyback: no mask of task {} for weight '{name}'", k + 1))
                })?;
                Ok((name.clone(), masks::unpack_bits(row, b.shape.iter().product())?))
            })
            .collect()
    }
}

impl Hooks for Piggyback {
    fn grad_masks(&self) -> &HashMap<String, Tensor> {
        &self.no_masks
    }

    fn lr_scales(&self) -> Option<&HashMap<String, f64>> {
        Some(&self.scales)
    }
}

impl Method for Piggyback {
    fn trainable(&self, name: &str, ctx: &TaskCtx) -> bool {
        let own_shared = self.shared == SharedParams::PerTask && !ctx.masked.contains(name);
        ctx.head_params.contains(name) || (own_shared && ctx.backbone_params.contains(name))
    }

    fn prepare_engine(&mut self, engine: &mut Engine, ctx: &TaskCtx) -> Result<(), TrainError> {
        self.scores.clear();
        let threshold = self.threshold;
        for name in ctx.masked {
            let w = engine
                .effective(name)
                .ok_or_else(|| TrainError::Invalid(format!("piggyback: no weight '{name}' in the graph")))?
                .map_err(candle("piggyback"))?;
            let s = Tensor::full(self.init, w.dims(), w.device())
                .and_then(|t| t.to_dtype(w.dtype()))
                .and_then(|t| Var::from_tensor(&t))
                .map_err(candle("piggyback scores"))?;
            engine.add_param(&score_name(name), s.clone());
            let scores = s.clone();
            engine.set_reparam(
                name,
                Arc::new(move |w: &Tensor| straight_through::masked(w, scores.as_tensor(), threshold)),
            )?;
            self.scores.insert(name.clone(), s);
        }
        if self.shared == SharedParams::PerTask {
            self.per_task.begin(engine, &masks::per_task_names(engine, ctx), ctx.index)?;
        }
        Ok(())
    }

    fn hooks(&mut self, _epoch: u64, lr: f64, _engine: &Engine, _ctx: &TaskCtx) -> Result<&mut dyn Hooks, TrainError> {
        let scale = self.mask_lr / lr;
        self.scales = self.scores.keys().map(|w| (score_name(w), scale)).collect();
        Ok(self)
    }

    fn end_task(&mut self, ctx: &TaskCtx, engine: &Engine, _x: &Tensor, _y: &[i64]) -> Result<(), TrainError> {
        let mut layers = Vec::new();
        for (name, s) in &self.scores {
            let keep: Vec<bool> = masks::values(s.as_tensor())
                .map_err(candle("piggyback masks"))?
                .iter()
                .map(|&v| f64::from(v) > self.threshold)
                .collect();
            let kept = keep.iter().filter(|&&k| k).count();
            layers.push(serde_json::json!({ "weight": name, "params": keep.len(), "kept": kept }));
            let b = self
                .bits
                .entry(name.clone())
                .or_insert_with(|| MaskBits { shape: s.as_tensor().dims().to_vec(), rows: Vec::new() });
            // A rerun of a task replaces its row.
            b.rows.truncate(ctx.index);
            if b.rows.len() != ctx.index {
                return Err(TrainError::Invalid(format!(
                    "piggyback: weight '{name}' has masks of {} tasks before task {}",
                    b.rows.len(),
                    ctx.index + 1
                )));
            }
            b.rows.push(masks::pack_bits(&keep));
        }
        let total: usize = self.bits.values().map(|b| b.shape.iter().product::<usize>()).sum();
        let kept: usize = layers.iter().filter_map(|l| l["kept"].as_u64()).sum::<u64>() as usize;
        self.report = Some(serde_json::json!({
            "method": "piggyback",
            "masked_params": total,
            "kept_fraction": kept as f64 / total.max(1) as f64,
            "bits_per_weight_per_task": 1.0,
            "layers": layers,
        }));
        self.scores.clear();
        if self.shared == SharedParams::PerTask {
            self.per_task.end(engine, ctx.index)?;
        }
        Ok(())
    }

    fn stored_masks(&self) -> Option<BTreeMap<String, StoredMask>> {
        let mut out = BTreeMap::new();
        for (name, b) in &self.bits {
            let width = b.shape.iter().product::<usize>().div_ceil(8);
            let flat: Vec<u8> = b.rows.iter().flatten().copied().collect();
            let rows = ndarray::Array2::from_shape_vec((b.rows.len(), width), flat).ok()?;
            out.insert(name.clone(), StoredMask::Bits { rows, len: b.shape.iter().product() });
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
        // The backbone's own head sees the backbone itself.
        let masked = match column {
            Some(k) if !self.bits.is_empty() => Some(masks::apply(model, &self.task_masks(k)?)?),
            _ => None,
        };
        if self.per_task.is_empty() {
            return Ok(masked);
        }
        self.per_task.apply(masked.as_ref().unwrap_or(model), column).map(Some)
    }

    fn record(&self) -> Result<Record, TrainError> {
        let mut r = Record::default();
        for (name, b) in &self.bits {
            let width = b.shape.iter().product::<usize>().div_ceil(8);
            let flat: Vec<u8> = b.rows.iter().flatten().copied().collect();
            let rows = ndarray::Array2::from_shape_vec((b.rows.len(), width), flat)
                .map_err(masks::invalid(format!("piggyback masks of '{name}'")))?;
            r.insert(BITS, name, Host::U8(rows.into_dyn()));
            let shape: Vec<i64> = b.shape.iter().map(|&d| d as i64).collect();
            r.insert(SHAPE, name, Host::I64(ndarray::arr1(&shape).into_dyn()));
        }
        self.per_task.record_into(&mut r)?;
        Ok(r)
    }

    fn restore(&mut self, record: &Record) -> Result<(), TrainError> {
        self.per_task.restore(record)?;
        if record.table(BITS).next().is_some() {
            self.bits.clear();
        }
        for (name, v) in record.table(BITS) {
            let (Host::U8(bits), Some(Host::I64(shape))) = (v, record.get(SHAPE, name)) else {
                return Err(TrainError::Invalid(format!("piggyback: masks of '{name}' are malformed")));
            };
            let shape = shape
                .iter()
                .map(|&d| usize::try_from(d).map_err(masks::invalid(format!("piggyback mask shape of '{name}'"))))
                .collect::<Result<Vec<usize>, TrainError>>()?;
            let width = shape.iter().product::<usize>().div_ceil(8);
            if bits.ndim() != 2 || bits.shape().get(1) != Some(&width) {
                return Err(TrainError::Invalid(format!(
                    "piggyback: masks of '{name}' are {:?}, expected [tasks, {width}]",
                    bits.shape()
                )));
            }
            let rows = bits.rows().into_iter().map(|r| r.iter().copied().collect()).collect();
            self.bits.insert(name.to_string(), MaskBits { shape, rows });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use candle_core::{DType, Device};

    use super::*;

    /// y = x @ W with W [3, 2].
    fn matmul() -> Model {
        crate::onnx::build::matmul(&Host::F32(ndarray::arr2(&[[1.0f32, -2.0], [0.5, 3.0], [-1.5, 0.25]]).into_dyn()))
    }

    #[test]
    fn masks_pass_gradients_straight_through_and_binarise_exactly() {
        let m = matmul();
        let mut engine = Engine::new(&m, &|_| false, DType::F32, &Device::Cpu).unwrap();
        let masked: BTreeSet<String> = ["W".to_string()].into();
        let empty = BTreeSet::new();
        let ctx = TaskCtx::single(&masked, &empty, 0);
        let mut pb = Piggyback::new(&Params::default());
        pb.prepare_engine(&mut engine, &ctx).unwrap();
        let scores = engine.params().get(&score_name("W")).unwrap().clone();
        // Two scores below the threshold drop their weights.
        let s = Tensor::new(&[[0.01f32, 0.001], [0.02, 0.01], [0.004, 0.01]], &Device::Cpu).unwrap();
        scores.set(&s).unwrap();
        let x = Tensor::new(&[[1.0f32, 2.0, 3.0]], &Device::Cpu).unwrap();
        let y = engine.forward(&[("x", x)]).unwrap().remove(0);
        // W * mask = [[1, 0], [0.5, 3], [0, 0.25]]; y = [1 + 1 + 0, 0 + 6 + 0.75]
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![2.0, 6.75]]);
        let c = Tensor::new(&[[1.0f32, -1.0]], &Device::Cpu).unwrap();
        let grads = y.mul(&c).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(scores.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        // dL/dW_eff[i][j] = x[i] * c[j]; straight through: dL/ds = dL/dW_eff * W.
        let w = [[1.0f32, -2.0], [0.5, 3.0], [-1.5, 0.25]];
        for i in 0..3 {
            for j in 0..2 {
                let want = [1.0f32, 2.0, 3.0][i] * [1.0f32, -1.0][j] * w[i][j];
                assert_eq!(g[i][j], want, "({i}, {j})");
            }
        }
        // The binary mask is what the task keeps.
        pb.end_task(&ctx, &engine, &Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(), &[]).unwrap();
        let kept = pb.task_masks(0).unwrap();
        assert_eq!(kept["W"], vec![true, false, true, true, false, true]);
    }
}
