//! Checkpoints of the task in progress: after every epoch, and mid-epoch when the run is
//! interrupted (Ctrl-C). Files carry the epoch (and step) in their names and `progress.json`
//! (written last, atomically) names the complete set, so a run killed at any moment resumes
//! from the last checkpoint written; a failed write leaves the previous one in place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::engine::{from_candle, to_candle_on, Engine};
use crate::methods::Record;
use crate::store;
use crate::train::{candle, EpochPart, EpochStats, Optimizer, TrainError};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    pub task: String,
    pub epochs_done: u64,
    pub steps: u64,
    pub history: Vec<EpochStats>,
    pub train_seconds: f64,
    /// The part of epoch `epochs_done` run before an interrupt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial: Option<EpochPart>,
}

impl Progress {
    /// Names this checkpoint's files: the epoch, and the step for a mid-epoch one.
    fn tag(&self) -> String {
        match &self.partial {
            Some(p) => format!("e{}_s{}", self.epochs_done, p.steps),
            None => format!("e{}", self.epochs_done),
        }
    }
}

fn progress_file(dir: &Path) -> PathBuf {
    dir.join("progress.json")
}

fn weights_file(dir: &Path, tag: &str) -> PathBuf {
    dir.join(format!("weights_{tag}.safetensors"))
}

fn optim_file(dir: &Path, tag: &str) -> PathBuf {
    dir.join(format!("optimizer_{tag}.safetensors"))
}

use crate::train::invalid;

fn write_error(path: PathBuf) -> impl FnOnce(std::io::Error) -> TrainError {
    move |source| TrainError::Write { path, source }
}

/// Prefix of method state in the weights file (no graph initializer starts with it).
const METHOD: &str = "mtpack.method/";

pub fn save(
    dir: &Path,
    p: &Progress,
    engine: &Engine,
    opt: &Optimizer,
    method_state: &Record,
) -> Result<(), TrainError> {
    let mut weights = Vec::new();
    for (name, var) in engine.params() {
        weights.push((name.clone(), from_candle(var.as_tensor()).map_err(candle("checkpoint weights"))?));
    }
    weights.extend(method_state.flatten().into_iter().map(|(n, t)| (format!("{METHOD}{n}"), t)));
    let refs: Vec<(&str, &crate::tensor::Tensor)> = weights.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let tag = p.tag();
    store::save(&weights_file(dir, &tag), &refs, HashMap::new())?;
    let mut state = Vec::new();
    for (name, t) in opt.state() {
        state.push((name, from_candle(&t).map_err(candle("checkpoint optimizer"))?));
    }
    let refs: Vec<(&str, &crate::tensor::Tensor)> = state.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let meta = HashMap::from([("steps".to_string(), opt.steps.to_string())]);
    store::save(&optim_file(dir, &tag), &refs, meta)?;
    let text = serde_json::to_vec_pretty(p).map_err(invalid("the checkpoint's progress record"))?;
    let progress = progress_file(dir);
    crate::fsutil::write_atomic(&progress, &text).map_err(write_error(progress))?;
    // Earlier checkpoints are no longer referenced.
    let current = [weights_file(dir, &tag), optim_file(dir, &tag)];
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with("weights_e") || name.starts_with("optimizer_e");
        if ours && !current.contains(&e.path()) {
            let _ = std::fs::remove_file(e.path());
        }
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
    let text = std::fs::read(&file).map_err(invalid(format!("reading {}", file.display())))?;
    let p: Progress = serde_json::from_slice(&text).map_err(invalid(file.display().to_string()))?;
    if p.task != task {
        return Ok(None);
    }
    let tag = p.tag();
    let (weights, _) = store::load(&weights_file(dir, &tag))?;
    let dev = engine.device().clone();
    for (name, var) in engine.params() {
        let t =
            weights.get(name).ok_or_else(|| TrainError::Invalid(format!("checkpoint has no weights for '{name}'")))?;
        var.set(&to_candle_on(t, engine.float(), &dev).map_err(candle("restoring weights"))?)
            .map_err(candle("restoring weights"))?;
    }
    let method_state = weights.iter().filter_map(|(k, t)| k.strip_prefix(METHOD).map(|n| (n.to_string(), t.clone())));
    let weights_path = weights_file(dir, &tag);
    method.restore(&Record::from_flat(method_state, &weights_path.display())?)?;
    let (state, meta) = store::load(&optim_file(dir, &tag))?;
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
        std::fs::remove_file(e.path()).map_err(invalid(format!("removing {}", e.path().display())))?;
    }
    Ok(())
}
