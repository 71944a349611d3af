//! tract, the independent verifier. A model is optimised for the concrete input shapes it is
//! run with, and the optimised plan is cached per shape.

use std::collections::HashMap;

use ndarray::{ArrayD, IxDyn};
use tract_onnx::prelude::{
    tvec, DatumType, Framework, InferenceFact, InferenceModel, InferenceModelExt, IntoRunnable, TValue,
    Tensor as TTensor, TypedRunnableModel,
};

use super::error::anyhow_like::TractError;
use super::{Backend, Named, RuntimeError};
use crate::tensor::Tensor;

pub struct TractSession {
    model: InferenceModel,
    inputs: Vec<String>,
    outputs: Vec<String>,
    plans: HashMap<Vec<Vec<usize>>, std::sync::Arc<TypedRunnableModel>>,
}

/// Runs `f`, turning a panic inside tract into an error: tract assumes well-formed models
/// in places (constant folding indexes with the model's own constants), and a damaged or
/// hostile artifact must be refused, not end the process.
fn guarded<T>(context: &str, f: impl FnOnce() -> Result<T, RuntimeError>) -> Result<T, RuntimeError> {
    quiet_inside_guard();
    GUARDED.with(|g| g.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(false));
    result.unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "no message".into());
        Err(RuntimeError::Panicked { runtime: "tract", context: context.to_string(), message })
    })
}

thread_local! {
    static GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A panic caught by `guarded` becomes an error with its message; the default hook would
/// also print it (with a backtrace) before that error. The hook installed here stays silent
/// inside a guard and hands every other panic to the hook that was there before.
fn quiet_inside_guard() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(|g| g.get()) {
                previous(info);
            }
        }));
    });
}

fn fail(context: impl Into<String>) -> impl FnOnce(tract_onnx::prelude::TractError) -> RuntimeError {
    let context = context.into();
    move |e| RuntimeError::Tract { context, source: TractError(e) }
}

impl TractSession {
    pub fn from_bytes(bytes: &[u8], label: &str) -> Result<TractSession, RuntimeError> {
        let bytes = without_shape_hints(bytes);
        let context = format!("loading {label}");
        let model = guarded(&context, || tract_onnx::onnx().model_for_read(&mut &bytes[..]).map_err(fail(&context)))?;
        let inputs = model
            .input_outlets()
            .map_err(fail("listing inputs"))?
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        let outputs = model
            .output_outlets()
            .map_err(fail("listing outputs"))?
            .iter()
            .map(|o| model.outlet_label(*o).map(str::to_string).unwrap_or_else(|| model.node(o.node).name.clone()))
            .collect();
        Ok(TractSession { model, inputs, outputs, plans: HashMap::new() })
    }

    /// The operators tract runs for inputs of these shapes, after its optimisations
    /// (constant folding included).
    pub fn optimized_ops(&mut self, inputs: &[(String, Tensor)]) -> Result<Vec<String>, RuntimeError> {
        let ordered = self.ordered(inputs)?;
        let plan = self.plan(&ordered)?;
        Ok(plan.model().nodes().iter().map(|n| n.op().name().to_string()).collect())
    }

    /// `inputs` in the model's input order.
    fn ordered<'a>(&self, inputs: &'a [(String, Tensor)]) -> Result<Vec<&'a Tensor>, RuntimeError> {
        self.inputs
            .iter()
            .map(|name| {
                inputs.iter().find(|(n, _)| n == name).map(|(_, t)| t).ok_or_else(|| RuntimeError::Input {
                    input: name.clone(),
                    problem: "the model needs it but it was not given".into(),
                })
            })
            .collect()
    }

    fn plan(&mut self, ordered: &[&Tensor]) -> Result<std::sync::Arc<TypedRunnableModel>, RuntimeError> {
        let key: Vec<Vec<usize>> = ordered.iter().map(|t| t.shape().to_vec()).collect();
        if let Some(p) = self.plans.get(&key) {
            return Ok(p.clone());
        }
        let mut model = self.model.clone();
        for (i, t) in ordered.iter().enumerate() {
            let fact = InferenceFact::dt_shape(datum_type(t), t.shape());
            model.set_input_fact(i, fact).map_err(fail(format!("setting the shape of input {i}")))?;
        }
        let plan = guarded("optimising the model", || {
            model
                .into_optimized()
                .map_err(fail("optimising the model"))?
                .into_runnable()
                .map_err(fail("preparing the model"))
        })?;
        self.plans.insert(key, plan.clone());
        Ok(plan)
    }
}

