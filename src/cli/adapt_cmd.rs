//! `mtpack adapt`: the plan from flags or a file, learned into a pack.

use std::path::PathBuf;

use anyhow::Context;

use super::{print_json, Outcome};
use crate::adapt::{self, report, Options};
use crate::engine::kernels::{Kernels, Precision};
use crate::methods::{MethodKind, MethodParams};
use crate::plan::{self, BatchNormMode, Plan, TaskPlan};
use crate::runtime::device::DeviceChoice;
use crate::train::Hyper;

/// Train tasks onto a backbone, one after another, into a pack directory.
///
/// Without a backbone and tasks it runs the built-in default: the committed tiny backbone
/// (its own digit head is kept as task 0) learning the bundled UCI digits as two tasks,
/// 0-4 then 5-9. A killed run resumes from its last checkpoint when rerun with the same
/// command (Ctrl-C writes one mid-epoch and exits 130); `--resume PACK --task ...` adds
/// tasks to an existing pack. One process writes a pack at a time (see --wait).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The ONNX backbone (default: fixtures/tiny/tiny_digits.onnx).
    pub backbone: Option<PathBuf>,
    /// A task as NAME=DATASET[:key=value...]; keys: epochs, batch, optimizer, lr, momentum,
    /// weight_decay, lr_step, lr_gamma, classes (e.g. 0,1,2), labels, test_fraction, train_per_class,
    /// resize (HxW), channels, mean, std, layout (nchw|nhwc). Repeat for a sequence, in order.
    #[arg(long = "task", value_parser = plan::parse_task)]
    pub tasks: Vec<TaskPlan>,
    /// A TOML plan file (schema: schemas/plan.schema.json) instead of the flags below.
    #[arg(long, conflicts_with_all = ["backbone", "tasks", "method"])]
    pub plan: Option<PathBuf>,
    /// The adaptation method.
    #[arg(long, value_enum)]
    pub method: Option<MethodKind>,
    /// Pack directory to write (created, or resumed when it holds the same plan).
    #[arg(long, short, required_unless_present = "resume")]
    pub output: Option<PathBuf>,
    /// Add the --task entries to this existing pack, keeping its method and settings.
    #[arg(long, conflicts_with_all = ["output", "plan", "backbone"])]
    pub resume: Option<PathBuf>,
    #[command(flatten)]
    pub hyper: Hyper,
    /// Seed of head initialisation, shuffling and splits.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where training runs; cuda needs a CUDA build and never falls back to the CPU.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Which op implementations train: mtpack's CPU kernels (native), or candle's portable
    /// ops, the ones a GPU runs; portable on the CPU checks a GPU run's computation.
    #[arg(long, value_enum, default_value = "native")]
    pub kernels: Kernels,
    /// Of the linear layers' matrix products while training (a transformer's MatMuls): f32,
    /// or bf16 operands with f32 sums on AMX tiles (Intel Xeon 4th generation and later).
    /// Convolutions, normalisation, activations, weights and evaluation stay f32.
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: Precision,
    /// BatchNormalization while the backbone trains: batch statistics with running
    /// averages updated (batch, PyTorch's train()) or the recorded ones (frozen)
    /// [default: frozen for lwf on a backbone with BatchNormalization, else batch].
    #[arg(long, value_enum)]
    pub batchnorm: Option<BatchNormMode>,
    /// Recompute BatchNorm's running statistics after each task from the data it trained
    /// on, with the final weights, as exact averages (precise BN) [default: on where
    /// BatchNorm trains with batch statistics].
    #[arg(long, value_name = "on|off", value_parser = plan::parse_switch)]
    pub bn_recalibrate: Option<bool>,
    /// Epochs fitting each new head alone on cached features of the frozen backbone before the
    /// task trains (linear probe, then fine-tune), for methods that train on images; 0 turns
    /// it off [default: 10 where BatchNorm keeps its recorded statistics (lwf, piggyback,
    /// --batchnorm frozen), else 0].
    #[arg(long, value_name = "EPOCHS")]
    pub linear_probe_epochs: Option<u64>,
    /// Choose each task's learning rate before training it: the task is trained from the same
    /// start at its learning rate, a tenth of it and ten times it, on 80% of its training
    /// data, scored on the other 20% (old tasks' data is never scored; only joint, which trains on it, reads it); the best is then trained
    /// on all of it. Costs about 2.4 times the task's training.
    #[arg(long)]
    pub tune: bool,
    /// Attach the new heads to this tensor of the backbone and drop everything after it
    /// (`mtpack inspect` lists candidates) [default: the input of the backbone's own
    /// classifier, else its graph output].
    #[arg(long)]
    pub at: Option<String>,
    /// Pooling of a token sequence [N, T, D] (cls: first token, mean, none: flatten) or a
    /// feature map [N, C, H, W] (mean: global average, none: flatten) [default: mean].
    #[arg(long, value_enum)]
    pub pool: Option<crate::graph::features::Pool>,
    /// The layout of the backbone's image input for every task [default: read from its
    /// declared shape: [N, H, W, 1|3|4] is nhwc].
    #[arg(long, value_enum)]
    pub layout: Option<crate::data::Layout>,
    #[command(flatten)]
    pub params: MethodParams,
    /// Print the manifest's results as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Wait for another process writing the same pack to finish instead of refusing at once.
    #[arg(long)]
    pub wait: bool,
}

