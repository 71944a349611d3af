//! `mtpack run`: a model on inputs from a safetensors file, in one runtime or several,
//! their outputs compared and, given labels, scored.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Serialize;

use super::{load, print_json, Outcome};
use crate::data::{parse_hw, Dataset, Preprocessing};
use crate::engine::CandleSession;
use crate::onnx::{tensor_type, Dim, Model};
use crate::pack::specialize;
use crate::runtime::device::{candle_device, DeviceChoice};
use crate::runtime::ort_rt::OrtSession;
use crate::runtime::tract_rt::TractSession;
use crate::runtime::{compare, Backend, Named};
use crate::store;
use crate::tensor::Tensor;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeChoice {
    Ort,
    Tract,
    /// mtpack's training engine (ONNX on candle), forward only.
    Candle,
    /// ort and tract.
    Both,
    /// ort, tract and candle.
    All,
}

/// Preprocessing flags shared by commands that feed datasets to models.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct PreprocessArgs {
    /// Resize images to HxW (bilinear), e.g. 64x64.
    #[arg(long, value_parser = parse_hw)]
    pub resize: Option<[usize; 2]>,
    /// Repeat a single grey channel to this many channels (e.g. 3 for RGB backbones).
    #[arg(long)]
    pub channels: Option<usize>,
    /// Per-channel mean subtracted after scaling to [0, 1], comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub mean: Vec<f32>,
    /// Per-channel standard deviation, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub std: Vec<f32>,
    /// The layout the model's input takes (default: read from its declared input shape).
    #[arg(long, value_enum)]
    pub layout: Option<crate::data::Layout>,
}

