//! The charts as SVG: each is a `<svg>` element of known size, inlined into the HTML page
//! as is and placed on one figure for the PNG, so both show the same drawing.

use std::fmt::Write as _;

use super::{escape, PALETTE};

const W: f64 = 640.0;
const H: f64 = 300.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 20.0;
const BOTTOM: f64 = 40.0;
/// Width of one character of the 12 px sans-serif text, for sizing columns and margins.
const CHAR: f64 = 7.0;

/// One chart: its `<svg>` element and its size in pixels.
#[derive(Clone, Debug)]
pub struct Chart {
    pub svg: String,
    pub width: f64,
    pub height: f64,
}

fn text_width(s: &str) -> f64 {
    s.chars().count() as f64 * CHAR
}

fn open(width: f64, height: f64, label: &str) -> String {
    format!("<svg width=\"{width}\" height=\"{height}\" role=\"img\" aria-label=\"{}\">\n", escape(label))
}

fn close(mut svg: String, width: f64, height: f64) -> Chart {
    svg.push_str("</svg>\n");
    Chart { svg, width, height }
}

/// White (0) to blue (1).
pub fn heat_colour(v: f64) -> (u8, u8, u8) {
    let v = v.clamp(0.0, 1.0);
    let mix = |a: f64, b: f64| (a + (b - a) * v).round() as u8;
    (mix(255.0, 8.0), mix(255.0, 81.0), mix(255.0, 156.0))
}

/// A table of values in [0, 1] as coloured cells with the value written in each.
pub fn heatmap(rows: &[String], cols: &[String], m: &[Vec<Option<f64>>]) -> Chart {
    let cell = cols.iter().map(|c| text_width(c) + 16.0).fold(80.0, f64::max);
    let left = rows.iter().map(|r| text_width(r) + 16.0).fold(110.0, f64::max);
    let top = 30.0;
    let w = left + cell * cols.len() as f64 + 10.0;
    let h = top + 40.0 * rows.len() as f64 + 10.0;
    let mut s = open(w, h, "accuracy matrix");
    for (c, name) in cols.iter().enumerate() {
        let x = left + cell * (c as f64 + 0.5);
        let _ = writeln!(s, "<text x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{}</text>", top - 10.0, escape(name));
    }
    for (r, name) in rows.iter().enumerate() {
        let y = top + 40.0 * r as f64;
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
                "<rect x=\"{x}\" y=\"{y}\" width=\"{cell}\" height=\"40\" fill=\"{fill}\" stroke=\"#fff\"/><text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"{ink}\">{label}</text>",
                x + cell * 0.5,
                y + 25.0
            );
        }
    }
    close(s, w, h)
}

/// The range of `values`, from zero when they are all positive; [0, 1] when empty or flat.
fn span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (a, b) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if a.is_finite() && b > a {
        (0.0f64.min(a), b)
    } else if b.is_finite() && b > 0.0 {
        (0.0, b)
    } else {
        (0.0, 1.0)
    }
}

/// The two axes of a plot area, the y range written at its ends and the y label turned.
fn axes(s: &mut String, (lo, hi): (f64, f64), py: impl Fn(f64) -> f64, ylabel: &str) {
    let _ = writeln!(
        s,
        "<line x1=\"{LEFT}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#888\"/><line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{}\" stroke=\"#888\"/>",
        H - BOTTOM,
        W - RIGHT,
        H - BOTTOM,
        H - BOTTOM
    );
    for v in [lo, hi] {
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v:.2}</text>", LEFT - 6.0, py(v) + 4.0);
    }
    let _ = writeln!(
        s,
        "<text x=\"14\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 14 {})\">{}</text>",
        (H - BOTTOM + TOP) / 2.0,
        (H - BOTTOM + TOP) / 2.0,
        escape(ylabel)
    );
}

/// The y axis of a line chart: its label and range (from the data when None).
pub struct YAxis<'a> {
    pub label: &'a str,
    pub range: Option<(f64, f64)>,
}

