//! Resize (and the older Upsample) as a product with one interpolation matrix per resized
//! axis. Interpolation is linear in the input, so for fixed sizes it is `A_h · X · A_wᵀ`: the
//! gradient comes from the matrix products, and nearest, linear and cubic share one code path.
//! ViT exports resize their position embeddings this way (bicubic, half-pixel).

use candle_core::{DType, Tensor};

use super::{ints, invalid, opt, req};
use crate::engine::registry::{BuildCtx, FnOp, Op, OpSpec, Registry};
use crate::engine::EngineError;
use crate::onnx::attr;
use crate::onnx::pb::NodeProto;

pub fn register(r: &mut Registry) {
    r.insert("Resize", OpSpec::new(1, 4, build_resize).since(10));
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Nearest(Rounding),
    Linear,
    Cubic { a: f64, exclude_outside: bool },
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Rounding {
    PreferFloor,
    PreferCeil,
    Floor,
    Ceil,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Coords {
    HalfPixel,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
}

fn parse(node: &NodeProto, opset: i64) -> Result<(Mode, Coords), EngineError> {
    let rounding = match attr::string(node, "nearest_mode")?.as_deref().unwrap_or("round_prefer_floor") {
        "round_prefer_floor" => Rounding::PreferFloor,
        "round_prefer_ceil" => Rounding::PreferCeil,
        "floor" => Rounding::Floor,
        "ceil" => Rounding::Ceil,
        other => return Err(invalid(node, format!("nearest_mode '{other}' is not supported"))),
    };
    let mode = match attr::string(node, "mode")?.as_deref().unwrap_or("nearest") {
        "nearest" => Mode::Nearest(rounding),
        "linear" | "bilinear" | "trilinear" => Mode::Linear,
        "cubic" | "bicubic" => Mode::Cubic {
            a: attr::float_or(node, "cubic_coeff_a", -0.75)? as f64,
            exclude_outside: attr::int_or(node, "exclude_outside", 0)? != 0,
        },
        other => return Err(invalid(node, format!("mode '{other}' is not supported"))),
    };
    // Opset 10 had no coordinate_transformation_mode: it behaved as asymmetric.
    let default = if opset < 11 { "asymmetric" } else { "half_pixel" };
    let coords = match attr::string(node, "coordinate_transformation_mode")?.as_deref().unwrap_or(default) {
        "half_pixel" => Coords::HalfPixel,
        "pytorch_half_pixel" => Coords::PytorchHalfPixel,
        "align_corners" => Coords::AlignCorners,
        "asymmetric" => Coords::Asymmetric,
        other => return Err(invalid(node, format!("coordinate_transformation_mode '{other}' is not supported"))),
    };
    if attr::int_or(node, "antialias", 0)? != 0 {
        return Err(invalid(node, "antialias=1 is not supported"));
    }
    let policy = attr::string(node, "keep_aspect_ratio_policy")?;
    if policy.as_deref().is_some_and(|p| p != "stretch") {
        return Err(invalid(node, "keep_aspect_ratio_policy other than 'stretch' is not supported"));
    }
    Ok((mode, coords))
}

fn build_resize(node: &NodeProto, ctx: &BuildCtx) -> Result<Box<dyn Op>, EngineError> {
    let (mode, coords) = parse(node, ctx.opset)?;
    let axes_attr = attr::ints(node, "axes")?;
    // Opset 10: (X, scales). From 11: (X, roi, scales, sizes).
    let (scales_at, sizes_at) = if ctx.opset < 11 { (1, usize::MAX) } else { (2, 3) };
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let a = req(x, 0)?;
        let rank = a.rank();
        let axes: Vec<usize> = match &axes_attr {
            Some(v) => v.iter().map(|&d| super::axis(d, rank)).collect::<candle_core::Result<_>>()?,
            None => (0..rank).collect(),
        };
        let sizes = opt(x, sizes_at).map(ints).transpose()?.filter(|s| !s.is_empty());
        let scales = match opt(x, scales_at) {
            Some(t) if t.elem_count() > 0 => Some(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?),
            _ => None,
        };
        let mut y = a.clone();
        for (i, &d) in axes.iter().enumerate() {
            let n = a.dims()[d];
            let (m, scale) = match (&sizes, &scales) {
                (Some(s), _) => {
                    let m = *s.get(i).ok_or_else(|| msg("Resize: fewer sizes than axes"))? as usize;
                    (m, m as f64 / n as f64)
                }
                (None, Some(s)) => {
                    let sc = *s.get(i).ok_or_else(|| msg("Resize: fewer scales than axes"))?;
                    ((n as f64 * sc).floor() as usize, sc)
                }
                (None, None) => return Err(msg("Resize: neither scales nor sizes given")),
            };
            if m == n && scale == 1.0 {
                continue;
            }
            let w = weights(n, m, scale, mode, coords);
            let mat = Tensor::from_vec(w, (m, n), a.device())?.to_dtype(a.dtype())?;
            y = along(&y, d, &mat)?;
        }
        Ok(vec![y])
    })))
}

