//! The real sequence: MobileNetV2 (ImageNet) learns Fashion-MNIST, then MNIST, then the UCI
//! digits, all at 3x64x64, with each method; prints the accuracy matrices and a summary
//! table (final average accuracy, BWT, forgetting, training time).
//!
//! Settings follow the comparison the project is held to: 2 epochs per task, batch 32, SGD
//! lr 0.01 momentum 0.9; Fashion-MNIST 6000/1000, MNIST 800/100 per digit, digits 1437/360.
//!
//! Run (after scripts/fetch.sh and scripts/prepare_sequence.sh):
//!   cargo run --release --example continual_sequence -- [METHOD...] [--ewc-lambda L] [--lwf-lambda L] [--frozen-bn-lr LR] [--out DIR]
//! Packs go to .cache/runs/<method> (reused when complete, resumed when interrupted).

use std::path::{Path, PathBuf};

use mtpack::adapt::plan::{BatchNormMode, Hyper, Plan, TaskPlan};
use mtpack::adapt::{report, Options};
use mtpack::data::Preprocessing;
use mtpack::methods::{MethodKind, MethodParams};

fn task(name: &str, file: &str, root: &Path) -> TaskPlan {
    TaskPlan {
        name: name.into(),
        dataset: root.join(".cache/sequence").join(file),
        classes: None,
        labels: None,
        test_fraction: None,
        preprocessing: Preprocessing {
            resize: Some([64, 64]),
            channels: Some(3),
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
        },
        hyper: Hyper::default(),
    }
}

fn main() -> anyhow::Result<()> {
    mtpack::alloc::tune_for_training();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut methods = Vec::new();
    let mut ewc_lambda = None;
    let mut lwf_lambda = None;
    let mut frozen_bn_lr: Option<f64> = None;
    let mut out = root.join(".cache/runs");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--ewc-lambda" => ewc_lambda = args.next().and_then(|v| v.parse().ok()),
            "--lwf-lambda" => lwf_lambda = args.next().and_then(|v| v.parse().ok()),
            // Recorded BatchNorm statistics (no drift) at this learning rate.
            "--frozen-bn-lr" => frozen_bn_lr = args.next().and_then(|v| v.parse().ok()),
            "--out" => out = args.next().map(PathBuf::from).unwrap_or(out),
            m => methods.push(<MethodKind as clap::ValueEnum>::from_str(m, true).map_err(anyhow::Error::msg)?),
        }
    }
    if methods.is_empty() {
        methods =
            vec![MethodKind::Finetune, MethodKind::FeatureExtract, MethodKind::Joint, MethodKind::Lwf, MethodKind::Ewc];
    }
    let mut summary = Vec::new();
    for method in methods {
        let plan = Plan {
            backbone: Some(root.join(".cache/models/mobilenetv2_imagenet.onnx")),
            method,
            seed: 0,
            device: Default::default(),
            batchnorm: if frozen_bn_lr.is_some() { BatchNormMode::Frozen } else { BatchNormMode::Batch },
            defaults: Hyper {
                epochs: Some(2),
                batch: Some(32),
                optimizer: Some("sgd".into()),
                lr: Some(frozen_bn_lr.unwrap_or(0.01)),
                momentum: Some(0.9),
                ..Hyper::default()
            },
            params: MethodParams { ewc_lambda, lwf_lambda, ..MethodParams::default() },
            tasks: vec![
                task("fashion", "fashion.safetensors", &root),
                task("mnist", "mnist.safetensors", &root),
                task("digits", "digits.safetensors", &root),
            ],
        };
        let mut suffix = match (method, ewc_lambda) {
            (MethodKind::Ewc, Some(l)) => format!("ewc-{l}"),
            (MethodKind::Lwf, _) if lwf_lambda.is_some() => format!("lwf-{}", lwf_lambda.unwrap_or_default()),
            _ => method.name().to_string(),
        };
        if let Some(lr) = frozen_bn_lr {
            suffix = format!("{suffix}-frozenbn-lr{lr}");
        }
        let started = std::time::Instant::now();
        let m = mtpack::adapt::run(&plan, &Options { pack: out.join(&suffix), extend: false, quiet: false })?;
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
