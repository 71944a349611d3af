//! A bench output directory as one page comparing the methods: final accuracy per task and
//! method, average accuracy against forgetting, adapt time and peak memory, artifact size
//! and latency, and the questions a user chooses a method by (new task, old tasks, training
//! speed, test speed, memory, old data) answered with the measured values.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::svg::{self, Chart};
use super::{escape, page_head, write_pair, ReportError};
use crate::bench::{self, BenchReport};

fn title(r: &BenchReport) -> String {
    let file = Path::new(&r.backbone).file_name().map_or(r.backbone.clone(), |f| f.to_string_lossy().into_owned());
    format!("mtpack bench: {} methods on {file}", r.methods.len())
}

fn summary(r: &BenchReport) -> String {
    format!("backbone {}, tasks {}, seed {}", r.backbone, r.columns.join(", "), r.seed)
}

/// Index of the first task column: the backbone's own head, when it has one, comes first.
fn first_task(r: &BenchReport) -> usize {
    usize::from(r.columns.len() > 1 && r.columns.first().is_some_and(|c| c == "backbone"))
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// The questions a method is chosen by, answered with this run's measurements.
pub fn choice_table(r: &BenchReport) -> (Vec<String>, Vec<Vec<String>>) {
    let first = first_task(r);
    let newest = r.columns.last().cloned().unwrap_or_default();
    let fastest = r.methods.iter().map(|m| m.adapt_seconds).fold(f64::INFINITY, f64::min);
    let header = [
        "method".to_string(),
        format!("new task ({newest})"),
        "old tasks (mean)".into(),
        "training speed".into(),
        "test speed".into(),
        "memory".into(),
        "old data".into(),
    ];
    let rows = r
        .methods
        .iter()
        .map(|m| {
            let task_acc = m.final_accuracy.get(first..).unwrap_or_default();
            let old = task_acc.split_last().map(|(_, old)| mean(old.iter().flatten().copied())).unwrap_or_default();
            let newest_acc = task_acc.last().copied().flatten();
            vec![
                m.method.to_string(),
                newest_acc.map_or("-".into(), |a| format!("{a:.3}")),
                old.map_or("-".into(), |a| format!("{a:.3}")),
                format!("{:.1} s ({:.1}x fastest)", m.adapt_seconds, m.adapt_seconds / fastest.max(1e-9)),
                format!("{:.2} ms/task", m.mean_latency_ms()),
                format!("{:.0} MB training, {:.1} MB artifact", m.peak_memory_mb, m.artifact_bytes as f64 / 1e6),
                if m.needs_old_data { "needed" } else { "not needed" }.into(),
            ]
        })
        .collect();
    (header.to_vec(), rows)
}

struct Charts {
    accuracy: Chart,
    tradeoff: Chart,
    adapt: Chart,
    memory: Chart,
    size: Chart,
    latency: Chart,
    choice: Chart,
}

fn charts(r: &BenchReport) -> Charts {
    let names: Vec<String> = r.methods.iter().map(|m| m.method.to_string()).collect();
    let mut cols = r.columns.clone();
    cols.push("average".into());
    let matrix: Vec<Vec<Option<f64>>> = r
        .methods
        .iter()
        .map(|m| m.final_accuracy.iter().copied().chain([Some(m.average_accuracy)]).collect())
        .collect();
    let points: Vec<(String, f64, f64)> =
        r.methods.iter().map(|m| (m.method.to_string(), m.forgetting, m.average_accuracy)).collect();
    let values = |f: fn(&bench::MethodRow) -> f64| r.methods.iter().map(f).collect::<Vec<f64>>();
    let (header, rows) = choice_table(r);
    Charts {
        accuracy: svg::heatmap(&names, &cols, &matrix),
        tradeoff: svg::scatter(&points, "forgetting (lower is better)", "average accuracy"),
        adapt: svg::bars("adapt wall time, s", &names, &values(|m| m.adapt_seconds), 1),
        memory: svg::bars("peak memory of adapt, MB", &names, &values(|m| m.peak_memory_mb), 0),
        size: svg::bars("artifact, MB", &names, &values(|m| m.artifact_bytes as f64 / 1e6), 2),
        latency: svg::bars(
            "latency, ms per task (batch 1, whole artifact)",
            &names,
            &values(|m| m.mean_latency_ms()),
            3,
        ),
        choice: svg::table(&header, &rows),
    }
}

fn html_table(s: &mut String, header: &[String], rows: &[Vec<String>]) {
    let cells =
        |tag: &str, row: &[String]| row.iter().map(|c| format!("<{tag}>{}</{tag}>", escape(c))).collect::<String>();
    let _ = writeln!(s, "<table><tr>{}</tr>", cells("th", header));
    for row in rows {
        let _ = writeln!(s, "<tr>{}</tr>", cells("td", row));
    }
    s.push_str("</table>\n");
}

/// The comparison page.
pub fn html(r: &BenchReport) -> String {
    let c = charts(r);
    let mut s = page_head(&title(r));
    let _ = writeln!(s, "<p>{}</p>", escape(&summary(r)));
    let _ = writeln!(s, "<h2>Choosing a method</h2>");
    let (header, rows) = choice_table(r);
    html_table(&mut s, &header, &rows);
    let _ = writeln!(s, "<h2>Final accuracy</h2>\n<p>Held-out accuracy on each task after the last one.</p>");
    s.push_str(&c.accuracy.svg);
    let _ = writeln!(s, "<h2>Average accuracy against forgetting</h2>");
    s.push_str(&c.tradeoff.svg);
    let _ = writeln!(s, "<h2>Cost</h2>");
    for chart in [&c.adapt, &c.memory, &c.size, &c.latency] {
        s.push_str(&chart.svg);
    }
    let _ = writeln!(s, "<h2>All measurements</h2>");
    let (header, rows) = bench::table(r);
    html_table(&mut s, &header, &rows);
    s.push_str("</body></html>\n");
    s
}

/// The page's charts and choice table on one SVG document, for the PNG.
pub fn figure(r: &BenchReport) -> String {
    let c = charts(r);
    let rows = vec![
        vec![("Final accuracy per task", &c.accuracy), ("Average accuracy against forgetting", &c.tradeoff)],
        vec![("Training", &c.adapt), ("", &c.memory)],
        vec![("Serving", &c.size), ("", &c.latency)],
        vec![("Choosing a method", &c.choice)],
    ];
    svg::figure(&title(r), &[summary(r)], &rows)
}

/// Reads `dir/bench.json` (or `dir` itself when it is the file).
pub fn load(path: &Path) -> Result<BenchReport, LoadError> {
    let file = if path.is_dir() { path.join("bench.json") } else { path.to_path_buf() };
    let text = std::fs::read_to_string(&file).map_err(|source| LoadError::Read { path: file.clone(), source })?;
    let r: BenchReport =
        serde_json::from_str(&text).map_err(|source| LoadError::Parse { path: file.clone(), source })?;
    if r.schema != bench::BENCH_SCHEMA {
        return Err(LoadError::Schema { path: file, found: r.schema });
    }
    Ok(r)
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a bench report")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: schema '{found}', expected '{}'", bench::BENCH_SCHEMA)]
    Schema { path: PathBuf, found: String },
}

