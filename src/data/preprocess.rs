//! Preprocessing a task declares and the manifest records: scale to [0,1], resize (bilinear,
//! half-pixel centres as in PyTorch's `interpolate(align_corners=False)`), repeat a grey
//! channel, normalise with a per-channel mean and standard deviation.

use ndarray::{Array4, ArrayD, Axis, Ix4};
use serde::{Deserialize, Serialize};

use super::DataError;
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct Preprocessing {
    /// Target [height, width]; None keeps the stored size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize: Option<[usize; 2]>,
    /// Channels after repeating a single grey channel (usually 3); None keeps them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<usize>,
    /// Per-channel mean subtracted after scaling to [0, 1]; empty means none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mean: Vec<f32>,
    /// Per-channel standard deviation divided by; empty means none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub std: Vec<f32>,
    /// The layout the backbone's input takes; None is NCHW (datasets are stored NCHW).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<Layout>,
}

/// Image tensor layouts: PyTorch exports take NCHW, TensorFlow (tf2onnx) exports NHWC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    #[default]
    Nchw,
    Nhwc,
}

impl std::str::FromStr for Layout {
    type Err = String;
    fn from_str(s: &str) -> Result<Layout, String> {
        match s {
            "nchw" => Ok(Layout::Nchw),
            "nhwc" => Ok(Layout::Nhwc),
            other => Err(format!("layout '{other}' is not nchw or nhwc")),
        }
    }
}

impl Layout {
    /// The layout a declared image input takes: NHWC when its last dimension is a fixed 1, 3
    /// or 4 channels and its second is not; NCHW otherwise (and for anything not rank 4).
    pub fn of_input(dims: &[crate::onnx::Dim]) -> Layout {
        use crate::onnx::Dim;
        let ch = |d: Option<&Dim>| matches!(d, Some(Dim::Fixed(1 | 3 | 4)));
        if dims.len() == 4 && ch(dims.get(3)) && !ch(dims.get(1)) {
            Layout::Nhwc
        } else {
            Layout::Nchw
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Layout::Nchw => "nchw",
            Layout::Nhwc => "nhwc",
        }
    }
}

impl Preprocessing {
    /// Resized to `size` x `size`, three channels, normalised with ImageNet's mean and std:
    /// what torchvision-trained backbones expect.
    pub fn imagenet(size: usize) -> Preprocessing {
        Preprocessing {
            resize: Some([size, size]),
            channels: Some(3),
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
            layout: None,
        }
    }

    pub fn is_identity(&self) -> bool {
        *self == Preprocessing::default()
    }

    pub fn validate(&self) -> Result<(), DataError> {
        let bad = |m: String| Err(DataError::Preprocessing(m));
        if let Some([h, w]) = self.resize {
            if h == 0 || w == 0 {
                return bad(format!("resize {h}x{w} has a zero side"));
            }
        }
        if self.channels == Some(0) {
            return bad("channels must be at least 1".into());
        }
        if self.mean.len() != self.std.len() && !self.std.is_empty() && !self.mean.is_empty() {
            return bad(format!("{} mean values but {} std values", self.mean.len(), self.std.len()));
        }
        if let Some(s) = self.std.iter().find(|s| s.is_nan() || **s <= 0.0) {
            return bad(format!("std {s} is not positive"));
        }
        Ok(())
    }