/// Polylines of `series` over `xs` (the x labels), with axes and a legend; series k takes
/// colour `first_colour + k`, so a task keeps its colour across charts.
pub fn lines(xs: &[String], series: &[(String, Vec<Option<f64>>)], y: YAxis, first_colour: usize) -> Chart {
    let YAxis { label: ylabel, range } = y;
    let (lo, hi) = range.unwrap_or_else(|| span(series.iter().flat_map(|(_, v)| v.iter().flatten().copied())));
    let n = xs.len().max(2) - 1;
    let px = |i: usize| LEFT + (W - LEFT - RIGHT) * i as f64 / n as f64;
    let py = |v: f64| TOP + (H - TOP - BOTTOM) * (1.0 - (v - lo) / (hi - lo).max(1e-12));
    let mut s = open(W, H, ylabel);
    axes(&mut s, (lo, hi), py, ylabel);
    // Many x labels (epochs across a long sequence) are thinned to about a dozen.
    let every = xs.len().div_ceil(12).max(1);
    for (i, x) in xs.iter().enumerate().filter(|(i, _)| i % every == 0) {
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            px(i),
            H - BOTTOM + 18.0,
            escape(x)
        );
    }
    for (k, (name, v)) in series.iter().enumerate() {
        let (r, g, b) = PALETTE[(first_colour + k) % PALETTE.len()];
        // Past the palette, colours repeat with a dashed line, so no two series look alike.
        let dash = if first_colour + k >= PALETTE.len() { " stroke-dasharray=\"6 3\"" } else { "" };
        let points: Vec<(f64, f64)> = v.iter().enumerate().filter_map(|(i, y)| y.map(|y| (px(i), py(y)))).collect();
        let joined: Vec<String> = points.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"rgb({r},{g},{b})\" stroke-width=\"2\"{dash} points=\"{}\"/>",
            joined.join(" ")
        );
        for (x, y) in &points {
            let _ = writeln!(s, "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"rgb({r},{g},{b})\"/>");
        }
        let ly = TOP + 18.0 * k as f64;
        let _ = writeln!(
            s,
            "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"rgb({r},{g},{b})\" stroke-width=\"4\"{dash}/><text x=\"{}\" y=\"{}\">{}</text>",
            W - RIGHT + 14.0,
            ly + 6.0,
            W - RIGHT + 32.0,
            ly + 6.0,
            W - RIGHT + 38.0,
            ly + 9.0,
            escape(name)
        );
    }
    close(s, W, H)
}

/// Every task's epoch losses on one axis, epochs counted across the sequence.
pub fn loss_curves(tasks: &[(String, Vec<f64>)], first_colour: usize) -> Chart {
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
    lines(&xs, &series, YAxis { label: "training loss", range: None }, first_colour)
}

/// The range of `values` widened by a tenth on each side (at least 0.01), so no point
/// sits on an axis.
fn padded(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (a, b) =
        values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !a.is_finite() {
        return (0.0, 1.0);
    }
    let d = ((b - a) * 0.1).max(0.01);
    (a - d, b + d)
}

/// Label positions next to their points, pushed down where they would overlap an earlier
/// label (methods with equal results sit on the same point).
fn place_labels(points: &[(f64, f64)], widths: &[f64]) -> Vec<(f64, f64)> {
    let mut order: Vec<usize> = (0..points.len()).collect();
    order.sort_by(|&a, &b| points[a].1.total_cmp(&points[b].1));
    let mut placed: Vec<(f64, f64, f64)> = Vec::new();
    let mut at = vec![(0.0, 0.0); points.len()];
    for i in order {
        let (x, mut y) = (points[i].0 + 8.0, points[i].1 + 4.0);
        let w = widths.get(i).copied().unwrap_or(0.0);
        // A label pushed to py + 14 can still test closer than 14 to py by a rounding
        // (58.00000000000001 + 14 = 72.0): without the margin that label was pushed to the
        // same place forever, and `report` hung on a real bench.
        while let Some(&(_, py, _)) =
            placed.iter().find(|&&(px, py, pw)| (y - py).abs() < 14.0 - 1e-6 && x < px + pw && px < x + w)
        {
            y = py + 14.0;
        }
        placed.push((x, y, w));
        at[i] = (x, y);
    }
    at
}

