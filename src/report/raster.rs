//! An SVG figure to PNG through resvg, with DejaVu Sans compiled into the binary so the
//! text looks the same on every machine, including ones without any font installed.

use std::sync::{Arc, OnceLock};

use resvg::tiny_skia::{Color, Pixmap, Transform};
use resvg::usvg::{fontdb, Options, Tree};

use super::ReportError;

/// DejaVu Sans 2.37 (Bitstream Vera licence, assets/fonts/LICENSE).
const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
const FAMILY: &str = "DejaVu Sans";
/// Pixels per SVG unit: sharp on high-density screens and slides.
const SCALE: f32 = 2.0;
/// A figure with hundreds of tasks is drawn smaller rather than allocating gigabytes.
const MAX_PIXELS: f32 = 40e6;

fn fonts() -> Arc<fontdb::Database> {
    static DB: OnceLock<Arc<fontdb::Database>> = OnceLock::new();
    DB.get_or_init(|| {
        let mut db = fontdb::Database::new();
        db.load_font_data(FONT.to_vec());
        db.set_sans_serif_family(FAMILY);
        Arc::new(db)
    })
    .clone()
}

/// The figure `svg` (a complete SVG document) as PNG bytes on a white background.
pub fn png(svg: &str) -> Result<Vec<u8>, ReportError> {
    let options = Options { font_family: FAMILY.into(), fontdb: fonts(), ..Options::default() };
    let tree = Tree::from_str(svg, &options).map_err(ReportError::Svg)?;
    let size = tree.size();
    let area = size.width() * size.height();
    let scale = SCALE.min((MAX_PIXELS / area.max(1.0)).sqrt());
    let (w, h) = ((size.width() * scale).ceil() as u32, (size.height() * scale).ceil() as u32);
    let mut pixmap = Pixmap::new(w.max(1), h.max(1)).ok_or(ReportError::Size { width: w, height: h })?;
    pixmap.fill(Color::WHITE);
    resvg::render(&tree, Transform::from_scale(scale, scale), &mut pixmap.as_mut());
    pixmap.encode_png().map_err(|e| ReportError::Encode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(png: &[u8]) -> image::RgbaImage {
        image::load_from_memory(png).unwrap().to_rgba8()
    }

    fn inked(img: &image::RgbaImage) -> usize {
        img.pixels().filter(|p| p.0[..3].iter().any(|&c| c < 128)).count()
    }

    #[test]
    fn text_is_drawn_with_the_bundled_font() {
        let doc = |body: &str| {
            format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"200\" height=\"40\" font-family=\"sans-serif\">{body}</svg>")
        };
        let with = decode(&png(&doc("<text x=\"5\" y=\"25\" font-size=\"16\">fashion 0.817</text>")).unwrap());
        let without = decode(&png(&doc("")).unwrap());
        assert_eq!((with.width(), with.height()), (400, 80));
        assert_eq!(inked(&without), 0);
        // Glyphs cover a visible share of the text's box (not one stray pixel).
        assert!(inked(&with) > 400, "{} dark pixels", inked(&with));
    }

    #[test]
    fn a_huge_figure_is_scaled_down_and_bad_svg_is_an_error() {
        let big = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"20000\" height=\"10000\"></svg>";
        let img = decode(&png(big).unwrap());
        assert!(f64::from(img.width()) * f64::from(img.height()) <= 40.1e6);
        assert!(matches!(png("<svg"), Err(ReportError::Svg(_))));
    }
}
