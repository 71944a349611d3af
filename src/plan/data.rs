//! A task's data as training needs it: loaded, subset to its classes, preprocessed to the
//! backbone's input, split, and checked against the backbone before anything trains.

use crate::data::{Dataset, Split};
use crate::onnx::Dim;
use crate::plan::TaskPlan;
use crate::tensor::Tensor;

#[derive(Clone)]
pub struct TaskData {
    pub labels: Vec<String>,
    pub pixel_max: f32,
    pub dataset_sha256: String,
    /// Float32 [N, C, H, W], preprocessed.
    pub train_x: Tensor,
    pub train_y: Vec<i64>,
    pub test_x: Tensor,
    pub test_y: Vec<i64>,
    /// The held-out images as stored, before preprocessing (uint8 or float32).
    pub test_raw: Tensor,
}

/// Why a task's data cannot be prepared; every variant names the task.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("task '{task}': dataset {} does not exist", path.display())]
    Missing { task: String, path: std::path::PathBuf },
    #[error("task '{task}'")]
    Data {
        task: String,
        #[source]
        source: Box<crate::data::DataError>,
    },
    #[error("task '{task}': cannot read {}", path.display())]
    Read {
        task: String,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("task '{task}': {problem}")]
    Invalid { task: String, problem: String },
}

/// Loads and prepares one task; every error names the task and the field.
pub fn prepare(t: &TaskPlan, input_shape: Option<&[Dim]>, seed: u64) -> Result<TaskData, PrepareError> {
    let task = || t.name.clone();
    let fail = |problem: String| PrepareError::Invalid { task: task(), problem };
    if !t.dataset.is_file() {
        return Err(PrepareError::Missing { task: task(), path: t.dataset.clone() });
    }
    let mut d = Dataset::load(&t.dataset).map_err(|e| PrepareError::Data { task: task(), source: Box::new(e) })?;
    let sha = crate::fsutil::file_sha256(&t.dataset).map_err(|source| PrepareError::Read {
        task: task(),
        path: t.dataset.clone(),
        source,
    })?;
    if let Some(classes) = &t.classes {
        subset_classes(&mut d, classes).map_err(fail)?;
    }
    if let Some(labels) = &t.labels {
        if labels.len() != d.classes() {
            return Err(fail(format!("labels lists {} names but the data has {} classes", labels.len(), d.classes())));
        }
        d.labels = labels.clone();
    }
    if d.test.is_none() {
        d.split_off_test(t.test_fraction.unwrap_or(0.2), seed);
    }
    let test = d.test.take().unwrap_or_else(|| d.train.select(&[]));
    if let Some(limit) = t.train_per_class {
        d.train = Dataset::limit_per_class(&d.train, d.classes(), limit, seed);
    }
    if d.train.is_empty() || test.is_empty() {
        return Err(fail(format!(
            "{} training and {} held-out images: both must be non-empty",
            d.train.len(),
            test.len()
        )));
    }
    let prep = |s: &Split| -> Result<Tensor, PrepareError> {
        let x = t
            .preprocessing
            .apply(&s.x, d.pixel_max)
            .map_err(|e| PrepareError::Data { task: task(), source: Box::new(e) })?;
        Ok(Tensor::F32(x.into_dyn()))
    };
    let (train_x, test_x) = (prep(&d.train)?, prep(&test)?);
    if let Some(dims) = input_shape {
        let layout = t.preprocessing.layout.unwrap_or_default();
        check_input(&train_x, dims, layout).map_err(fail)?;
    }
    Ok(TaskData {
        labels: d.labels.clone(),
        pixel_max: d.pixel_max,
        dataset_sha256: sha,
        train_x,
        train_y: d.train.y,
        test_x,
        test_raw: test.x,
        test_y: test.y,
    })
}

/// Keeps the listed classes, relabelled 0..k in the given order.
fn subset_classes(d: &mut Dataset, classes: &[i64]) -> Result<(), String> {
    if let Some(bad) = classes.iter().find(|&&c| c < 0 || c as usize >= d.classes()) {
        return Err(format!("classes: {bad} is not a class of the dataset (0..{})", d.classes()));
    }
    d.train = keep_classes(&d.train, classes);
    d.test = d.test.as_ref().map(|t| keep_classes(t, classes));
    d.labels = classes.iter().map(|&c| d.labels.get(c as usize).cloned().unwrap_or_else(|| c.to_string())).collect();
    Ok(())
}

fn keep_classes(s: &Split, classes: &[i64]) -> Split {
    let idx: Vec<usize> = (0..s.len()).filter(|&i| s.y.get(i).is_some_and(|l| classes.contains(l))).collect();
    let mut out = s.select(&idx);
    for l in &mut out.y {
        *l = classes.iter().position(|c| c == l).unwrap_or(0) as i64;
    }
    out
}

/// The preprocessed images must fit the backbone's declared input (fixed dimensions).
fn check_input(x: &Tensor, dims: &[Dim], layout: crate::data::Layout) -> Result<(), String> {
    let shape = x.shape();
    let fits = dims.len() == shape.len()
        && dims.iter().zip(shape).skip(1).all(|(d, &s)| !matches!(d, Dim::Fixed(n) if *n >= 0 && *n as usize != s));
    if fits {
        Ok(())
    } else {
        let want: Vec<String> = dims.iter().map(ToString::to_string).collect();
        Err(format!(
            "images are {:?} after preprocessing but the backbone input is [{}] (images in layout {}, the \
             input reads as {}; set resize, channels or layout=nchw|nhwc)",
            shape.get(1..).unwrap_or_default(),
            want.join(", "),
            layout.name(),
            crate::data::Layout::of_input(dims).name()
        ))
    }
}

/// The first `n` rows of an image tensor.
pub fn head_rows(x: &Tensor, n: usize) -> Tensor {
    let rows = x.shape().first().copied().unwrap_or(0).min(n);
    let s = ndarray::Slice::from(0..rows);
    match x {
        Tensor::F32(a) => Tensor::F32(a.slice_axis(ndarray::Axis(0), s).to_owned()),
        Tensor::U8(a) => Tensor::U8(a.slice_axis(ndarray::Axis(0), s).to_owned()),
        other => other.clone(),
    }
}
