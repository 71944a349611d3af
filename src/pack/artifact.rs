//! The exported artifact's manifest (schemas/artifact.schema.json), embedded in the model's
//! metadata under `mtpack.manifest` and written next to it, and the per-tensor digests it
//! records.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::Preprocessing;
use crate::methods::MethodKind;
use crate::onnx::{tensor_proto, Model, OnnxError};
use crate::pack::manifest::Metrics;

pub const ARTIFACT_SCHEMA: &str = "mtpack.artifact/1";
pub const METADATA_KEY: &str = "mtpack.manifest";

/// How the artifact reaches its tasks. Written as the sentence that tells a reader how to
/// use the graph (what the manifest has always held, so earlier artifacts still read).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Design {
    #[serde(
        rename = "one output per task (<task>/logits, plus the backbone's own output); one backbone pass feeds every head"
    )]
    SharedBackbone,
    #[serde(
        rename = "one output per task (<task>/logits) and an int64 input 'task' [1] selecting the per-task weight masks, unpacked in the graph; read a task's output with its task value (other outputs are NaN); task -1 gives the backbone's own output"
    )]
    TaskMasks,
    #[serde(
        rename = "one output per task (<task>/logits) and an int64 input 'task' [1] selecting each task's own biases and BatchNormalization, stacked and gathered in the graph; read a task's output with its task value (other outputs are NaN); task -1 gives the backbone's own output"
    )]
    TaskParameters,
    #[serde(rename = "one task with its weight mask applied: a plain model, no task input")]
    Standalone,
}

/// The element type of the artifact's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputType {
    /// Preprocessed images, as the backbone takes them.
    Float32,
    /// Raw pixels; the preprocessing is in the graph.
    Uint8,
}

