//! Where a training step's time goes on MobileNetV2 (3x64x64, batch 32): forward and
//! backward wall time, then forward time per op type. For finding the next bottleneck;
//! the throughput figures themselves come from `cargo bench --bench train_throughput`.
//!
//! Run: `cargo run --release --example profile_step` (after scripts/fetch.sh).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use mtpack::engine::Engine;
use mtpack::graph::heads::{add_heads, LinearHead};
use mtpack::onnx::Model;
use mtpack::train::loss;

fn main() -> anyhow::Result<()> {
    mtpack::alloc::tune_for_training();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/models/mobilenetv2_imagenet.onnx");
    let backbone = Model::load(&path)?;
    let model = add_heads(&backbone, "features", &[("task".into(), LinearHead::init(10, 1280, 0))], true)?;
    let names = mtpack::graph::analysis::trainable_names(model.graph());
    let engine = Engine::new(&model, &|n| names.contains(n), DType::F32, &Device::Cpu)?;
    // Batch-statistics BatchNorm, as `mtpack adapt` and the throughput bench train.
    engine.set_training(true);
    let x = Tensor::randn(0f32, 1f32, (32, 3, 64, 64), &Device::Cpu)?;
    let y = Tensor::new(&[1i64; 32], &Device::Cpu)?;
    // MTPACK_PROFILE_ROUNDS: more rounds to dilute warm-up in a `perf record` of this example.
    let rounds: usize = std::env::var("MTPACK_PROFILE_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    for round in 0..rounds {
        let t = Instant::now();
        let out = engine.forward_to(&[("input", x.clone())], &["task/logits"])?;
        let l = loss::cross_entropy(&out[0], &y)?;
        let forward = t.elapsed();
        let t = Instant::now();
        let _grads = l.backward()?;
        eprintln!("round {round}: forward {forward:?}, backward {:?}", t.elapsed());
    }
    for (op, d) in engine.profile_forward(&[("input", x)])? {
        eprintln!("{op:<20} {d:?}");
    }
    Ok(())
}
