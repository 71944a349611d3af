//! The frozen prefix: computed once per dataset in ONNX Runtime and cached, so training runs
//! only the trainable suffix in candle.

use std::collections::HashMap;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::eval::{run_batched_on, Inference};
use super::TrainError;
use crate::graph::cut;
use crate::onnx::Model;
use crate::store;
use crate::tensor::Tensor;

const CACHE_KEY: &str = "mtpack.prefix_key";

/// Identifies a prefix computation: model bytes, cut tensor and input data.
pub fn cache_key(model: &Model, cut_at: &str, x: &Tensor) -> String {
    let mut h = Sha256::new();
    h.update(model.to_bytes());
    h.update(cut_at.as_bytes());
    h.update(format!("{:?}{:?}", x.dtype(), x.shape()).as_bytes());
    h.update(x.to_le_bytes());
    format!("{:x}", h.finalize())
}

/// Outputs of the model's prefix up to `cut_at` for every row of `x`, computed in ONNX
/// Runtime, or as `how` says. With `cache`, a file from an identical earlier computation is reused and a new
/// result is written there (atomically).
pub fn features(
    model: &Model,
    input: &str,
    cut_at: &str,
    x: &Tensor,
    cache: Option<&Path>,
    how: Inference,
) -> Result<Tensor, TrainError> {
    let key = cache_key(model, cut_at, x);
    if let Some(path) = cache.filter(|p| p.exists()) {
        // A stale or unreadable cache is recomputed, not trusted.
        if let Ok((mut t, meta)) = store::load(path) {
            if meta.get(CACHE_KEY) == Some(&key) {
                if let Some(f) = t.remove("features") {
                    return Ok(f);
                }
            }
        }
    }
    let prefix = cut::prefix(model, cut_at)?;
    let f = run_batched_on(how, &prefix, input, cut_at, x, 128)?;
    if let Some(path) = cache {
        let meta = HashMap::from([(CACHE_KEY.to_string(), key)]);
        store::save(path, &[("features", &f)], meta)?;
    }
    Ok(f)
}
