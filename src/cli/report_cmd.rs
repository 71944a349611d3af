use std::path::PathBuf;

use super::Outcome;

/// Render a pack's results as a static HTML page and a PNG.
///
/// The page (inline SVG, no scripts, no network) shows the accuracy matrix as a heatmap,
/// each task's accuracy over the sequence, the training loss of every epoch, and the tasks;
/// the PNG beside it (<stem>.png) has the heatmap and the accuracy lines.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The pack directory written by `mtpack adapt`.
    pub pack: PathBuf,
    #[arg(long, short, default_value = "report.html")]
    pub output: PathBuf,
}

pub fn run(a: Args, quiet: bool) -> anyhow::Result<Outcome> {
    let m = crate::pack::Pack::new(&a.pack).load_manifest()?;
    let png =
        crate::report::write(&m, &a.output).map_err(|e| anyhow::anyhow!("writing {}: {e}", a.output.display()))?;
    if !quiet {
        eprintln!("wrote {} and {}", a.output.display(), png.display());
    }
    Ok(Outcome::Ok)
}