/// tract unifies declared symbolic dimensions (`DynamicDimension.0`) of outputs and
/// value_info with the concrete shapes it is run at, and refuses the combination. Those
/// declarations are hints that do not change what the graph computes, so they are dropped
/// (element types stay); inputs get concrete shapes from the tensors at run time.
fn without_shape_hints(bytes: &[u8]) -> Vec<u8> {
    use crate::onnx::pb::{type_proto::Value, ModelProto};
    use prost::Message;
    let Ok(mut m) = ModelProto::decode(bytes) else { return bytes.to_vec() };
    if let Some(g) = m.graph.as_mut() {
        g.value_info.clear();
        for o in &mut g.output {
            if let Some(Value::TensorType(t)) = o.r#type.as_mut().and_then(|t| t.value.as_mut()) {
                t.shape = None;
            }
        }
    }
    m.encode_to_vec()
}

fn datum_type(t: &Tensor) -> DatumType {
    match t {
        Tensor::F32(_) => DatumType::F32,
        Tensor::F64(_) => DatumType::F64,
        Tensor::I64(_) => DatumType::I64,
        Tensor::I32(_) => DatumType::I32,
        Tensor::I8(_) => DatumType::I8,
        Tensor::U8(_) => DatumType::U8,
        Tensor::Bool(_) => DatumType::Bool,
    }
}

fn to_tract(name: &str, t: &Tensor) -> Result<TTensor, RuntimeError> {
    fn make<T: tract_onnx::prelude::Datum + Copy>(a: &ArrayD<T>) -> tract_onnx::prelude::TractResult<TTensor> {
        let v: Vec<T> = a.iter().copied().collect();
        TTensor::from_shape(a.shape(), &v)
    }
    let r = match t {
        Tensor::F32(a) => make(a),
        Tensor::F64(a) => make(a),
        Tensor::I64(a) => make(a),
        Tensor::I32(a) => make(a),
        Tensor::I8(a) => make(a),
        Tensor::U8(a) => make(a),
        Tensor::Bool(a) => make(a),
    };
    r.map_err(fail(format!("input '{name}'")))
}

fn from_tract(name: &str, t: &TTensor) -> Result<Tensor, RuntimeError> {
    fn get<T: tract_onnx::prelude::Datum + Clone>(t: &TTensor) -> tract_onnx::prelude::TractResult<ArrayD<T>> {
        let v: Vec<T> = t.to_plain_array_view::<T>()?.iter().cloned().collect();
        Ok(ArrayD::from_shape_vec(IxDyn(t.shape()), v)?)
    }
    let r = match t.datum_type() {
        DatumType::F32 => get(t).map(Tensor::F32),
        DatumType::F64 => get(t).map(Tensor::F64),
        DatumType::I64 => get(t).map(Tensor::I64),
        DatumType::I32 => get(t).map(Tensor::I32),
        DatumType::I8 => get(t).map(Tensor::I8),
        DatumType::U8 => get(t).map(Tensor::U8),
        DatumType::Bool => get(t).map(Tensor::Bool),
        other => {
            return Err(RuntimeError::Output {
                output: name.into(),
                problem: format!("element type {other:?} is not supported"),
            })
        }
    };
    r.map_err(fail(format!("output '{name}'")))
}

impl Backend for TractSession {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn run(&mut self, inputs: &[(String, Tensor)]) -> Result<Named, RuntimeError> {
        let ordered = self.ordered(inputs)?;
        let plan = self.plan(&ordered)?;
        let mut values = tvec![];
        for (name, t) in self.inputs.iter().zip(&ordered) {
            values.push(TValue::from(to_tract(name, t)?));
        }
        let out = guarded("running the model", || plan.run(values).map_err(fail("running the model")))?;
        self.outputs.iter().zip(out.iter()).map(|(name, v)| Ok((name.clone(), from_tract(name, v)?))).collect()
    }
}
