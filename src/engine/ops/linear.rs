//! Gemm and MatMul.

use candle_core::{DType, Tensor};

use super::{opt, req};
use crate::engine::kernels::matmul_bf16::matmul_bf16;
use crate::engine::kernels::{native, precision, Precision};
use crate::engine::registry::{BuildCtx, FnOp, Op, OpSpec, Registry};
use crate::engine::EngineError;
use crate::onnx::attr;
use crate::onnx::pb::NodeProto;

pub fn register(r: &mut Registry) {
    r.insert("Gemm", OpSpec::new(2, 3, build_gemm));
    r.insert(
        "MatMul",
        OpSpec::new(2, 2, |_, _| Ok(Box::new(FnOp(|x: &[Option<Tensor>]| Ok(vec![matmul(req(x, 0)?, req(x, 1)?)?]))))),
    );
}

fn build_gemm(node: &NodeProto, _: &BuildCtx) -> Result<Box<dyn Op>, EngineError> {
    let alpha = attr::float_or(node, "alpha", 1.0)? as f64;
    let beta = attr::float_or(node, "beta", 1.0)? as f64;
    let ta = attr::int_or(node, "transA", 0)? != 0;
    let tb = attr::int_or(node, "transB", 0)? != 0;
    Ok(Box::new(FnOp(move |x: &[Option<Tensor>]| {
        let a = if ta { req(x, 0)?.t()? } else { req(x, 0)?.clone() };
        let b = if tb { req(x, 1)?.t()? } else { req(x, 1)?.clone() };
        // A 2-D product like MatMul's: PyTorch exports nn.Linear on [batch, features] as Gemm.
        let mut y = product(&a, &b)?;
        if alpha != 1.0 {
            y = y.affine(alpha, 0.0)?;
        }
        if let Some(c) = opt(x, 2) {
            let c = if beta != 1.0 { c.affine(beta, 0.0)? } else { c.clone() };
            y = y.broadcast_add(&c)?;
        }
        Ok(vec![y])
    })))
}

/// numpy matmul: 1-D operands are promoted and the added axis removed; batch axes broadcast.
pub fn matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    // Tokens times a weight ([.., T, K] x [K, N], every linear layer of a transformer) is one
    // [rows, K] x [K, N] product, as PyTorch computes it: broadcasting the weight over the
    // batch instead made the backward pass eight small products plus a reduction of
    // batch-sized weight gradients (4.5x the forward on ViT-S/14).
    if a.rank() > 2 && b.rank() == 2 {
        let (lead, k) = a.dims().split_at(a.rank() - 1);
        let rows: usize = lead.iter().product();
        let y = product(&a.reshape((rows, k[0]))?, b)?;
        let mut shape = lead.to_vec();
        shape.push(b.dims()[1]);
        return y.reshape(shape);
    }
    let (a1, b1) = (a.rank() == 1, b.rank() == 1);
    let a = if a1 { a.unsqueeze(0)? } else { a.clone() };
    let b = if b1 { b.unsqueeze(1)? } else { b.clone() };
    let y = if a.rank() == 2 && b.rank() == 2 { product(&a, &b)? } else { a.broadcast_matmul(&b)? };
    let y = if b1 { y.squeeze(y.rank() - 1)? } else { y };
    if a1 {
        y.squeeze(y.rank().saturating_sub(if b1 { 1 } else { 2 }))
    } else {
        Ok(y)
    }
}

/// A 2-D product: in bf16 on AMX under `--precision bf16` (f32 tensors, mtpack's CPU
/// kernels), else candle's. Attention's batched products stay f32: with k = 64 they are
/// bound by memory, not arithmetic.
fn product(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let bf16 = precision() == Precision::Bf16 && native(a) && a.dtype() == DType::F32 && b.dtype() == DType::F32;
    match bf16 {
        true => matmul_bf16(a, b),
        false => a.matmul(b),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, IndexOp, Tensor};

    /// Batched products (attention's heads) run whole products on separate threads (the
    /// vendored candle's MatMul); each must equal the same product computed alone, where all
    /// threads share it, to the bit.
    #[test]
    fn batched_products_equal_each_product_alone() -> candle_core::Result<()> {
        let a = Tensor::randn(0f32, 1., (12, 257, 64), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 1., (12, 64, 257), &Device::Cpu)?;
        let y = super::matmul(&a, &b)?;
        for i in 0..12 {
            let alone = a.i(i)?.matmul(&b.i(i)?)?;
            assert_eq!(y.i(i)?.to_vec2::<f32>()?, alone.to_vec2::<f32>()?, "product {i}");
        }
        Ok(())
    }
}
