//! `mtpack report`: a pack's results as one static HTML page (inline SVG, no scripts, no
//! network) and a PNG of the same charts: the accuracy matrix as a heatmap, each task's
//! accuracy over the sequence, and the training loss of every epoch.

mod png;
mod svg;

use std::fmt::Write as _;
use std::path::Path;

use crate::pack::Manifest;

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
    let mut s = String::new();
    let title = format!("mtpack report: {} on {}", m.method, m.backbone.source);
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\n<style>{}</style></head><body>\n",
        escape(&title),
        STYLE
    );
    let _ = writeln!(s, "<h1>{}</h1>", escape(&title));
    let _ = writeln!(
        s,
        "<p>method <b>{}</b> ({}), average accuracy <b>{:.4}</b>, BWT <b>{:+.4}</b>, forgetting <b>{:.4}</b></p>",
        escape(&m.method),
        if m.needs_old_data { "needs old data" } else { "no old data" },
        m.metrics.average_accuracy,
        m.metrics.bwt,
        m.metrics.forgetting
    );
    let _ = writeln!(
        s,
        "<h2>Accuracy matrix</h2>\n<p>Held-out accuracy after each task (rows) on each task (columns).</p>"
    );
    s.push_str(&svg::heatmap(&m.rows, &m.columns, &m.accuracy_matrix));
    let _ = writeln!(s, "<h2>Accuracy of each task over the sequence</h2>");
    s.push_str(&svg::lines(&m.rows, &series(m), "accuracy", Some((0.0, 1.0))));
    let _ = writeln!(s, "<h2>Training loss per epoch</h2>");
    s.push_str(&svg::loss_curves(&losses(m)));
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

/// Writes `out` (HTML) and the PNG beside it (`<stem>.png`); returns the PNG's path.
pub fn write(m: &Manifest, out: &Path) -> std::io::Result<std::path::PathBuf> {
    crate::fsutil::write_atomic(out, html(m).as_bytes())?;
    let png_path = out.with_extension("png");
    crate::fsutil::write_atomic(&png_path, &png::render(m))?;
    Ok(png_path)
}
