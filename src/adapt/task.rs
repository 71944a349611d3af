//! Learning one task of the sequence: add its head, train epoch by epoch with checkpoints,
//! let the method finish, write the weights, and measure the accuracy matrix row.

use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::time::Instant;

use candle_core::{DType, Device, Tensor as CTensor};

use super::checkpoint::{self, Progress};
use super::{AdaptError, Backbone};
use crate::engine::{to_candle_on, Engine};
use crate::graph::cut;
use crate::graph::heads::{add_heads, LinearHead};
use crate::methods::{Inputs, Method, TaskCtx, Tasks, TrainingData};
use crate::onnx::Model;
use crate::pack::{Manifest, Metrics, Pack, TaskRecord};
use crate::plan::data::{head_rows, TaskData};
use crate::plan::Plan;
use crate::tensor::Tensor;
use crate::train::{
    candle, eval, prefix, train_epoch, train_epoch_mixed, EpochEnd, EpochRun, Optimizer, Task, TrainError,
};

/// How many held-out images of the first task the backbone's own head is scored on.
pub const AGREEMENT_IMAGES: usize = 500;

/// The inputs of the tasks an epoch trains on, in order, with their heads' logits.
struct TrainingInputs {
    members: Vec<usize>,
    xs: Vec<CTensor>,
    logits: Vec<String>,
}

impl TrainingInputs {
    /// The epoch's tasks; only the current task `t` asks for the method's extra outputs.
    fn tasks<'a>(&'a self, input: &'a str, t: usize, extra: &'a [String], data: &'a [TaskData]) -> Vec<Task<'a>> {
        self.members
            .iter()
            .zip(&self.xs)
            .zip(&self.logits)
            .map(|((&k, x), l)| Task {
                input,
                logits: l,
                extra_outputs: if k == t { extra } else { &[] },
                x,
                y: &data[k].train_y,
            })
            .collect()
    }
}

/// The names a task's context (`TaskCtx`) borrows.
struct TaskNames {
    name: String,
    input: String,
    logits: String,
    head_params: BTreeSet<String>,
    old_logits: Vec<String>,
    old_head_params: BTreeSet<String>,
}

/// What a task's epochs train: the engine on the inputs, with the task's settings.
#[derive(Clone, Copy)]
struct Training<'a> {
    ctx: &'a TaskCtx<'a>,
    engine: &'a Engine,
    inputs: &'a TrainingInputs,
    hyper: &'a crate::train::Resolved,
}

/// What one epoch runs with.
struct EpochDriver {
    epoch: u64,
    batch: usize,
    lr: f64,
    /// Several tasks' data mixed into each batch (`Tasks::AllSoFar`).
    mixed: bool,
    /// The progress bar's label: the task and the epoch.
    label: String,
}

pub struct Runner<'a> {
    pub pack: &'a Pack,
    pub plan: &'a Plan,
    pub backbone: &'a Backbone,
    pub data: &'a [TaskData],
    pub device: &'a Device,
    pub quiet: bool,
    /// The original backbone's predictions on the agreement images, when it has a head.
    pub agreement: Option<(Tensor, Vec<i64>)>,
    /// A `--tune` trial: only the task being learnt is scored (on its validation split);
    /// earlier tasks' held-out data is not read.
    pub trial: bool,
}

/// The original model's own-head predictions on the first task's held-out images.
pub fn agreement_reference(
    pack: &Pack,
    b: &Backbone,
    data: &[TaskData],
    how: eval::Inference,
) -> Result<Option<(Tensor, Vec<i64>)>, AdaptError> {
    let (Some(own), Some(first)) = (&b.record.own_head, data.first()) else { return Ok(None) };
    let x = head_rows(&first.test_x, AGREEMENT_IMAGES);
    let original = Model::load(&pack.backbone())?;
    let out = eval::run_batched_on(how, &original, &b.record.input, &own.output, &x, eval::eval_batch(&x))?;
    Ok(Some((x, eval::argmax_rows(&out)?)))
}

