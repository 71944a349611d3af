//! ONNX Runtime through ort, loading the shared library at run time (`load-dynamic`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ndarray::{ArrayD, IxDyn};
use ort::session::Session;
use ort::value::{DynValue, TensorElementType, ValueType};

use super::device::DeviceChoice;
use super::{Backend, Named, RuntimeError};
use crate::tensor::Tensor;

pub const ORT_LIBRARY: &str = "libonnxruntime.so.1.31.1";

/// Where `scripts/fetch.sh ort` puts the library, relative to the checkout.
pub const FETCHED_DIR: &str = ".cache/onnxruntime";

/// Candidate library paths in the order mtpack tries them: beside the executable (and in
/// `../lib`), then the checkout's fetch folder. `ORT_DYLIB_PATH`, when set, wins over all.
pub fn candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        v.push(dir.join(ORT_LIBRARY));
        v.push(dir.join("../lib").join(ORT_LIBRARY));
        // target/{debug,release}[/deps] of the checkout mtpack was built in.
        for up in ["..", "../.."] {
            v.push(dir.join(up).join("..").join(FETCHED_DIR).join(ORT_LIBRARY));
        }
    }
    v.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(FETCHED_DIR).join(ORT_LIBRARY));
    v
}

/// The library file mtpack will load.
pub fn library_path() -> Result<PathBuf, RuntimeError> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(RuntimeError::OrtPathInvalid { path: p }) };
    }
    let cands = candidates();
    cands.iter().find(|p| p.is_file()).cloned().ok_or_else(|| RuntimeError::OrtLibraryMissing {
        looked: cands.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
    })
}

static ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// Loads the library and creates the process-wide environment, once.
fn environment() -> Result<&'static ort::environment::Environment, RuntimeError> {
    let path = library_path()?;
    let env = ENV.get_or_init(|| {
        let builder = ort::init_from(&path).map_err(|e| e.to_string())?;
        builder.with_name("mtpack").build().map_err(|e| e.to_string())
    });
    env.as_ref().map_err(|message| RuntimeError::OrtLoad { path, message: message.clone() })
}

/// An ONNX Runtime session on the CPU.
pub struct OrtSession {
    session: Session,
    outputs: Vec<String>,
}

impl OrtSession {
    /// A CPU session.
    pub fn from_bytes(model: &[u8], label: &str) -> Result<OrtSession, RuntimeError> {
        OrtSession::on_device(model, label, DeviceChoice::Cpu)
    }

    pub fn on_device(model: &[u8], label: &str, device: DeviceChoice) -> Result<OrtSession, RuntimeError> {
        let providers = super::device::ort_providers(device)?;
        let env = environment()?;
        let ctx = |what: &str| format!("{what} {label}");
        let builder = Session::builder(env)
            .map_err(|source| RuntimeError::Ort { context: ctx("creating a session for"), source })?;
        let mut builder = if providers.is_empty() {
            builder
        } else {
            builder.with_execution_providers(providers).map_err(|e| RuntimeError::Device {
                device: format!("{device:?}").to_lowercase(),
                why: format!("ONNX Runtime could not register its provider: {e}"),
            })?
        };
        let session = builder
            .commit_from_memory(model)
            .map_err(|source| RuntimeError::Ort { context: ctx("loading"), source })?;
        let outputs = session.outputs().iter().map(|o| o.name().to_string()).collect();
        Ok(OrtSession { session, outputs })
    }

    /// Writes `model` to `out` as ONNX Runtime holds it once loaded, after its graph
    /// optimisations (constant folding included): what a session computes on every run.
    pub fn write_optimized(model: &[u8], label: &str, out: &Path) -> Result<(), RuntimeError> {
        let env = environment()?;
        let ctx = |what: &str| format!("{what} {label}");
        let mut builder = Session::builder(env)
            .map_err(|source| RuntimeError::Ort { context: ctx("creating a session for"), source })?
            .with_optimized_model_path(out)
            .map_err(|e| RuntimeError::Ort {
                context: ctx("asking for the optimised model of"),
                source: ort::Error::new(e.message()),
            })?;
        builder.commit_from_memory(model).map_err(|source| RuntimeError::Ort { context: ctx("loading"), source })?;
        Ok(())
    }

