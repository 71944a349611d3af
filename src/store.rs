//! Named tensors in safetensors files (datasets, checkpoints, masks), written atomically.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::tensor::{DType, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file")]
    Format {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("{path}: tensor '{tensor}' has element type {dtype:?}, which mtpack does not read")]
    DType { path: PathBuf, tensor: String, dtype: Dtype },
    #[error("{path}: tensor '{tensor}': {problem}")]
    Tensor { path: PathBuf, tensor: String, problem: String },
}

fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
        DType::I64 => Dtype::I64,
        DType::I32 => Dtype::I32,
        DType::I8 => Dtype::I8,
        DType::U8 => Dtype::U8,
        DType::Bool => Dtype::BOOL,
    }
}

fn our_dtype(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        Dtype::I64 => DType::I64,
        Dtype::I32 => DType::I32,
        Dtype::I8 => DType::I8,
        Dtype::U8 => DType::U8,
        Dtype::BOOL => DType::Bool,
        _ => return None,
    })
}

/// Encodes tensors and string metadata as safetensors bytes.
pub fn to_bytes(
    tensors: &[(&str, &Tensor)],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>, safetensors::SafeTensorError> {
    let bytes: Vec<(String, Vec<u8>, &Tensor)> =
        tensors.iter().map(|(n, t)| (n.to_string(), t.to_le_bytes(), *t)).collect();
    let mut views = Vec::with_capacity(bytes.len());
    for (n, b, t) in &bytes {
        views.push((n.clone(), TensorView::new(st_dtype(t.dtype()), t.shape().to_vec(), b)?));
    }
    let meta = if metadata.is_empty() { None } else { Some(metadata) };
    safetensors::serialize(views, meta)
}

/// Writes tensors atomically.
pub fn save(path: &Path, tensors: &[(&str, &Tensor)], metadata: HashMap<String, String>) -> Result<(), StoreError> {
    let bytes =
        to_bytes(tensors, metadata).map_err(|source| StoreError::Format { path: path.to_path_buf(), source })?;
    crate::fsutil::write_atomic(path, &bytes).map_err(|source| StoreError::Write { path: path.to_path_buf(), source })
}

/// Every tensor of a file plus its metadata. The safetensors parser checks that each tensor's
/// byte range lies inside the file before anything is copied.
pub type Loaded = (HashMap<String, Tensor>, HashMap<String, String>);

pub fn load(path: &Path) -> Result<Loaded, StoreError> {
    let bytes = std::fs::read(path).map_err(|source| StoreError::Read { path: path.to_path_buf(), source })?;
    from_bytes(&bytes, path)
}

pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Loaded, StoreError> {
    let format = |source| StoreError::Format { path: path.to_path_buf(), source };
    let st = SafeTensors::deserialize(bytes).map_err(format)?;
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(format)?;
    let mut out = HashMap::new();
    for name in st.names() {
        let view = st.tensor(name).map_err(format)?;
        let dtype = our_dtype(view.dtype()).ok_or_else(|| StoreError::DType {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            dtype: view.dtype(),
        })?;
        let t = Tensor::from_le_bytes(dtype, view.shape(), view.data()).map_err(|problem| StoreError::Tensor {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            problem,
        })?;
        out.insert(name.to_string(), t);
    }
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    #[test]
    fn round_trip_with_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let x = Tensor::U8(ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![1, 2, 3, 4]).unwrap());
        let y = Tensor::I64(ArrayD::from_shape_vec(IxDyn(&[2]), vec![0, 1]).unwrap());
        let meta = HashMap::from([("k".to_string(), "v".to_string())]);
        save(&p, &[("x", &x), ("y", &y)], meta.clone()).unwrap();
        let (t, m) = load(&p).unwrap();
        assert_eq!(t["x"], x);
        assert_eq!(t["y"], y);
        assert_eq!(m, meta);
    }

    #[test]
    fn truncated_and_garbage_files_are_errors() {
        let x = Tensor::F32(ArrayD::zeros(IxDyn(&[4, 4])));
        let bytes = to_bytes(&[("x", &x)], HashMap::new()).unwrap();
        let p = Path::new("t.safetensors");
        assert!(from_bytes(&bytes[..bytes.len() - 3], p).is_err());
        assert!(from_bytes(b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage", p).is_err());
        assert!(from_bytes(b"", p).is_err());
    }
}
