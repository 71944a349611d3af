//! `mtpack export`: one ONNX file serving every task of a pack (or one task, standalone),
//! verified in tract and ONNX Runtime against the training engine before anything is written.
//!
//! Graph design: one output per task, `<task>/logits`, plus the backbone's own output when it
//! has a head. Shared-backbone methods compute the backbone once for all heads. No control
//! flow and no task input, so ONNX Runtime and tract execute the same graph the same way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::artifact::{self, ArtifactManifest, ArtifactTask, Probes, Verified, ARTIFACT_SCHEMA};
use super::{Manifest, Pack, PackError};
use crate::adapt::data::{self, TaskData};
use crate::engine::{from_candle, to_candle, Engine};
use crate::graph::{preprocess, Patch};
use crate::onnx::Model;
use crate::runtime::ort_rt::OrtSession;
use crate::runtime::tract_rt::TractSession;
use crate::runtime::{compare, Backend, Named};
use crate::tensor::Tensor;
use crate::train::eval;

pub const PROBES_PER_TASK: usize = 2;
pub const TOLERANCE: f64 = 1e-4;
pub const DESIGN: &str =
    "one output per task (<task>/logits, plus the backbone's own output); one backbone pass feeds every head";

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Pack(#[from] PackError),
    #[error("{0}")]
    Invalid(String),
    /// Verification found the artifact wanting; nothing was written.
    #[error("verification failed, nothing written: {0}")]
    Check(String),
    #[error("{context}")]
    Step {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn step<E: std::error::Error + Send + Sync + 'static>(context: impl Into<String>) -> impl FnOnce(E) -> ExportError {
    let context = context.into();
    move |e| ExportError::Step { context, source: Box::new(e) }
}

pub struct ExportOptions {
    /// Export only this task, as a standalone model.
    pub task: Option<String>,
    /// Put the recorded preprocessing into the graph (uint8 image input).
    pub with_preprocessing: bool,
}

pub struct Exported {
    pub manifest: ArtifactManifest,
    pub model_path: PathBuf,
    pub manifest_path: PathBuf,
    pub probes_path: PathBuf,
}

/// Files written beside `out`: `<stem>.manifest.json` and `<stem>.probes.safetensors`.
pub fn sidecars(out: &Path) -> (PathBuf, PathBuf) {
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let dir = out.parent().unwrap_or(Path::new("."));
    (dir.join(format!("{stem}.manifest.json")), dir.join(format!("{stem}.probes.safetensors")))
}

fn stack(parts: &[Tensor]) -> Result<Tensor, ExportError> {
    let fail = |e: ndarray::ShapeError| ExportError::Invalid(format!("stacking probes: {e}"));
    match parts.first() {
        Some(Tensor::F32(_)) => {
            let v: Vec<_> = parts.iter().filter_map(|p| p.as_f32().map(|a| a.view())).collect();
            Ok(Tensor::F32(ndarray::concatenate(ndarray::Axis(0), &v).map_err(fail)?))
        }
        Some(Tensor::U8(_)) => {
            let arrays: Vec<ndarray::ArrayD<u8>> =
                parts.iter().filter_map(|p| if let Tensor::U8(a) = p { Some(a.clone()) } else { None }).collect();
            let v: Vec<_> = arrays.iter().map(|a| a.view()).collect();
            Ok(Tensor::U8(ndarray::concatenate(ndarray::Axis(0), &v).map_err(fail)?))
        }
        _ => Err(ExportError::Invalid("probe images must be float32 or uint8".into())),
    }
}

/// Loads the pack and its tasks' held-out data, checking digests on the way.
fn load(pack: &Pack) -> Result<(Manifest, Model, Vec<TaskData>), ExportError> {
    let m = pack.load_manifest()?;
    pack.verify_files(&m)?;
    if let Some(t) = m.tasks.iter().find(|t| !t.done) {
        return Err(ExportError::Invalid(format!(
            "task '{}' is not finished; rerun mtpack adapt on {}",
            t.name,
            pack.dir.display()
        )));
    }
    let model = Model::load(&pack.model()).map_err(step(format!("{}", pack.model().display())))?;
    let mut data = Vec::new();
    for (plan, rec) in m.plan.tasks.iter().zip(&m.tasks) {
        let d = data::prepare(plan, None, m.seed).map_err(ExportError::Invalid)?;
        if d.dataset_sha256 != rec.dataset_sha256 {
            return Err(ExportError::Invalid(format!(
                "task '{}': dataset {} changed since adapt (sha256 differs)",
                rec.name, rec.dataset
            )));
        }
        data.push(d);
    }
    Ok((m, model, data))
}

/// Builds, verifies and writes the artifact. A failed verification writes nothing.
pub fn export(pack_dir: &Path, out: &Path, opts: &ExportOptions) -> Result<Exported, ExportError> {
    let pack = Pack::new(pack_dir);
    let (m, model, data) = load(&pack)?;
    let selected: Vec<usize> = match &opts.task {
        Some(name) => vec![m.tasks.iter().position(|t| &t.name == name).ok_or_else(|| {
            let names: Vec<&str> = m.tasks.iter().map(|t| t.name.as_str()).collect();
            ExportError::Invalid(format!("--task {name}: the pack has tasks {}", names.join(", ")))
        })?],
        None => (0..m.tasks.len()).collect(),
    };
    if opts.with_preprocessing {
        let pre = &m.tasks[selected[0]].preprocessing;
        if selected.iter().any(|&i| {
            &m.tasks[i].preprocessing != pre || data[i].test_raw.shape() != data[selected[0]].test_raw.shape()
        }) {
            return Err(ExportError::Invalid(
                "--with-preprocessing needs tasks with one preprocessing and image size; pick one with --task".into(),
            ));
        }
    }
    let own = m.backbone.own_head.as_ref().filter(|_| opts.task.is_none());
    let mut outputs: Vec<String> = own.map(|h| h.output.clone()).into_iter().collect();
    outputs.extend(selected.iter().map(|&i| m.tasks[i].logits.clone()));
    let keep: Vec<_> =
        outputs.iter().filter_map(|o| model.graph().output.iter().find(|v| v.name() == o).cloned()).collect();
    let plain = Patch::new().set_outputs(keep).apply(&model).map_err(step("selecting the outputs"))?;
    // Probes: the first held-out images of each selected task.
    let rows = |t: &Tensor| data::head_rows(t, PROBES_PER_TASK);
    let probe_x = stack(&selected.iter().map(|&i| rows(&data[i].test_x)).collect::<Vec<_>>())?;
    let expected = engine_outputs(&plain, &m.backbone.input, &probe_x)?;
    let (artifact_model, input, probe_in) = if opts.with_preprocessing {
        let first = selected[0];
        let raw = data[first].test_raw.shape();
        let raw3 = [raw[1], raw[2], raw[3]];
        let pre = &m.tasks[first].preprocessing;
        let g = preprocess::prepend(&plain, &m.backbone.input, raw3, data[first].pixel_max, pre)
            .map_err(step("adding preprocessing"))?;
        let raw_probes = stack(&selected.iter().map(|&i| rows(&data[i].test_raw)).collect::<Vec<_>>())?;
        (g, preprocess::RAW_INPUT.to_string(), raw_probes)
    } else {
        (plain, m.backbone.input.clone(), probe_x)
    };
    let bytes = artifact_model.to_bytes();
    let feed = vec![(input.clone(), probe_in.clone())];
    let tract = TractSession::from_bytes(&bytes, "artifact").and_then(|mut s| s.run(&feed)).map_err(step("tract"))?;
    let ort =
        OrtSession::from_bytes(&bytes, "artifact").and_then(|mut s| s.run(&feed)).map_err(step("ONNX Runtime"))?;
    let worst = |a: &Named| -> Result<f64, ExportError> {
        Ok(compare(&expected, a).map_err(step("comparing outputs"))?.iter().map(|(_, d)| *d).fold(0.0, f64::max))
    };
    let (tract_diff, ort_diff) = (worst(&tract)?, worst(&ort)?);
    if tract_diff > TOLERANCE || ort_diff > TOLERANCE {
        return Err(ExportError::Check(format!(
            "largest difference from the training engine: tract {tract_diff:.3e}, ONNX Runtime {ort_diff:.3e} (tolerance {TOLERANCE:.0e})"
        )));
    }
    let tasks = measure(&m, &data, &selected, &artifact_model, &input, opts.with_preprocessing)?;
    let last = m.accuracy_matrix.last().cloned().unwrap_or_default();
    let offset = usize::from(m.backbone.own_head.is_some());
    for (t, &i) in tasks.iter().zip(&selected) {
        let recorded = last.get(offset + i).copied().flatten();
        if t.accuracy != recorded && !opts.with_preprocessing {
            return Err(ExportError::Check(format!(
                "task '{}': accuracy through the artifact {:?} differs from the pack's {:?}",
                t.name, t.accuracy, recorded
            )));
        }
    }
    let (manifest_path, probes_path) = sidecars(out);
    let mut probe_tensors: Vec<(String, Tensor)> = vec![("input".into(), probe_in)];
    probe_tensors.extend(expected.into_iter().map(|(n, t)| (format!("expected/{n}"), t)));
    let refs: Vec<(&str, &Tensor)> = probe_tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let probe_bytes = crate::store::to_bytes(&refs, HashMap::new()).map_err(step("encoding probes"))?;
    let manifest = ArtifactManifest {
        schema: ARTIFACT_SCHEMA.into(),
        mtpack_version: env!("CARGO_PKG_VERSION").into(),
        backbone_source: m.backbone.source.clone(),
        backbone_sha256: m.backbone.sha256.clone(),
        method: m.method.clone(),
        method_params: m.method_params.clone(),
        plan: serde_json::to_value(&m.plan).unwrap_or_default(),
        design: DESIGN.into(),
        input,
        input_type: if opts.with_preprocessing { "uint8".into() } else { "float32".into() },
        tasks,
        extra_outputs: own.map(|h| h.output.clone()).into_iter().collect(),
        columns: m.columns.clone(),
        rows: m.rows.clone(),
        accuracy_matrix: m.accuracy_matrix.clone(),
        metrics: m.metrics.clone(),
        tensors: artifact::tensor_digests(&artifact_model).map_err(step("digests"))?,
        probes: Probes {
            file: probes_path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
            sha256: format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&probe_bytes)),
            count: refs.first().map(|(_, t)| t.shape()[0]).unwrap_or(0),
            tolerance: TOLERANCE,
        },
        verified: Verified {
            tract_max_abs_diff: tract_diff,
            ort_max_abs_diff: ort_diff,
            accuracy_matches_pack: !opts.with_preprocessing,
        },
    };
    let json = serde_json::to_string_pretty(&manifest).map_err(step("manifest"))?;
    let mut final_model = artifact_model;
    artifact::embed(&mut final_model, &json);
    let write =
        |p: &Path, b: &[u8]| crate::fsutil::write_atomic(p, b).map_err(step(format!("writing {}", p.display())));
    write(&probes_path, &probe_bytes)?;
    write(&manifest_path, json.as_bytes())?;
    final_model.save(out).map_err(step("writing the model"))?;
    Ok(Exported { manifest, model_path: out.to_path_buf(), manifest_path, probes_path })
}

