//! Joint training with mixed batches: every batch draws from all tasks at once, runs the
//! shared backbone once, and scores each example with its own task's head. BatchNorm then
//! sees the mixture of all tasks in every batch, the same statistics its running averages
//! (used at evaluation) converge to; batches of one task each would train every head under
//! statistics it never meets at evaluation.

use std::collections::HashMap;

use candle_core::Tensor;

use super::loss::{correct, cross_entropy};
use super::trainer::optimise;
use super::{candle, epoch_batches, EpochEnd, EpochRun, Hooks, Optimizer, Task, TrainError};
use crate::engine::Engine;

/// One epoch over the union of `tasks` (which must share their input), shuffled together.
pub fn train_epoch_mixed(
    engine: &Engine,
    tasks: &[Task],
    run: EpochRun,
    opt: &mut Optimizer,
    hooks: &mut dyn Hooks,
) -> Result<EpochEnd, TrainError> {
    let input = tasks.first().map(|t| t.input).ok_or_else(|| TrainError::Invalid("no tasks to train".into()))?;
    if tasks.iter().any(|t| t.input != input) {
        return Err(TrainError::Invalid("mixed batches need every task to feed the same input".into()));
    }
    // Global example g belongs to the task whose range holds it.
    let owner: Vec<(usize, usize)> =
        tasks.iter().enumerate().flat_map(|(k, t)| (0..t.y.len()).map(move |i| (k, i))).collect();
    let (epoch, lr) = (run.epoch, run.lr);
    let order = epoch_batches(owner.len(), run.batch, run.seed, epoch);
    let logits: Vec<&str> = tasks.iter().map(|t| t.logits).collect();
    let dev = engine.device().clone();
    run.drive(&order, |step, idx| {
        let groups = by_task(idx, &owner, tasks.len());
        let xb = gather(tasks, &groups, &dev)?;
        let outs = engine.forward_to(&[(input, xb)], &logits)?;
        let outputs: HashMap<String, Tensor> = logits.iter().map(|s| s.to_string()).zip(outs.clone()).collect();
        let (mut loss, right) = mixed_loss(tasks, &groups, &outs, idx.len())?;
        let ctx = super::BatchCtx { task: 0, indices: idx, outputs: &outputs, params: engine.params() };
        if let Some(extra) = hooks.extra_loss(&ctx).map_err(candle("method loss"))? {
            loss = (loss + extra).map_err(candle("adding the method loss"))?;
        }
        let value = optimise(engine, &loss, lr, opt, hooks, (epoch, step))?;
        Ok((idx.len(), value, right))
    })
}

/// The batch's examples `idx` grouped by task, as indices into each task's data.
fn by_task(idx: &[usize], owner: &[(usize, usize)], tasks: usize) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = vec![Vec::new(); tasks];
    for &g in idx {
        if let Some(&(k, i)) = owner.get(g) {
            if let Some(v) = groups.get_mut(k) {
                v.push(i);
            }
        }
    }
    groups
}

/// The batch's inputs, task by task in `groups` order.
fn gather(tasks: &[Task], groups: &[Vec<usize>], dev: &candle_core::Device) -> Result<Tensor, TrainError> {
    let mut parts = Vec::new();
    for (t, rows) in tasks.iter().zip(groups).filter(|(_, r)| !r.is_empty()) {
        let ids =
            Tensor::new(rows.iter().map(|&i| i as u32).collect::<Vec<u32>>(), dev).map_err(candle("batch indices"))?;
        parts.push(t.x.index_select(&ids, 0).map_err(candle("selecting a batch"))?);
    }
    Tensor::cat(&parts, 0).map_err(candle("mixing a batch"))
}

/// The batch's loss (each example scored by its own task's head, `outs` in task order) and
/// how many examples its head got right.
fn mixed_loss(
    tasks: &[Task],
    groups: &[Vec<usize>],
    outs: &[Tensor],
    batch: usize,
) -> Result<(Tensor, usize), TrainError> {
    let mut total: Option<Tensor> = None;
    let mut right = 0;
    let mut offset = 0;
    for ((t, rows), out) in tasks.iter().zip(groups).zip(outs) {
        if rows.is_empty() {
            continue;
        }
        let mine = out.narrow(0, offset, rows.len()).map_err(candle("a task's rows"))?;
        offset += rows.len();
        let yb: Vec<i64> = rows.iter().filter_map(|&i| t.y.get(i).copied()).collect();
        let yt = Tensor::new(yb.as_slice(), mine.device()).map_err(candle("batch labels"))?;
        right += correct(&mine, &yb).map_err(candle("accuracy"))?;
        // Each task's mean, weighted by its share of the batch: the batch mean overall.
        let part = cross_entropy(&mine, &yt)
            .and_then(|l| l.affine(rows.len() as f64 / batch.max(1) as f64, 0.0))
            .map_err(candle("cross-entropy"))?;
        total = Some(match total {
            Some(acc) => (acc + part).map_err(candle("adding task losses"))?,
            None => part,
        });
    }
    Ok((total.ok_or_else(|| TrainError::Invalid("an empty batch".into()))?, right))
}
