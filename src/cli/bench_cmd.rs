//! `mtpack bench`: one scenario learned by every method, the comparison table printed.

use std::path::PathBuf;

use anyhow::Context;

use super::{print_json, Outcome};
use crate::bench;
use crate::methods::MethodKind;
use crate::plan::Plan;

/// Learn one scenario with every method and print the comparison table.
///
/// Each method runs `mtpack adapt` in its own process (wall time and peak memory are its
/// own), then its pack is exported, verified, and timed through ONNX Runtime. The default
/// scenario is MobileNetV2 learning Fashion-MNIST, MNIST and the UCI digits at 3x64x64 (200
/// training images per class of the first two; needs scripts/fetch.sh and
/// scripts/prepare_sequence.sh); `--plan` gives your own backbone and tasks (its method is
/// replaced by each of --methods). Markdown on stdout, or JSON (schemas/bench.schema.json).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A TOML plan (schemas/plan.schema.json) instead of the default scenario.
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// Methods to compare, comma-separated [default: all seven].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub methods: Vec<MethodKind>,
    /// Directory for the packs, artifacts and the report.
    #[arg(long, short, default_value = "bench-out")]
    pub output: PathBuf,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args, quiet: bool) -> anyhow::Result<Outcome> {
    let plan = match &a.plan {
        Some(file) => {
            let text = std::fs::read_to_string(file).with_context(|| format!("cannot read plan {}", file.display()))?;
            Plan::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?
        }
        None => bench::default_scenario(std::path::Path::new(env!("CARGO_MANIFEST_DIR"))),
    };
    let methods = if a.methods.is_empty() { MethodKind::ALL.to_vec() } else { a.methods.clone() };
    for t in &plan.tasks {
        if !t.dataset.is_file() {
            anyhow::bail!(
                "task '{}': dataset {} does not exist (the default scenario needs scripts/fetch.sh and scripts/prepare_sequence.sh)",
                t.name,
                t.dataset.display()
            );
        }
    }
    let report = bench::run(&plan, &methods, &a.output, quiet)?;
    let json = serde_json::to_string_pretty(&report)?;
    crate::fsutil::write_atomic(&a.output.join("bench.json"), json.as_bytes())?;
    if a.json {
        print_json(&report)?;
    } else {
        print!("{}", bench::markdown(&report));
    }
    Ok(Outcome::Ok)
}