/// Writes the comparison page to `out` (HTML) and its figure beside it (`<stem>.svg`,
/// `<stem>.png`); returns the PNG's path.
pub fn write(r: &BenchReport, out: &Path) -> Result<PathBuf, ReportError> {
    write_pair(&html(r), &figure(r), out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::MethodRow;

    fn row(method: &str, acc: [f64; 3], seconds: f64, old_data: bool) -> MethodRow {
        MethodRow {
            method: serde_json::from_value(serde_json::json!(method)).unwrap(),
            final_accuracy: acc.iter().map(|&a| Some(a)).collect(),
            average_accuracy: (acc[1] + acc[2]) / 2.0,
            bwt: -0.125,
            forgetting: 0.25,
            adapt_seconds: seconds,
            peak_memory_mb: 900.0,
            artifact_bytes: 9_250_000,
            artifact_vs_backbone: 1.02,
            latency_ms: vec![1.0, 2.0],
            needs_old_data: old_data,
            pack: format!("bench-out/{method}"),
        }
    }

    fn report() -> BenchReport {
        BenchReport {
            schema: bench::BENCH_SCHEMA.into(),
            backbone: "models/mobilenetv2.onnx".into(),
            columns: vec!["backbone".into(), "fashion".into(), "digits".into()],
            seed: 3,
            methods: vec![
                row("finetune", [0.5, 0.375, 0.875], 20.0, false),
                row("joint", [0.75, 0.625, 0.8125], 10.0, true),
            ],
        }
    }

    #[test]
    fn the_choice_table_answers_with_the_measured_values() {
        let (header, rows) = choice_table(&report());
        assert_eq!(header[1], "new task (digits)");
        // Old tasks: the tasks before the newest, not the backbone's own head.
        assert_eq!(
            rows[0],
            [
                "finetune",
                "0.875",
                "0.375",
                "20.0 s (2.0x fastest)",
                "1.50 ms/task",
                "900 MB training, 9.2 MB artifact",
                "not needed"
            ]
        );
        assert_eq!(rows[1][2], "0.625");
        assert_eq!(rows[1][6], "needed");
    }

    #[test]
    fn the_png_carries_every_label_and_value_of_the_page() {
        let r = report();
        let svg = figure(&r);
        let page = html(&r);
        for needle in ["finetune", "joint", "fashion", "digits", "average", "0.375", "0.625", "forgetting", "old data"]
        {
            assert!(svg.contains(needle), "the figure lacks {needle}");
            assert!(page.contains(needle), "the page lacks {needle}");
        }
        let decode = |svg: &str| image::load_from_memory(&super::super::raster::png(svg).unwrap()).unwrap().to_rgb8();
        let (with, bare) = (decode(&svg), decode(&svg::without_text(&svg)));
        assert_eq!(with.dimensions(), bare.dimensions());
        let inked = |img: &image::RgbImage| img.pixels().filter(|p| p.0.iter().any(|&c| c < 200)).count();
        // The drawing without text is not blank (cells, points, bars) ...
        assert!(inked(&bare) > 10_000, "{}", inked(&bare));
        // ... and the text adds thousands of dark pixels to it.
        let differ = with.pixels().zip(bare.pixels()).filter(|(a, b)| a != b).count();
        assert!(differ > 20_000, "only {differ} pixels differ");
        assert!(inked(&with) > inked(&bare) + 10_000);
    }

    #[test]
    fn loading_names_the_file_and_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bench.json");
        std::fs::write(&file, "{\"schema\": 1").unwrap();
        let e = load(dir.path()).unwrap_err();
        assert!(matches!(e, LoadError::Parse { .. }) && e.to_string().contains("bench.json"), "{e}");
        let mut r = serde_json::to_value(report()).unwrap();
        r["schema"] = "mtpack.bench/0".into();
        std::fs::write(&file, r.to_string()).unwrap();
        let e = load(&file).unwrap_err();
        assert!(e.to_string().contains("mtpack.bench/0"), "{e}");
        assert!(matches!(load(&dir.path().join("none")), Err(LoadError::Read { .. })));
    }
}
