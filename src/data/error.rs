//! The data layer's error type: reading, importing and checking task datasets.

use std::path::PathBuf;

use crate::store::StoreError;

/// Failures reading, importing or checking task datasets. Each names the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
    #[error("{path}: tensor '{tensor}' is missing")]
    Missing { path: PathBuf, tensor: String },
    #[error("{path}: tensor '{tensor}': {problem}")]
    Tensor { path: PathBuf, tensor: String, problem: String },
    #[error("{path}: label {label} at index {index} of '{tensor}' is outside 0..{classes}")]
    LabelRange { path: PathBuf, tensor: String, index: usize, label: i64, classes: usize },
    #[error("{path}: '{tensor}' has a non-finite value at element {index}")]
    NotFinite { path: PathBuf, tensor: String, index: usize },
    #[error("{path}: {problem}")]
    Image {
        path: PathBuf,
        problem: String,
        #[source]
        source: image::ImageError,
    },
    #[error("invalid preprocessing: {0}")]
    Preprocessing(String),
}
