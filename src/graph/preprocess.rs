//! Putting a task's recorded preprocessing into the graph, so a device can feed raw uint8
//! images: Cast, scale to [0, 1], Resize (linear, half-pixel: the same as mtpack's own
//! resize), repeat a grey channel, normalise with mean and standard deviation.

use ndarray::{Array1, Array4};

use super::{GraphError, Patch};
use crate::data::{Layout, Preprocessing};
use crate::onnx::{attr, build, tensor_proto, Dim, Model};
use crate::tensor::{DType, Tensor};

pub const RAW_INPUT: &str = "image";

/// Replaces float input `input` by a uint8 input `image` of `raw` = [C, H, W] per image, taken
/// as [H, W, C] when the preprocessing's layout is NHWC (the backbone's own layout).
pub fn prepend(
    model: &Model,
    input: &str,
    raw: [usize; 3],
    pixel_max: f32,
    pre: &Preprocessing,
) -> Result<Model, GraphError> {
    if model.opset("").unwrap_or(0) < 13 {
        return Err(GraphError::Shape {
            tensor: input.into(),
            problem: "preprocessing in the graph needs opset 13 or later (Resize)".into(),
        });
    }
    let nhwc = pre.layout == Some(Layout::Nhwc);
    let mut p = Patch::new();
    let mut cur = scale(&mut p, pixel_max, nhwc);
    if let Some(hw) = pre.resize.filter(|r| *r != [raw[1], raw[2]]) {
        cur = resize(&mut p, &cur, hw);
    }
    let mut channels = raw[0];
    if let Some(c) = pre.channels.filter(|c| *c != channels) {
        let copies: Vec<&str> = std::iter::repeat_n(cur.as_str(), c).collect();
        p.add_node(build::node("Concat", "pre/channels", &copies, &["pre/rgb"], vec![attr::make_int("axis", 1)]));
        cur = "pre/rgb".into();
        channels = c;
    }
    normalise(&mut p, &cur, input, pre, channels, nhwc)?;
    let [c, h, w] = raw.map(|d| Dim::Fixed(d as i64));
    let raw_dims = if nhwc { [Dim::Named("batch".into()), h, w, c] } else { [Dim::Named("batch".into()), c, h, w] };
    let others: Vec<_> = model.graph().input.iter().filter(|i| i.name() != input).cloned().collect();
    let mut inputs = vec![build::value_info(RAW_INPUT, DType::U8, Some(&raw_dims))];
    inputs.extend(others);
    p.set_inputs(inputs);
    p.apply(model)
}

fn init(p: &mut Patch, name: &str, t: Tensor) {
    p.add_initializer(tensor_proto::from_tensor(name, &t));
}

/// The raw image as float in [0, 1], NCHW from here on; returns the tensor's name.
fn scale(p: &mut Patch, pixel_max: f32, nhwc: bool) -> String {
    p.add_node(build::node("Cast", "pre/cast", &[RAW_INPUT], &["pre/float"], vec![attr::make_int("to", 1)]));
    init(p, "pre/scale", Tensor::F32(ndarray::arr0(1.0 / pixel_max).into_dyn()));
    p.add_node(build::node("Mul", "pre/scale_mul", &["pre/float", "pre/scale"], &["pre/scaled"], vec![]));
    if !nhwc {
        return "pre/scaled".into();
    }
    let perm = vec![attr::make_ints("perm", &[0, 3, 1, 2])];
    p.add_node(build::node("Transpose", "pre/to_nchw", &["pre/scaled"], &["pre/nchw"], perm));
    "pre/nchw".into()
}

/// `cur` resized to `[h, w]` (batch and channels kept from its shape); returns the result's name.
fn resize(p: &mut Patch, cur: &str, [h, w]: [usize; 2]) -> String {
    init(p, "pre/hw", Tensor::I64(Array1::from(vec![h as i64, w as i64]).into_dyn()));
    init(p, "pre/zero", Tensor::I64(Array1::from(vec![0i64]).into_dyn()));
    init(p, "pre/two", Tensor::I64(Array1::from(vec![2i64]).into_dyn()));
    p.add_node(build::node("Shape", "pre/shape_of", &[cur], &["pre/shape"], vec![]));
    p.add_node(build::node("Slice", "pre/nc_slice", &["pre/shape", "pre/zero", "pre/two"], &["pre/nc"], vec![]));
    p.add_node(build::node(
        "Concat",
        "pre/sizes_concat",
        &["pre/nc", "pre/hw"],
        &["pre/sizes"],
        vec![attr::make_int("axis", 0)],
    ));
    let attrs =
        vec![attr::make_string("mode", "linear"), attr::make_string("coordinate_transformation_mode", "half_pixel")];
    p.add_node(build::node("Resize", "pre/resize", &[cur, "", "", "pre/sizes"], &["pre/resized"], attrs));
    "pre/resized".into()
}

/// `(cur - mean) / std` per channel written to `input` (back in NHWC for an NHWC backbone).
fn normalise(
    p: &mut Patch,
    cur: &str,
    input: &str,
    pre: &Preprocessing,
    channels: usize,
    nhwc: bool,
) -> Result<(), GraphError> {
    let per = |v: &[f32], default: f32| -> Vec<f32> {
        match v {
            [] => vec![default; channels],
            [one] => vec![*one; channels],
            _ => v.to_vec(),
        }
    };
    let (mean, std) = (per(&pre.mean, 0.0), per(&pre.std, 1.0));
    let as4 = |v: Vec<f32>| Array4::from_shape_vec((1, v.len(), 1, 1), v).map(|a| Tensor::F32(a.into_dyn()));
    let bad = |e: ndarray::ShapeError| GraphError::Shape { tensor: "pre/mean".into(), problem: e.to_string() };
    init(p, "pre/mean", as4(mean).map_err(bad)?);
    init(p, "pre/std", as4(std).map_err(bad)?);
    p.add_node(build::node("Sub", "pre/centre", &[cur, "pre/mean"], &["pre/centred"], vec![]));
    let out = if nhwc { "pre/normalised" } else { input };
    p.add_node(build::node("Div", "pre/normalise", &["pre/centred", "pre/std"], &[out], vec![]));
    if nhwc {
        let perm = vec![attr::make_ints("perm", &[0, 2, 3, 1])];
        p.add_node(build::node("Transpose", "pre/to_nhwc", &["pre/normalised"], &[input], perm));
    }
    Ok(())
}
