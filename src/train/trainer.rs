//! One epoch of mini-batch training of an [`Engine`], with the hooks methods plug into.

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::time::Instant;

use candle_core::{Tensor, Var};

use super::loss::{correct, cross_entropy};
use super::{candle, epoch_batches, Optimizer, TrainError};
use crate::engine::Engine;

/// What a batch exposes to hooks.
pub struct BatchCtx<'a> {
    /// Which of the epoch's tasks the batch comes from.
    pub task: usize,
    /// Indices of the batch's examples in the training set.
    pub indices: &'a [usize],
    /// The engine's outputs for the batch, by name.
    pub outputs: &'a HashMap<String, Tensor>,
    pub params: &'a BTreeMap<String, Var>,
}

/// How a method shapes training beyond plain cross-entropy.
pub trait Hooks {
    /// Extra loss terms (a penalty, a distillation term) added to the task loss.
    fn extra_loss(&self, _ctx: &BatchCtx) -> candle_core::Result<Option<Tensor>> {
        Ok(None)
    }

    /// Per-parameter masks applied to gradients and updates (1 = trainable, 0 = frozen).
    fn grad_masks(&self) -> &HashMap<String, Tensor>;

    /// Per-parameter factors on the learning rate (e.g. a mask's own rate).
    fn lr_scales(&self) -> Option<&HashMap<String, f64>> {
        None
    }

    /// Called after every optimizer step (e.g. to reset pruned weights to zero).
    fn after_step(&mut self, _params: &BTreeMap<String, Var>) -> candle_core::Result<()> {
        Ok(())
    }
}

/// Plain training.
#[derive(Default)]
pub struct NoHooks {
    masks: HashMap<String, Tensor>,
}

impl Hooks for NoHooks {
    fn grad_masks(&self) -> &HashMap<String, Tensor> {
        &self.masks
    }
}

/// The data of one task as the engine sees it.
pub struct Task<'a> {
    /// Graph input fed with `x`.
    pub input: &'a str,
    /// Graph output holding the task's logits.
    pub logits: &'a str,
    /// Further outputs hooks need (e.g. old heads for distillation).
    pub extra_outputs: &'a [String],
    /// Training inputs [N, ...] on the engine's device and dtype.
    pub x: &'a Tensor,
    pub y: &'a [i64],
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochStats {
    pub epoch: u64,
    /// Training examples seen this epoch (all tasks together for joint training).
    pub examples: usize,
    pub loss: f64,
    pub train_accuracy: f64,
    pub images_per_second: f64,
    pub lr: f64,
}

/// What has been done of an epoch so far: the sums its statistics are made of. An epoch
/// stopped part-way (an interrupt) is checkpointed with this and resumed from `steps`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochPart {
    pub steps: usize,
    pub examples: usize,
    pub loss_sum: f64,
    pub right: usize,
    pub seconds: f64,
}

impl EpochPart {
    fn add_step(&mut self, examples: usize, loss: f64, right: usize) {
        self.steps += 1;
        self.examples += examples;
        self.loss_sum += loss * examples as f64;
        self.right += right;
    }

    pub fn stats(&self, epoch: u64, lr: f64) -> EpochStats {
        let n = self.examples.max(1) as f64;
        EpochStats {
            epoch,
            examples: self.examples,
            loss: self.loss_sum / n,
            train_accuracy: self.right as f64 / n,
            images_per_second: self.examples as f64 / self.seconds.max(1e-9),
            lr,
        }
    }
}

/// How one epoch runs.
pub struct EpochRun<'a> {
    pub epoch: u64,
    pub batch: usize,
    pub seed: u64,
    pub lr: f64,
    /// What an earlier, interrupted process did of this epoch: its steps are skipped (the
    /// batch order is a function of seed and epoch) and its sums carried on.
    pub done: EpochPart,
    /// Told (step, steps, loss) after every step; `Break` stops the epoch after that step.
    pub progress: &'a mut dyn FnMut(usize, usize, f64) -> ControlFlow<()>,
}

/// How an epoch ended.
#[derive(Debug)]
pub enum EpochEnd {
    Complete(EpochStats),
    /// Stopped by the progress callback; the part done so far.
    Stopped(EpochPart),
}

impl EpochRun<'_> {
    /// Runs `step` for each batch of `order` not yet done, accumulating; `step` returns the
    /// batch's (examples, loss, right).
    pub(crate) fn drive<B>(
        self,
        order: &[B],
        mut step: impl FnMut(usize, &B) -> Result<(usize, f64, usize), TrainError>,
    ) -> Result<EpochEnd, TrainError> {
        let started = Instant::now();
        // The steps allocate and free the same large activations every step: keep them.
        let _keep = crate::alloc::keep_large_blocks();
        let EpochRun { epoch, lr, done: mut part, progress, .. } = self;
        let base = part.seconds;
        for (i, b) in order.iter().enumerate().skip(part.steps) {
            let (examples, loss, right) = step(i, b)?;
            part.add_step(examples, loss, right);
            part.seconds = base + started.elapsed().as_secs_f64();
            let flow = progress(i + 1, order.len(), loss);
            if flow.is_break() && part.steps < order.len() {
                return Ok(EpochEnd::Stopped(part));
            }
        }
        Ok(EpochEnd::Complete(part.stats(epoch, lr)))
    }
}