fn plan_from_flags(a: &Args) -> Plan {
    let tasks = if a.tasks.is_empty() && a.backbone.is_none() { plan::default_tasks() } else { a.tasks.clone() };
    Plan {
        backbone: a.backbone.clone(),
        method: a.method.unwrap_or(MethodKind::Lwf),
        seed: a.seed,
        device: a.device,
        kernels: a.kernels,
        precision: a.precision,
        batchnorm: a.batchnorm,
        at: a.at.clone(),
        pool: a.pool,
        layout: a.layout,
        bn_recalibrate: a.bn_recalibrate,
        linear_probe_epochs: a.linear_probe_epochs,
        tune: a.tune.then_some(true),
        defaults: a.hyper.clone(),
        params: a.params.clone(),
        tasks,
    }
}

pub fn run(a: Args, quiet: bool) -> anyhow::Result<Outcome> {
    let (plan, pack, extend) = if let Some(dir) = &a.resume {
        let m = crate::pack::Pack::new(dir).load_manifest()?;
        if a.tasks.is_empty() {
            anyhow::bail!("--resume {} needs at least one --task to add", dir.display());
        }
        let mut p = m.plan.clone();
        p.tasks.extend(a.tasks.iter().cloned());
        (p, dir.clone(), true)
    } else if let Some(file) = &a.plan {
        let text = std::fs::read_to_string(file).with_context(|| format!("cannot read plan {}", file.display()))?;
        let p = Plan::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        (p, a.output.clone().unwrap_or_default(), false)
    } else {
        (plan_from_flags(&a), a.output.clone().unwrap_or_default(), false)
    };
    // Ctrl-C or SIGTERM: finish the step, write a checkpoint, exit 130.
    if let Err(e) = crate::interrupt::install() {
        eprintln!("warning: Ctrl-C will stop adapt at once, without a checkpoint of the epoch in progress: {e}");
    }
    let manifest = adapt::run(&plan, &Options { pack: pack.clone(), extend, quiet, wait: super::wait(a.wait) })?;
    if a.json {
        print_json(&serde_json::json!({
            "schema": "mtpack.adapt/1",
            "pack": pack.display().to_string(),
            "method": manifest.method,
            "columns": manifest.columns,
            "rows": manifest.rows,
            "accuracy_matrix": manifest.accuracy_matrix,
            "metrics": manifest.metrics,
            "tasks": manifest.tasks.iter().map(|t| serde_json::json!({
                "name": t.name, "accuracy": t.accuracy, "epochs": t.epochs_done,
                "train_seconds": t.train_seconds, "history": t.history,
                "linear_probe": t.linear_probe, "batchnorm_recalibrated": t.batchnorm_recalibrated,
            })).collect::<Vec<_>>(),
        }))?;
    } else {
        print!("{}", report::table(&manifest));
    }
    Ok(Outcome::Ok)
}
