//! The task dataset file: safetensors with `x` [N, C, H, W] (uint8 or float32) and `y` int64
//! [N] for training, optionally `x_test` / `y_test` for the held-out split, and metadata
//! (label names, source, pixel range, preprocessing already applied).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, Axis, IxDyn};
use serde::Serialize;

use super::{DataError, Preprocessing};
use crate::rng::Rng;
use crate::store;
use crate::tensor::Tensor;

pub const FORMAT: &str = "mtpack.dataset/1";
const META_FORMAT: &str = "mtpack.format";
const META_LABELS: &str = "mtpack.labels";
const META_SOURCE: &str = "mtpack.source";
const META_PIXEL_MAX: &str = "mtpack.pixel_max";
const META_PREPROCESSING: &str = "mtpack.preprocessing";

/// Images and their labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    pub x: Tensor,
    pub y: Vec<i64>,
}

impl Split {
    pub fn len(&self) -> usize {
        self.y.len()
    }

    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// The images at `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> Split {
        let x = match &self.x {
            Tensor::U8(a) => Tensor::U8(a.select(Axis(0), idx)),
            Tensor::F32(a) => Tensor::F32(a.select(Axis(0), idx)),
            other => other.clone(),
        };
        Split { x, y: idx.iter().filter_map(|&i| self.y.get(i).copied()).collect() }
    }

    pub fn counts(&self, classes: usize) -> Vec<usize> {
        let mut c = vec![0; classes];
        for &l in &self.y {
            if let Some(slot) = usize::try_from(l).ok().and_then(|l| c.get_mut(l)) {
                *slot += 1;
            }
        }
        c
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub train: Split,
    pub test: Option<Split>,
    pub labels: Vec<String>,
    pub source: String,
    /// The stored value that means "full intensity" (255 for 8-bit images).
    pub pixel_max: f32,
    /// Preprocessing already applied to the stored images, if any.
    pub preprocessing: Option<Preprocessing>,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub format: &'static str,
    pub source: String,
    pub dtype: String,
    /// [C, H, W] of one image.
    pub image_shape: Vec<usize>,
    pub pixel_max: f32,
    pub labels: Vec<String>,
    pub train: usize,
    pub test: usize,
    /// label -> (train, test)
    pub per_class: BTreeMap<String, (usize, usize)>,
    pub preprocessing: Option<Preprocessing>,
}

impl Dataset {
    pub fn classes(&self) -> usize {
        self.labels.len()
    }

    pub fn image_shape(&self) -> Vec<usize> {
        self.train.x.shape().get(1..).map(<[usize]>::to_vec).unwrap_or_default()
    }