    /// Applies to images [N, C, H, W]; `pixel_max` is the value that maps to 1.0 (255 for
    /// 8-bit images, 16 for the UCI digits, 1 for data already scaled).
    pub fn apply(&self, x: &Tensor, pixel_max: f32) -> Result<Array4<f32>, DataError> {
        self.validate()?;
        let scale = 1.0 / pixel_max;
        let scaled: ArrayD<f32> = match x {
            Tensor::U8(a) => a.mapv(|v| v as f32 * scale),
            Tensor::F32(a) => a.mapv(|v| v * scale),
            other => {
                return Err(DataError::Preprocessing(format!(
                    "images of type {} cannot be preprocessed",
                    other.dtype()
                )))
            }
        };
        let mut img = scaled
            .into_dimensionality::<Ix4>()
            .map_err(|_| DataError::Preprocessing(format!("images must be [N, C, H, W], got {:?}", x.shape())))?;
        let (n, c, h, w) = img.dim();
        let out = [n, self.channels.unwrap_or(c), self.resize.map_or(h, |r| r[0]), self.resize.map_or(w, |r| r[1])];
        let bytes = out.iter().try_fold(4u64, |acc, &d| acc.checked_mul(d as u64));
        crate::alloc::check_fits(bytes)
            .map_err(|e| DataError::Preprocessing(format!("images of {out:?} after preprocessing: {e}")))?;
        if let Some([h, w]) = self.resize {
            img = resize_bilinear(&img, h, w);
        }
        if let Some(c) = self.channels {
            img = repeat_channels(img, c)?;
        }
        normalise(&mut img, &self.mean, &self.std)?;
        if self.layout == Some(Layout::Nhwc) {
            img = img.permuted_axes([0, 2, 3, 1]).as_standard_layout().to_owned();
        }
        Ok(img)
    }

    /// The shape of one preprocessed image in the backbone's layout, from the stored
    /// [C, H, W] size.
    pub fn image_shape(&self, stored: [usize; 3]) -> [usize; 3] {
        let [c, h, w] = stored;
        let [h, w] = self.resize.unwrap_or([h, w]);
        let c = self.channels.unwrap_or(c);
        match self.layout {
            Some(Layout::Nhwc) => [h, w, c],
            _ => [c, h, w],
        }
    }
}

fn repeat_channels(img: Array4<f32>, c: usize) -> Result<Array4<f32>, DataError> {
    let have = img.shape()[1];
    if have == c {
        return Ok(img);
    }
    if have != 1 {
        return Err(DataError::Preprocessing(format!(
            "cannot turn {have} channels into {c}: only a single channel repeats"
        )));
    }
    // Written plane by plane in row-major order: ndarray's `concatenate` along axis 1 builds
    // its result by appending, which leaves the channel axis outermost in memory, and every
    // later copy of such an array (to the training engine) went element by element: 1.9 s for
    // 6000 images at 64x64, longer than the data took to load.
    let (n, _, h, w) = img.dim();
    let src = img.as_standard_layout();
    let src = src.as_slice().ok_or_else(|| DataError::Preprocessing("images are not contiguous".into()))?;
    let mut out = Vec::with_capacity(n * c * h * w);
    for plane in src.chunks_exact((h * w).max(1)) {
        for _ in 0..c {
            out.extend_from_slice(plane);
        }
    }
    Array4::from_shape_vec((n, c, h, w), out).map_err(|e| DataError::Preprocessing(e.to_string()))
}

fn normalise(img: &mut Array4<f32>, mean: &[f32], std: &[f32]) -> Result<(), DataError> {
    let c = img.shape()[1];
    let per = |v: &[f32], what: &str, default: f32| -> Result<Vec<f32>, DataError> {
        match v.len() {
            0 => Ok(vec![default; c]),
            1 => Ok(vec![v[0]; c]),
            n if n == c => Ok(v.to_vec()),
            n => Err(DataError::Preprocessing(format!("{n} {what} values for {c} channels"))),
        }
    };
    let (m, s) = (per(mean, "mean", 0.0)?, per(std, "std", 1.0)?);
    for (ch, mut plane) in img.axis_iter_mut(Axis(1)).enumerate() {
        let (mc, sc) = (m[ch], s[ch]);
        plane.mapv_inplace(|v| (v - mc) / sc);
    }
    Ok(())
}

/// Bilinear resize with half-pixel centres (PyTorch `align_corners=False`, no antialias).
pub fn resize_bilinear(img: &Array4<f32>, oh: usize, ow: usize) -> Array4<f32> {
    let (n, c, ih, iw) = img.dim();
    if (ih, iw) == (oh, ow) {
        return img.clone();
    }
    let coords = |out: usize, inp: usize| -> Vec<(usize, usize, f32)> {
        let scale = inp as f32 / out as f32;
        (0..out)
            .map(|o| {
                let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
                let lo = (src.floor() as usize).min(inp - 1);
                let hi = (lo + 1).min(inp - 1);
                (lo, hi, src - lo as f32)
            })
            .collect()
    };
    let (ys, xs) = (coords(oh, ih), coords(ow, iw));
    let mut out = Array4::<f32>::zeros((n, c, oh, ow));
    for b in 0..n {
        for ch in 0..c {
            let src = img.index_axis(Axis(0), b);
            let src = src.index_axis(Axis(0), ch);
            for (oy, &(y0, y1, fy)) in ys.iter().enumerate() {
                for (ox, &(x0, x1, fx)) in xs.iter().enumerate() {
                    let top = src[[y0, x0]] * (1.0 - fx) + src[[y0, x1]] * fx;
                    let bot = src[[y1, x0]] * (1.0 - fx) + src[[y1, x1]] * fx;
                    out[[b, ch, oy, ox]] = top * (1.0 - fy) + bot * fy;
                }
            }
        }
    }
    out
}