/// Trains one epoch over one task, or over several with their batches interleaved
/// evenly (joint training).
pub fn train_epoch(
    engine: &Engine,
    tasks: &[Task],
    run: EpochRun,
    opt: &mut Optimizer,
    hooks: &mut dyn Hooks,
) -> Result<EpochEnd, TrainError> {
    let (epoch, lr) = (run.epoch, run.lr);
    let per_task: Vec<Vec<Vec<usize>>> = tasks
        .iter()
        .enumerate()
        .map(|(k, t)| epoch_batches(t.y.len(), run.batch, run.seed.wrapping_add(k as u64), epoch))
        .collect();
    // Each task's batches are spread evenly over the epoch (batch j of B at (j + 0.5) / B),
    // so a small task is not crowded into the first steps: running BatchNorm statistics and
    // the last updates then see every task in proportion.
    let mut keyed: Vec<(f64, usize, &Vec<usize>)> = per_task
        .iter()
        .enumerate()
        .flat_map(|(k, bs)| bs.iter().enumerate().map(move |(j, idx)| ((j as f64 + 0.5) / bs.len() as f64, k, idx)))
        .collect();
    keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let order: Vec<(usize, &Vec<usize>)> = keyed.into_iter().map(|(_, k, idx)| (k, idx)).collect();
    let dev = engine.device().clone();
    let end = run.drive(&order, |step, (k, idx)| {
        let Some(task) = tasks.get(*k) else { return Ok((0, 0.0, 0)) };
        let mut wanted: Vec<&str> = vec![task.logits];
        wanted.extend(task.extra_outputs.iter().map(String::as_str));
        let ids =
            Tensor::new(idx.iter().map(|&i| i as u32).collect::<Vec<u32>>(), &dev).map_err(candle("batch indices"))?;
        let xb = task.x.index_select(&ids, 0).map_err(candle("selecting a batch"))?;
        let yb: Vec<i64> = idx.iter().filter_map(|&i| task.y.get(i).copied()).collect();
        let yt = Tensor::new(yb.as_slice(), &dev).map_err(candle("batch labels"))?;
        let outs = engine.forward_to(&[(task.input, xb)], &wanted)?;
        let outputs: HashMap<String, Tensor> = wanted.iter().map(|s| s.to_string()).zip(outs).collect();
        let logits =
            outputs.get(task.logits).ok_or_else(|| TrainError::Invalid(format!("no output '{}'", task.logits)))?;
        let mut loss = cross_entropy(logits, &yt).map_err(candle("cross-entropy"))?;
        let ctx = BatchCtx { task: *k, indices: idx, outputs: &outputs, params: engine.params() };
        if let Some(extra) = hooks.extra_loss(&ctx).map_err(candle("method loss"))? {
            loss = (loss + extra).map_err(candle("adding the method loss"))?;
        }
        let right = correct(logits, &yb).map_err(candle("accuracy"))?;
        let value = optimise(engine, &loss, lr, opt, hooks, (epoch, step))?;
        Ok((idx.len(), value, right))
    })?;
    if matches!(end, EpochEnd::Complete(_)) {
        check_finite(engine, epoch)?;
    }
    Ok(end)
}

/// An error naming the first weight that holds NaN or infinity. Summed in f64, where no sum
/// of finite f32 values overflows, so the sum is finite exactly when every value is; one
/// pass over the weights an epoch.
fn check_finite(engine: &Engine, epoch: u64) -> Result<(), TrainError> {
    for (name, v) in engine.params() {
        let sum = v
            .as_tensor()
            .to_dtype(candle_core::DType::F64)
            .and_then(|t| t.sum_all())
            .and_then(|t| t.to_scalar::<f64>())
            .map_err(candle("checking the weights"))?;
        if !sum.is_finite() {
            return Err(TrainError::WeightsDiverged { weight: name.clone(), epoch });
        }
    }
    Ok(())
}

/// Backward pass, optimizer step and after-step hook for one batch's `loss`; returns its
/// value, or an error if it is not finite.
pub(crate) fn optimise(
    engine: &Engine,
    loss: &Tensor,
    lr: f64,
    opt: &mut Optimizer,
    hooks: &mut dyn Hooks,
    (epoch, step): (u64, usize),
) -> Result<f64, TrainError> {
    let value: f64 =
        loss.to_dtype(candle_core::DType::F64).and_then(|l| l.to_scalar()).map_err(candle("reading the loss"))?;
    if !value.is_finite() {
        return Err(TrainError::Diverged { value, epoch, step });
    }
    let grads = loss.backward().map_err(candle("backward pass"))?;
    opt.step_scaled(engine.params(), &grads, lr, hooks.grad_masks(), hooks.lr_scales())
        .map_err(candle("optimizer step"))?;
    hooks.after_step(engine.params()).map_err(candle("after-step hook"))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    #[test]
    fn a_non_finite_weight_is_named() {
        let w = crate::tensor::Tensor::F32(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[3, 2]), 0.5));
        let engine = Engine::new(&crate::onnx::build::matmul(&w), &|n| n == "W", DType::F32, &Device::Cpu).unwrap();
        check_finite(&engine, 0).unwrap();
        for bad in [f32::NAN, f32::INFINITY] {
            let values = Tensor::new(&[[0.5f32, 0.5], [bad, 0.5], [0.5, 0.5]], &Device::Cpu).unwrap();
            engine.params().get("W").unwrap().set(&values).unwrap();
            let e = check_finite(&engine, 3).unwrap_err().to_string();
            assert!(e.contains("weight 'W'") && e.contains("epoch 3"), "{e}");
        }
    }
}
