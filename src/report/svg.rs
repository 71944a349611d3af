//! The charts as inline SVG.

use std::fmt::Write as _;

use super::{escape, PALETTE};

const W: f64 = 640.0;
const H: f64 = 300.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 20.0;
const BOTTOM: f64 = 40.0;

/// White (0) to blue (1).
pub fn heat_colour(v: f64) -> (u8, u8, u8) {
    let v = v.clamp(0.0, 1.0);
    let mix = |a: f64, b: f64| (a + (b - a) * v).round() as u8;
    (mix(255.0, 8.0), mix(255.0, 81.0), mix(255.0, 156.0))
}

pub fn heatmap(rows: &[String], cols: &[String], m: &[Vec<Option<f64>>]) -> String {
    let cell = 80.0;
    let (left, top) = (110.0, 30.0);
    let w = left + cell * cols.len() as f64 + 10.0;
    let h = top + cell * 0.5 * rows.len() as f64 + 10.0;
    let mut s = format!("<svg width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"accuracy matrix\">\n");
    for (c, name) in cols.iter().enumerate() {
        let x = left + cell * (c as f64 + 0.5);
        let _ = writeln!(s, "<text x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{}</text>", top - 10.0, escape(name));
    }
    for (r, name) in rows.iter().enumerate() {
        let y = top + cell * 0.5 * r as f64;
        let _ =
            writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>", left - 8.0, y + 25.0, escape(name));
        for c in 0..cols.len() {
            let x = left + cell * c as f64;
            let v = m.get(r).and_then(|row| row.get(c)).copied().flatten();
            let (fill, label) = match v {
                Some(v) => {
                    let (red, g, b) = heat_colour(v);
                    (format!("rgb({red},{g},{b})"), format!("{v:.3}"))
                }
                None => ("#f4f4f4".to_string(), "-".to_string()),
            };
            let ink = if v.unwrap_or(0.0) > 0.55 { "#fff" } else { "#222" };
            let _ = writeln!(
                s,
                "<rect x=\"{x}\" y=\"{y}\" width=\"{cell}\" height=\"{}\" fill=\"{fill}\" stroke=\"#fff\"/><text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"{ink}\">{label}</text>",
                cell * 0.5,
                x + cell * 0.5,
                y + 25.0
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

/// Polylines of `series` over `xs` (the x labels), with axes and a legend.
pub fn lines(xs: &[String], series: &[(String, Vec<Option<f64>>)], ylabel: &str, range: Option<(f64, f64)>) -> String {
    let values = series.iter().flat_map(|(_, v)| v.iter().flatten().copied());
    let (lo, hi) = range.unwrap_or_else(|| {
        let (a, b) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
        if a.is_finite() && b > a {
            (0.0f64.min(a), b)
        } else {
            (0.0, 1.0)
        }
    });
    let n = xs.len().max(2) - 1;
    let px = |i: usize| LEFT + (W - LEFT - RIGHT) * i as f64 / n as f64;
    let py = |v: f64| TOP + (H - TOP - BOTTOM) * (1.0 - (v - lo) / (hi - lo).max(1e-12));
    let mut s = format!("<svg width=\"{W}\" height=\"{H}\" role=\"img\" aria-label=\"{}\">\n", escape(ylabel));
    let _ = writeln!(
        s,
        "<line x1=\"{LEFT}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#888\"/><line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{}\" stroke=\"#888\"/>",
        H - BOTTOM,
        W - RIGHT,
        H - BOTTOM,
        H - BOTTOM
    );
    for (v, anchor) in [(lo, "end"), (hi, "end")] {
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"{anchor}\">{v:.2}</text>", LEFT - 6.0, py(v) + 4.0);
    }
    let _ = writeln!(
        s,
        "<text x=\"12\" y=\"{}\" transform=\"rotate(-90 12 {})\">{}</text>",
        H / 2.0,
        H / 2.0,
        escape(ylabel)
    );
    for (i, x) in xs.iter().enumerate() {
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            px(i),
            H - BOTTOM + 18.0,
            escape(x)
        );
    }
    for (k, (name, v)) in series.iter().enumerate() {
        let (r, g, b) = PALETTE[k % PALETTE.len()];
        let points: Vec<String> =
            v.iter().enumerate().filter_map(|(i, y)| y.map(|y| format!("{:.1},{:.1}", px(i), py(y)))).collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"rgb({r},{g},{b})\" stroke-width=\"2\" points=\"{}\"/>",
            points.join(" ")
        );
        for p in &points {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(s, "<circle cx=\"{x}\" cy=\"{y}\" r=\"3\" fill=\"rgb({r},{g},{b})\"/>");
        }
        let ly = TOP + 18.0 * k as f64;
        let _ = writeln!(
            s,
            "<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"4\" fill=\"rgb({r},{g},{b})\"/><text x=\"{}\" y=\"{}\">{}</text>",
            W - RIGHT + 12.0,
            ly + 4.0,
            W - RIGHT + 30.0,
            ly + 9.0,
            escape(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Every task's epoch losses on one axis, epochs counted across the sequence.
pub fn loss_curves(tasks: &[(String, Vec<f64>)]) -> String {
    let total: usize = tasks.iter().map(|(_, v)| v.len()).sum();
    let xs: Vec<String> = (1..=total.max(1)).map(|e| e.to_string()).collect();
    let mut offset = 0;
    let series: Vec<(String, Vec<Option<f64>>)> = tasks
        .iter()
        .map(|(name, v)| {
            let mut row = vec![None; total.max(1)];
            for (i, l) in v.iter().enumerate() {
                if let Some(slot) = row.get_mut(offset + i) {
                    *slot = Some(*l);
                }
            }
            offset += v.len();
            (name.clone(), row)
        })
        .collect();
    lines(&xs, &series, "training loss", None)
}
