//! Gradient checking against central finite differences, in double precision.

use candle_core::{DType, Device, Tensor, Var};

use crate::rng::Rng;

/// A tensor of seeded values in [-1, 1).
pub fn seeded(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let mut rng = Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.uniform() * 2.0 - 1.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).and_then(|t| t.to_dtype(dtype)).expect("a seeded tensor")
}

/// A tensor's values as bit patterns (of their float64 conversion, exact from float32), for
/// tests that two computations agree bit for bit.
pub fn bits(t: &Tensor) -> Vec<u64> {
    let v: Vec<f64> = t.to_dtype(DType::F64).and_then(|t| t.flatten_all()?.to_vec1()).expect("a float tensor");
    v.iter().map(|x| x.to_bits()).collect()
}

/// Checks d(sum(f(x) * r))/dx_i for every input i against central differences, on up to 60
/// elements per input, with r a fixed random tensor. Passes when
/// |analytic - numeric| <= tol * (1 + |numeric|) for every checked element.
pub fn check_gradients(
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    tol: f64,
) -> Result<(), String> {
    let e = |e: candle_core::Error| e.to_string();
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).map_err(e)).collect::<Result<_, _>>()?;
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&xs).map_err(e)?;
    let r = seeded(y.dims(), 99, DType::F64);
    let loss = |y: &Tensor| -> Result<f64, String> {
        y.mul(&r).and_then(|t| t.sum_all()).and_then(|t| t.to_scalar::<f64>()).map_err(e)
    };
    let grads = y.mul(&r).and_then(|t| t.sum_all()).and_then(|t| t.backward()).map_err(e)?;
    let eps = 1e-6;
    for (i, x) in inputs.iter().enumerate() {
        let g = grads.get(&xs[i]).ok_or_else(|| format!("input {i} got no gradient"))?;
        let analytic: Vec<f64> = g.flatten_all().and_then(|t| t.to_vec1()).map_err(e)?;
        let base: Vec<f64> = x.flatten_all().and_then(|t| t.to_vec1()).map_err(e)?;
        let mut rng = Rng::new(i as u64);
        let picks: Vec<usize> =
            if base.len() <= 60 { (0..base.len()).collect() } else { (0..60).map(|_| rng.below(base.len())).collect() };
        for j in picks {
            let at = |delta: f64| -> Result<f64, String> {
                let mut v = base.clone();
                v[j] += delta;
                let t = Tensor::from_vec(v, x.dims(), &Device::Cpu).map_err(e)?;
                let mut args = inputs.to_vec();
                args[i] = t;
                loss(&f(&args).map_err(e)?)
            };
            let numeric = (at(eps)? - at(-eps)?) / (2.0 * eps);
            if (analytic[j] - numeric).abs() > tol * (1.0 + numeric.abs()) {
                return Err(format!("input {i} element {j}: analytic {} vs numeric {numeric}", analytic[j]));
            }
        }
    }
    Ok(())
}
