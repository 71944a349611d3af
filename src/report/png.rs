//! The heatmap and the accuracy lines rasterised into one PNG (no text: the HTML page has
//! the labels; the PNG is for slides and issue threads).

use image::{Rgb, RgbImage};

use super::svg::heat_colour;
use super::{series, PALETTE};
use crate::pack::Manifest;

const W: u32 = 960;
const H: u32 = 400;
const PAD: u32 = 20;

fn rect(img: &mut RgbImage, x0: u32, y0: u32, w: u32, h: u32, c: Rgb<u8>) {
    for y in y0..(y0 + h).min(img.height()) {
        for x in x0..(x0 + w).min(img.width()) {
            img.put_pixel(x, y, c);
        }
    }
}

/// A line of width 3 from (x0, y0) to (x1, y1).
fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb<u8>) {
    let steps = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
    for i in 0..=steps {
        let t = i as f64 / steps as f64;
        let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
        for dy in -1i64..=1 {
            for dx in -1i64..=1 {
                let (px, py) = (x.round() as i64 + dx, y.round() as i64 + dy);
                if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                    img.put_pixel(px as u32, py as u32, c);
                }
            }
        }
    }
}

pub fn render(m: &Manifest) -> Vec<u8> {
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    // Left half: the accuracy matrix.
    let (rows, cols) = (m.accuracy_matrix.len().max(1) as u32, m.columns.len().max(1) as u32);
    let half = W / 2 - 2 * PAD;
    let (cw, ch) = (half / cols, (H - 2 * PAD) / rows);
    for (r, row) in m.accuracy_matrix.iter().enumerate() {
        for c in 0..m.columns.len() {
            let colour = match row.get(c).copied().flatten() {
                Some(v) => {
                    let (red, g, b) = heat_colour(v);
                    Rgb([red, g, b])
                }
                None => Rgb([244, 244, 244]),
            };
            rect(
                &mut img,
                PAD + c as u32 * cw + 1,
                PAD + r as u32 * ch + 1,
                cw.saturating_sub(2),
                ch.saturating_sub(2),
                colour,
            );
        }
    }
    // Right half: each column's accuracy over the rows, on [0, 1].
    let (x0, x1) = (f64::from(W / 2 + PAD), f64::from(W - PAD));
    let (y0, y1) = (f64::from(PAD), f64::from(H - PAD));
    let grey = Rgb([136, 136, 136]);
    line(&mut img, (x0, y1), (x1, y1), grey);
    line(&mut img, (x0, y0), (x0, y1), grey);
    let n = (m.accuracy_matrix.len().max(2) - 1) as f64;
    for (k, (_, values)) in series(m).iter().enumerate() {
        let (r, g, b) = PALETTE[k % PALETTE.len()];
        let pts: Vec<(f64, f64)> = values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| (x0 + (x1 - x0) * i as f64 / n, y1 - (y1 - y0) * v.clamp(0.0, 1.0))))
            .collect();
        for w in pts.windows(2) {
            if let [a, b2] = w {
                line(&mut img, *a, *b2, Rgb([r, g, b]));
            }
        }
        for p in &pts {
            line(&mut img, (p.0 - 2.0, p.1), (p.0 + 2.0, p.1), Rgb([r, g, b]));
        }
    }
    let mut out = Vec::new();
    // Encoding an in-memory RGB image cannot fail short of running out of memory.
    let _ = image::DynamicImage::ImageRgb8(img).write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png);
    out
}
