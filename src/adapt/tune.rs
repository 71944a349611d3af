//! `--tune`: each task's learning rate chosen on its own data, as FACIL's continual
//! hyperparameter selection does (Masana et al., TPAMI 2022): a share of each class of the
//! task's training data is held out, the task is trained from the same start (the pack as it
//! stands, the method's state after the previous task) at a few learning rates on the rest,
//! each trial is scored on the held-out share, and the best rate then trains the task on all
//! of its data. Earlier tasks' data is never scored, and read only by a method that trains
//! on it anyway (joint), so the choice costs no privacy the method did not already give up;
//! the task's own held-out test split is never seen.

use std::path::Path;
use std::time::Instant;

use super::task::Runner;
use super::AdaptError;
use crate::methods::{MethodParams, Record};
use crate::pack::manifest::{TuneRecord, TuneTrial};
use crate::pack::{Manifest, Pack, PackError};
use crate::plan::data::TaskData;
use crate::rng::Rng;
use crate::train::TrainError;

/// The learning rates tried for a task whose own is `lr`: its own first, so that a tie keeps
/// it, then a tenth of it and ten times it (divided and multiplied, so that 0.01 gives 0.001
/// and 0.1 exactly as written).
pub fn candidates(lr: f64) -> [f64; 3] {
    [lr, lr / 10.0, lr * 10.0]
}

/// The share of each class held out to score the trials.
pub const VALIDATION_FRACTION: f64 = 0.2;

/// Splits `d`'s training data into (train, validation), `VALIDATION_FRACTION` of each class
/// (at least one image of every class with two or more) held out, drawn with `seed`. The
/// validation share becomes the returned task's held-out split.
pub fn split(d: &TaskData, seed: u64) -> Result<(TaskData, usize), String> {
    let mut by_class: std::collections::BTreeMap<i64, Vec<usize>> = Default::default();
    for (i, &y) in d.train_y.iter().enumerate() {
        by_class.entry(y).or_default().push(i);
    }
    let mut rng = Rng::new(seed ^ 0x7475_6e65);
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for rows in by_class.values_mut() {
        rng.shuffle(rows);
        let n = if rows.len() < 2 { 0 } else { ((rows.len() as f64 * VALIDATION_FRACTION).round() as usize).max(1) };
        val.extend_from_slice(&rows[..n]);
        train.extend_from_slice(&rows[n..]);
    }
    if val.is_empty() {
        return Err("--tune: the task has too few training images to hold any out".into());
    }
    train.sort_unstable();
    val.sort_unstable();
    let pick = |rows: &[usize]| rows.iter().map(|&i| d.train_y.get(i).copied().unwrap_or_default()).collect();
    let out = TaskData {
        train_x: d.train_x.select_rows(&train)?,
        train_y: pick(&train),
        test_x: d.train_x.select_rows(&val)?,
        test_y: pick(&val),
        test_raw: d.train_x.select_rows(&val)?,
        ..d.clone()
    };
    Ok((out, val.len()))
}

/// The trial with the highest validation accuracy, the earliest of equals; `None` when every
/// trial diverged.
pub fn best(trials: &[TuneTrial]) -> Option<&TuneTrial> {
    trials.iter().filter(|r| r.accuracy.is_some()).fold(None, |best, r| match best {
        Some(b) if b.accuracy >= r.accuracy => Some(b),
        _ => Some(r),
    })
}

impl Runner<'_> {
    /// Tries each learning rate on task `t` (not yet started) and returns the record of the
    /// choice. `params` are the method's parameters for the backbone; `done` the last finished
    /// task, whose state each trial starts from.
    pub(super) fn tune(
        &self,
        t: usize,
        params: &MethodParams,
        manifest: &Manifest,
        done: Option<&str>,
    ) -> Result<TuneRecord, AdaptError> {
        let task = &self.plan.tasks[t];
        let base = self.plan.hyper_of(task).resolve(&task.name).map_err(AdaptError::Plan)?.optim.lr;
        let (held, validation_size) = split(&self.data[t], self.plan.seed).map_err(AdaptError::Plan)?;
        // Tasks after `t` play no part in a trial; earlier ones only as the method reads them.
        let mut data = self.data[..t].to_vec();
        data.push(held);
        let mut trials = Vec::new();
        for lr in candidates(base) {
            let started = Instant::now();
            let accuracy = self.trial(t, lr, &data, params, manifest, done)?;
            let trial = TuneTrial { lr, accuracy, seconds: started.elapsed().as_secs_f64() };
            if !self.quiet {
                let score = accuracy.map_or("diverged".to_string(), |a| format!("{a:.4}"));
                eprintln!("{}: --tune lr {lr}: validation accuracy {score} in {:.1}s", task.name, trial.seconds);
            }
            trials.push(trial);
        }
        let Some(best) = best(&trials) else {
            return Err(AdaptError::Plan(format!(
                "task '{}': --tune: the loss diverged at every learning rate tried ({})",
                task.name,
                trials.iter().map(|r| format!("{}", r.lr)).collect::<Vec<_>>().join(", ")
            )));
        };
        Ok(TuneRecord { validation_size, chosen_lr: best.lr, trials })
    }

    /// One trial in a scratch pack under the pack's state folder, removed afterwards: the
    /// validation accuracy, or `None` when the loss diverged.
    fn trial(
        &self,
        t: usize,
        lr: f64,
        data: &[TaskData],
        params: &MethodParams,
        manifest: &Manifest,
        done: Option<&str>,
    ) -> Result<Option<f64>, AdaptError> {
        let name = &self.plan.tasks[t].name;
        let dir = self.pack.state_dir().join("tune").join(format!("{name}-lr{lr}"));
        remove(&dir)?;
        let scratch = Pack::new(&dir);
        scratch.create_dirs()?;
        for (from, to) in [(self.pack.model(), scratch.model()), (self.pack.backbone(), scratch.backbone())] {
            std::fs::copy(&from, &to).map_err(|source| PackError::Write { path: to.clone(), source })?;
        }
        // The method's state after each earlier task (its record names files there).
        copy_tree(&self.pack.state_dir(), &scratch.state_dir(), "tune")?;
        let mut method = self.plan.method.create(params).map_err(AdaptError::Plan)?;
        if let Some(last) = done {
            method.restore(&Record::load(&self.pack.state_dir().join(format!("after_{last}")))?)?;
        }
        let mut plan = self.plan.clone();
        plan.tasks[t].hyper.lr = Some(lr);
        let mut m = manifest.clone();
        m.tasks.truncate(t);
        let runner = Runner { pack: &scratch, plan: &plan, data, quiet: true, agreement: None, trial: true, ..*self };
        let outcome = match runner.learn(t, method.as_mut(), &mut m) {
            Ok(()) => Ok(m.tasks.get(t).and_then(|r| r.accuracy)),
            Err(AdaptError::Train(TrainError::Diverged { .. } | TrainError::WeightsDiverged { .. })) => Ok(None),
            Err(AdaptError::Interrupted { .. }) => Err(self.interrupted(name, 0, None)),
            Err(e) => Err(e),
        };
        remove(&dir)?;
        outcome
    }
}