pub fn parse_hw(s: &str) -> Result<[usize; 2], String> {
    let (h, w) = s.split_once(['x', 'X']).ok_or_else(|| format!("'{s}' is not HxW (e.g. 64x64)"))?;
    let p = |v: &str| v.trim().parse::<usize>().map_err(|_| format!("'{s}' is not HxW (e.g. 64x64)"));
    Ok([p(h)?, p(w)?])
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    #[test]
    fn upsample_2x_matches_pytorch_half_pixel() {
        // torch.nn.functional.interpolate([[0, 1]], size=4, mode="bilinear",
        // align_corners=False) along one axis gives [0, 0.25, 0.75, 1].
        let img = Array4::from_shape_vec((1, 1, 1, 2), vec![0.0, 1.0]).unwrap();
        let out = resize_bilinear(&img, 1, 4);
        assert_eq!(out.iter().copied().collect::<Vec<_>>(), vec![0.0, 0.25, 0.75, 1.0]);
    }

    #[test]
    fn full_pipeline_scales_repeats_and_normalises() {
        let x = Tensor::U8(ArrayD::from_shape_vec(IxDyn(&[1, 1, 2, 2]), vec![0, 255, 255, 0]).unwrap());
        let p = Preprocessing { resize: None, channels: Some(3), mean: vec![0.5], std: vec![0.5], layout: None };
        let out = p.apply(&x, 255.0).unwrap();
        assert_eq!(out.dim(), (1, 3, 2, 2));
        assert_eq!(out[[0, 2, 0, 1]], 1.0);
        assert_eq!(out[[0, 1, 0, 0]], -1.0);
        let nhwc = Preprocessing { layout: Some(Layout::Nhwc), ..p }.apply(&x, 255.0).unwrap();
        assert_eq!(nhwc.dim(), (1, 2, 2, 3));
        assert_eq!(nhwc[[0, 0, 1, 2]], 1.0);
        assert_eq!(nhwc[[0, 0, 0, 1]], -1.0);
    }

    #[test]
    fn repeated_channels_are_row_major_image_by_image() {
        let x = Array4::from_shape_vec((2, 1, 1, 2), vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let out = repeat_channels(x, 3).unwrap();
        // Row-major, so the engine copies the buffer at once instead of element by element.
        assert_eq!(out.as_slice(), Some(&[1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0, 3.0, 4.0][..]));
    }

    #[test]
    fn layout_is_read_from_the_declared_input() {
        use crate::onnx::Dim::{Fixed, Named};
        let n = || Named("N".into());
        assert_eq!(Layout::of_input(&[n(), Fixed(224), Fixed(224), Fixed(3)]), Layout::Nhwc);
        assert_eq!(Layout::of_input(&[n(), Fixed(3), Fixed(224), Fixed(224)]), Layout::Nchw);
        assert_eq!(Layout::of_input(&[n(), Fixed(1), Fixed(8), Fixed(1)]), Layout::Nchw);
        assert_eq!(Layout::of_input(&[n(), Fixed(8)]), Layout::Nchw);
    }

    #[test]
    fn bad_settings_are_named() {
        let x = Tensor::U8(ArrayD::zeros(IxDyn(&[1, 2, 2, 2])));
        let p = Preprocessing { channels: Some(3), ..Default::default() };
        assert!(p.apply(&x, 255.0).unwrap_err().to_string().contains("2 channels into 3"));
        let p = Preprocessing { std: vec![0.0], ..Default::default() };
        assert!(p.validate().is_err());
    }
}
