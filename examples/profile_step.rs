//! Where a training step's time goes on MobileNetV2 (3x64x64, batch 32; 3x224x224, batch 16
//! with MTPACK_PROFILE_SIZE=224), or with
//! MTPACK_PROFILE_PRECISION=bf16 with the linear layers' matrix products in bf16, or
//! MTPACK_PROFILE_MODEL=vit on the ViT-S/14 encoder (3x224x224, batch 8, cut at its final
//! LayerNorm, class token): forward and backward wall time, the time of mtpack's kernels
//! (convolution, BatchNorm, the transformer's row-wise ops) in one step, forward and
//! backward passes (per shape with MTPACK_PROFILE_SHAPES=1), then forward time per op type.
//! For finding the next bottleneck; the throughput figures themselves come from
//! `cargo bench --bench train_throughput`.
//!
//! Run: `cargo run --release --example profile_step` (after scripts/fetch.sh).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use mtpack::engine::Engine;
use mtpack::graph::heads::{add_heads, LinearHead};
use mtpack::onnx::Model;
use mtpack::train::loss;

/// Large freed blocks kept for reuse, as the `mtpack` binary does (see `mtpack::alloc`).
#[global_allocator]
static ALLOC: mtpack::alloc::Recycling = mtpack::alloc::Recycling::new();

fn main() -> anyhow::Result<()> {
    mtpack::alloc::tune_for_training();
    // On a pool thread, as the `mtpack` binary runs its commands (see mtpack::parallel).
    mtpack::parallel::on_pool(profile)
}

fn profile() -> anyhow::Result<()> {
    let vit = std::env::var("MTPACK_PROFILE_MODEL").is_ok_and(|m| m == "vit");
    let (model, input, shape) = if vit { vit_model()? } else { mobilenetv2()? };
    let names = mtpack::graph::analysis::trainable_names(model.graph());
    let mut engine = Engine::new(&model, &|n| names.contains(n), DType::F32, &Device::Cpu)?;
    // MTPACK_PROFILE_PRECISION=bf16: the linear layers' matrix products in bf16 (AMX).
    if std::env::var("MTPACK_PROFILE_PRECISION").is_ok_and(|p| p == "bf16") {
        engine.set_precision(mtpack::engine::kernels::Precision::Bf16);
    }
    // Batch-statistics BatchNorm, as `mtpack adapt` and the throughput bench train.
    engine.set_training(true);
    let x = Tensor::randn(0f32, 1f32, shape, &Device::Cpu)?;
    // As `adapt`'s training loop: freed large blocks are kept for the next step.
    let _keep = mtpack::alloc::keep_large_blocks();
    let y = Tensor::new(vec![1i64; shape.0], &Device::Cpu)?;
    // MTPACK_PROFILE_ROUNDS: more rounds to dilute warm-up in a `perf record` of this example.
    let rounds: usize = std::env::var("MTPACK_PROFILE_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    for round in 0..rounds {
        let t = Instant::now();
        let out = engine.forward_to(&[(input, x.clone())], &["task/logits"])?;
        let l = loss::cross_entropy(&out[0], &y)?;
        let forward = t.elapsed();
        let t = Instant::now();
        let _grads = l.backward()?;
        eprintln!("round {round}: forward {forward:?}, backward {:?}", t.elapsed());
    }
    // One more step with the kernels timed: the backward pass's share per kernel, which the
    // per-node forward profile below cannot show.
    mtpack::engine::kernels::timing::enable(true);
    let out = engine.forward_to(&[(input, x.clone())], &["task/logits"])?;
    loss::cross_entropy(&out[0], &y)?.backward()?;
    mtpack::engine::kernels::timing::enable(false);
    print_kernel_times(mtpack::engine::kernels::timing::take());
    for (op, d) in engine.profile_forward(&[(input, x)])? {
        eprintln!("{op:<20} {d:?}");
    }
    Ok(())
}

/// Kernel time of one step by kernel and pass (the shape dropped), or by shape too with
/// MTPACK_PROFILE_SHAPES=1.
fn print_kernel_times(times: Vec<(String, std::time::Duration, usize)>) {
    let by_shape = std::env::var("MTPACK_PROFILE_SHAPES").is_ok_and(|v| v == "1");
    let mut total: std::collections::BTreeMap<String, (std::time::Duration, usize)> = Default::default();
    for (key, d, n) in times {
        let key = if by_shape { key } else { key.split(" [").next().unwrap_or(&key).to_string() };
        let e = total.entry(key).or_default();
        e.0 += d;
        e.1 += n;
    }
    let sum: std::time::Duration = total.values().map(|e| e.0).sum();
    eprintln!("kernel time of one step (forward and backward): {sum:?}");
    for (key, (d, n)) in total {
        eprintln!("  {key:<48} {n:>4} calls {d:>12.3?}");
    }
}

type Setup = (Model, &'static str, (usize, usize, usize, usize));

fn mobilenetv2() -> anyhow::Result<Setup> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/models/mobilenetv2_imagenet.onnx");
    let backbone = Model::load(&path)?;
    let model = add_heads(&backbone, "features", &[("task".into(), LinearHead::init(10, 1280, 0))], true)?;
    // MTPACK_PROFILE_SIZE=224: the 3x224x224 batch-16 step of the throughput bench.
    match std::env::var("MTPACK_PROFILE_SIZE").is_ok_and(|s| s == "224") {
        true => Ok((model, "input", (16, 3, 224, 224))),
        false => Ok((model, "input", (32, 3, 64, 64))),
    }
}

fn vit_model() -> anyhow::Result<Setup> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/models/vit_s14_focus.onnx");
    let (folded, _) = mtpack::graph::materialize::weights_from_nodes(&Model::load(&path)?)?;
    let at = "/backbone/layernorm/Add_1_output_0";
    let dims = mtpack::runtime::probe::shapes(&folded, &[at.to_string()])?[at].clone();
    let pool = mtpack::graph::features::Pool::Cls;
    let (cut, width) = mtpack::graph::features::attach(&folded, at, &dims, pool, Default::default())?;
    let feature = mtpack::graph::features::FEATURE;
    let model = add_heads(&cut, feature, &[("task".into(), LinearHead::init(10, width, 0))], true)?;
    Ok((model, "input_image", (8, 3, 224, 224)))
}
