//! The engine as a third runtime for `mtpack run`: forward only, every weight constant.

use candle_core::{DType, Device};

use super::{from_candle, to_candle_on, Engine};
use crate::onnx::Model;
use crate::runtime::{Backend, Named, RuntimeError};
use crate::tensor::Tensor;

pub struct CandleSession {
    engine: Engine,
}

impl CandleSession {
    pub fn new(model: &Model, device: &Device) -> Result<CandleSession, super::EngineError> {
        Ok(CandleSession { engine: Engine::new(model, &|_| false, DType::F32, device)? })
    }
}

fn fail(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Output { output: "candle".into(), problem: e.to_string() }
}

impl Backend for CandleSession {
    fn name(&self) -> &'static str {
        "candle"
    }

    fn run(&mut self, inputs: &[(String, Tensor)]) -> Result<Named, RuntimeError> {
        let dev = self.engine.device().clone();
        let mut ct = Vec::with_capacity(inputs.len());
        for (n, t) in inputs {
            let v = to_candle_on(t, DType::F32, &dev)
                .map_err(|e| RuntimeError::Input { input: n.clone(), problem: e.to_string() })?;
            ct.push((n.as_str(), v));
        }
        let outs = self.engine.forward(&ct).map_err(|e| RuntimeError::Engine(Box::new(e)))?;
        self.engine
            .output_names()
            .iter()
            .zip(outs)
            .map(|(n, t)| Ok((n.clone(), from_candle(&t).map_err(fail)?)))
            .collect()
    }
}
