//! Losses on logits.

use candle_core::{DType, Tensor, D};

/// Mean cross-entropy of `logits` [N, K] against integer `labels` [N].
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
    let logp = log_softmax(logits)?;
    let picked = logp.gather(&labels.to_dtype(DType::I64)?.unsqueeze(1)?, 1)?;
    picked.neg()?.mean_all()
}

/// Numerically stable log-softmax over the last axis.
pub fn log_softmax(logits: &Tensor) -> candle_core::Result<Tensor> {
    let shifted = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?.detach())?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// Number of rows whose argmax equals the label.
pub fn correct(logits: &Tensor, labels: &[i64]) -> candle_core::Result<usize> {
    let pred: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
    Ok(pred.iter().zip(labels).filter(|(p, l)| **p as i64 == **l).count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::gradcheck::{check_gradients, seeded};
    use candle_core::Device;

    #[test]
    fn cross_entropy_value_and_gradient() {
        let dev = Device::Cpu;
        // Uniform logits over 4 classes: loss = ln 4.
        let l = Tensor::zeros((3, 4), DType::F64, &dev).unwrap();
        let y = Tensor::new(&[0i64, 3, 1], &dev).unwrap();
        let v: f64 = cross_entropy(&l, &y).unwrap().to_scalar().unwrap();
        assert!((v - 4f64.ln()).abs() < 1e-12);
        // d loss / d logits = (softmax - onehot) / N, checked numerically.
        let x = seeded(&[3, 4], 1, DType::F64);
        check_gradients(&[x], |v| cross_entropy(&v[0], &y)?.unsqueeze(0), 1e-6).unwrap();
    }
}