    pub fn summary(&self) -> Summary {
        let train = self.train.counts(self.classes());
        let test = self.test.as_ref().map(|t| t.counts(self.classes())).unwrap_or_else(|| vec![0; self.classes()]);
        Summary {
            format: FORMAT,
            source: self.source.clone(),
            dtype: self.train.x.dtype().to_string(),
            image_shape: self.image_shape(),
            pixel_max: self.pixel_max,
            labels: self.labels.clone(),
            train: self.train.len(),
            test: self.test.as_ref().map_or(0, Split::len),
            per_class: self.labels.iter().enumerate().map(|(i, l)| (format!("{i}:{l}"), (train[i], test[i]))).collect(),
            preprocessing: self.preprocessing.clone(),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        let y = Tensor::I64(
            ArrayD::from_shape_vec(IxDyn(&[self.train.len()]), self.train.y.clone()).map_err(|e| invalid(path, e))?,
        );
        let mut tensors: Vec<(&str, &Tensor)> = vec![("x", &self.train.x), ("y", &y)];
        let y_test;
        if let Some(t) = &self.test {
            y_test = Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[t.len()]), t.y.clone()).map_err(|e| invalid(path, e))?);
            tensors.push(("x_test", &t.x));
            tensors.push(("y_test", &y_test));
        }
        let mut meta = HashMap::new();
        meta.insert(META_FORMAT.to_string(), FORMAT.to_string());
        meta.insert(META_LABELS.to_string(), serde_json::to_string(&self.labels).map_err(|e| invalid(path, e))?);
        meta.insert(META_SOURCE.to_string(), self.source.clone());
        meta.insert(META_PIXEL_MAX.to_string(), self.pixel_max.to_string());
        if let Some(p) = &self.preprocessing {
            meta.insert(META_PREPROCESSING.to_string(), serde_json::to_string(p).map_err(|e| invalid(path, e))?);
        }
        Ok(store::save(path, &tensors, meta)?)
    }

    /// Reads and checks a dataset file: shapes, label range, finite values.
    pub fn load(path: &Path) -> Result<Dataset, DataError> {
        let (mut tensors, meta) = store::load(path)?;
        let mut take = |name: &str| tensors.remove(name);
        let x = take("x").ok_or_else(|| DataError::Missing { path: path.into(), tensor: "x".into() })?;
        let y = take("y").ok_or_else(|| DataError::Missing { path: path.into(), tensor: "y".into() })?;
        let train = split(path, "x", x, "y", y)?;
        let test = match (take("x_test"), take("y_test")) {
            (Some(x), Some(y)) => Some(split(path, "x_test", x, "y_test", y)?),
            (None, None) => None,
            (Some(_), None) => return Err(DataError::Missing { path: path.into(), tensor: "y_test".into() }),
            (None, Some(_)) => return Err(DataError::Missing { path: path.into(), tensor: "x_test".into() }),
        };
        if let Some(t) = &test {
            if t.x.shape().get(1..) != train.x.shape().get(1..) || t.x.dtype() != train.x.dtype() {
                return Err(invalid(
                    path,
                    format!(
                        "x_test ({} {:?}) does not match x ({} {:?})",
                        t.x.dtype(),
                        t.x.shape(),
                        train.x.dtype(),
                        train.x.shape()
                    ),
                ));
            }
        }
        let max_label = train.y.iter().chain(test.iter().flat_map(|t| t.y.iter())).copied().max().unwrap_or(-1);
        let labels: Vec<String> = match meta.get(META_LABELS) {
            Some(s) => serde_json::from_str(s).map_err(|e| invalid(path, format!("metadata {META_LABELS}: {e}")))?,
            None => (0..=max_label.max(0)).map(|i| i.to_string()).collect(),
        };
        if labels.is_empty() {
            return Err(invalid(path, "no classes: the label list is empty"));
        }
        check_labels(path, "y", &train.y, labels.len())?;
        if let Some(t) = &test {
            check_labels(path, "y_test", &t.y, labels.len())?;
        }
        let pixel_max =
            match meta.get(META_PIXEL_MAX) {
                Some(s) => s.parse::<f32>().ok().filter(|v| *v > 0.0).ok_or_else(|| {
                    invalid(path, format!("metadata {META_PIXEL_MAX} = '{s}' is not a positive number"))
                })?,
                None if train.x.dtype() == crate::tensor::DType::U8 => 255.0,
                None => 1.0,
            };
        let preprocessing = meta
            .get(META_PREPROCESSING)
            .map(|s| serde_json::from_str(s).map_err(|e| invalid(path, format!("metadata {META_PREPROCESSING}: {e}"))))
            .transpose()?;
        let source = meta.get(META_SOURCE).cloned().unwrap_or_else(|| path.display().to_string());
        Ok(Dataset { train, test, labels, source, pixel_max, preprocessing })
    }

    /// Moves a seeded random `fraction` of the training images into the test split.
    pub fn split_off_test(&mut self, fraction: f64, seed: u64) {
        let n = self.train.len();
        let n_test = ((n as f64) * fraction).round() as usize;
        let mut idx: Vec<usize> = (0..n).collect();
        Rng::new(seed).shuffle(&mut idx);
        let (test_idx, train_idx) = idx.split_at(n_test.min(n));
        let (mut test_idx, mut train_idx) = (test_idx.to_vec(), train_idx.to_vec());
        test_idx.sort_unstable();
        train_idx.sort_unstable();
        let test = self.train.select(&test_idx);
        self.train = self.train.select(&train_idx);
        self.test = Some(test);
    }

    /// Keeps at most `limit` images of each class (a seeded random choice), in original order.
    pub fn limit_per_class(split: &Split, classes: usize, limit: usize, seed: u64) -> Split {
        let mut idx: Vec<usize> = (0..split.len()).collect();
        Rng::new(seed).shuffle(&mut idx);
        let mut taken = vec![0usize; classes];
        let mut keep: Vec<usize> = idx
            .into_iter()
            .filter(|&i| {
                let Some(slot) = split.y.get(i).and_then(|&l| usize::try_from(l).ok()).and_then(|l| taken.get_mut(l))
                else {
                    return false;
                };
                *slot += 1;
                *slot <= limit
            })
            .collect();
        keep.sort_unstable();
        split.select(&keep)
    }
}

