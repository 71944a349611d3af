//! Loading and saving ONNX models losslessly, with external data resolved and sizes bounded.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use prost::Message;

use super::pb::tensor_proto::DataLocation;
use super::pb::{GraphProto, ModelProto, TensorProto};
use super::{tensor_proto, OnnxError};

/// Protobuf messages cannot exceed 2 GiB; anything larger is not a single-file ONNX model.
pub const MAX_MODEL_BYTES: u64 = 2 * 1024 * 1024 * 1024 - 1;

/// An ONNX model together with where it came from (for messages and external data).
#[derive(Clone, Debug)]
pub struct Model {
    pub proto: ModelProto,
    /// The file it was loaded from, or a label such as "<memory>".
    pub origin: PathBuf,
    /// Bytes of the original encoding that did not survive decoding (fields unknown to
    /// `schemas/onnx.proto`). Zero for every model written against IR version 14 or older.
    pub unknown_bytes: u64,
}

impl Model {
    /// Loads a model file, resolving tensors stored in external data files next to it.
    pub fn load(path: &Path) -> Result<Model, OnnxError> {
        let read = |source| OnnxError::Read { path: path.to_path_buf(), source };
        let mut file = std::fs::File::open(path).map_err(read)?;
        let size = file.metadata().map_err(read)?.len();
        if size > MAX_MODEL_BYTES {
            return Err(OnnxError::TooLarge { path: path.to_path_buf(), size, limit: MAX_MODEL_BYTES });
        }
        let mut bytes = Vec::with_capacity(size as usize);
        file.read_to_end(&mut bytes).map_err(read)?;
        let mut model = Model::from_bytes(&bytes, path)?;
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        model.resolve_external_data(&dir)?;
        Ok(model)
    }

    /// Decodes a model from memory; `origin` names it in messages.
    pub fn from_bytes(bytes: &[u8], origin: &Path) -> Result<Model, OnnxError> {
        if bytes.len() as u64 > MAX_MODEL_BYTES {
            let size = bytes.len() as u64;
            return Err(OnnxError::TooLarge { path: origin.to_path_buf(), size, limit: MAX_MODEL_BYTES });
        }
        // prost checks every length prefix against the bytes that remain, so decoding
        // allocates at most in proportion to the input.
        let proto =
            ModelProto::decode(bytes).map_err(|source| OnnxError::Decode { path: origin.to_path_buf(), source })?;
        if proto.graph.is_none() {
            return Err(OnnxError::NoGraph { path: origin.to_path_buf() });
        }
        let unknown_bytes = (bytes.len() as u64).saturating_sub(proto.encoded_len() as u64);
        Ok(Model { proto, origin: origin.to_path_buf(), unknown_bytes })
    }

    pub fn from_proto(proto: ModelProto, origin: &str) -> Model {
        Model { proto, origin: PathBuf::from(origin), unknown_bytes: 0 }
    }

    pub fn graph(&self) -> &GraphProto {
        // `from_bytes` refuses models without a graph; a model built in code always has one.
        static EMPTY: std::sync::OnceLock<GraphProto> = std::sync::OnceLock::new();
        self.proto.graph.as_ref().unwrap_or_else(|| EMPTY.get_or_init(GraphProto::default))
    }

    pub fn graph_mut(&mut self) -> &mut GraphProto {
        self.proto.graph.get_or_insert_with(GraphProto::default)
    }

    /// The model with new values for the initializers `value` returns one for (each keeps
    /// its name and doc string, see `tensor_proto::refill`). Values only: the graph's
    /// structure changes through `graph::Patch`.
    pub fn with_values<E>(
        &self,
        mut value: impl FnMut(&TensorProto) -> Result<Option<crate::tensor::Tensor>, E>,
    ) -> Result<Model, E> {
        let mut out = self.clone();
        for t in &mut out.graph_mut().initializer {
            if let Some(v) = value(t)? {
                super::tensor_proto::refill(t, &v);
            }
        }
        Ok(out)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.proto.encode_to_vec()
    }

