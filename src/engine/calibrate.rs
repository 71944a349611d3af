//! Precise BatchNorm statistics (detectron2/fvcore's `update_bn_stats`, PyTorch's
//! `swa_utils.update_bn`): after training, the running mean and variance of every BatchNorm
//! that trained with batch statistics are recomputed from the training data with the final
//! weights, as exact averages over the batches instead of an exponential moving average.
//!
//! A short training run leaves the moving averages somewhere between the pretrained data's
//! statistics and the new data's, with weights that never saw that mixture: evaluation then
//! runs a network that never existed in training.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use candle_core::Tensor;

use super::{Engine, EngineError};

/// Restores the engine's modes when recalibration ends, however it ends.
struct Modes<'a> {
    engine: &'a Engine,
    training: bool,
}

impl Drop for Modes<'_> {
    fn drop(&mut self) {
        self.engine.calibrating.store(false, Ordering::Relaxed);
        self.engine.training.store(self.training, Ordering::Relaxed);
    }
}

impl Engine {
    /// Names of the running (mean, variance) of each BatchNorm that trains with batch
    /// statistics, in graph order.
    pub fn running_statistics(&self) -> Vec<(String, String)> {
        self.steps.iter().filter_map(|s| s.running.clone()).collect()
    }

    /// Recomputes every running mean and variance from `xs` (fed to `input` in batches of
    /// `batch`, as in training: each BatchNorm normalises with its batch's statistics) as the
    /// average of the batches' means and unbiased variances, each batch weighted by its size.
    /// Returns how many BatchNorm layers were recalibrated (0: none trains with batch
    /// statistics, and nothing changes).
    pub fn recalibrate_batchnorm(&self, input: &str, xs: &[Tensor], batch: usize) -> Result<usize, EngineError> {
        let running = self.running_statistics();
        let Some(last) = self.steps.iter().rev().find(|s| s.running.is_some()).and_then(|s| s.outputs.first()) else {
            return Ok(0);
        };
        let candle = |context: &str| {
            let context = format!("BatchNorm recalibration: {context}");
            move |e: candle_core::Error| EngineError::Candle { context, source: Box::new(e) }
        };
        let _modes = Modes { engine: self, training: self.training.load(Ordering::Relaxed) };
        self.training.store(true, Ordering::Relaxed);
        self.calibrating.store(true, Ordering::Relaxed);
        let mut sums: BTreeMap<&str, Tensor> = BTreeMap::new();
        let mut seen = 0usize;
        for x in xs {
            let n = x.dim(0).map_err(candle("the training inputs"))?;
            // A last batch of one has no variance; it is left out when others exist.
            let batches =
                (0..n).step_by(batch.max(1)).map(|s| (s, batch.min(n - s))).filter(|&(_, len)| len > 1 || n == 1);
            for (start, len) in batches {
                let xb = x.narrow(0, start, len).map_err(candle("a batch"))?;
                // With `calibrating` set, each stateful BatchNorm writes its batch's statistics.
                self.forward_to(&[(input, xb)], &[last.as_str()])?;
                for name in running.iter().flat_map(|(m, v)| [m, v]) {
                    let Some(var) = self.params.get(name) else { continue };
                    let weighted = (var.as_tensor() * len as f64).map_err(candle(name))?;
                    let sum = match sums.remove(name.as_str()) {
                        Some(s) => (s + weighted).map_err(candle(name))?,
                        None => weighted,
                    };
                    sums.insert(name, sum);
                }
                seen += len;
            }
        }
        if seen == 0 {
            return Ok(0);
        }
        for (name, sum) in sums {
            if let Some(var) = self.params.get(name) {
                var.set(&(sum / seen as f64).map_err(candle(name))?).map_err(candle(name))?;
            }
        }
        Ok(running.len())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use crate::engine::gradcheck::seeded;
    use crate::engine::Engine;
    use crate::onnx::build::{model, node, value_info};
    use crate::onnx::pb::GraphProto;
    use crate::tensor::DType as HostDType;

    /// x [N, 3, 2, 2] -> BatchNormalization with initializers s, b, m, v.
    fn bn_model() -> crate::onnx::Model {
        let init = |name: &str, v: [f32; 3]| {
            crate::onnx::tensor_proto::from_tensor(name, &crate::tensor::Tensor::F32(ndarray::arr1(&v).into_dyn()))
        };
        let graph = GraphProto {
            node: vec![node("BatchNormalization", "bn", &["x", "s", "b", "m", "v"], &["y"], vec![])],
            input: vec![value_info("x", HostDType::F32, None)],
            output: vec![value_info("y", HostDType::F32, None)],
            initializer: vec![
                init("s", [1.0, 2.0, 0.5]),
                init("b", [0.0, 0.1, -0.1]),
                init("m", [5.0, -5.0, 0.0]),
                init("v", [9.0, 0.1, 1.0]),
            ],
            ..Default::default()
        };
        model(graph, 15)
    }

    fn values(e: &Engine, name: &str) -> Vec<f32> {
        e.params()[name].as_tensor().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn running_statistics_become_the_batches_exact_averages() {
        let engine = Engine::new(&bn_model(), &|n| n == "s" || n == "b", DType::F32, &Device::Cpu).unwrap();
        let x = (seeded(&[10, 3, 2, 2], 7, DType::F32) * 3.0).unwrap();
        // Batches of 4, 4 and 2, weighted by size.
        let (mut mean, mut var) = ([0f64; 3], [0f64; 3]);
        for (start, len) in [(0, 4), (4, 4), (8, 2)] {
            let b = x.narrow(0, start, len).unwrap().transpose(0, 1).unwrap().flatten_from(1).unwrap();
            for (c, row) in b.to_vec2::<f32>().unwrap().iter().enumerate() {
                let m = row.iter().map(|&v| v as f64).sum::<f64>() / row.len() as f64;
                let v = row.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / (row.len() - 1) as f64;
                mean[c] += m * len as f64 / 10.0;
                var[c] += v * len as f64 / 10.0;
            }
        }
        assert_eq!(engine.recalibrate_batchnorm("x", std::slice::from_ref(&x), 4).unwrap(), 1);
        for (got, want) in [(values(&engine, "m"), mean), (values(&engine, "v"), var)] {
            for (g, w) in got.iter().zip(want) {
                assert!((*g as f64 - w).abs() < 1e-5, "{got:?} vs {want:?}");
            }
        }
        // Where the statistics started does not matter, and the engine is back in eval mode.
        let again = values(&engine, "m");
        engine.params()["m"].set(&Tensor::new(&[100f32, 0.0, -3.0], &Device::Cpu).unwrap()).unwrap();
        engine.recalibrate_batchnorm("x", std::slice::from_ref(&x), 4).unwrap();
        assert_eq!(values(&engine, "m"), again);
        engine.forward(&[("x", x.clone())]).unwrap();
        assert_eq!(values(&engine, "m"), again, "an eval-mode forward leaves the statistics alone");
    }

    #[test]
    fn a_batchnorm_that_does_not_train_is_left_alone() {
        let engine = Engine::new(&bn_model(), &|_| false, DType::F32, &Device::Cpu).unwrap();
        let x = seeded(&[6, 3, 2, 2], 1, DType::F32);
        assert_eq!(engine.recalibrate_batchnorm("x", &[x], 4).unwrap(), 0);
        assert!(engine.running_statistics().is_empty());
    }
}