/// How the per-task masks are stored in the graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MaskKind {
    /// One 4- or 8-bit owner id per weight for all tasks (PackNet).
    PacknetOwnerIds,
    /// One bit per weight per task (Piggyback).
    PiggybackBits,
    /// No weight masks, only per-task copies of biases and BatchNorm (EWC).
    PerTaskParameters,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ArtifactTask {
    pub name: String,
    /// The graph output holding this task's scores.
    pub output: String,
    /// The `task` input value that selects this task's masks (mask methods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_value: Option<i64>,
    pub classes: usize,
    pub labels: Vec<String>,
    /// What the caller must do to raw images before feeding the input (empty when the
    /// graph does it itself).
    pub preprocessing: Preprocessing,
    pub pixel_max: f32,
    /// Held-out accuracy measured through this artifact (ONNX Runtime) at export.
    pub accuracy: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Probes {
    /// Safetensors file beside the model: `input` and `expected/<output>` for every output.
    pub file: String,
    pub sha256: String,
    pub count: usize,
    /// Largest |runtime - expected| allowed.
    pub tolerance: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Verified {
    pub tract_max_abs_diff: f64,
    pub ort_max_abs_diff: f64,
    /// Every task's accuracy through the artifact equals the pack's last accuracy row.
    pub accuracy_matches_pack: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ArtifactManifest {
    pub schema: String,
    pub mtpack_version: String,
    pub backbone_source: String,
    pub backbone_sha256: String,
    pub method: MethodKind,
    pub method_params: serde_json::Value,
    pub plan: serde_json::Value,
    pub design: Design,
    pub input: String,
    pub input_type: InputType,
    pub tasks: Vec<ArtifactTask>,
    /// The int64 [1] input selecting a task's masks (mask methods' multi-task artifacts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_input: Option<String>,
    /// Outputs beyond the tasks (the backbone's own head).
    pub extra_outputs: Vec<String>,
    /// The `task` value the extra outputs are read with, when there is a task input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_outputs_task_value: Option<i64>,
    /// How the per-task masks are stored in the graph (mask methods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masks: Option<MaskSummary>,
    pub columns: Vec<String>,
    pub rows: Vec<String>,
    pub accuracy_matrix: Vec<Vec<Option<f64>>>,
    pub metrics: Metrics,
    /// sha256 of every initializer's little-endian bytes, by name.
    pub tensors: BTreeMap<String, String>,
    pub probes: Probes,
    pub verified: Verified,
}

/// The embedded masks: their kind, their tensors and what they cost.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MaskSummary {
    pub kind: MaskKind,
    pub masked_params: usize,
    pub tasks: usize,
    /// Mask storage in bits per masked weight per task.
    pub bits_per_weight_per_task: f64,
    /// The mask initializers, by masked weight.
    pub tensors: BTreeMap<String, String>,
    /// Parameters each task has its own copy of, stacked with the backbone's first and
    /// gathered by task (BatchNormalization folded into a per-task scale and shift).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_task: Vec<String>,
}

impl MaskSummary {
    pub fn of(stored: &BTreeMap<String, crate::graph::masks::StoredMask>, tasks: usize) -> MaskSummary {
        use crate::graph::masks::StoredMask;
        let mut params = 0usize;
        let mut bytes = 0usize;
        let mut tensors = BTreeMap::new();
        let mut per_task = Vec::new();
        let mut kind = None;
        for (name, s) in stored {
            match s {
                StoredMask::Owners(ids) => {
                    params += ids.len();
                    bytes += ids.len().div_ceil(8 / crate::graph::masks::owner_bits(ids) as usize);
                    kind = Some(MaskKind::PacknetOwnerIds);
                    tensors.insert(name.clone(), format!("{name}/owner"));
                }
                StoredMask::Bits { rows, len } => {
                    params += len;
                    bytes += rows.len();
                    kind = Some(MaskKind::PiggybackBits);
                    tensors.insert(name.clone(), format!("{name}/bits"));
                }
                StoredMask::PerTask(_) => {
                    per_task.push(name.clone());
                }
            }
        }
        MaskSummary {
            kind: kind.unwrap_or(MaskKind::PerTaskParameters),
            masked_params: params,
            tasks,
            bits_per_weight_per_task: (bytes * 8) as f64 / (params.max(1) * tasks.max(1)) as f64,
            tensors,
            per_task,
        }
    }
}

/// sha256 of every initializer (dtype, shape and values), by name.
pub fn tensor_digests(m: &Model) -> Result<BTreeMap<String, String>, OnnxError> {
    let mut out = BTreeMap::new();
    for t in &m.graph().initializer {
        let host = tensor_proto::to_tensor(t)?;
        let mut h = Sha256::new();
        h.update(format!("{}{:?}", host.dtype(), host.shape()).as_bytes());
        h.update(host.to_le_bytes());
        out.insert(t.name().to_string(), format!("{:x}", h.finalize()));
    }
    Ok(out)
}

/// The manifest embedded in a model, if any.
pub fn embedded(m: &Model) -> Option<&str> {
    m.proto.metadata_props.iter().find(|p| p.key() == METADATA_KEY).map(|p| p.value())
}

/// Sets (or replaces) the embedded manifest.
pub fn embed(m: &mut Model, json: &str) {
    m.proto.metadata_props.retain(|p| p.key() != METADATA_KEY);
    m.proto
        .metadata_props
        .push(crate::onnx::pb::StringStringEntryProto { key: Some(METADATA_KEY.into()), value: Some(json.into()) });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schema lists the values these enums write, so that a new variant fails here
    /// until the schema knows it.
    #[test]
    fn the_schema_lists_every_design_input_type_and_mask_kind() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../schemas/artifact.schema.json")).unwrap();
        let props = &schema["properties"];
        let listed = |v: &serde_json::Value| v["enum"].as_array().cloned().unwrap_or_default();
        let designs = [Design::SharedBackbone, Design::TaskMasks, Design::TaskParameters, Design::Standalone];
        let kinds = [MaskKind::PacknetOwnerIds, MaskKind::PiggybackBits, MaskKind::PerTaskParameters];
        let written = |v: &[serde_json::Value]| v.to_vec();
        assert_eq!(listed(&props["design"]), written(&designs.map(|d| serde_json::to_value(d).unwrap())));
        let types = [InputType::Float32, InputType::Uint8].map(|d| serde_json::to_value(d).unwrap());
        assert_eq!(listed(&props["input_type"]), written(&types));
        let mask_kind = &props["masks"]["properties"]["kind"];
        assert_eq!(listed(mask_kind), written(&kinds.map(|d| serde_json::to_value(d).unwrap())));
    }
}
