//! Linear probe, then fine-tune (LP-FT, Kumar et al., ICLR 2022): before a method trains the
//! backbone, the new head is fitted alone on features of the frozen backbone, computed once
//! through ONNX Runtime. Training then starts from a head that already separates the classes,
//! so the first gradients reaching the pretrained features are not a random head's. The
//! probe's held-out accuracy is also the bar the task should clear: a head on the frozen
//! backbone reaches it without training the backbone at all.

use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::time::Instant;

use candle_core::DType;

use super::task::Runner;
use super::AdaptError;
use crate::engine::{from_candle, to_candle_on, Engine};
use crate::graph::cut;
use crate::onnx::Model;
use crate::pack::manifest::ProbeRecord;
use crate::tensor::Tensor;
use crate::train::hyper::{DEFAULT_LR, DEFAULT_MOMENTUM};
use crate::train::{candle, eval, prefix, train_epoch, EpochEnd, EpochRun, NoHooks, OptimConfig, OptimKind, Optimizer};

/// The probed head: its parameters' values and how well it did.
pub struct Probe {
    pub head: Vec<(String, Tensor)>,
    pub record: ProbeRecord,
}

impl Runner<'_> {
    /// Fits task `t`'s head (`head_params`, read at `logits`) on the frozen backbone of
    /// `model` for `epochs` epochs of `batch`, as feature-extract would train it.
    pub(super) fn linear_probe(
        &self,
        model: &Model,
        t: usize,
        logits: &str,
        head_params: &BTreeSet<String>,
        epochs: u64,
        batch: usize,
    ) -> Result<Probe, AdaptError> {
        let started = Instant::now();
        let (input, feature) = (&self.backbone.record.input, &self.backbone.record.feature);
        let backbone_only = cut::prefix(model, feature)?;
        let d = &self.data[t];
        let train = prefix::features(&backbone_only, input, feature, &d.train_x, None, self.inference())?;
        let test = prefix::features(&backbone_only, input, feature, &d.test_x, None, self.inference())?;
        let suffix = cut::suffix(model, feature)?;
        let mut engine = Engine::new(&suffix, &|n| head_params.contains(n), DType::F32, self.device)
            .map_err(crate::train::TrainError::from)?;
        engine.set_kernels(self.plan.kernels);
        engine.set_precision(self.plan.precision);
        let x = to_candle_on(&train, DType::F32, self.device).map_err(candle("probe features"))?;
        let task = crate::train::Task { input: feature, logits, extra_outputs: &[], x: &x, y: &d.train_y };
        let config = OptimConfig {
            kind: OptimKind::Sgd { momentum: DEFAULT_MOMENTUM, nesterov: false },
            lr: DEFAULT_LR,
            weight_decay: 0.0,
        };
        let mut opt = Optimizer::new(config);
        let name = &self.plan.tasks[t].name;
        let mut train_accuracy = 0.0;
        for epoch in 0..epochs {
            let mut stop = |_: usize, _: usize, _: f64| {
                if crate::interrupt::requested() {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            };
            let run = EpochRun {
                epoch,
                batch,
                seed: self.plan.seed,
                lr: DEFAULT_LR,
                done: Default::default(),
                progress: &mut stop,
            };
            match train_epoch(&engine, std::slice::from_ref(&task), run, &mut opt, &mut NoHooks::default())? {
                EpochEnd::Complete(stats) => train_accuracy = stats.train_accuracy,
                EpochEnd::Stopped(_) => return Err(self.interrupted(name, 0, None)),
            }
        }
        let probed = engine.export(&suffix).map_err(crate::train::TrainError::from)?;
        let out = eval::run_batched_on(self.inference(), &probed, feature, logits, &test, eval::eval_batch(&test))?;
        let accuracy = eval::accuracy(&out, &d.test_y)?;
        let head = engine
            .params()
            .iter()
            .map(|(n, v)| Ok((n.clone(), from_candle(v.as_tensor()).map_err(candle("probed head"))?)))
            .collect::<Result<Vec<_>, crate::train::TrainError>>()?;
        let record = ProbeRecord { epochs, accuracy, train_accuracy, seconds: started.elapsed().as_secs_f64() };
        Ok(Probe { head, record })
    }
}

/// Sets the engine's parameters named in `head` to the probed values.
pub fn load_head(engine: &Engine, head: &[(String, Tensor)]) -> Result<(), AdaptError> {
    for (name, value) in head {
        let Some(var) = engine.params().get(name) else {
            return Err(AdaptError::Plan(format!("linear probe: the task's engine has no parameter '{name}'")));
        };
        let v = to_candle_on(value, var.dtype(), var.device()).map_err(candle("probed head"))?;
        var.set(&v).map_err(candle("probed head"))?;
    }
    Ok(())
}

/// The warning for a task that ended below its linear probe: training the backbone made the
/// task worse than not training it. `None` within a point of the probe. The suggestions leave
/// out what the run already does: BatchNorm on its recorded statistics (`batch_statistics`
/// false: frozen, or a method that keeps them), or recalibrated.
pub fn below_probe(
    task: &str,
    accuracy: f64,
    probe: &ProbeRecord,
    batch_statistics: bool,
    recalibrated: bool,
) -> Option<String> {
    let mut tries = vec!["--method feature-extract"];
    if batch_statistics {
        tries.push("--batchnorm frozen");
        if !recalibrated {
            tries.push("--bn-recalibrate on");
        }
    }
    tries.push("a lower --lr or more epochs");
    (accuracy + 0.01 < probe.accuracy).then(|| {
        format!(
            "warning: task '{task}' ended at {accuracy:.3} held-out accuracy, below the {:.3} that its head \
             alone reaches on the frozen backbone (the linear probe). With little data or a backbone these \
             defaults were not tuned on, try {}",
            probe.accuracy,
            tries.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_below_its_probe_is_warned_about_naming_the_flags_not_yet_set() {
        let probe = ProbeRecord { epochs: 10, accuracy: 0.65, train_accuracy: 0.9, seconds: 1.0 };
        let w = below_probe("flowers", 0.36, &probe, true, false).unwrap();
        assert!(w.contains("'flowers'") && w.contains("0.360") && w.contains("0.650"), "{w}");
        assert!(w.contains("--method feature-extract") && w.contains("--batchnorm frozen"), "{w}");
        assert!(w.contains("--bn-recalibrate on"), "{w}");
        let w = below_probe("flowers", 0.36, &probe, true, true).unwrap();
        assert!(!w.contains("--bn-recalibrate"), "{w}");
        let w = below_probe("flowers", 0.36, &probe, false, false).unwrap();
        assert!(!w.contains("--batchnorm frozen") && !w.contains("--bn-recalibrate") && w.contains("--lr"), "{w}");
        let at = |a| below_probe("flowers", a, &probe, true, false);
        assert_eq!(at(0.645), None, "within a point of the probe");
        assert_eq!(at(0.8), None);
    }
}