fn head_names(task: &str) -> (String, BTreeSet<String>) {
    let n = crate::graph::heads::HeadNames::of(task);
    (n.logits, [n.weight, n.bias].into_iter().collect())
}

impl Runner<'_> {
    fn progress_bar(&self, steps: usize, label: String) -> indicatif::ProgressBar {
        if self.quiet {
            return indicatif::ProgressBar::hidden();
        }
        let bar = indicatif::ProgressBar::with_draw_target(Some(steps as u64), indicatif::ProgressDrawTarget::stderr());
        let style = indicatif::ProgressStyle::with_template("{prefix} [{bar:28}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        bar.set_style(style.progress_chars("=> "));
        bar.set_prefix(label);
        bar
    }

    /// The working model with this task's head, added (and saved) if it is new, and the
    /// task's record in the manifest.
    pub(super) fn model_with_head(&self, t: usize, manifest: &mut Manifest) -> Result<Model, AdaptError> {
        let name = &self.plan.tasks[t].name;
        let mut model = Model::load(&self.pack.model())?;
        let (logits, params) = head_names(name);
        if !model.graph().output.iter().any(|o| o.name() == logits) {
            let classes = self.data[t].labels.len();
            let seed = self.plan.seed.wrapping_add(1000 + t as u64);
            let head = LinearHead::init(classes, self.backbone.record.feature_dim, seed);
            model = add_heads(&model, &self.backbone.record.feature, &[(name.clone(), head)], false)?;
            model.save(&self.pack.model())?;
        }
        if manifest.tasks.len() > t {
            return Ok(model);
        }
        let task = &self.plan.tasks[t];
        let hyper = self.plan.hyper_of(task).resolve(name).map_err(AdaptError::Plan)?;
        let d = &self.data[t];
        manifest.tasks.push(TaskRecord {
            name: name.clone(),
            dataset: task.dataset.display().to_string(),
            dataset_sha256: d.dataset_sha256.clone(),
            classes: task.classes.clone(),
            labels: d.labels.clone(),
            preprocessing: task.preprocessing.clone(),
            pixel_max: d.pixel_max,
            train_size: d.train_y.len(),
            test_size: d.test_y.len(),
            hyper,
            logits,
            head_params: params.into_iter().collect(),
            epochs_done: 0,
            done: false,
            history: Vec::new(),
            accuracy: None,
            train_seconds: 0.0,
            method_report: None,
            linear_probe: None,
            batchnorm_recalibrated: None,
            tune: None,
        });
        self.pack.save_manifest(manifest)?;
        Ok(model)
    }

    /// Learns task `t` (resuming its checkpoint if there is one) and records the results.
    pub fn learn(&self, t: usize, method: &mut dyn Method, manifest: &mut Manifest) -> Result<(), AdaptError> {
        let model = self.model_with_head(t, manifest)?;
        let data = self.plan.method.spec().data;
        let names = self.task_names(t, data);
        let hyper = manifest.tasks[t].hyper.clone();
        let ctx = self.ctx(t, &names, hyper.epochs);
        let fe = data.inputs == Inputs::FrozenFeatures;
        let graph_model = if fe { cut::suffix(&model, &self.backbone.record.feature)? } else { model.clone() };
        let mut engine = Engine::new(&graph_model, &|n| method.trainable(n, &ctx), DType::F32, self.device)
            .map_err(TrainError::from)?;
        engine.set_kernels(self.plan.kernels);
        engine.set_precision(self.plan.precision);
        method.prepare_engine(&mut engine, &ctx)?;
        let mut opt = Optimizer::new(hyper.optim);
        let restored = checkpoint::restore(&self.pack.checkpoint_dir(), &names.name, &engine, &mut opt, method)?;
        let fresh = restored.is_none();
        let mut progress = restored.unwrap_or_else(|| Progress { task: names.name.clone(), ..Default::default() });
        let inputs = self.training_inputs(&model, t, data)?;
        self.begin(t, &model, &ctx, &engine, method)?;
        if fresh && data.inputs == Inputs::Images {
            // After `begin_task`: the probe must see the network this task starts from
            // (per-task parameters reset, masks in place), not the pack's stored one.
            self.start_from_probe(t, &model, &engine, (&names.input, &inputs.xs), hyper.batch, manifest)?;
        }
        let training = Training { ctx: &ctx, engine: &engine, inputs: &inputs, hyper: &hyper };
        self.train_epochs(&training, &mut opt, &mut progress, method)?;
        if self.plan.bn_recalibrate == Some(true) && data.inputs == Inputs::Images {
            let layers =
                engine.recalibrate_batchnorm(&names.input, &inputs.xs, hyper.batch).map_err(TrainError::from)?;
            manifest.tasks[t].batchnorm_recalibrated = Some(layers);
        }
        let x_end = inputs.xs.last().cloned().ok_or_else(|| AdaptError::Plan("no training data".into()))?;
        method.end_task(&ctx, &engine, &x_end, &self.data[t].train_y)?;
        self.finish(t, &model, &engine, method, progress, manifest)
    }

    /// The names task `t`'s context borrows: the graph input its training data feeds (the
    /// feature tensor when the method trains on frozen features), its head and earlier ones.
    fn task_names(&self, t: usize, data: TrainingData) -> TaskNames {
        let name = self.plan.tasks[t].name.clone();
        let (logits, head_params) = head_names(&name);
        let (old_logits, old_head_params) = self.old_heads(t);
        let record = &self.backbone.record;
        let input = if data.inputs == Inputs::FrozenFeatures { &record.feature } else { &record.input };
        TaskNames { name, input: input.clone(), logits, head_params, old_logits, old_head_params }
    }

    fn ctx<'n>(&'n self, t: usize, names: &'n TaskNames, epochs: u64) -> TaskCtx<'n> {
        TaskCtx {
            index: t,
            input: &names.input,
            name: &names.name,
            logits: &names.logits,
            head_params: &names.head_params,
            backbone_params: &self.backbone.shared,
            masked: &self.backbone.masked,
            epochs,
            last: t + 1 == self.plan.tasks.len(),
            old_logits: &names.old_logits,
            old_head_params: &names.old_head_params,
            seed: self.plan.seed,
        }
    }

    /// Lets the method start task `t`, with ONNX Runtime at hand to record the current
    /// model's outputs on the task's training images (LwF's targets).
    fn begin(
        &self,
        t: usize,
        model: &Model,
        ctx: &TaskCtx,
        engine: &Engine,
        method: &mut dyn Method,
    ) -> Result<(), AdaptError> {
        let train_x = &self.data[t].train_x;
        let mut record = |names: &[String]| -> Result<Vec<CTensor>, TrainError> {
            names
                .iter()
                .map(|n| {
                    let input = &self.backbone.record.input;
                    let out =
                        eval::run_batched_on(self.inference(), model, input, n, train_x, eval::eval_batch(train_x))?;
                    to_candle_on(&out, DType::F32, self.device).map_err(candle("recorded outputs"))
                })
                .collect()
        };
        method.begin_task(ctx, engine, &mut record, &self.pack.state_dir())?;
        Ok(())
    }

    /// The task's epochs from where `progress` stands (with BatchNorm in the plan's mode),
    /// each checkpointed; a signal stops the run between epochs as well as within one.
    fn train_epochs(
        &self,
        training: &Training,
        opt: &mut Optimizer,
        progress: &mut Progress,
        method: &mut dyn Method,
    ) -> Result<(), AdaptError> {
        let Training { ctx, engine, inputs, hyper } = *training;
        engine.set_training(self.plan.batchnorm_mode() == crate::plan::BatchNormMode::Batch);
        let epochs = hyper.epochs + method.extra_epochs(ctx);
        let extra = method.extra_outputs(ctx);
        for epoch in progress.epochs_done..epochs {
            let lr = hyper.schedule.lr_at(hyper.optim.lr, epoch) * method.lr_scale(epoch, ctx);
            let tasks = inputs.tasks(ctx.input, ctx.index, &extra, self.data);
            let started = Instant::now();
            let hooks = method.hooks(epoch, lr, engine, ctx)?;
            let label = format!("{} epoch {}/{epochs}", ctx.name, epoch + 1);
            let run = EpochDriver { epoch, batch: hyper.batch, lr, mixed: inputs.members.len() > 1, label };
            let end = self.run_epoch(engine, &tasks, run, opt, hooks, progress)?;
            progress.train_seconds += started.elapsed().as_secs_f64();
            progress.steps = opt.steps;
            self.end_epoch(epoch, end, progress, engine, opt, method)?;
            if crate::interrupt::requested() && epoch + 1 < epochs {
                return Err(self.interrupted(ctx.name, epoch + 1, None));
            }
        }
        engine.set_training(false);
        Ok(())
    }

    /// Fits task `t`'s new head alone on the frozen backbone (when the plan asks for a linear
    /// probe) and starts the engine from it; the probe is recorded in the manifest.
    ///
    /// The probe runs the engine's starting network in evaluation mode, while training
    /// normalises with each batch's statistics: so BatchNorm that trains that way is first
    /// recalibrated on `train` (input name, tensors), or the head would be fitted to features
    /// normalised with another dataset's (or, after per-task parameters are reset, another
    /// network's) statistics.
    fn start_from_probe(
        &self,
        t: usize,
        model: &Model,
        engine: &Engine,
        train: (&str, &[CTensor]),
        batch: usize,
        manifest: &mut Manifest,
    ) -> Result<(), AdaptError> {
        let epochs = self.plan.linear_probe_epochs.unwrap_or(0);
        if epochs == 0 {
            return Ok(());
        }
        // Frozen statistics are the recorded ones in training too: nothing to match, and
        // recalibrating would replace them (a BatchNorm whose scale trains keeps its running
        // statistics as engine state in either mode).
        if self.plan.trains_batch_statistics() {
            engine.recalibrate_batchnorm(train.0, train.1, batch).map_err(TrainError::from)?;
        }
        let start = engine.export(model).map_err(TrainError::from)?;
        let name = &self.plan.tasks[t].name;
        let (logits, head_params) = head_names(name);
        let probe = self.linear_probe(&start, t, &logits, &head_params, epochs, batch)?;
        super::probe::load_head(engine, &probe.head)?;
        if !self.quiet {
            let p = &probe.record;
            eprintln!(
                "{name}: linear probe on the frozen backbone, {epochs} epochs in {:.1}s: held-out accuracy {:.4}",
                p.seconds, p.accuracy
            );
        }
        manifest.tasks[t].linear_probe = Some(probe.record);
        self.pack.save_manifest(manifest)?;
        Ok(())
    }

    /// The logits and parameters of every head before task `t`'s: the backbone's own, if
    /// any, then the earlier tasks'.
    fn old_heads(&self, t: usize) -> (Vec<String>, BTreeSet<String>) {
        let own = self.backbone.record.own_head.as_ref();
        let mut logits: Vec<String> = own.map(|h| h.logits.clone()).into_iter().collect();
        let mut params: BTreeSet<String> = own.map(|h| h.params.iter().cloned().collect()).unwrap_or_default();
        for prev in &self.plan.tasks[..t] {
            let (l, p) = head_names(&prev.name);
            logits.push(l);
            params.extend(p);
        }
        (logits, params)
    }

    /// What the engine trains on for task `t`, as the method's `TrainingData` says: its
    /// images or the frozen backbone's features, of the task or of every task so far.
    fn training_inputs(&self, model: &Model, t: usize, data: TrainingData) -> Result<TrainingInputs, AdaptError> {
        let members: Vec<usize> = match data.tasks {
            Tasks::AllSoFar => (0..=t).collect(),
            Tasks::Current => vec![t],
        };
        let mut xs = Vec::new();
        for &k in &members {
            // The images are borrowed, not cloned: each copy of a task's images (295 MB for
            // 6000 at 3x64x64) cost most of a second in fresh pages here.
            let host = if data.inputs == Inputs::FrozenFeatures {
                std::borrow::Cow::Owned(self.features(model, k)?)
            } else {
                std::borrow::Cow::Borrowed(&self.data[k].train_x)
            };
            xs.push(to_candle_on(&host, DType::F32, self.device).map_err(candle("training inputs"))?);
        }
        let logits = members.iter().map(|&k| head_names(&self.plan.tasks[k].name).0).collect();
        Ok(TrainingInputs { members, xs, logits })
    }

    /// One epoch (or what is left of it after a resume) with a progress bar; Ctrl-C stops it
    /// after the current step.
    fn run_epoch(
        &self,
        engine: &Engine,
        tasks: &[Task],
        run: EpochDriver,
        opt: &mut Optimizer,
        hooks: &mut dyn crate::train::Hooks,
        progress: &mut Progress,
    ) -> Result<EpochEnd, AdaptError> {
        let examples: usize = tasks.iter().map(|task| task.y.len()).sum();
        let bar = self.progress_bar(examples.div_ceil(run.batch), run.label);
        let done = progress.partial.take().unwrap_or_default();
        bar.set_position(done.steps as u64);
        let mut on_step = |s: usize, _: usize, l: f64| {
            bar.set_position(s as u64);
            bar.set_message(format!("loss {l:.4}"));
            if crate::interrupt::requested() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        let epoch_run = EpochRun {
            epoch: run.epoch,
            batch: run.batch,
            seed: self.plan.seed,
            lr: run.lr,
            done,
            progress: &mut on_step,
        };
        // Every task so far in each batch (see train::mixed).
        let train = if run.mixed { train_epoch_mixed } else { train_epoch };
        let end = train(engine, tasks, epoch_run, opt, hooks)?;
        match &end {
            EpochEnd::Complete(stats) => {
                let summary = format!("loss {:.4}, {:.1} images/s", stats.loss, stats.images_per_second);
                // Progress bars draw only on a terminal; logs get one line per epoch.
                if !self.quiet && !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                    eprintln!("{}: {summary}", bar.prefix());
                }
                bar.finish_with_message(summary);
            }
            EpochEnd::Stopped(_) => bar.abandon(),
        }
        Ok(end)
    }

    /// Records a finished epoch and checkpoints it; a stopped one is checkpointed mid-epoch
    /// and ends the run as interrupted.
    fn end_epoch(
        &self,
        epoch: u64,
        end: EpochEnd,
        progress: &mut Progress,
        engine: &Engine,
        opt: &Optimizer,
        method: &dyn Method,
    ) -> Result<(), AdaptError> {
        let ckpt = self.pack.checkpoint_dir();
        match end {
            EpochEnd::Complete(stats) => {
                progress.epochs_done = epoch + 1;
                progress.history.push(stats);
                checkpoint::save(&ckpt, progress, engine, opt, &method.record()?)?;
                Ok(())
            }
            EpochEnd::Stopped(part) => {
                let step = part.steps;
                progress.partial = Some(part);
                checkpoint::save(&ckpt, progress, engine, opt, &method.record()?)?;
                Err(self.interrupted(&progress.task, epoch, Some(step)))
            }
        }
    }

    /// The error that ends a run stopped by a signal, after its checkpoint is written.
    pub(super) fn interrupted(&self, task: &str, epoch: u64, step: Option<usize>) -> AdaptError {
        AdaptError::Interrupted { pack: self.pack.dir.clone(), task: task.to_string(), epoch, step }
    }

    /// What runs the frozen prefix, recorded outputs and evaluation (see `eval::Inference`).
    pub(super) fn inference(&self) -> eval::Inference<'_> {
        eval::Inference::beside_training(self.device, self.plan.kernels)
    }

    /// Frozen-backbone features of task `k`'s training images, cached in the pack.
    fn features(&self, model: &Model, k: usize) -> Result<Tensor, AdaptError> {
        let cache = self.pack.state_dir().join(format!("features_{}.safetensors", self.plan.tasks[k].name));
        let backbone_only = cut::prefix(model, &self.backbone.record.feature)?;
        Ok(prefix::features(
            &backbone_only,
            &self.backbone.record.input,
            &self.backbone.record.feature,
            &self.data[k].train_x,
            Some(&cache),
            self.inference(),
        )?)
    }

    fn finish(
        &self,
        t: usize,
        model: &Model,
        engine: &Engine,
        method: &mut dyn Method,
        progress: Progress,
        manifest: &mut Manifest,
    ) -> Result<(), AdaptError> {
        let trained = method.canonical(engine.export(model).map_err(TrainError::from)?)?;
        trained.save(&self.pack.model())?;
        let name = &self.plan.tasks[t].name;
        let state_dir = self.pack.state_dir().join(format!("after_{name}"));
        std::fs::create_dir_all(&state_dir)
            .map_err(|source| crate::pack::PackError::Write { path: state_dir.clone(), source })?;
        if let Some(f) = method.record()?.save(&state_dir)? {
            manifest.files.insert(format!("state/after_{name}/{f}"), String::new());
        }
        let row = self.evaluate(&trained, t, manifest, method)?;
        if let Some(report) = method.task_report() {
            if !self.quiet {
                eprint!("{}", super::report::method_text(name, &report));
            }
            manifest.tasks[t].method_report = Some(report);
        }
        let rec = &mut manifest.tasks[t];
        rec.accuracy = row.get(manifest.columns.iter().position(|c| c == name).unwrap_or(0)).copied().flatten();
        if let (Some(accuracy), Some(probe), false) = (rec.accuracy, &rec.linear_probe, self.trial) {
            if let Some(warning) = super::probe::below_probe(
                name,
                accuracy,
                probe,
                self.plan.trains_batch_statistics(),
                rec.batchnorm_recalibrated.is_some(),
            ) {
                eprintln!("{warning}");
            }
        }
        rec.epochs_done = progress.epochs_done;
        rec.history = progress.history;
        rec.train_seconds = progress.train_seconds;
        rec.done = true;
        manifest.rows.push(name.clone());
        manifest.accuracy_matrix.push(row);
        manifest.metrics = Metrics::from_matrix(&manifest.accuracy_matrix);
        self.pack.save_manifest(manifest)?;
        checkpoint::clear(&self.pack.checkpoint_dir())?;
        Ok(())
    }

    /// Accuracy on every column's held-out data after task `t` (ONNX Runtime; the engine on
    /// a GPU).
    fn evaluate(
        &self,
        model: &Model,
        t: usize,
        manifest: &Manifest,
        method: &dyn Method,
    ) -> Result<Vec<Option<f64>>, AdaptError> {
        let mut row = vec![None; manifest.columns.len()];
        let input = &self.backbone.record.input;
        let col = usize::from(self.backbone.record.own_head.is_some());
        if let (Some(own), Some((x, reference))) = (&self.backbone.record.own_head, &self.agreement) {
            let view = method.view(model, None)?;
            let viewed = view.as_ref().unwrap_or(model);
            let out = eval::run_batched_on(self.inference(), viewed, input, &own.output, x, eval::eval_batch(x))?;
            row[0] = Some(eval::accuracy(&out, reference)?);
        }
        let first = if self.trial { t } else { 0 };
        for (k, task) in self.plan.tasks.iter().enumerate().take(t + 1).skip(first) {
            let (logits, _) = head_names(&task.name);
            let view = method.view(model, Some(k))?;
            let out = eval::run_batched_on(
                self.inference(),
                view.as_ref().unwrap_or(model),
                input,
                &logits,
                &self.data[k].test_x,
                eval::eval_batch(&self.data[k].test_x),
            )?;
            if let Some(slot) = row.get_mut(col + k) {
                *slot = Some(eval::accuracy(&out, &self.data[k].test_y)?);
            }
        }
        Ok(row)
    }
}
