//! The accuracy matrix and the summary metrics as a table for people.

use std::fmt::Write as _;

use crate::pack::Manifest;

pub fn table(m: &Manifest) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "method {} ({}), backbone {}",
        m.method,
        if m.needs_old_data { "needs old data" } else { "no old data" },
        m.backbone.source
    );
    let _ = writeln!(
        s,
        "held-out accuracy after each task (rows) on each task (columns){}:",
        if m.backbone.own_head.is_some() {
            "; backbone = agreement of its own head with the original predictions"
        } else {
            ""
        }
    );
    let width = m.columns.iter().map(String::len).max().unwrap_or(8).max(8);
    let rw = m.rows.iter().map(String::len).max().unwrap_or(8).max(8);
    let _ = write!(s, "{:<rw$}", "after");
    for c in &m.columns {
        let _ = write!(s, "  {c:>width$}");
    }
    let _ = writeln!(s);
    for (r, row) in m.rows.iter().zip(&m.accuracy_matrix) {
        let _ = write!(s, "{r:<rw$}");
        for v in row {
            match v {
                Some(v) => {
                    let _ = write!(s, "  {v:>width$.4}");
                }
                None => {
                    let _ = write!(s, "  {:>width$}", "-");
                }
            }
        }
        let _ = writeln!(s);
    }
    let x = &m.metrics;
    let _ =
        writeln!(s, "average accuracy {:.4}   BWT {:+.4}   forgetting {:.4}", x.average_accuracy, x.bwt, x.forgetting);
    for t in &m.tasks {
        let last = t.history.last();
        let _ = writeln!(
            s,
            "task {:<16} {} epochs, {:.1}s, final loss {:.4}, {:.1} images/s",
            t.name,
            t.epochs_done,
            t.train_seconds,
            last.map_or(f64::NAN, |h| h.loss),
            last.map_or(0.0, |h| h.images_per_second)
        );
    }
    s
}