/// One labelled point per (name, x, y), with both axes labelled and their ranges written.
pub fn scatter(points: &[(String, f64, f64)], xlabel: &str, ylabel: &str) -> Chart {
    let (xlo, xhi) = padded(points.iter().map(|p| p.1));
    let (ylo, yhi) = padded(points.iter().map(|p| p.2));
    let px = |v: f64| LEFT + (W - LEFT - RIGHT) * (v - xlo) / (xhi - xlo);
    let py = |v: f64| TOP + (H - TOP - BOTTOM) * (1.0 - (v - ylo) / (yhi - ylo));
    let mut s = open(W, H, &format!("{ylabel} against {xlabel}"));
    axes(&mut s, (ylo, yhi), py, ylabel);
    for v in [xlo, xhi] {
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{v:.2}</text>", px(v), H - BOTTOM + 18.0);
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
        (LEFT + W - RIGHT) / 2.0,
        H - 6.0,
        escape(xlabel)
    );
    let centres: Vec<(f64, f64)> = points.iter().map(|(_, x, y)| (px(*x), py(*y))).collect();
    let widths: Vec<f64> = points.iter().map(|(name, _, _)| text_width(name)).collect();
    let labels = place_labels(&centres, &widths);
    for (k, (((name, _, _), (cx, cy)), (lx, ly))) in points.iter().zip(&centres).zip(&labels).enumerate() {
        let (r, g, b) = PALETTE[k % PALETTE.len()];
        let _ = writeln!(
            s,
            "<circle cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"5\" fill=\"rgb({r},{g},{b})\"/><text x=\"{lx:.1}\" y=\"{ly:.1}\">{}</text>",
            escape(name)
        );
    }
    close(s, W, H)
}

/// Horizontal bars, one per label, each with its value written after it.
pub fn bars(title: &str, labels: &[String], values: &[f64], decimals: usize) -> Chart {
    let left = labels.iter().map(|l| text_width(l) + 14.0).fold(60.0, f64::max);
    let (bar_w, row) = (200.0, 22.0);
    let w = left + bar_w + 70.0;
    let h = 26.0 + row * labels.len() as f64 + 6.0;
    let max = values.iter().copied().filter(|v| v.is_finite()).fold(0.0, f64::max).max(1e-12);
    let mut s = open(w, h, title);
    let _ = writeln!(s, "<text x=\"{left}\" y=\"16\" font-weight=\"bold\">{}</text>", escape(title));
    for (i, (label, v)) in labels.iter().zip(values).enumerate() {
        let y = 26.0 + row * i as f64;
        let len = if v.is_finite() { bar_w * (v / max).clamp(0.0, 1.0) } else { 0.0 };
        let (r, g, b) = PALETTE[i % PALETTE.len()];
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text><rect x=\"{left}\" y=\"{}\" width=\"{len:.1}\" height=\"14\" fill=\"rgb({r},{g},{b})\"/><text x=\"{:.1}\" y=\"{}\">{v:.decimals$}</text>",
            left - 6.0,
            y + 12.0,
            escape(label),
            y + 1.0,
            left + len + 5.0,
            y + 12.0
        );
    }
    close(s, w, h)
}

/// A table of text: the first column left-aligned, the others right-aligned, a rule under
/// the header.
pub fn table(header: &[String], rows: &[Vec<String>]) -> Chart {
    let widths: Vec<f64> = (0..header.len())
        .map(|c| {
            let cells = std::iter::once(&header[c]).chain(rows.iter().filter_map(|r| r.get(c)));
            cells.map(|t| text_width(t)).fold(0.0, f64::max) + 18.0
        })
        .collect();
    let w: f64 = widths.iter().sum::<f64>() + 4.0;
    let h = 22.0 * (rows.len() + 1) as f64 + 8.0;
    let mut s = open(w, h, "table");
    let all = std::iter::once(header).chain(rows.iter().map(Vec::as_slice));
    for (r, cells) in all.enumerate() {
        let y = 16.0 + 22.0 * r as f64;
        let mut x = 2.0;
        for (c, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            let (at, anchor) = if c == 0 { (x + 4.0, "start") } else { (x + width - 6.0, "end") };
            let weight = if r == 0 { " font-weight=\"bold\"" } else { "" };
            let _ = writeln!(s, "<text x=\"{at}\" y=\"{y}\" text-anchor=\"{anchor}\"{weight}>{}</text>", escape(cell));
            x += width;
        }
        if r == 0 {
            let _ = writeln!(
                s,
                "<line x1=\"2\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#888\"/>",
                y + 6.0,
                w - 2.0,
                y + 6.0
            );
        }
    }
    close(s, w, h)
}

