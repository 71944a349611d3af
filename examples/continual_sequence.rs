//! The real sequence: MobileNetV2 (ImageNet) learns Fashion-MNIST, then MNIST, then the UCI
//! digits, all at 3x64x64, with each method; prints the accuracy matrices and a summary
//! table (final average accuracy, BWT, forgetting, training time).
//!
//! Settings follow the comparison the project is held to: 2 epochs per task, batch 32, SGD
//! lr 0.01 momentum 0.9; Fashion-MNIST 6000/1000, MNIST 800/100 per digit, digits 1437/360.
//!
//! Run (after scripts/fetch.sh and scripts/prepare_sequence.sh):
//!   cargo run --release --example continual_sequence -- [METHOD...] [--ewc-lambda L] [--lwf-lambda L]
//!       [--frozen-bn-lr LR] [--lr LR] [--optimizer sgd|adamw] [--seed N] [--set PARAM=VALUE...] [--out DIR]
//! `--linear-probe-epochs N` and `--bn-recalibrate on|off` set those two steps (default: the
//! comparison's, both off; with `--defaults`, mtpack's).
//! `--set` sets any method parameter of the plan file (e.g. `--set packnet_prune=0.5`).
//! `--defaults` keeps mtpack's defaults for BatchNorm and learning rate (LwF: frozen
//! BatchNorm at lr 0.001) instead of the comparison's batch statistics at lr 0.01.
//! Piggyback, unless --lr/--optimizer say otherwise, trains with its own defaults (Adam).
//! Packs go to .cache/runs/<method>[-settings] (reused when complete, resumed when interrupted).

use std::path::PathBuf;

use mtpack::adapt::{report, Options};
use mtpack::methods::{MethodKind, MethodParams};
use mtpack::plan::{BatchNormMode, Plan, TaskPlan};
use mtpack::train::Hyper;

/// Large freed blocks kept for reuse, as the `mtpack` binary does (see `mtpack::alloc`).
#[global_allocator]
static ALLOC: mtpack::alloc::Recycling = mtpack::alloc::Recycling::new();