    /// Writes the model atomically: a reader never sees a partial file.
    pub fn save(&self, path: &Path) -> Result<(), OnnxError> {
        let bytes = self.to_bytes();
        if bytes.len() as u64 > MAX_MODEL_BYTES {
            let size = bytes.len() as u64;
            return Err(OnnxError::TooLarge { path: path.to_path_buf(), size, limit: MAX_MODEL_BYTES });
        }
        crate::fsutil::write_atomic(path, &bytes)
            .map_err(|source| OnnxError::Write { path: path.to_path_buf(), source })
    }

    /// The opset version the model imports for `domain` ("" is the default ONNX domain).
    pub fn opset(&self, domain: &str) -> Option<i64> {
        self.proto
            .opset_import
            .iter()
            .find(|o| o.domain() == domain || (domain.is_empty() && o.domain() == "ai.onnx"))
            .and_then(|o| o.version)
    }

    fn resolve_external_data(&mut self, dir: &Path) -> Result<(), OnnxError> {
        let mut result = Ok(());
        if let Some(graph) = self.proto.graph.as_mut() {
            for_each_tensor_mut(graph, &mut |t| {
                if result.is_ok() && t.data_location() == DataLocation::External {
                    result = load_external(t, dir);
                }
            });
        }
        result
    }
}

/// Visits every tensor of a graph: initializers, Constant values and tensor attributes,
/// recursing into subgraphs (If/Loop/Scan bodies).
pub fn for_each_tensor_mut(graph: &mut GraphProto, f: &mut dyn FnMut(&mut TensorProto)) {
    for t in &mut graph.initializer {
        f(t);
    }
    for node in &mut graph.node {
        for a in &mut node.attribute {
            if let Some(t) = a.t.as_mut() {
                f(t);
            }
            for t in &mut a.tensors {
                f(t);
            }
            if let Some(g) = a.g.as_mut() {
                for_each_tensor_mut(g, f);
            }
            for g in &mut a.graphs {
                for_each_tensor_mut(g, f);
            }
        }
    }
}

fn load_external(t: &mut TensorProto, dir: &Path) -> Result<(), OnnxError> {
    let entry = |key: &str| t.external_data.iter().find(|e| e.key() == key).map(|e| e.value().to_string());
    let fail = |file: &Path, problem: String| OnnxError::ExternalData {
        tensor: t.name().to_string(),
        file: file.to_path_buf(),
        problem,
    };
    let location = entry("location").ok_or_else(|| fail(dir, "no 'location' entry".into()))?;
    let rel = PathBuf::from(&location);
    // A model must not make mtpack read files outside its own directory.
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(fail(&rel, "location must be a plain relative path inside the model's directory".into()));
    }
    let file = dir.join(&rel);
    let parse = |key: &str| -> Result<Option<u64>, OnnxError> {
        entry(key)
            .map(|v| v.parse::<u64>().map_err(|_| fail(&file, format!("'{key}' is not a number: {v}"))))
            .transpose()
    };
    let offset = parse("offset")?.unwrap_or(0);
    let dtype = tensor_proto::dtype_of(t.data_type()).ok_or_else(|| {
        fail(&file, format!("element type {} is not supported", tensor_proto::data_type_name(t.data_type())))
    })?;
    let needed = tensor_proto::declared_len(t)?
        .checked_mul(dtype.size())
        .ok_or_else(|| fail(&file, "size overflows".into()))? as u64;
    let length = parse("length")?.unwrap_or(needed);
    if length != needed {
        return Err(fail(&file, format!("length {length} does not match the {needed} bytes its dimensions need")));
    }
    let io = |e: std::io::Error| fail(&file, e.to_string());
    let mut f = std::fs::File::open(&file).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    if offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(fail(&file, format!("bytes {offset}..{offset}+{length} lie past its end ({size} bytes)")));
    }
    f.seek(SeekFrom::Start(offset)).map_err(io)?;
    let mut raw = vec![0u8; length as usize];
    f.read_exact(&mut raw).map_err(io)?;
    t.raw_data = Some(raw);
    t.external_data.clear();
    t.data_location = Some(DataLocation::Default as i32);
    Ok(())
}
