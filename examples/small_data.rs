//! The small-data scenario: a new user's first run. One real backbone with BatchNormalization
//! learns Fashion-MNIST from 40 training images per class (10 classes) at 224x224, 1 epoch,
//! with the linear probe and BatchNorm recalibration on, every other setting at mtpack's
//! defaults; accuracy is on 50 held-out images per class. Prints one row per backbone, method
//! and settings with the accuracy of each seed, their mean and spread, and the linear probe's
//! accuracy (a head alone on the frozen backbone).
//!
//! Run (after scripts/fetch.sh and scripts/prepare_sequence.sh):
//!   cargo run --release --example small_data -- [METHOD...] [--backbone mobilenetv2|pplcnet]...
//!       [--seeds 0,1,2] [--off] [--tune] [--defaults] [--out DIR]
//! `--off` adds, for each method that trains the backbone, a row with the linear probe and
//! BatchNorm recalibration off; `--tune` a row at mtpack's defaults with `--tune` (each
//! task's learning rate chosen on a validation split of its training data); `--defaults` a
//! row at mtpack's defaults.
//! Packs go to DIR (default .cache/small_data), one per run, reused when complete.

use std::path::{Path, PathBuf};

use mtpack::adapt::Options;
use mtpack::data::{Dataset, Preprocessing};
use mtpack::methods::{Inputs, MethodKind};
use mtpack::plan::{Plan, TaskPlan};
use mtpack::train::Hyper;

const TRAIN_PER_CLASS: usize = 40;
const TEST_PER_CLASS: usize = 50;

/// Fashion-MNIST cut to the scenario's size, written once.
fn small_fashion(root: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let out = dir.join(format!("fashion_{TRAIN_PER_CLASS}_{TEST_PER_CLASS}.safetensors"));
    if out.exists() {
        return Ok(out);
    }
    let mut d = Dataset::load(&root.join(".cache/sequence/fashion.safetensors"))?;
    let classes = d.classes();
    let test = d.test.take().ok_or_else(|| anyhow::anyhow!("fashion.safetensors has no test split"))?;
    d.train = Dataset::limit_per_class(&d.train, classes, TRAIN_PER_CLASS, 0);
    d.test = Some(Dataset::limit_per_class(&test, classes, TEST_PER_CLASS, 0));
    std::fs::create_dir_all(dir)?;
    d.save(&out)?;
    Ok(out)
}

fn backbone(name: &str) -> anyhow::Result<&'static str> {
    Ok(match name {
        "mobilenetv2" => "mobilenetv2_imagenet.onnx",
        "pplcnet" => "pplcnet_orientation.onnx",
        _ => anyhow::bail!("--backbone {name}: not mobilenetv2 or pplcnet"),
    })
}

/// The settings a row runs with.
#[derive(Clone, Copy, PartialEq)]
enum Settings {
    /// The linear probe, and recalibration where BatchNorm trains with batch statistics.
    On,
    /// Neither.
    Off,
    /// mtpack's defaults, with `--tune`.
    Tune,
    /// mtpack's defaults.
    Defaults,
}

impl Settings {
    fn label(self) -> &'static str {
        match self {
            Settings::On => "probe and recalibration on",
            Settings::Off => "both off",
            Settings::Tune => "defaults + --tune",
            Settings::Defaults => "defaults",
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Settings::On => "",
            Settings::Off => "-off",
            Settings::Tune => "-tune",
            Settings::Defaults => "-defaults",
        }
    }
}

struct Row {
    label: String,
    accuracies: Vec<f64>,
    probe: Option<f64>,
}

/// Large freed blocks kept for reuse, as the `mtpack` binary does (see `mtpack::alloc`).
#[global_allocator]
static ALLOC: mtpack::alloc::Recycling = mtpack::alloc::Recycling::new();

