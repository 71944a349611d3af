//! The accuracy matrix and the summary metrics as a table for people.

use std::fmt::Write as _;

use crate::pack::{Manifest, TaskRecord};

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
    matrix(&mut s, m);
    let x = &m.metrics;
    let _ =
        writeln!(s, "average accuracy {:.4}   BWT {:+.4}   forgetting {:.4}", x.average_accuracy, x.bwt, x.forgetting);
    for t in &m.tasks {
        task_lines(&mut s, t);
    }
    s
}

/// The accuracy matrix, a row per task learned, '-' where a column was not measured.
fn matrix(s: &mut String, m: &Manifest) {
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
            let _ = match v {
                Some(v) => write!(s, "  {v:>width$.4}"),
                None => write!(s, "  {:>width$}", "-"),
            };
        }
        let _ = writeln!(s);
    }
}

/// A task's training summary, and what --tune chose for it.
fn task_lines(s: &mut String, t: &TaskRecord) {
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
    if let Some(tune) = &t.tune {
        let trials: Vec<String> = tune
            .trials
            .iter()
            .map(|r| format!("{}: {}", r.lr, r.accuracy.map_or("diverged".into(), |a| format!("{a:.4}"))))
            .collect();
        let _ = writeln!(
            s,
            "  --tune chose lr {}; validation accuracy on {} training images held out: {}",
            tune.chosen_lr,
            tune.validation_size,
            trials.join(", ")
        );
    }
}

/// A mask method's per-layer report after task `task`, for stderr.
pub fn method_text(task: &str, r: &serde_json::Value) -> String {
    let mut s = String::new();
    let layers = r["layers"].as_array().cloned().unwrap_or_default();
    let width = layers.iter().filter_map(|l| l["weight"].as_str()).map(str::len).max().unwrap_or(6).max(6);
    let total = r["masked_params"].as_u64().unwrap_or(0);
    match r["method"].as_str() {
        Some("packnet") => {
            let free = r["free_params"].as_u64().unwrap_or(0);
            let _ = writeln!(
                s,
                "packnet after '{task}': {free} of {total} masked weights free ({:.1}%); free per layer:",
                100.0 * free as f64 / total.max(1) as f64
            );
            for l in &layers {
                let (p, f) = (l["params"].as_u64().unwrap_or(0), l["free"].as_u64().unwrap_or(0));
                let owned: Vec<String> =
                    l["owned"].as_array().into_iter().flatten().map(|v| v.as_u64().unwrap_or(0).to_string()).collect();
                let _ = writeln!(
                    s,
                    "  {:<width$} {p:>9} weights, owned per task [{}], free {f} ({:.1}%)",
                    l["weight"].as_str().unwrap_or("?"),
                    owned.join(", "),
                    100.0 * f as f64 / p.max(1) as f64
                );
            }
        }
        Some("piggyback") => {
            let _ = writeln!(
                s,
                "piggyback mask of '{task}': keeps {:.1}% of {total} masked weights (1 bit per weight); per layer:",
                100.0 * r["kept_fraction"].as_f64().unwrap_or(0.0)
            );
            for l in &layers {
                let (p, k) = (l["params"].as_u64().unwrap_or(0), l["kept"].as_u64().unwrap_or(0));
                let _ = writeln!(
                    s,
                    "  {:<width$} {p:>9} weights, kept {:.1}%",
                    l["weight"].as_str().unwrap_or("?"),
                    100.0 * k as f64 / p.max(1) as f64
                );
            }
        }
        _ => {}
    }
    s
}
