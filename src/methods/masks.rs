//! What PackNet and Piggyback share: binary masks over named weights, their compact
//! storage (bits packed eight weights to a byte), and the model a task sees through them.

use std::collections::BTreeMap;

use crate::onnx::{tensor_proto, Model};
use crate::tensor::Tensor;
use crate::train::TrainError;

/// Packs `mask` eight weights to a byte: weight i is bit (i % 8) of byte i / 8 (the order
/// the exported graph unpacks).
pub fn pack_bits(mask: &[bool]) -> Vec<u8> {
    mask.chunks(8).map(|c| c.iter().enumerate().fold(0u8, |b, (j, &on)| if on { b | (1 << j) } else { b })).collect()
}

/// The first `n` bits of `bytes`; an error when there are fewer.
pub fn unpack_bits(bytes: &[u8], n: usize) -> Result<Vec<bool>, TrainError> {
    if bytes.len() < n.div_ceil(8) {
        return Err(TrainError::Invalid(format!("a packed mask of {} bytes cannot hold {n} weights", bytes.len())));
    }
    Ok((0..n).map(|i| bytes.get(i / 8).is_some_and(|b| (b >> (i % 8)) & 1 == 1)).collect())
}

/// `model` with each named float initializer multiplied by its mask: kept weights are
/// copied bit for bit, masked ones become +0.
pub fn apply(model: &Model, masks: &BTreeMap<String, Vec<bool>>) -> Result<Model, TrainError> {
    let mut out = model.clone();
    for t in &mut out.graph_mut().initializer {
        let Some(mask) = masks.get(t.name()) else { continue };
        let host = tensor_proto::to_tensor(t).map_err(|e| TrainError::Invalid(format!("{e:#}")))?;
        let Tensor::F32(mut a) = host else {
            return Err(TrainError::Invalid(format!("masked weight '{}' is not float32", t.name())));
        };
        if a.len() != mask.len() {
            return Err(TrainError::Invalid(format!(
                "mask of '{}' has {} entries, the weight {}",
                t.name(),
                mask.len(),
                a.len()
            )));
        }
        a.iter_mut().zip(mask).filter(|(_, &keep)| !keep).for_each(|(w, _)| *w = 0.0);
        let mut fresh = tensor_proto::from_tensor(t.name(), &Tensor::F32(a));
        fresh.doc_string = t.doc_string.take();
        *t = fresh;
    }
    Ok(out)
}

/// A weight's values as float32 from the engine.
pub fn values(t: &candle_core::Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()
}

/// A 0/1 float tensor shaped like `like`, on its device and dtype.
pub fn mask_tensor(keep: &[bool], like: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    let v: Vec<f32> = keep.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
    candle_core::Tensor::from_vec(v, like.dims(), like.device())?.to_dtype(like.dtype())
}

/// Writes a method's state file `name` into `dir`; returns the names written.
pub fn save_state(dir: &std::path::Path, name: &str, host: &[(String, Tensor)]) -> Result<Vec<String>, TrainError> {
    let refs: Vec<(&str, &Tensor)> = host.iter().map(|(n, t)| (n.as_str(), t)).collect();
    crate::store::save(&dir.join(name), &refs, Default::default()).map_err(invalid)?;
    Ok(vec![name.into()])
}

/// Reads a method's state file `name` from `dir`, if there is one.
pub fn load_state(
    dir: &std::path::Path,
    name: &str,
) -> Result<Option<std::collections::HashMap<String, Tensor>>, TrainError> {
    let file = dir.join(name);
    if !file.exists() {
        return Ok(None);
    }
    let (t, _) = crate::store::load(&file).map_err(invalid)?;
    Ok(Some(t))
}

pub fn invalid(e: impl std::fmt::Display) -> TrainError {
    TrainError::Invalid(format!("{e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_round_trip_in_little_endian_order() {
        let mask: Vec<bool> = (0..19).map(|i| i % 3 == 0 || i == 18).collect();
        let packed = pack_bits(&mask);
        assert_eq!(packed.len(), 3);
        assert_eq!(packed[0], 0b0100_1001);
        assert_eq!(unpack_bits(&packed, 19).unwrap(), mask);
        assert!(unpack_bits(&packed, 25).is_err());
    }
}
