//! The pack manifest (schemas/pack.schema.json).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::data::Preprocessing;
use crate::methods::MethodKind;
use crate::plan::Plan;
use crate::train::{EpochStats, Resolved};

pub const PACK_SCHEMA: &str = "mtpack.pack/1";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BackboneRecord {
    /// Where the backbone came from, as given.
    pub source: String,
    pub sha256: String,
    pub input: String,
    pub feature: String,
    pub feature_dim: usize,
    /// The backbone's own classifier, kept as task 0 and scored by agreement with the
    /// original model's predictions.
    pub own_head: Option<OwnHead>,
    /// Where the backbone was cut and how the cut tensor was pooled into `feature`, when the
    /// heads do not hang off the backbone's own feature tensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut: Option<CutRecord>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CutRecord {
    /// The tensor of the original backbone the heads attach to; what followed it is dropped.
    pub at: String,
    /// Its shape for one image (batch 1), as ONNX Runtime computed it.
    pub shape: Vec<usize>,
    pub pool: crate::graph::features::Pool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OwnHead {
    pub output: String,
    pub logits: String,
    pub classes: usize,
    pub params: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TaskRecord {
    pub name: String,
    pub dataset: String,
    pub dataset_sha256: String,
    /// Original labels kept, in the head's order (None: all).
    pub classes: Option<Vec<i64>>,
    pub labels: Vec<String>,
    pub preprocessing: Preprocessing,
    /// The pixel value the dataset stores for full intensity.
    pub pixel_max: f32,
    pub train_size: usize,
    pub test_size: usize,
    pub hyper: Resolved,
    /// Output of this task's head in model.onnx, and its initializers.
    pub logits: String,
    pub head_params: Vec<String>,
    pub epochs_done: u64,
    pub done: bool,
    pub history: Vec<EpochStats>,
    /// Held-out accuracy right after this task was learned.
    pub accuracy: Option<f64>,
    /// Seconds spent training this task (all epochs, across resumes).
    pub train_seconds: f64,
    /// What the method reports about the task (mask methods: each layer's capacity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method_report: Option<serde_json::Value>,
    /// The linear probe that fitted this task's head before it trained (LP-FT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linear_probe: Option<ProbeRecord>,
    /// How many BatchNorm layers had their running statistics recomputed after training
    /// (precise BN); absent when recalibration is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batchnorm_recalibrated: Option<usize>,
    /// The learning rate chosen on a validation split of the task's training data (`--tune`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tune: Option<TuneRecord>,
}

/// The learning rate `--tune` chose for a task, and the trials it chose from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuneRecord {
    /// Training images held out of each trial (a share of each class), scored by it.
    pub validation_size: usize,
    pub trials: Vec<TuneTrial>,
    pub chosen_lr: f64,
}

/// One trial: the task trained from the same start on the rest of its training data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuneTrial {
    pub lr: f64,
    /// Validation accuracy; `None` when the loss diverged.
    pub accuracy: Option<f64>,
    pub seconds: f64,
}

/// A head fitted alone on features of the frozen backbone: where a task's training starts,
/// and what the backbone gives without training (the bar `adapt` warns below).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbeRecord {
    pub epochs: u64,
    /// Held-out accuracy of the probed head on the frozen backbone.
    pub accuracy: f64,
    pub train_accuracy: f64,
    pub seconds: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Metrics {
    /// Mean of the last row of the accuracy matrix.
    pub average_accuracy: f64,
    /// Backward transfer: mean over tasks but the last of (final accuracy - accuracy right
    /// after learning it). Negative means forgetting.
    pub bwt: f64,
    /// Mean over tasks but the last of (best accuracy ever - final accuracy).
    pub forgetting: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub schema: String,
    pub mtpack_version: String,
    pub backbone: BackboneRecord,
    pub method: MethodKind,
    pub method_params: serde_json::Value,
    pub needs_old_data: bool,
    pub seed: u64,
    pub plan: Plan,
    pub plan_digest: String,
    pub tasks: Vec<TaskRecord>,
    /// Columns: "backbone" (its own head, if any) then the tasks in order.
    pub columns: Vec<String>,
    /// Rows: "initial" (before any task, when the backbone has its own head) then the tasks.
    pub rows: Vec<String>,
    /// Row i: accuracy on every column's held-out data after learning task i (null for a
    /// task not learned yet).
    pub accuracy_matrix: Vec<Vec<Option<f64>>>,
    pub metrics: Metrics,
    /// sha256 of every file of the pack, relative path -> digest.
    pub files: BTreeMap<String, String>,
}

impl Metrics {
    /// From an accuracy matrix whose row i was measured after task i.
    pub fn from_matrix(m: &[Vec<Option<f64>>]) -> Metrics {
        let Some(last) = m.last() else { return Metrics::default() };
        let finals: Vec<f64> = last.iter().flatten().copied().collect();
        let average_accuracy = finals.iter().sum::<f64>() / finals.len().max(1) as f64;
        let cols = last.len();
        let (mut bwt, mut forgetting, mut counted) = (0.0, 0.0, 0usize);
        // Column j is first learned at the first row where it has a value.
        for j in 0..cols {
            let Some(first_row) = m.iter().position(|r| r.get(j).copied().flatten().is_some()) else { continue };
            if first_row + 1 >= m.len() {
                continue;
            }
            let (Some(Some(at_learn)), Some(Some(fin))) = (m[first_row].get(j), last.get(j)) else { continue };
            let best = m.iter().filter_map(|r| r.get(j).copied().flatten()).fold(f64::MIN, f64::max);
            bwt += fin - at_learn;
            forgetting += best - fin;
            counted += 1;
        }
        let c = counted.max(1) as f64;
        Metrics { average_accuracy, bwt: bwt / c, forgetting: forgetting / c }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_of_a_small_matrix() {
        // Two tasks: A learned to 0.9, then drops to 0.6 when B is learned to 0.8.
        let m = vec![vec![Some(0.9), None], vec![Some(0.6), Some(0.8)]];
        let x = Metrics::from_matrix(&m);
        assert!((x.average_accuracy - 0.7).abs() < 1e-12);
        assert!((x.bwt + 0.3).abs() < 1e-12);
        assert!((x.forgetting - 0.3).abs() < 1e-12);
    }
}
