//! `mtpack export` and `mtpack verify`: the multi-task artifact written and checked.

use std::path::PathBuf;

use super::{print_json, Outcome};
use crate::pack::export::{export, ExportError, ExportOptions};
use crate::pack::verify::verify;

/// Write one ONNX file serving every task of a pack, verified by tract and ONNX Runtime.
///
/// Writes OUT, OUT's manifest (<stem>.manifest.json, also embedded in the model's
/// metadata) and its probes (<stem>.probes.safetensors). Nothing is written when the
/// artifact does not reproduce the training engine's outputs (exit 1).
#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// The pack directory written by `mtpack adapt`.
    pub pack: PathBuf,
    #[arg(long, short)]
    pub output: PathBuf,
    /// Export one task as a standalone model (the weights it does not use are dropped).
    #[arg(long)]
    pub task: Option<String>,
    /// Put the task's recorded preprocessing into the graph: the input becomes raw uint8
    /// images [N, C, H, W] as stored in the dataset.
    #[arg(long)]
    pub with_preprocessing: bool,
    /// Print the manifest as JSON.
    #[arg(long)]
    pub json: bool,
    /// Wait for a process writing the pack to finish instead of refusing at once.
    #[arg(long)]
    pub wait: bool,
}

/// Check an exported model: tensor digests, manifest, and probes in tract (and ONNX Runtime).
///
/// Exit 0 when everything holds, 1 when anything differs (each difference is named), 2 when
/// the model cannot be read.
#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    pub model: PathBuf,
    /// The manifest file (default: the one embedded in the model).
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn run_export(a: ExportArgs, quiet: bool) -> anyhow::Result<Outcome> {
    let opts =
        ExportOptions { task: a.task.clone(), with_preprocessing: a.with_preprocessing, wait: super::wait(a.wait) };
    match export(&a.pack, &a.output, &opts) {
        Ok(done) => {
            if a.json {
                print_json(&done.manifest)?;
            } else {
                let v = &done.manifest.verified;
                println!("wrote {} ({} tasks)", done.model_path.display(), done.manifest.tasks.len());
                println!("      {}", done.manifest_path.display());
                println!("      {}", done.probes_path.display());
                println!(
                    "verified: tract {:.2e}, ONNX Runtime {:.2e} from the training engine on {} probes",
                    v.tract_max_abs_diff, v.ort_max_abs_diff, done.manifest.probes.count
                );
                for t in &done.manifest.tasks {
                    println!("  {:<20} output {:<28} accuracy {:.4}", t.name, t.output, t.accuracy.unwrap_or(f64::NAN));
                }
            }
            Ok(Outcome::Ok)
        }
        Err(ExportError::Check(why)) => {
            if !quiet {
                eprintln!("error: {}: verification failed, nothing written: {why}", a.output.display());
            }
            Ok(Outcome::CheckFailed)
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("exporting {}", a.pack.display()))),
    }
}

pub fn run_verify(a: VerifyArgs) -> anyhow::Result<Outcome> {
    let report = verify(&a.model, a.manifest.as_deref()).map_err(|e| {
        let text = format!("{e:#}");
        // Errors from reading the file already name it; the others get it here.
        if text.contains(&a.model.display().to_string()) {
            anyhow::Error::new(e)
        } else {
            anyhow::Error::new(e).context(a.model.display().to_string())
        }
    })?;
    if a.json {
        print_json(&report)?;
    } else {
        println!("{}: {} tensors checked", report.model, report.tensors_checked);
        for o in &report.outputs {
            let served = if o.task.is_some() { " (task alone)" } else { "" };
            println!(
                "  {:<6} {:<28} max |diff| {:.2e} {}{served}",
                o.runtime,
                o.output,
                o.max_abs_diff,
                if o.ok { "ok" } else { "DIFFERS" }
            );
        }
        for p in &report.problems {
            println!("PROBLEM {p}");
        }
        println!("{}", if report.ok { "verified" } else { "NOT verified" });
    }
    Ok(if report.ok { Outcome::Ok } else { Outcome::CheckFailed })
}
