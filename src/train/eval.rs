//! Accuracy through ONNX Runtime on the engine's current weights, and the batched runs
//! `adapt` evaluates and records with (ONNX Runtime on the CPU, the engine on a GPU).

use super::TrainError;
use candle_core::{DType, Device};

use crate::engine::kernels::Kernels;
use crate::engine::{from_candle, to_candle_on, Engine};
use crate::onnx::Model;
use crate::runtime::ort_rt::OrtSession;
use crate::runtime::Backend;
use crate::tensor::Tensor;

/// Runs `model` in ONNX Runtime over `x` in batches and returns the named output, stacked.
/// Images per ONNX Runtime call when mtpack evaluates: 256 at 3x64x64 (and below), fewer for
/// larger images, so that one call holds about the same memory (a ViT at 3x224x224 with 256
/// images needed several GiB of activations; at 20 it is under one).
pub fn eval_batch(x: &Tensor) -> usize {
    const BUDGET: usize = 256 * 3 * 64 * 64;
    let per_image: usize = x.shape().iter().skip(1).product();
    (BUDGET / per_image.max(1)).clamp(8, 256)
}

pub fn run_batched(model: &Model, input: &str, output: &str, x: &Tensor, batch: usize) -> Result<Tensor, TrainError> {
    run_batched_with(model, &[], input, output, x, batch)
}

/// `run_batched` with further inputs that stay the same for every batch (e.g. `task`).
pub fn run_batched_with(
    model: &Model,
    fixed: &[(String, Tensor)],
    input: &str,
    output: &str,
    x: &Tensor,
    batch: usize,
) -> Result<Tensor, TrainError> {
    let exposed = expose(model, output)?;
    let model = exposed.as_ref().unwrap_or(model);
    let mut session = OrtSession::from_bytes(&model.to_bytes(), &model.origin.display().to_string())?;
    let n = x.shape().first().copied().unwrap_or(0);
    let mut parts: Vec<ndarray::ArrayD<f32>> = Vec::new();
    for start in (0..n).step_by(batch.max(1)) {
        let end = (start + batch).min(n);
        let xb = rows(x, start, end)?;
        let mut feed = vec![(input.to_string(), xb)];
        feed.extend(fixed.iter().cloned());
        let out = session.run(&feed)?;
        let t = out
            .into_iter()
            .find(|(name, _)| name == output)
            .map(|(_, t)| t)
            .ok_or_else(|| TrainError::Invalid(format!("model has no output '{output}'")))?;
        match t {
            Tensor::F32(a) => parts.push(a),
            other => return Err(TrainError::Invalid(format!("output '{output}' is {}, not float32", other.dtype()))),
        }
    }
    stack(&parts)
}

fn stack(parts: &[ndarray::ArrayD<f32>]) -> Result<Tensor, TrainError> {
    let views: Vec<_> = parts.iter().map(|a| a.view()).collect();
    let stacked = ndarray::concatenate(ndarray::Axis(0), &views).map_err(super::invalid("stacking the outputs"))?;
    Ok(Tensor::F32(stacked))
}

/// `model` with `output` made a graph output when it is a tensor inside the graph, such as
/// the logits a backbone's own head turns into probabilities with a Softmax (LwF distils
/// logits); `None` when it already is one.
fn expose(model: &Model, output: &str) -> Result<Option<Model>, TrainError> {
    if model.graph().output.iter().any(|o| o.name() == output) {
        return Ok(None);
    }
    let g = model.graph();
    Ok(Some(crate::graph::Patch::new().add_output(crate::graph::cut::value_info_for(g, output)).apply(model)?))
}

/// What runs a model forward for `adapt` outside training (the frozen prefix, recorded
/// outputs, evaluation): ONNX Runtime where training runs on the CPU's kernels; where it runs
/// on a GPU, mtpack's engine there (the ONNX Runtime library mtpack loads is a CPU build),
/// and with `--kernels portable` the engine with the portable ops on the CPU, so that a CPU
/// run takes every path a GPU run takes.
#[derive(Clone, Copy, Debug)]
pub enum Inference<'a> {
    Ort,
    Engine { device: &'a Device, kernels: Kernels },
}

