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
    model.with_values(|t| {
        let Some(mask) = masks.get(t.name()) else { return Ok(None) };
        let host = tensor_proto::to_tensor(t).map_err(invalid(format!("masked weight '{}'", t.name())))?;
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
        Ok(Some(Tensor::F32(a)))
    })
}

/// The engine parameters a mask method keeps per task: every shared parameter that is not a
/// masked weight (biases, BatchNorm scale and shift, and the running statistics).
pub fn per_task_names(engine: &crate::engine::Engine, ctx: &super::TaskCtx) -> Vec<String> {
    engine
        .params()
        .keys()
        .filter(|n| {
            !(ctx.head_params.contains(*n)
                || ctx.old_head_params.contains(*n)
                || ctx.masked.contains(*n)
                || n.starts_with(super::piggyback::SCORES))
        })
        .cloned()
        .collect()
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

pub use crate::train::invalid;

/// Shared parameters that every task of a mask method has its own copy of (biases,
/// BatchNorm scale, shift and statistics): row 0 holds the backbone's values (its own head),
/// row k + 1 task k's.
#[derive(Default)]
pub struct PerTask {
    rows: Vec<BTreeMap<String, Tensor>>,
}

/// The record table of the per-task parameters.
const PER_TASK: &str = "per_task";

impl PerTask {
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Starts task `index`: the first time, records the backbone's values of `names`; then
    /// sets the engine to them, so each task starts from the backbone.
    pub fn begin(&mut self, engine: &crate::engine::Engine, names: &[String], index: usize) -> Result<(), TrainError> {
        if self.rows.is_empty() {
            if index != 0 {
                return Err(TrainError::Invalid("per-task parameters: the backbone's values are missing".into()));
            }
            self.rows.push(Self::read(engine, names)?);
        }
        let original = self.rows.first().cloned().unwrap_or_default();
        for (name, t) in &original {
            let Some(var) = engine.params().get(name) else { continue };
            let v =
                crate::engine::to_candle_on(t, var.dtype(), var.device()).map_err(crate::train::candle("per-task"))?;
            var.set(&v).map_err(crate::train::candle("per-task parameters"))?;
        }
        Ok(())
    }

    fn read(engine: &crate::engine::Engine, names: &[String]) -> Result<BTreeMap<String, Tensor>, TrainError> {
        names
            .iter()
            .filter_map(|n| engine.params().get(n).map(|v| (n, v)))
            .map(|(n, v)| {
                Ok((n.clone(), crate::engine::from_candle(v.as_tensor()).map_err(crate::train::candle("per-task"))?))
            })
            .collect()
    }

    /// Records task `index`'s values from the engine.
    pub fn end(&mut self, engine: &crate::engine::Engine, index: usize) -> Result<(), TrainError> {
        let names: Vec<String> = self.rows.first().map(|r| r.keys().cloned().collect()).unwrap_or_default();
        let values = Self::read(engine, &names)?;
        self.rows.truncate(index + 1);
        if self.rows.len() != index + 1 {
            return Err(TrainError::Invalid(format!(
                "per-task parameters: task {} follows {} tasks",
                index + 1,
                self.rows.len().saturating_sub(1)
            )));
        }
        self.rows.push(values);
        Ok(())
    }

    /// `model` with task `column`'s values (`None`: the backbone's).
    pub fn apply(&self, model: &Model, column: Option<usize>) -> Result<Model, TrainError> {
        let Some(row) = self.rows.get(column.map_or(0, |k| k + 1)) else {
            return Err(TrainError::Invalid(format!("per-task parameters: none for task {:?}", column.map(|k| k + 1))));
        };
        model.with_values(|t| Ok(row.get(t.name()).cloned()))
    }

    /// `model` as the pack stores it: the backbone's values of the per-task parameters.
    pub fn canonical(&self, model: Model) -> Result<Model, TrainError> {
        if self.is_empty() {
            return Ok(model);
        }
        self.apply(&model, None)
    }

    /// Adds each per-task parameter's stacked rows to `out` (nothing when there are none).
    pub fn add_stored(&self, out: &mut BTreeMap<String, crate::graph::masks::StoredMask>) -> Result<(), TrainError> {
        for (name, rows) in self.stacked()? {
            out.insert(name, crate::graph::masks::StoredMask::PerTask(rows));
        }
        Ok(())
    }

    /// Each parameter's rows stacked: [1 + tasks, ...].
    pub fn stacked(&self) -> Result<BTreeMap<String, ndarray::ArrayD<f32>>, TrainError> {
        let names: Vec<String> = self.rows.first().map(|r| r.keys().cloned().collect()).unwrap_or_default();
        let mut out = BTreeMap::new();
        for name in names {
            let views: Vec<ndarray::ArrayViewD<f32>> =
                self.rows.iter().filter_map(|r| r.get(&name).and_then(|t| t.as_f32()).map(|a| a.view())).collect();
            let views: Vec<_> = views.iter().map(|v| v.view().insert_axis(ndarray::Axis(0))).collect();
            let stacked =
                ndarray::concatenate(ndarray::Axis(0), &views).map_err(invalid(format!("per-task '{name}'")))?;
            out.insert(name, stacked);
        }
        Ok(out)
    }

    /// Adds the per-task parameters, stacked by row, to a method's record.
    pub fn record_into(&self, record: &mut super::Record) -> Result<(), TrainError> {
        for (name, stacked) in self.stacked()? {
            record.insert(PER_TASK, &name, Tensor::F32(stacked));
        }
        Ok(())
    }

    /// Takes the per-task parameters back from a record that has them.
    pub fn restore(&mut self, record: &super::Record) -> Result<(), TrainError> {
        if record.table(PER_TASK).next().is_none() {
            return Ok(());
        }
        self.rows.clear();
        for (name, v) in record.table(PER_TASK) {
            let Tensor::F32(a) = v else {
                return Err(TrainError::Invalid(format!("per-task '{name}' is not float32")));
            };
            for (i, row) in a.outer_iter().enumerate() {
                if self.rows.len() <= i {
                    self.rows.push(BTreeMap::new());
                }
                if let Some(r) = self.rows.get_mut(i) {
                    r.insert(name.to_string(), Tensor::F32(row.to_owned()));
                }
            }
        }
        Ok(())
    }
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