/// Copies the folder `from` into `to` (created), all but its entry named `skip`.
fn copy_tree(from: &Path, to: &Path, skip: &str) -> Result<(), AdaptError> {
    fn write(path: &Path) -> impl FnOnce(std::io::Error) -> PackError + '_ {
        move |source| PackError::Write { path: path.to_path_buf(), source }
    }
    std::fs::create_dir_all(to).map_err(write(to))?;
    for entry in std::fs::read_dir(from).map_err(write(from))? {
        let entry = entry.map_err(write(from))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_name() == skip {
            continue;
        }
        if entry.file_type().map_err(write(&src))?.is_dir() {
            copy_tree(&src, &dst, "")?;
        } else {
            std::fs::copy(&src, &dst).map_err(write(&dst))?;
        }
    }
    Ok(())
}

fn remove(dir: &Path) -> Result<(), AdaptError> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(PackError::Write { path: dir.to_path_buf(), source: e }.into())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Tensor;

    fn task(labels: &[i64]) -> TaskData {
        let n = labels.len();
        let x = Tensor::F32(ndarray::ArrayD::from_shape_fn(vec![n, 2], |i| i[0] as f32));
        TaskData {
            labels: vec!["a".into(), "b".into(), "c".into()],
            pixel_max: 1.0,
            dataset_sha256: String::new(),
            train_x: x.clone(),
            train_y: labels.to_vec(),
            test_x: x.clone(),
            test_y: labels.to_vec(),
            test_raw: x,
        }
    }

    #[test]
    fn the_best_trial_is_the_most_accurate_the_first_of_equals_and_never_a_diverged_one() {
        let trial = |lr, accuracy| TuneTrial { lr, accuracy, seconds: 0.0 };
        let trials = [trial(0.01, Some(0.5)), trial(0.001, Some(0.7)), trial(0.1, None), trial(0.003, Some(0.7))];
        assert_eq!(best(&trials).map(|t| t.lr), Some(0.001));
        assert_eq!(best(&[trial(0.01, Some(0.5)), trial(0.1, Some(0.5))]).map(|t| t.lr), Some(0.01));
        assert_eq!(best(&[trial(0.1, None)]), None);
    }

    #[test]
    fn the_validation_share_is_drawn_from_every_class_and_nothing_is_both() {
        let labels: Vec<i64> = (0..50).map(|i| i % 2).chain([2, 2]).collect();
        let (d, n) = split(&task(&labels), 7).unwrap();
        assert_eq!(n, d.test_y.len());
        assert_eq!(d.train_y.len() + d.test_y.len(), labels.len());
        for c in 0..3 {
            assert!(d.test_y.contains(&c) && d.train_y.contains(&c), "class {c} on both sides");
        }
        // Rows are the images' own: the first feature is the row index of the original.
        let rows = |x: &Tensor| x.as_f32().unwrap().outer_iter().map(|r| r[0] as usize).collect::<Vec<_>>();
        let (train, val) = (rows(&d.train_x), rows(&d.test_x));
        assert!(train.iter().all(|r| !val.contains(r)));
        assert!(val.iter().zip(&d.test_y).all(|(&r, &y)| labels[r] == y), "labels follow their images");
        assert_eq!(split(&task(&labels), 7).unwrap().0.test_y, d.test_y, "the same seed draws the same share");
        assert!(split(&task(&[0, 1, 2]), 7).is_err(), "one image per class: nothing to hold out");
    }
}