impl PreprocessArgs {
    pub fn to_preprocessing(&self) -> Preprocessing {
        Preprocessing {
            resize: self.resize,
            channels: self.channels,
            mean: self.mean.clone(),
            std: self.std.clone(),
            layout: self.layout,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The ONNX model to run.
    pub model: PathBuf,
    /// A safetensors file: tensors named like the model's inputs, or a task dataset (its `x`
    /// feeds the model's single input; with `y`, accuracy is reported).
    #[arg(long)]
    pub input: PathBuf,
    /// Which runtime executes the model; with several, each is compared with the first.
    #[arg(long, value_enum, default_value = "both")]
    pub runtime: RuntimeChoice,
    /// Largest absolute difference allowed between runtimes (with both or all).
    #[arg(long, default_value_t = 1e-4)]
    pub tolerance: f64,
    /// Use only the first N images of a dataset.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Which split of a dataset to run.
    #[arg(long, value_enum, default_value = "test")]
    pub split: SplitChoice,
    #[command(flatten)]
    pub pre: PreprocessArgs,
    /// Where ONNX Runtime and candle run (cuda needs a CUDA build; it never falls back).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Do not score a dataset's labels against the first output (e.g. labels of another task).
    #[arg(long)]
    pub ignore_labels: bool,
    /// Run one task of a multi-task artifact: its task selector becomes a constant that the
    /// runtimes fold when they load the model, and only that task's output is computed.
    #[arg(long)]
    pub task: Option<String>,
    /// Print outputs and comparisons as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The task a run served, when `--task` was given.
#[derive(Serialize)]
struct ServedTask {
    name: String,
    output: String,
    /// The `task` input's value, fixed in the model (artifacts that select tasks by an input).
    task_value: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SplitChoice {
    Train,
    Test,
}

#[derive(Serialize)]
struct OutputRecord {
    runtime: &'static str,
    name: String,
    shape: Vec<usize>,
    values: Vec<f64>,
}

#[derive(Serialize)]
struct Comparison {
    reference: &'static str,
    runtime: &'static str,
    output: String,
    max_abs_diff: f64,
}

#[derive(Serialize)]
struct RunReport {
    schema: &'static str,
    model: String,
    input: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    task: Option<ServedTask>,
    outputs: Vec<OutputRecord>,
    /// Largest absolute difference of each output between each runtime and the first.
    comparisons: Vec<Comparison>,
    tolerance: f64,
    accuracy: Option<f64>,
    agree: bool,
}

pub fn run(a: Args) -> anyhow::Result<Outcome> {
    let (model, task) = served_model(load::model(&a.model)?, &a)?;
    let (inputs, labels) = read_inputs(&model, &a).with_context(|| a.input.display().to_string())?;
    let label = a.model.display().to_string();
    let mut results: Vec<(&'static str, Named)> = Vec::new();
    for mut b in backends(&model, &a)? {
        let out = run_rows(b.as_mut(), &model, &inputs).with_context(|| format!("running {label} in {}", b.name()))?;
        results.push((b.name(), out));
    }
    let mut comparisons = Vec::new();
    if let Some(((reference, first), rest)) = results.split_first() {
        for (runtime, out) in rest {
            for (output, max_abs_diff) in compare(first, out)? {
                comparisons.push(Comparison { reference, runtime, output, max_abs_diff });
            }
        }
    }
    let agree = comparisons.iter().all(|c| c.max_abs_diff <= a.tolerance);
    // Only a classifier's [N, classes] output has an accuracy; an encoder's features do not.
    let scores = |out: &Named| out.first().is_some_and(|(_, t)| t.shape().len() == 2);
    let accuracy = match (&labels, results.first()) {
        (Some(y), Some((_, out))) if !a.ignore_labels && scores(out) => Some(accuracy(out, y, &a.model)?),
        _ => None,
    };
    let report = RunReport {
        schema: "mtpack.run/1",
        model: label,
        input: a.input.display().to_string(),
        task,
        outputs: output_records(&results),
        comparisons,
        tolerance: a.tolerance,
        accuracy,
        agree,
    };
    if a.json {
        print_json(&report)?;
    } else {
        print_text(&report);
    }
    Ok(if agree { Outcome::Ok } else { Outcome::CheckFailed })
}

/// The runtimes `a.runtime` names, each with `model` loaded.
fn backends(model: &Model, a: &Args) -> anyhow::Result<Vec<Box<dyn Backend>>> {
    let bytes = model.to_bytes();
    let label = a.model.display().to_string();
    let mut backends: Vec<Box<dyn Backend>> = Vec::new();
    use RuntimeChoice::*;
    if matches!(a.runtime, Ort | Both | All) {
        backends.push(Box::new(OrtSession::on_device(&bytes, &label, a.device)?));
    }
    if matches!(a.runtime, Tract | Both | All) {
        backends.push(Box::new(TractSession::from_bytes(&bytes, &label)?));
    }
    if matches!(a.runtime, Candle | All) {
        let dev = candle_device(a.device)?;
        let s = CandleSession::new(model, &dev).with_context(|| format!("{label}: building the training engine"))?;
        backends.push(Box::new(s));
    }
    Ok(backends)
}

fn output_records(results: &[(&'static str, Named)]) -> Vec<OutputRecord> {
    results
        .iter()
        .flat_map(|(rt, outs)| {
            outs.iter().map(move |(n, t)| OutputRecord {
                runtime: rt,
                name: n.clone(),
                shape: t.shape().to_vec(),
                values: t.to_f64_vec(),
            })
        })
        .collect()
}

/// The model `a` asks for: the file itself, or one task of it.
fn served_model(model: Model, a: &Args) -> anyhow::Result<(Model, Option<ServedTask>)> {
    let Some(name) = &a.task else { return Ok((model, None)) };
    let label = a.model.display().to_string();
    let m = specialize::manifest_of(&model, &label)?;
    let t = specialize::find_task(&m, name).with_context(|| label.clone())?;
    let one = specialize::specialize(&model, &m, t).with_context(|| label.clone())?;
    let served = ServedTask { name: t.name.clone(), output: t.output.clone(), task_value: t.task_value };
    Ok((one, Some(served)))
}

fn print_text(r: &RunReport) {
    if let Some(t) = &r.task {
        let value = t.task_value.map(|v| format!(" (task value {v}, fixed in the model)")).unwrap_or_default();
        println!("task {}: output {}{value}", t.name, t.output);
    }
    for o in &r.outputs {
        let head: Vec<String> = o.values.iter().take(6).map(|v| format!("{v:.6}")).collect();
        println!(
            "{:<6} {} {:?} [{}{}]",
            o.runtime,
            o.name,
            o.shape,
            head.join(", "),
            if o.values.len() > 6 { ", ..." } else { "" }
        );
    }
    if let Some(acc) = r.accuracy {
        println!("accuracy {acc:.4} (argmax of the first output against y)");
    }
    for c in &r.comparisons {
        let verdict = if c.max_abs_diff <= r.tolerance { "ok" } else { "DIFFERS" };
        println!(
            "max |{} - {}| {}: {:.3e} (tolerance {:.1e}) {verdict}",
            c.reference, c.runtime, c.output, c.max_abs_diff, r.tolerance
        );
    }
}

/// Model inputs from the file, plus the labels when the file is a dataset.
fn read_inputs(model: &Model, a: &Args) -> anyhow::Result<(Named, Option<Vec<i64>>)> {
    let g = model.graph();
    let names: Vec<&str> =
        g.input.iter().map(|i| i.name()).filter(|n| !g.initializer.iter().any(|t| t.name() == *n)).collect();
    let (tensors, meta) = store::load(&a.input)?;
    // A dataset (x and y, or marked as one) feeds its images even when an input is named x.
    let is_dataset = meta.get("mtpack.format").is_some_and(|f| f == crate::data::FORMAT)
        || (tensors.contains_key("x") && tensors.contains_key("y"));
    let (inputs, labels) = if !is_dataset && names.iter().all(|n| tensors.contains_key(*n)) {
        let mut v: Vec<(String, Tensor)> =
            names.iter().filter_map(|n| tensors.get(*n).map(|t| (n.to_string(), t.clone()))).collect();
        if let Some(n) = a.limit {
            v = v.into_iter().map(|(k, t)| (k, first_rows(t, n))).collect();
        }
        (v, None)
    } else if tensors.contains_key("x") {
        let [only] = names.as_slice() else {
            bail!(
                "the model has {} inputs ({}); a dataset's x can feed only a single-input model",
                names.len(),
                names.join(", ")
            );
        };
        let declared = model.graph().input.iter().find(|i| i.name() == *only).and_then(tensor_type);
        let layout = declared.and_then(|(_, d)| d).map(|d| crate::data::Layout::of_input(&d)).unwrap_or_default();
        let (x, y) = dataset_input(&a.input, a, layout)?;
        (vec![(only.to_string(), x)], Some(y))
    } else {
        bail!("holds neither the model's inputs ({}) nor a dataset's x", names.join(", "));
    };
    for (name, t) in &inputs {
        check_shape(model, name, t)?;
    }
    Ok((inputs, labels))
}

/// The dataset's images preprocessed into `layout` unless `--layout` says otherwise.
fn dataset_input(path: &Path, a: &Args, layout: crate::data::Layout) -> anyhow::Result<(Tensor, Vec<i64>)> {
    let d = Dataset::load(path)?;
    let split = match (a.split, &d.test) {
        (SplitChoice::Test, Some(t)) => t.clone(),
        (SplitChoice::Test, None) => bail!("has no test split (x_test/y_test); pass --split train"),
        (SplitChoice::Train, _) => d.train.clone(),
    };
    let n = a.limit.unwrap_or(split.len()).min(split.len());
    let idx: Vec<usize> = (0..n).collect();
    let split = split.select(&idx);
    let mut pre = a.pre.to_preprocessing();
    if pre.layout.is_none() && layout == crate::data::Layout::Nhwc {
        pre.layout = Some(layout);
    }
    let x = if split.x.dtype() == crate::tensor::DType::F32 && pre.is_identity() && d.pixel_max == 1.0 {
        split.x
    } else {
        Tensor::F32(pre.apply(&split.x, d.pixel_max)?.into_dyn())
    };
    Ok((x, split.y))
}

fn first_rows(t: Tensor, n: usize) -> Tensor {
    let rows = t.shape().first().copied().unwrap_or(0).min(n);
    let s = ndarray::Slice::from(0..rows);
    match t {
        Tensor::F32(a) => Tensor::F32(a.slice_axis(ndarray::Axis(0), s).to_owned()),
        Tensor::U8(a) => Tensor::U8(a.slice_axis(ndarray::Axis(0), s).to_owned()),
        Tensor::I64(a) => Tensor::I64(a.slice_axis(ndarray::Axis(0), s).to_owned()),
        other => other,
    }
}

/// Whether input `name` is declared for a batch of one image ([1, ...], deploy exports).
fn batch_of_one(model: &Model, name: &str) -> bool {
    let decl = model.graph().input.iter().find(|i| i.name() == name);
    matches!(decl.and_then(tensor_type).and_then(|(_, d)| d).as_deref(), Some([Dim::Fixed(1), _, ..]))
}

/// Runs `inputs` in `b`; an input declared for a batch of one but holding more rows is run
/// a row at a time, and each output's rows stacked.
fn run_rows(b: &mut dyn Backend, model: &Model, inputs: &[(String, Tensor)]) -> anyhow::Result<Named> {
    let rows_of = |(n, t): &(String, Tensor)| t.shape().first().copied().filter(|&r| r > 1 && batch_of_one(model, n));
    let Some(rows) = inputs.iter().find_map(rows_of) else { return Ok(b.run(inputs)?) };
    let mut parts: Vec<Named> = Vec::with_capacity(rows);
    for r in 0..rows {
        let one = inputs
            .iter()
            .map(|i| match rows_of(i) {
                Some(_) => i.1.select_rows(&[r]).map(|t| (i.0.clone(), t)),
                None => Ok(i.clone()),
            })
            .collect::<Result<Named, String>>()
            .map_err(|e| anyhow::anyhow!("input row {r}: {e}"))?;
        parts.push(b.run(&one)?);
    }
    let first = parts.first().cloned().unwrap_or_default();
    first
        .iter()
        .enumerate()
        .map(|(j, (name, _))| {
            let each: Vec<&Tensor> = parts.iter().filter_map(|p| p.get(j).map(|(_, t)| t)).collect();
            let stacked = Tensor::concat_rows(&each).map_err(|e| anyhow::anyhow!("output '{name}': {e}"))?;
            Ok((name.clone(), stacked))
        })
        .collect()
}

/// Refuses inputs whose rank or fixed dimensions disagree with the model's declaration (a
/// batch fixed at one takes any number of rows: they run one at a time).
fn check_shape(model: &Model, name: &str, t: &Tensor) -> anyhow::Result<()> {
    let Some(decl) = model.graph().input.iter().find(|i| i.name() == name) else { return Ok(()) };
    let Some((_, Some(dims))) = tensor_type(decl) else { return Ok(()) };
    let one = batch_of_one(model, name);
    let fits = dims.len() == t.shape().len()
        && dims
            .iter()
            .zip(t.shape())
            .enumerate()
            .all(|(k, (d, &s))| (k == 0 && one) || !matches!(d, Dim::Fixed(n) if *n >= 0 && *n as usize != s));
    if !fits {
        let want: Vec<String> = dims.iter().map(ToString::to_string).collect();
        bail!("x has shape {:?} but model input '{name}' expects [{}]", t.shape(), want.join(", "));
    }
    Ok(())
}

fn accuracy(outputs: &Named, y: &[i64], model: &Path) -> anyhow::Result<f64> {
    let Some((name, Tensor::F32(out))) = outputs.first() else {
        bail!("{}: the first output is not float32", model.display())
    };
    let [n, k] = out.shape() else {
        bail!("{}: output '{name}' has shape {:?}, not [N, classes]", model.display(), out.shape())
    };
    if let Some((i, l)) = y.iter().enumerate().find(|(_, &l)| l < 0 || l as usize >= *k) {
        bail!("label {l} at index {i} is outside the {k} classes of output '{name}' of {}", model.display());
    }
    let rows = out.as_slice().map(|s| s.chunks(*k).collect::<Vec<_>>()).unwrap_or_default();
    let correct = rows
        .iter()
        .zip(y)
        .filter(|(row, &l)| {
            let best =
                row.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
            best.0 as i64 == l
        })
        .count();
    Ok(correct as f64 / (*n).max(1) as f64)
}