fn main() -> anyhow::Result<()> {
    mtpack::alloc::tune_for_training();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let (mut methods, mut backbones, mut seeds) = (Vec::new(), Vec::new(), vec![0u64]);
    let (mut off, mut tune, mut defaults) = (false, false, false);
    let mut out = root.join(".cache/small_data");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--backbone" => backbones.push(args.next().unwrap_or_default()),
            "--seeds" => {
                let list = args.next().unwrap_or_default();
                seeds = list.split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>()?;
            }
            "--off" => off = true,
            "--tune" => tune = true,
            "--defaults" => defaults = true,
            "--out" => out = args.next().map(PathBuf::from).unwrap_or(out),
            m => methods.push(<MethodKind as clap::ValueEnum>::from_str(m, true).map_err(anyhow::Error::msg)?),
        }
    }
    if methods.is_empty() {
        methods = MethodKind::ALL.to_vec();
    }
    if backbones.is_empty() {
        backbones = vec!["mobilenetv2".into(), "pplcnet".into()];
    }
    let data = small_fashion(&root, &out)?;
    let mut rows = Vec::new();
    for b in &backbones {
        let file = backbone(b)?;
        for &method in &methods {
            let trains_backbone = method.spec().data.inputs == Inputs::Images;
            let wanted = [
                (Settings::On, true),
                (Settings::Off, off && trains_backbone),
                (Settings::Tune, tune),
                (Settings::Defaults, defaults),
            ];
            for settings in wanted.into_iter().filter(|w| w.1).map(|w| w.0) {
                let label = format!("| {b} | {} | {} |", method.name(), settings.label());
                let mut row = Row { label, accuracies: Vec::new(), probe: None };
                for &seed in &seeds {
                    let plan = plan(&root, &data, file, method, seed, settings);
                    let suffix = format!("{b}-{}{}-seed{seed}", method.name(), settings.suffix());
                    let started = std::time::Instant::now();
                    let opts = Options {
                        pack: out.join(&suffix),
                        extend: false,
                        quiet: true,
                        wait: mtpack::pack::lock::Wait::No,
                    };
                    let m = mtpack::adapt::run(&plan, &opts)?;
                    let task = m.tasks.first().ok_or_else(|| anyhow::anyhow!("{suffix}: no task"))?;
                    let acc = task.accuracy.unwrap_or(f64::NAN);
                    eprintln!("{suffix}: {acc:.4} in {:.0}s", started.elapsed().as_secs_f64());
                    row.accuracies.push(acc);
                    row.probe = row.probe.or(task.linear_probe.as_ref().map(|p| p.accuracy));
                }
                rows.push(row);
            }
        }
    }
    println!(
        "| backbone | method | settings | accuracy per seed | mean | spread (max-min) | linear probe (seed {}) |",
        seeds[0]
    );
    println!("|---|---|---|---|---:|---:|---:|");
    for r in rows {
        let per: Vec<String> = r.accuracies.iter().map(|a| format!("{a:.3}")).collect();
        let mean = r.accuracies.iter().sum::<f64>() / r.accuracies.len().max(1) as f64;
        let (lo, hi) = r.accuracies.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &a| (l.min(a), h.max(a)));
        let probe = r.probe.map_or("-".to_string(), |p| format!("{p:.3}"));
        println!("{} {} | {mean:.3} | {:.3} | {probe} |", r.label, per.join(", "), hi - lo);
    }
    Ok(())
}

/// The scenario's plan: 224x224 RGB with ImageNet normalisation, 1 epoch, the two steps as
/// `settings` says, everything else at mtpack's defaults.
fn plan(root: &Path, data: &Path, file: &str, method: MethodKind, seed: u64, settings: Settings) -> Plan {
    let spec = method.spec();
    let images = spec.data.inputs == Inputs::Images;
    let pre = Preprocessing::imagenet(224);
    let task = TaskPlan {
        name: "fashion".into(),
        dataset: data.to_path_buf(),
        classes: None,
        labels: None,
        test_fraction: None,
        train_per_class: None,
        preprocessing: pre,
        hyper: Hyper { epochs: Some(1), ..Hyper::default() },
    };
    let on = settings == Settings::On;
    let tuned = settings == Settings::Tune;
    let own = matches!(settings, Settings::Tune | Settings::Defaults);
    Plan {
        seed,
        // Recalibration only where BatchNorm trains with batch statistics (not LwF's frozen).
        bn_recalibrate: (!own).then_some(on && images && !spec.frozen_batchnorm),
        linear_probe_epochs: (!own).then_some(if on && images { mtpack::plan::LINEAR_PROBE_EPOCHS } else { 0 }),
        tune: tuned.then_some(true),
        ..Plan::new(Some(root.join(".cache/models").join(file)), method, vec![task])
    }
}