impl<'a> Inference<'a> {
    pub fn beside_training(device: &'a Device, kernels: Kernels) -> Inference<'a> {
        if device.is_cpu() && kernels == Kernels::Native {
            Inference::Ort
        } else {
            Inference::Engine { device, kernels }
        }
    }
}

/// `run_batched` by `how`: ONNX Runtime, or the engine in inference mode.
pub fn run_batched_on(
    how: Inference,
    model: &Model,
    input: &str,
    output: &str,
    x: &Tensor,
    batch: usize,
) -> Result<Tensor, TrainError> {
    let Inference::Engine { device: dev, kernels } = how else {
        return run_batched(model, input, output, x, batch);
    };
    let exposed = expose(model, output)?;
    let mut engine = Engine::new(exposed.as_ref().unwrap_or(model), &|_| false, DType::F32, dev)?;
    engine.set_kernels(kernels);
    let n = x.shape().first().copied().unwrap_or(0);
    let mut parts: Vec<ndarray::ArrayD<f32>> = Vec::new();
    for start in (0..n).step_by(batch.max(1)) {
        let xb = to_candle_on(&rows(x, start, (start + batch).min(n))?, DType::F32, dev)
            .map_err(super::candle("evaluation inputs"))?;
        let out = engine.forward_to(&[(input, xb)], &[output])?;
        let t = out.first().ok_or_else(|| TrainError::Invalid(format!("model has no output '{output}'")))?;
        match from_candle(t).map_err(super::candle("evaluation outputs"))? {
            Tensor::F32(a) => parts.push(a),
            other => return Err(TrainError::Invalid(format!("output '{output}' is {}, not float32", other.dtype()))),
        }
    }
    stack(&parts)
}

fn rows(x: &Tensor, start: usize, end: usize) -> Result<Tensor, TrainError> {
    let s = ndarray::Slice::from(start..end);
    match x {
        Tensor::F32(a) => Ok(Tensor::F32(a.slice_axis(ndarray::Axis(0), s).to_owned())),
        Tensor::U8(a) => Ok(Tensor::U8(a.slice_axis(ndarray::Axis(0), s).to_owned())),
        other => Err(TrainError::Invalid(format!("inputs must be float32 or uint8, got {}", other.dtype()))),
    }
}

/// Fraction of rows of `logits` [N, K] whose argmax is the label.
pub fn accuracy(logits: &Tensor, y: &[i64]) -> Result<f64, TrainError> {
    let right = argmax_rows(logits)?.iter().zip(y).filter(|(p, l)| p == l).count();
    Ok(right as f64 / y.len().max(1) as f64)
}

/// The argmax of each row of `logits` [N, K] (the first of equal maxima).
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<i64>, TrainError> {
    let Tensor::F32(a) = logits else { return Err(TrainError::Invalid("logits must be float32".into())) };
    let k = a.shape().get(1).copied().unwrap_or(0).max(1);
    let flat: Vec<f32> = a.iter().copied().collect();
    Ok(flat
        .chunks(k)
        .map(|row| {
            row.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0
                as i64
        })
        .collect())
}

/// Held-out accuracy of the engine's current weights, measured by ONNX Runtime on `model`
/// with those weights written in.
pub fn evaluate(
    engine: &Engine,
    model: &Model,
    input: &str,
    logits: &str,
    x: &Tensor,
    y: &[i64],
) -> Result<f64, TrainError> {
    let current = engine.export(model)?;
    let out = run_batched(&current, input, logits, x, eval_batch(x))?;
    accuracy(&out, y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensor_inside_the_graph_is_read_like_an_output() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let model = Model::load(&root.join("fixtures/tiny/tiny_digits.onnx")).unwrap();
        let x = Tensor::F32(ndarray::ArrayD::from_shape_fn(vec![5, 1, 8, 8], |i| (i[0] + i[2] * i[3]) as f32 / 50.0));
        let inside = run_batched(&model, "input", "features", &x, 2).unwrap();
        let cut = crate::graph::cut::prefix(&model, "features").unwrap();
        assert_eq!(inside, run_batched(&cut, "input", "features", &x, 2).unwrap());
        assert_eq!(inside.shape(), [5, 32]);
    }
}