/// Charts laid out in rows (side by side within a row, rows one under the other), each with a
/// heading, under a title and lines of text: one self-contained SVG document.
pub fn figure(title: &str, lines_of_text: &[String], rows: &[Vec<(&str, &Chart)>]) -> String {
    let gap = 24.0;
    let mut body = String::new();
    let mut y = 34.0;
    let mut width: f64 = text_width(title) * 1.4 + 2.0 * gap;
    let _ =
        writeln!(body, "<text x=\"{gap}\" y=\"{y}\" font-size=\"20\" font-weight=\"bold\">{}</text>", escape(title));
    for line in lines_of_text {
        y += 20.0;
        width = width.max(text_width(line) + 2.0 * gap);
        let _ = writeln!(body, "<text x=\"{gap}\" y=\"{y}\">{}</text>", escape(line));
    }
    y += 16.0;
    for row in rows {
        let mut x = gap;
        let mut tallest: f64 = 0.0;
        for (heading, chart) in row {
            let _ = writeln!(
                body,
                "<text x=\"{x}\" y=\"{}\" font-size=\"15\" font-weight=\"bold\">{}</text>",
                y + 16.0,
                escape(heading)
            );
            let _ = writeln!(body, "<g transform=\"translate({x} {})\">\n{}</g>", y + 26.0, chart.svg);
            x += chart.width.max(text_width(heading) * 1.3) + gap;
            tallest = tallest.max(chart.height);
        }
        width = width.max(x);
        y += 26.0 + tallest + gap;
    }
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{y}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>\n{body}</svg>\n"
    )
}

/// `svg` with every text element taken out: the drawing as a rasteriser without fonts would
/// make it, to check that the labels and values reach the PNG.
pub fn without_text(svg: &str) -> String {
    let mut out = String::new();
    let mut rest = svg;
    while let Some(start) = rest.find("<text") {
        out.push_str(rest.get(..start).unwrap_or_default());
        let end = rest.get(start..).and_then(|r| r.find("</text>")).map_or(rest.len(), |e| start + e + "</text>".len());
        rest = rest.get(end..).unwrap_or_default();
    }
    out + rest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_that_crowd_one_spot_are_stacked_and_placing_them_ends() {
        // A real bench's (forgetting, average accuracy): the piggyback label was pushed to
        // 58.00000000000001 + 14 = 72.0, which tests closer than 14 to 58.00000000000001,
        // and placing it never ended.
        let points: Vec<(String, f64, f64)> = [
            ("finetune", 0.41715352697095437, 0.5725454126325497),
            ("feature-extract", 0.0, 0.8470823728292608),
            ("joint", 0.004500000000000004, 0.904833871215614),
            ("lwf", 0.09006016597510369, 0.8111140310434917),
            ("ewc", 0.04200000000000004, 0.8489309973874288),
            ("packnet", 0.0, 0.9257376671277086),
            ("piggyback", 0.0, 0.8787946826494544),
        ]
        .map(|(n, x, y)| (n.to_string(), x, y))
        .to_vec();
        let chart = scatter(&points, "forgetting", "average accuracy");
        let labels: Vec<(f64, f64)> = chart
            .svg
            .lines()
            .filter(|l| l.starts_with("<circle"))
            .filter_map(|l| {
                let at = |k: &str| l.split(k).nth(1)?.split('"').nth(1)?.parse::<f64>().ok();
                Some((at(" x=")?, at(" y=")?))
            })
            .collect();
        assert_eq!(labels.len(), points.len());
        for (i, a) in labels.iter().enumerate() {
            for b in &labels[i + 1..] {
                assert!((a.1 - b.1).abs() >= 13.9 || (a.0 - b.0).abs() > 100.0, "labels overlap: {a:?} {b:?}");
            }
        }
    }

    #[test]
    fn series_past_the_palette_are_dashed_so_none_look_alike() {
        let xs: Vec<String> = ["a", "b"].map(String::from).to_vec();
        let series: Vec<(String, Vec<Option<f64>>)> =
            (0..PALETTE.len() + 2).map(|k| (format!("s{k}"), vec![Some(0.1), Some(k as f64 / 10.0)])).collect();
        let chart = lines(&xs, &series, YAxis { label: "accuracy", range: Some((0.0, 1.0)) }, 0);
        let styles: Vec<(&str, bool)> = chart
            .svg
            .lines()
            .filter(|l| l.starts_with("<polyline"))
            .map(|l| {
                (
                    l.split("stroke=\"").nth(1).unwrap_or_default().split('"').next().unwrap_or_default(),
                    l.contains("dasharray"),
                )
            })
            .collect();
        assert_eq!(styles.len(), PALETTE.len() + 2);
        for (i, a) in styles.iter().enumerate() {
            for b in &styles[i + 1..] {
                assert_ne!(a, b, "two series drawn alike");
            }
        }
        assert!(styles[..PALETTE.len()].iter().all(|(_, dashed)| !dashed));
    }
}
