//! `mtpack report`: results as one static HTML page (inline SVG, no scripts, no network)
//! and a PNG of the same drawing, text included. For a pack: the accuracy matrix as a
//! heatmap, each task's accuracy over the sequence, and the training loss of every epoch;
//! for a bench output directory, the methods compared (compare.rs).

pub mod compare;
mod raster;
pub mod svg;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::pack::Manifest;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot draw the figure")]
    Svg(#[source] resvg::usvg::Error),
    #[error("the figure's size {width}x{height} cannot be drawn")]
    Size { width: u32, height: u32 },
    #[error("cannot encode the PNG: {0}")]
    Encode(String),
    #[error("{} would be overwritten by its own figure (.svg and .png are written beside the page): name the page .html", path.display())]
    Output { path: PathBuf },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Colours of the tasks' lines, in column order (colour-blind-safe palette).
pub const PALETTE: [(u8, u8, u8); 8] = [
    (0, 114, 178),
    (230, 159, 0),
    (0, 158, 115),
    (204, 121, 167),
    (86, 180, 233),
    (213, 94, 0),
    (240, 228, 66),
    (0, 0, 0),
];

/// Each column's accuracy after each row, None where not yet learned.
pub fn series(m: &Manifest) -> Vec<(String, Vec<Option<f64>>)> {
    m.columns
        .iter()
        .enumerate()
        .map(|(c, name)| (name.clone(), m.accuracy_matrix.iter().map(|r| r.get(c).copied().flatten()).collect()))
        .collect()
}

/// The training loss of every epoch of every task, in order: (task, epoch losses).
pub fn losses(m: &Manifest) -> Vec<(String, Vec<f64>)> {
    m.tasks.iter().map(|t| (t.name.clone(), t.history.iter().map(|h| h.loss).collect())).collect()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

const STYLE: &str = "body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse}\
td,th{padding:4px 8px;border:1px solid #ccc;text-align:right}svg text{font-family:sans-serif;font-size:12px}";

/// The page.
pub fn html(m: &Manifest) -> String {
    let mut s = page_head(&title(m));
    let _ = writeln!(s, "<p>{}</p>", escape(&summary(m)));
    let _ = writeln!(
        s,
        "<h2>Accuracy matrix</h2>\n<p>Held-out accuracy after each task (rows) on each task (columns).</p>"
    );
    let [heat, acc, loss] = charts(m);
    s.push_str(&heat.svg);
    let _ = writeln!(s, "<h2>Accuracy of each task over the sequence</h2>");
    s.push_str(&acc.svg);
    let _ = writeln!(s, "<h2>Training loss per epoch</h2>");
    s.push_str(&loss.svg);
    let _ = writeln!(s, "<h2>Tasks</h2>\n<table><tr><th>task</th><th>classes</th><th>train</th><th>held out</th><th>epochs</th><th>seconds</th><th>accuracy when learned</th></tr>");
    for t in &m.tasks {
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{}</td></tr>",
            escape(&t.name),
            t.labels.len(),
            t.train_size,
            t.test_size,
            t.epochs_done,
            t.train_seconds,
            t.accuracy.map_or("-".into(), |a| format!("{a:.4}"))
        );
    }
    s.push_str("</table>\n</body></html>\n");
    s
}

/// The start of a page: its title as the document's and as the first heading.
fn page_head(title: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title>\n<style>{STYLE}</style></head><body>\n<h1>{t}</h1>\n",
        t = escape(title)
    )
}

fn title(m: &Manifest) -> String {
    format!("mtpack report: {} on {}", m.method, m.backbone.source)
}

fn summary(m: &Manifest) -> String {
    format!(
        "method {} ({}), average accuracy {:.4}, BWT {:+.4}, forgetting {:.4}",
        m.method,
        if m.needs_old_data { "needs old data" } else { "no old data" },
        m.metrics.average_accuracy,
        m.metrics.bwt,
        m.metrics.forgetting
    )
}

/// The pack's three charts: the accuracy matrix, the accuracy lines, the loss curves.
fn charts(m: &Manifest) -> [svg::Chart; 3] {
    [
        svg::heatmap(&m.rows, &m.columns, &m.accuracy_matrix),
        svg::lines(&m.rows, &series(m), svg::YAxis { label: "accuracy", range: Some((0.0, 1.0)) }, 0),
        // The accuracy lines start with the backbone's column when it has one.
        svg::loss_curves(&losses(m), m.columns.len().saturating_sub(m.tasks.len())),
    ]
}

/// The page's charts on one SVG document, for the PNG.
pub fn figure(m: &Manifest) -> String {
    let [heat, acc, loss] = charts(m);
    let rows = vec![
        vec![("Accuracy matrix (rows: after task; columns: evaluated on)", &heat)],
        vec![("Accuracy of each task over the sequence", &acc)],
        vec![("Training loss per epoch", &loss)],
    ];
    svg::figure(&title(m), &[summary(m)], &rows)
}

pub use raster::png as render_png;

/// Writes `html` to `out`, and beside it `figure` as `<stem>.svg` (for documents that take
/// vectors) and as `<stem>.png`, each through a temporary file; returns the PNG's path.
fn write_pair(html: &str, figure: &str, out: &Path) -> Result<PathBuf, ReportError> {
    let png_path = out.with_extension("png");
    let svg_path = out.with_extension("svg");
    if out == png_path || out == svg_path {
        return Err(ReportError::Output { path: out.to_path_buf() });
    }
    let png = raster::png(figure)?;
    let files = [(out, html.as_bytes()), (svg_path.as_path(), figure.as_bytes()), (png_path.as_path(), &png)];
    for (path, bytes) in files {
        crate::fsutil::write_atomic(path, bytes)
            .map_err(|source| ReportError::Write { path: path.to_path_buf(), source })?;
    }
    Ok(png_path)
}

/// Writes a pack's page to `out` (HTML) and its figure beside it (`<stem>.svg`,
/// `<stem>.png`); returns the PNG's path.
pub fn write(m: &Manifest, out: &Path) -> Result<PathBuf, ReportError> {
    write_pair(&html(m), &figure(m), out)
}