    pub fn input_names(&self) -> Vec<String> {
        self.session.inputs().iter().map(|o| o.name().to_string()).collect()
    }
}

fn to_value(name: &str, t: &Tensor) -> Result<DynValue, RuntimeError> {
    let shape: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
    let fail = |source: ort::Error| RuntimeError::Ort { context: format!("input '{name}'"), source };
    fn make<T: ort::value::PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static>(
        shape: Vec<i64>,
        a: &ArrayD<T>,
    ) -> ort::Result<DynValue> {
        Ok(ort::value::Tensor::from_array((shape, a.iter().cloned().collect::<Vec<T>>()))?.into_dyn())
    }
    match t {
        Tensor::F32(a) => make(shape, a),
        Tensor::F64(a) => make(shape, a),
        Tensor::I64(a) => make(shape, a),
        Tensor::I32(a) => make(shape, a),
        Tensor::I8(a) => make(shape, a),
        Tensor::U8(a) => make(shape, a),
        Tensor::Bool(a) => make(shape, a),
    }
    .map_err(fail)
}

fn from_value(name: &str, v: &DynValue) -> Result<Tensor, RuntimeError> {
    let fail = |source: ort::Error| RuntimeError::Ort { context: format!("output '{name}'"), source };
    let ty = match v.dtype() {
        ValueType::Tensor { ty, .. } => *ty,
        other => {
            return Err(RuntimeError::Output { output: name.into(), problem: format!("is a {other:?}, not a tensor") })
        }
    };
    fn get<T: ort::value::PrimitiveTensorElementType + Clone>(v: &DynValue) -> ort::Result<ArrayD<T>> {
        let (shape, data) = v.try_extract_tensor::<T>()?;
        let dims: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
        ArrayD::from_shape_vec(IxDyn(&dims), data.to_vec()).map_err(|e| ort::Error::new(e.to_string()))
    }
    Ok(match ty {
        TensorElementType::Float32 => Tensor::F32(get(v).map_err(fail)?),
        TensorElementType::Float64 => Tensor::F64(get(v).map_err(fail)?),
        TensorElementType::Int64 => Tensor::I64(get(v).map_err(fail)?),
        TensorElementType::Int32 => Tensor::I32(get(v).map_err(fail)?),
        TensorElementType::Int8 => Tensor::I8(get(v).map_err(fail)?),
        TensorElementType::Uint8 => Tensor::U8(get(v).map_err(fail)?),
        TensorElementType::Bool => Tensor::Bool(get(v).map_err(fail)?),
        other => {
            return Err(RuntimeError::Output {
                output: name.into(),
                problem: format!("element type {other:?} is not supported"),
            })
        }
    })
}

impl Backend for OrtSession {
    fn name(&self) -> &'static str {
        "ort"
    }

    fn run(&mut self, inputs: &[(String, Tensor)]) -> Result<Named, RuntimeError> {
        let mut values = Vec::with_capacity(inputs.len());
        for (name, t) in inputs {
            values.push((name.clone(), to_value(name, t)?));
        }
        // Inputs are lent, not given: ONNX Runtime returns an output that is also a graph
        // input (a feature both fed and listed as an output) as the input's own buffer, which
        // must outlive the outputs' extraction below.
        let feed: Vec<(&str, &DynValue)> = values.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let outputs = self
            .session
            .run(feed)
            .map_err(|source| RuntimeError::Ort { context: "running the model".into(), source })?;
        let mut out = Vec::with_capacity(self.outputs.len());
        for name in &self.outputs {
            let v = outputs.get(name.as_str()).ok_or_else(|| RuntimeError::Output {
                output: name.clone(),
                problem: "not returned by ONNX Runtime".into(),
            })?;
            out.push((name.clone(), from_value(name, v)?));
        }
        Ok(out)
    }
}