fn msg(m: &str) -> candle_core::Error {
    candle_core::Error::Msg(m.to_string())
}

/// `mat [m, n]` applied to axis `d` of `a` (whose size there is n).
fn along(a: &Tensor, d: usize, mat: &Tensor) -> candle_core::Result<Tensor> {
    let last = a.rank() - 1;
    let moved = if d == last { a.clone() } else { a.transpose(d, last)?.contiguous()? };
    let y = moved.broadcast_matmul(&mat.t()?)?;
    if d == last {
        Ok(y)
    } else {
        y.transpose(d, last)?.contiguous()
    }
}

/// The source coordinate of output index `x` (ONNX's coordinate_transformation_mode).
fn source(x: usize, n: usize, m: usize, scale: f64, coords: Coords) -> f64 {
    let x = x as f64;
    match coords {
        Coords::HalfPixel => (x + 0.5) / scale - 0.5,
        Coords::PytorchHalfPixel if m > 1 => (x + 0.5) / scale - 0.5,
        Coords::PytorchHalfPixel => 0.0,
        Coords::AlignCorners if m > 1 => x * (n as f64 - 1.0) / (m as f64 - 1.0),
        Coords::AlignCorners => 0.0,
        Coords::Asymmetric => x / scale,
    }
}

/// Row-major [m, n] interpolation weights. Neighbours outside the input take the edge value
/// (as ONNX Runtime and PyTorch do) unless cubic's exclude_outside drops them.
fn weights(n: usize, m: usize, scale: f64, mode: Mode, coords: Coords) -> Vec<f64> {
    let mut w = vec![0.0; m * n];
    let last = n as i64 - 1;
    for o in 0..m {
        let s = source(o, n, m, scale, coords);
        let row = &mut w[o * n..(o + 1) * n];
        match mode {
            Mode::Nearest(r) => {
                let i = match r {
                    Rounding::PreferFloor if s.fract() == 0.5 => s.floor(),
                    Rounding::PreferFloor | Rounding::PreferCeil => s.round(),
                    Rounding::Floor => s.floor(),
                    Rounding::Ceil => s.ceil(),
                };
                row[(i as i64).clamp(0, last) as usize] += 1.0;
            }
            Mode::Linear => {
                let s = s.clamp(0.0, last as f64);
                let i0 = s.floor() as i64;
                let t = s - i0 as f64;
                row[i0 as usize] += 1.0 - t;
                row[(i0 + 1).min(last) as usize] += t;
            }
            Mode::Cubic { a, exclude_outside } => {
                let i0 = s.floor() as i64;
                let t = s - i0 as f64;
                let k = cubic(t, a);
                let mut kept = 0.0;
                for (j, kj) in k.iter().enumerate() {
                    let i = i0 - 1 + j as i64;
                    if exclude_outside && !(0..=last).contains(&i) {
                        continue;
                    }
                    kept += kj;
                    row[i.clamp(0, last) as usize] += kj;
                }
                if exclude_outside && kept != 0.0 {
                    row.iter_mut().for_each(|v| *v /= kept);
                }
            }
        }
    }
    w
}

/// Keys' cubic convolution weights of the four neighbours at offsets -1, 0, 1, 2.
fn cubic(t: f64, a: f64) -> [f64; 4] {
    let k = |x: f64| {
        let x = x.abs();
        if x <= 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
        } else {
            0.0
        }
    };
    [k(t + 1.0), k(t), k(1.0 - t), k(2.0 - t)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_rows_sum_to_one() {
        for mode in [
            Mode::Nearest(Rounding::PreferFloor),
            Mode::Linear,
            Mode::Cubic { a: -0.75, exclude_outside: false },
            Mode::Cubic { a: -0.5, exclude_outside: true },
        ] {
            for coords in [Coords::HalfPixel, Coords::AlignCorners, Coords::Asymmetric, Coords::PytorchHalfPixel] {
                let (n, m) = (5, 9);
                let w = weights(n, m, m as f64 / n as f64, mode, coords);
                for r in w.chunks(n) {
                    assert!((r.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{mode:?} {coords:?}: {r:?}");
                }
            }
        }
    }

    #[test]
    fn align_corners_linear_keeps_the_end_points() {
        let w = weights(3, 5, 5.0 / 3.0, Mode::Linear, Coords::AlignCorners);
        assert_eq!(&w[0..3], &[1.0, 0.0, 0.0]);
        assert_eq!(&w[12..15], &[0.0, 0.0, 1.0]);
        assert_eq!(&w[3..6], &[0.5, 0.5, 0.0]);
    }
}