fn main() -> anyhow::Result<()> {
    mtpack::alloc::tune_for_training();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut methods = Vec::new();
    let mut ewc_lambda: Option<f64> = None;
    let mut lwf_lambda: Option<f64> = None;
    let mut frozen_bn_lr: Option<f64> = None;
    let mut lr: Option<f64> = None;
    let mut optimizer: Option<mtpack::train::OptimizerName> = None;
    let mut seed = 0u64;
    let mut own_defaults = false;
    let mut probe: Option<u64> = None;
    let mut recalibrate: Option<bool> = None;
    let mut sets = serde_json::Map::new();
    let mut out = root.join(".cache/runs");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--ewc-lambda" => ewc_lambda = args.next().and_then(|v| v.parse().ok()),
            "--lwf-lambda" => lwf_lambda = args.next().and_then(|v| v.parse().ok()),
            // Recorded BatchNorm statistics (no drift) at this learning rate.
            "--frozen-bn-lr" => frozen_bn_lr = args.next().and_then(|v| v.parse().ok()),
            "--out" => out = args.next().map(PathBuf::from).unwrap_or(out),
            "--lr" => lr = args.next().and_then(|v| v.parse().ok()),
            "--optimizer" => optimizer = args.next().and_then(|v| v.parse().ok()),
            "--defaults" => own_defaults = true,
            "--linear-probe-epochs" => probe = args.next().and_then(|v| v.parse().ok()),
            "--bn-recalibrate" => recalibrate = args.next().map(|v| v == "on"),
            "--seed" => seed = args.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            "--set" => {
                let kv = args.next().unwrap_or_default();
                let (k, v) = kv.split_once('=').ok_or_else(|| anyhow::anyhow!("--set {kv}: not PARAM=VALUE"))?;
                let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.into()));
                sets.insert(k.to_string(), value);
            }
            m => methods.push(<MethodKind as clap::ValueEnum>::from_str(m, true).map_err(anyhow::Error::msg)?),
        }
    }
    if methods.is_empty() {
        methods = MethodKind::ALL.to_vec();
    }
    let mut summary = Vec::new();
    let mut base: serde_json::Value = serde_json::Value::Object(sets.clone());
    if let Some(l) = ewc_lambda {
        base["ewc_lambda"] = l.into();
    }
    if let Some(l) = lwf_lambda {
        base["lwf_lambda"] = l.into();
    }
    let params: MethodParams = serde_json::from_value(base)?;
    for method in methods {
        // The comparison's settings, except where a method trains with its own optimizer.
        let own = method.hyper_defaults();
        let (default_opt, default_lr) = match own.optimizer {
            Some(_) => (None, None),
            None => (Some(mtpack::train::OptimizerName::Sgd), Some(0.01)),
        };
        let plan = Plan {
            backbone: Some(root.join(".cache/models/mobilenetv2_imagenet.onnx")),
            method,
            seed,
            device: Default::default(),
            kernels: Default::default(),
            precision: Default::default(),
            batchnorm: match (frozen_bn_lr, own_defaults) {
                (Some(_), _) => Some(BatchNormMode::Frozen),
                (None, true) => None,
                (None, false) => Some(BatchNormMode::Batch),
            },
            at: None,
            pool: None,
            layout: None,
            // The comparison's settings do neither (the reference library does not).
            bn_recalibrate: recalibrate.or((!own_defaults).then_some(false)),
            linear_probe_epochs: probe.or((!own_defaults).then_some(0)),
            tune: None,
            defaults: Hyper {
                epochs: Some(2),
                batch: Some(32),
                optimizer: optimizer.or(default_opt),
                lr: lr.or(frozen_bn_lr).or(default_lr.filter(|_| !own_defaults)),
                momentum: Some(0.9),
                ..Hyper::default()
            },
            params: params.clone(),
            // The bench's scenario with every prepared image (no per-class limit).
            tasks: mtpack::bench::default_scenario(&root)
                .tasks
                .into_iter()
                .map(|t| TaskPlan { train_per_class: None, ..t })
                .collect(),
        };
        let mut suffix = match (method, ewc_lambda) {
            (MethodKind::Ewc, Some(l)) => format!("ewc-{l}"),
            (MethodKind::Lwf, _) if lwf_lambda.is_some() => format!("lwf-{}", lwf_lambda.unwrap_or_default()),
            _ => method.name().to_string(),
        };
        if own_defaults {
            suffix = format!("{suffix}-defaults");
        }
        if let Some(lr) = frozen_bn_lr {
            suffix = format!("{suffix}-frozenbn-lr{lr}");
        }
        if let Some(l) = lr {
            suffix = format!("{suffix}-lr{l}");
        }
        if let Some(o) = optimizer {
            suffix = format!("{suffix}-{}", if o == mtpack::train::OptimizerName::Sgd { "sgd" } else { "adamw" });
        }
        if let Some(e) = probe {
            suffix = format!("{suffix}-probe{e}");
        }
        if let Some(on) = recalibrate {
            suffix = format!("{suffix}-recal{}", if on { "on" } else { "off" });
        }
        if seed != 0 {
            suffix = format!("{suffix}-seed{seed}");
        }
        for (k, v) in &sets {
            let v = v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
            suffix = format!("{suffix}-{k}-{v}");
        }
        let started = std::time::Instant::now();
        let m = mtpack::adapt::run(
            &plan,
            &Options { pack: out.join(&suffix), extend: false, quiet: false, wait: mtpack::pack::lock::Wait::No },
        )?;
        eprintln!("{suffix}: {:.0}s", started.elapsed().as_secs_f64());
        println!("## {suffix}\n\n```\n{}```\n", report::table(&m));
        let last = m.accuracy_matrix.last().cloned().unwrap_or_default();
        let secs: f64 = m.tasks.iter().map(|t| t.train_seconds).sum();
        summary.push((suffix, last, m.metrics.clone(), secs, m.needs_old_data));
    }
    println!("| method | fashion | mnist | digits | average | BWT | forgetting | train s | old data |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for (name, last, x, secs, old) in summary {
        let cell = |i: usize| last.get(i).copied().flatten().map_or("-".to_string(), |v| format!("{v:.3}"));
        println!(
            "| {name} | {} | {} | {} | {:.3} | {:+.3} | {:.3} | {secs:.0} | {} |",
            cell(0),
            cell(1),
            cell(2),
            x.average_accuracy,
            x.bwt,
            x.forgetting,
            if old { "yes" } else { "no" }
        );
    }
    Ok(())
}
