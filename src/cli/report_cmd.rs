//! `mtpack report`: a pack's results, or a bench run's comparison, as a static page and figure.

use std::path::PathBuf;

use anyhow::Context;

use super::Outcome;

/// Render a pack's results, or a bench run's comparison of methods, as a static HTML page and
/// a PNG of the same drawing.
///
/// The page has inline SVG, no scripts and nothing to fetch; the PNG beside it (<stem>.png)
/// carries every label and value, for pull requests, chats and slides. For a pack (the
/// directory written by `mtpack adapt`): the accuracy matrix as a heatmap, each task's
/// accuracy over the sequence and the training loss of every epoch. For a bench output
/// directory (written by `mtpack bench`, with bench.json): final accuracy per task and
/// method, average accuracy against forgetting, adapt time and peak memory, artifact size
/// and latency, and a table answering new task, old tasks, training speed, test speed,
/// memory and old data with the measured values.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A pack directory, or a bench output directory (or its bench.json).
    pub path: PathBuf,
    #[arg(long, short, default_value = "report.html")]
    pub output: PathBuf,
}

pub fn run(a: Args, quiet: bool) -> anyhow::Result<Outcome> {
    let pack = crate::pack::Pack::new(&a.path);
    let is_bench = a.path.join("bench.json").is_file() || a.path.is_file();
    let png = if is_bench && !pack.manifest_path().is_file() {
        let r = crate::report::compare::load(&a.path)?;
        crate::report::compare::write(&r, &a.output)
    } else {
        let m = pack.load_manifest().with_context(|| {
            format!("{} is neither a pack nor a bench output directory (no bench.json)", a.path.display())
        })?;
        crate::report::write(&m, &a.output)
    }?;
    if !quiet {
        eprintln!("wrote {} and {}", a.output.display(), png.display());
    }
    Ok(Outcome::Ok)
}
