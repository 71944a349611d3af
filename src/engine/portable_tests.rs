//! The portable ops held to the CPU kernels: the same values and the same gradients, in
//! double precision, on the shapes real backbones use (asymmetric padding, stride 2,
//! depthwise with and without a channel multiplier, ceil-mode pooling, clamped BatchNorm).

use candle_core::{DType, Tensor, Var};

use super::*;
use crate::engine::gradcheck::{check_gradients, seeded};
use crate::engine::kernels;

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    d.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Values and gradients (of sum(f(x) * r), r seeded) of `f` on `inputs`.
fn value_and_grads(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&xs).unwrap();
    let r = seeded(y.dims(), 7, y.dtype());
    let g = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    let grads = xs.iter().map(|x| g.get(x).cloned().unwrap_or_else(|| x.zeros_like().unwrap())).collect();
    (y, grads)
}

/// `portable` against `native` on `inputs`: values and every input's gradient within `tol`.
fn same(
    what: &str,
    inputs: &[Tensor],
    native: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    portable: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    tol: f64,
) {
    let (yn, gn) = value_and_grads(inputs, native);
    let (yp, gp) = value_and_grads(inputs, portable);
    let d = max_diff(&yn, &yp);
    assert!(d <= tol, "{what}: values differ by {d}");
    for (i, (a, b)) in gn.iter().zip(&gp).enumerate() {
        let d = max_diff(a, b);
        assert!(d <= tol, "{what}: gradient of input {i} differs by {d}");
    }
}

fn conv_case(x: [usize; 4], w: [usize; 4], p: ConvParams) {
    let (xs, ws) = (seeded(&x, 1, DType::F64), seeded(&w, 2, DType::F64));
    same(
        &format!("conv {x:?} {w:?} {p:?}"),
        &[xs, ws],
        |v| kernels::conv2d::conv2d(&v[0], &v[1], p),
        |v| conv2d(&v[0], &v[1], p),
        1e-12,
    );
}

#[test]
fn convolutions_match_the_cpu_kernels() {
    let p = |stride: usize, pads: [usize; 4], groups: usize| ConvParams {
        stride: [stride; 2],
        dilation: [1; 2],
        pads,
        groups,
    };
    // Dense 3x3, stride 2 with TensorFlow's asymmetric SAME padding.
    conv_case([2, 3, 9, 8], [4, 3, 3, 3], p(2, [0, 0, 1, 1], 1));
    // Pointwise.
    conv_case([2, 5, 4, 4], [6, 5, 1, 1], p(1, [0; 4], 1));
    // Depthwise 3x3, stride 1 and 2, symmetric and asymmetric padding.
    conv_case([2, 4, 7, 7], [4, 1, 3, 3], p(1, [1; 4], 4));
    conv_case([2, 4, 8, 7], [4, 1, 3, 3], p(2, [0, 1, 1, 0], 4));
    // Depthwise 5x5 with a channel multiplier of 2.
    conv_case([1, 3, 9, 9], [6, 1, 5, 5], p(2, [2; 4], 3));
    // Two groups of two channels.
    conv_case([2, 4, 5, 5], [6, 2, 3, 3], p(1, [1; 4], 2));
    // Dilated depthwise, unequal strides.
    let dilated = ConvParams { stride: [2, 1], dilation: [2, 2], pads: [2, 1, 2, 1], groups: 3 };
    conv_case([1, 3, 9, 8], [3, 1, 3, 3], dilated);
}

#[test]
fn depthwise_gradients_match_finite_differences() {
    let p = ConvParams { stride: [2; 2], dilation: [1; 2], pads: [1, 0, 1, 1], groups: 2 };
    let (x, w) = (seeded(&[1, 2, 5, 6], 3, DType::F64), seeded(&[2, 1, 3, 3], 4, DType::F64));
    check_gradients(&[x, w], |v| conv2d(&v[0], &v[1], p), 1e-6).unwrap();
}

#[test]
fn pooling_matches_the_cpu_kernels() {
    let cases = [
        (PoolKind::Max, [3, 3], [2, 2], [1, 1, 1, 1], false),
        (PoolKind::Max, [3, 3], [2, 2], [0, 0, 0, 0], true),
        (PoolKind::Max, [2, 2], [2, 2], [0, 0, 0, 0], false),
        (PoolKind::Average { count_include_pad: false }, [3, 3], [2, 2], [1, 1, 1, 1], true),
        (PoolKind::Average { count_include_pad: true }, [3, 3], [1, 1], [1, 0, 1, 2], false),
        (PoolKind::Average { count_include_pad: true }, [3, 2], [2, 2], [1, 1, 1, 1], true),
    ];
    for (kind, kernel, stride, pads, ceil_mode) in cases {
        let p = PoolParams { kind, kernel, stride, dilation: [1, 1], pads, ceil_mode };
        // Distinct values: a max pooling tie may send its gradient to either input.
        let x = seeded(&[2, 3, 8, 7], 5, DType::F64);
        same(&format!("{p:?}"), &[x], |v| kernels::pool2d::pool2d(&v[0], p), |v| pool2d(&v[0], p), 1e-12);
    }
}

#[test]
fn training_batch_norm_matches_the_cpu_kernel() {
    for clamp in [None, Some(Clamp { lo: 0.0, hi: 0.5 }), Some(Clamp { lo: 0.0, hi: f64::INFINITY })] {
        let x = seeded(&[4, 3, 5, 5], 6, DType::F64).affine(3.0, 0.7).unwrap();
        let (scale, bias) = (seeded(&[3], 8, DType::F64), seeded(&[3], 9, DType::F64));
        let native = |v: &[Tensor]| kernels::batchnorm::batch_norm_train(&v[0], &v[1], &v[2], 1e-5, clamp);
        let portable = |v: &[Tensor]| batch_norm_train(&v[0], &v[1], &v[2], 1e-5, clamp);
        let inputs = [x, scale, bias];
        same(&format!("{clamp:?}"), &inputs, |v| Ok(native(v)?.0), |v| Ok(portable(v)?.0), 1e-10);
        let (n, p) = (native(&inputs).unwrap(), portable(&inputs).unwrap());
        assert!(max_diff(&n.1, &p.1) < 1e-12 && max_diff(&n.2, &p.2) < 1e-12, "batch statistics differ");
    }
}

#[test]
fn the_choice_holds_for_one_thread_and_one_call() {
    let x = Tensor::zeros(1, DType::F32, &candle_core::Device::Cpu).unwrap();
    assert!(kernels::native(&x));
    let inside = kernels::with_kernels(kernels::Kernels::Portable, || {
        let nested = kernels::with_kernels(kernels::Kernels::Native, || kernels::native(&x));
        (nested, kernels::native(&x))
    });
    assert_eq!(inside, (true, false));
    assert!(kernels::native(&x));
    let other = std::thread::spawn(move || kernels::with_kernels(kernels::Kernels::Portable, || ()));
    other.join().unwrap();
    assert!(kernels::native(&Tensor::zeros(1, DType::F32, &candle_core::Device::Cpu).unwrap()));
}
