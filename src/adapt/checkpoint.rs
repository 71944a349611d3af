//! Per-epoch checkpoints of the task in progress. Files carry the epoch in their names and
//! `progress.json` (written last, atomically) names the complete set, so a run killed at
//! any moment resumes from the last finished epoch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::engine::{from_candle, to_candle_on, Engine};
use crate::store;
use crate::train::{candle, EpochStats, Optimizer, TrainError};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    pub task: String,
    pub epochs_done: u64,
    pub steps: u64,
    pub history: Vec<EpochStats>,
    pub train_seconds: f64,
}

fn progress_file(dir: &Path) -> PathBuf {
    dir.join("progress.json")
}

fn weights_file(dir: &Path, epoch: u64) -> PathBuf {
    dir.join(format!("weights_e{epoch}.safetensors"))
}

fn optim_file(dir: &Path, epoch: u64) -> PathBuf {
    dir.join(format!("optimizer_e{epoch}.safetensors"))
}

fn invalid(e: impl std::fmt::Display) -> TrainError {
    TrainError::Invalid(format!("{e:#}"))
}

/// Prefix of method state in the weights file (no graph initializer starts with it).
const METHOD: &str = "mtpack.method/";

pub fn save(
    dir: &Path,
    p: &Progress,
    engine: &Engine,
    opt: &Optimizer,
    method_state: &[(String, crate::tensor::Tensor)],
) -> Result<(), TrainError> {
    let mut weights = Vec::new();
    for (name, var) in engine.params() {
        weights.push((name.clone(), from_candle(var.as_tensor()).map_err(candle("checkpoint weights"))?));
    }
    weights.extend(method_state.iter().map(|(n, t)| (format!("{METHOD}{n}"), t.clone())));
    let refs: Vec<(&str, &crate::tensor::Tensor)> = weights.iter().map(|(n, t)| (n.as_str(), t)).collect();
    store::save(&weights_file(dir, p.epochs_done), &refs, HashMap::new()).map_err(invalid)?;
    let mut state = Vec::new();
    for (name, t) in opt.state() {
        state.push((name, from_candle(&t).map_err(candle("checkpoint optimizer"))?));
    }
    let refs: Vec<(&str, &crate::tensor::Tensor)> = state.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let meta = HashMap::from([("steps".to_string(), opt.steps.to_string())]);
    store::save(&optim_file(dir, p.epochs_done), &refs, meta).map_err(invalid)?;
    let text = serde_json::to_vec_pretty(p).map_err(invalid)?;
    crate::fsutil::write_atomic(&progress_file(dir), &text).map_err(invalid)?;
    // Older epochs are no longer referenced.
    for e in 0..p.epochs_done {
        let _ = std::fs::remove_file(weights_file(dir, e));
        let _ = std::fs::remove_file(optim_file(dir, e));
    }
    Ok(())
}

/// Restores the checkpoint of `task` into the engine, optimizer and method, if there is one.
pub fn restore(
    dir: &Path,
    task: &str,
    engine: &Engine,
    opt: &mut Optimizer,
    method: &mut dyn crate::methods::Method,
) -> Result<Option<Progress>, TrainError> {
    let file = progress_file(dir);
    if !file.is_file() {
        return Ok(None);
    }
    let text = std::fs::read(&file).map_err(invalid)?;
    let p: Progress = serde_json::from_slice(&text).map_err(|e| invalid(format!("{}: {e}", file.display())))?;
    if p.task != task {
        return Ok(None);
    }
    let (weights, _) = store::load(&weights_file(dir, p.epochs_done)).map_err(invalid)?;
    let dev = engine.device().clone();
    for (name, var) in engine.params() {
        let t = weights.get(name).ok_or_else(|| invalid(format!("checkpoint has no weights for '{name}'")))?;
        var.set(&to_candle_on(t, engine.float(), &dev).map_err(candle("restoring weights"))?)
            .map_err(candle("restoring weights"))?;
    }
    let method_state: HashMap<String, crate::tensor::Tensor> =
        weights.iter().filter_map(|(k, t)| k.strip_prefix(METHOD).map(|n| (n.to_string(), t.clone()))).collect();
    method.restore_checkpoint_state(&method_state)?;
    let (state, meta) = store::load(&optim_file(dir, p.epochs_done)).map_err(invalid)?;
    let steps = meta.get("steps").and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut restored = Vec::new();
    for (name, t) in state {
        restored.push((name, to_candle_on(&t, DType::F32, &dev).map_err(candle("restoring the optimizer"))?));
    }
    opt.load_state(restored, steps);
    Ok(Some(p))
}

/// Removes every checkpoint file once a task is complete.
pub fn clear(dir: &Path) -> Result<(), TrainError> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Ok(()) };
    for e in rd.flatten() {
        std::fs::remove_file(e.path()).map_err(invalid)?;
    }
    Ok(())
}