fn invalid(path: &Path, problem: impl ToString) -> DataError {
    DataError::Invalid { path: PathBuf::from(path), problem: problem.to_string() }
}

fn split(path: &Path, xn: &str, x: Tensor, yn: &str, y: Tensor) -> Result<Split, DataError> {
    let terr = |tensor: &str, problem: String| DataError::Tensor { path: path.into(), tensor: tensor.into(), problem };
    if !matches!(x, Tensor::U8(_) | Tensor::F32(_)) {
        return Err(terr(xn, format!("has element type {}, expected uint8 or float32", x.dtype())));
    }
    if x.shape().len() != 4 {
        return Err(terr(xn, format!("has shape {:?}, expected [N, C, H, W]", x.shape())));
    }
    let y = match y {
        Tensor::I64(a) if a.ndim() == 1 => a.into_raw_vec_and_offset().0,
        Tensor::I64(a) => return Err(terr(yn, format!("has shape {:?}, expected [N]", a.shape()))),
        other => return Err(terr(yn, format!("has element type {}, expected int64", other.dtype()))),
    };
    if x.shape().first() != Some(&y.len()) {
        return Err(terr(
            xn,
            format!("has {} images but '{yn}' has {} labels", x.shape().first().unwrap_or(&0), y.len()),
        ));
    }
    if let Tensor::F32(a) = &x {
        if let Some(index) = a.iter().position(|v| !v.is_finite()) {
            return Err(DataError::NotFinite { path: path.into(), tensor: xn.into(), index });
        }
    }
    Ok(Split { x, y })
}

fn check_labels(path: &Path, tensor: &str, y: &[i64], classes: usize) -> Result<(), DataError> {
    match y.iter().position(|&l| l < 0 || l as usize >= classes) {
        Some(index) => {
            Err(DataError::LabelRange { path: path.into(), tensor: tensor.into(), index, label: y[index], classes })
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Dataset {
        let x = Tensor::U8(ArrayD::from_shape_fn(IxDyn(&[10, 1, 2, 2]), |d| d[0] as u8));
        Dataset {
            train: Split { x, y: (0..10).map(|i| i % 2).collect() },
            test: None,
            labels: vec!["even".into(), "odd".into()],
            source: "test".into(),
            pixel_max: 255.0,
            preprocessing: None,
        }
    }

    #[test]
    fn save_load_round_trip_with_split() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.safetensors");
        let mut d = tiny();
        d.split_off_test(0.3, 1);
        assert_eq!((d.train.len(), d.test.as_ref().unwrap().len()), (7, 3));
        d.save(&p).unwrap();
        assert_eq!(Dataset::load(&p).unwrap(), d);
    }

    #[test]
    fn labels_out_of_range_name_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.safetensors");
        let mut d = tiny();
        d.train.y[4] = 7;
        d.save(&p).unwrap();
        let e = Dataset::load(&p).unwrap_err().to_string();
        assert!(e.contains("label 7 at index 4") && e.contains("0..2"), "{e}");
    }

    #[test]
    fn nan_in_x_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.safetensors");
        let mut d = tiny();
        let mut a = ArrayD::<f32>::zeros(IxDyn(&[10, 1, 2, 2]));
        a[[3, 0, 1, 1]] = f32::NAN;
        d.train.x = Tensor::F32(a);
        d.save(&p).unwrap();
        let e = Dataset::load(&p).unwrap_err().to_string();
        assert!(e.contains("non-finite value at element 15"), "{e}");
    }

    #[test]
    fn per_class_limit() {
        let d = tiny();
        let s = Dataset::limit_per_class(&d.train, 2, 2, 0);
        assert_eq!(s.counts(2), vec![2, 2]);
    }
}