/// The training engine's outputs (the reference every runtime must reproduce).
fn engine_outputs(model: &Model, input: &str, x: &Tensor) -> Result<Named, ExportError> {
    let engine = Engine::new(model, &|_| false, DType::F32, &Device::Cpu).map_err(step("training engine"))?;
    let xc = to_candle(x, DType::F32).map_err(step("probe input"))?;
    let outs = engine.forward(&[(input, xc)]).map_err(step("training engine"))?;
    engine
        .output_names()
        .iter()
        .zip(outs)
        .map(|(n, t)| Ok((n.clone(), from_candle(&t).map_err(step("engine output"))?)))
        .collect()
}

/// Each selected task's held-out accuracy through the artifact, in ONNX Runtime.
fn measure(
    m: &Manifest,
    data: &[TaskData],
    selected: &[usize],
    artifact_model: &Model,
    input: &str,
    raw: bool,
) -> Result<Vec<ArtifactTask>, ExportError> {
    let mut out = Vec::new();
    for &i in selected {
        let rec = &m.tasks[i];
        let x = if raw { data[i].test_raw.clone() } else { data[i].test_x.clone() };
        let scores = eval::run_batched(artifact_model, input, &rec.logits, &x, 256)
            .map_err(step(format!("task '{}'", rec.name)))?;
        let accuracy = eval::accuracy(&scores, &data[i].test_y).map_err(step("accuracy"))?;
        out.push(ArtifactTask {
            name: rec.name.clone(),
            output: rec.logits.clone(),
            classes: rec.labels.len(),
            labels: rec.labels.clone(),
            preprocessing: if raw { Default::default() } else { rec.preprocessing.clone() },
            pixel_max: rec.pixel_max,
            accuracy: Some(accuracy),
        });
    }
    Ok(out)
}
