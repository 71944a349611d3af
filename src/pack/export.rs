//! `mtpack export`: one ONNX file serving every task of a pack (or one task, standalone),
//! verified in tract and ONNX Runtime against the training engine before anything is written.
//!
//! Graph design: one output per task, `<task>/logits`, plus the backbone's own output when it
//! has a head. Shared-backbone methods compute the backbone once for all heads. Mask methods
//! add an int64 `task` input that selects the weight masks (see [`crate::graph::masks`]). No
//! control flow, so ONNX Runtime and tract execute the same graph the same way.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::artifact::ARTIFACT_SCHEMA;
use super::artifact::{self, ArtifactManifest, ArtifactTask, Design, InputType, MaskSummary, Probes, Verified};
use super::manifest::OwnHead;
use super::{Manifest, Pack, PackError};
use crate::engine::{from_candle, to_candle, Engine};
use crate::graph::{masks, preprocess, Patch};
use crate::methods::{Method, Record};
use crate::onnx::Model;
use crate::plan::data::{self, TaskData};
use crate::runtime::ort_rt::OrtSession;
use crate::runtime::tract_rt::TractSession;
use crate::runtime::{compare, Backend, Named};
use crate::tensor::Tensor;
use crate::train::eval;

pub const PROBES_PER_TASK: usize = 2;
/// The largest difference from the training engine an artifact may show, per unit of its
/// largest expected output (at least 1): float32 sums differ in proportion to what they add
/// up, and a fitted head's logits can reach tens.
pub const TOLERANCE: f64 = 1e-4;

/// `TOLERANCE` scaled to the largest magnitude among the expected outputs.
fn tolerance_for(b: &Built) -> f64 {
    let largest = b
        .queries
        .iter()
        .flat_map(|q| q.expected.iter())
        .flat_map(|(_, t)| t.to_f64_vec())
        .filter(|v| v.is_finite())
        .fold(1.0f64, |m, v| m.max(v.abs()));
    TOLERANCE * largest
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Pack(#[from] PackError),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    TaskData(#[from] data::PrepareError),
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

#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Export only this task, as a standalone model.
    pub task: Option<String>,
    /// Put the recorded preprocessing into the graph (uint8 image input).
    pub with_preprocessing: bool,
    /// Whether to wait for a process writing the pack (else refuse at once).
    pub wait: super::lock::Wait,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions { task: None, with_preprocessing: false, wait: super::lock::Wait::No }
    }
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
        let d = data::prepare(plan, None, m.seed)?;
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

/// One group of probes run with one `task` value: the outputs it checks and the engine's
/// reference for them.
struct Query {
    task: Option<i64>,
    /// Probe rows as the engine takes them (float).
    x: Tensor,
    /// The same rows as the artifact takes them (raw uint8 with preprocessing in the graph).
    feed: Tensor,
    expected: Named,
}

/// The artifact before verification.
struct Built {
    model: Model,
    input: String,
    /// The `task` input of mask methods' multi-task artifacts.
    task_input: Option<String>,
    queries: Vec<Query>,
    design: Design,
    masks: Option<MaskSummary>,
}

fn select(m: &Manifest, opts: &ExportOptions) -> Result<Vec<usize>, ExportError> {
    Ok(match &opts.task {
        Some(name) => vec![m.tasks.iter().position(|t| &t.name == name).ok_or_else(|| {
            let names: Vec<&str> = m.tasks.iter().map(|t| t.name.as_str()).collect();
            ExportError::Invalid(format!("--task {name}: the pack has tasks {}", names.join(", ")))
        })?],
        None => (0..m.tasks.len()).collect(),
    })
}

/// The method with the state it had after the pack's last task.
fn load_method(pack: &Pack, m: &Manifest) -> Result<Box<dyn Method>, ExportError> {
    let backbone = Model::load(&pack.backbone()).map_err(step(format!("{}", pack.backbone().display())))?;
    let params = m.plan.params.for_backbone(m.plan.method, &backbone);
    let mut method = m.plan.method.create(&params).map_err(ExportError::Invalid)?;
    if let Some(last) = m.tasks.last() {
        let record =
            Record::load(&pack.state_dir().join(format!("after_{}", last.name))).map_err(step("the method's state"))?;
        method.restore(&record).map_err(step("the method's state"))?;
    }
    Ok(method)
}

/// `model` keeping only `outputs`, in that order.
fn with_outputs(model: &Model, outputs: &[String]) -> Result<Model, ExportError> {
    let keep: Vec<_> =
        outputs.iter().filter_map(|o| model.graph().output.iter().find(|v| v.name() == o).cloned()).collect();
    Patch::new().set_outputs(keep).apply(model).map_err(step("selecting the outputs"))
}

impl Query {
    fn new(
        task: Option<i64>,
        outputs: Vec<String>,
        x: Tensor,
        raw: &Tensor,
        reference: &Model,
        input: &str,
        with_pre: bool,
    ) -> Result<Query, ExportError> {
        let reference = with_outputs(reference, &outputs)?;
        let expected = engine_outputs(&reference, input, &x)?;
        let feed = if with_pre { raw.clone() } else { x.clone() };
        Ok(Query { task, x, feed, expected })
    }
}

/// What the graph and its probe queries are made from.
struct Sources<'a> {
    m: &'a Manifest,
    model: &'a Model,
    data: &'a [TaskData],
    method: &'a dyn Method,
    /// The backbone's image input.
    input: &'a str,
    with_pre: bool,
}

impl Sources<'_> {
    fn logits(&self, i: usize) -> String {
        self.m.tasks[i].logits.clone()
    }

    /// A probe query on task `rows_of`'s held-out images, expected to give what the training
    /// engine computes for `outputs` on the model as `column` sees it.
    fn query(
        &self,
        task: Option<i64>,
        outputs: Vec<String>,
        column: Option<usize>,
        rows_of: usize,
    ) -> Result<Query, ExportError> {
        let view = self.method.view(self.model, column).map_err(step("applying the task's masks"))?;
        let (x, raw) = self.rows(rows_of);
        Query::new(task, outputs, x, &raw, view.as_ref().unwrap_or(self.model), self.input, self.with_pre)
    }

    /// Task `i`'s probe rows, as the engine and as the artifact take them.
    fn rows(&self, i: usize) -> (Tensor, Tensor) {
        let d = &self.data[i];
        let raw = raw_images(&self.m.tasks[i], data::head_rows(&d.test_raw, PROBES_PER_TASK));
        (data::head_rows(&d.test_x, PROBES_PER_TASK), raw)
    }

    /// No masks: one output per task on a shared backbone, one query over every task's rows.
    fn shared(&self, selected: &[usize], own: Option<&OwnHead>) -> Result<Built, ExportError> {
        let mut outputs: Vec<String> = own.map(|h| h.output.clone()).into_iter().collect();
        outputs.extend(selected.iter().map(|&i| self.logits(i)));
        let plain = with_outputs(self.model, &outputs)?;
        let x = stack(&selected.iter().map(|&i| self.rows(i).0).collect::<Vec<_>>())?;
        // Raw images are only fed with preprocessing in the graph; tasks may differ in size.
        let raw = if self.with_pre {
            stack(&selected.iter().map(|&i| self.rows(i).1).collect::<Vec<_>>())?
        } else {
            x.clone()
        };
        let q = Query::new(None, outputs, x, &raw, &plain, self.input, self.with_pre)?;
        Ok(Built::new(plain, self.input, None, vec![q], Design::SharedBackbone, None))
    }

    /// One task of a mask method alone, its mask applied to the weights.
    fn standalone(&self, only: usize) -> Result<Built, ExportError> {
        let view = self.method.view(self.model, Some(only)).map_err(step("applying the task's masks"))?;
        let view = with_outputs(view.as_ref().unwrap_or(self.model), &[self.logits(only)])?;
        let (x, raw) = self.rows(only);
        let q = Query::new(None, vec![self.logits(only)], x, &raw, &view, self.input, self.with_pre)?;
        Ok(Built::new(view, self.input, None, vec![q], Design::Standalone, None))
    }

    /// Every task of a mask method: the masks in the graph, selected by the `task` input,
    /// each output gated to its own task value; one query per task.
    fn masked(
        &self,
        stored: &BTreeMap<String, masks::StoredMask>,
        selected: &[usize],
        own: Option<&OwnHead>,
    ) -> Result<Built, ExportError> {
        let mut outputs: Vec<String> = own.map(|h| h.output.clone()).into_iter().collect();
        outputs.extend(selected.iter().map(|&i| self.logits(i)));
        let base = with_outputs(self.model, &outputs)?;
        let mut gates: Vec<(String, i64)> = selected.iter().map(|&i| (self.logits(i), i as i64)).collect();
        let mut queries = Vec::new();
        for &i in selected {
            queries.push(self.query(Some(i as i64), vec![self.logits(i)], Some(i), i)?);
        }
        if let (Some(h), Some(&first)) = (own, selected.first()) {
            gates.push((h.output.clone(), masks::OWN_HEAD_TASK));
            queries.push(self.query(Some(masks::OWN_HEAD_TASK), vec![h.output.clone()], None, first)?);
        }
        let ranks = batchnorm_ranks(&base, stored)?;
        let embedded = masks::embed(&base, stored, &gates, &ranks).map_err(step("putting the masks into the graph"))?;
        let summary = MaskSummary::of(stored, self.m.tasks.len());
        let design = if summary.masked_params > 0 { Design::TaskMasks } else { Design::TaskParameters };
        let task_input = Some(masks::TASK_INPUT.to_string());
        Ok(Built::new(embedded, self.input, task_input, queries, design, Some(summary)))
    }
}

/// The ranks of the inputs of per-task BatchNormalization nodes, measured by running `model`.
fn batchnorm_ranks(
    model: &Model,
    stored: &BTreeMap<String, masks::StoredMask>,
) -> Result<HashMap<String, usize>, ExportError> {
    let bn_inputs = masks::per_task_batchnorm_inputs(model, stored);
    if bn_inputs.is_empty() {
        return Ok(HashMap::new());
    }
    let shapes = crate::runtime::probe::shapes(model, &bn_inputs)
        .map_err(step("measuring the ranks of per-task BatchNormalization inputs"))?;
    Ok(shapes.into_iter().map(|(k, s)| (k, s.len())).collect())
}

impl Built {
    fn new(
        model: Model,
        input: &str,
        task_input: Option<String>,
        queries: Vec<Query>,
        design: Design,
        masks: Option<MaskSummary>,
    ) -> Built {
        Built { model, input: input.to_string(), task_input, queries, design, masks }
    }
}

/// The graph to export and the probe queries that check it.
fn build(
    m: &Manifest,
    model: &Model,
    data: &[TaskData],
    selected: &[usize],
    method: &dyn Method,
    opts: &ExportOptions,
) -> Result<Built, ExportError> {
    let input = &m.backbone.input;
    let src = Sources { m, model, data, method, input, with_pre: opts.with_preprocessing };
    let own = m.backbone.own_head.as_ref().filter(|_| opts.task.is_none());
    let built = match (method.stored_masks(), selected) {
        (None, _) => src.shared(selected, own)?,
        (Some(_), [only]) if opts.task.is_some() => src.standalone(*only)?,
        (Some(stored), _) => src.masked(&stored, selected, own)?,
    };
    if opts.with_preprocessing {
        with_preprocessing(built, m, data, selected)
    } else {
        Ok(built)
    }
}

/// `built` taking raw images of the first selected task's size, its preprocessing in the graph.
fn with_preprocessing(built: Built, m: &Manifest, data: &[TaskData], selected: &[usize]) -> Result<Built, ExportError> {
    let first = selected.first().copied().ok_or_else(|| ExportError::Invalid("no task to export".into()))?;
    let (Some(d), Some(task)) = (data.get(first), m.tasks.get(first)) else {
        return Err(ExportError::Invalid(format!("task {first} has no data")));
    };
    let &[_, c, h, w] = d.test_raw.shape() else {
        return Err(ExportError::Invalid(format!(
            "task '{}': raw images are {:?}, expected [N, C, H, W]",
            task.name,
            d.test_raw.shape()
        )));
    };
    let model = preprocess::prepend(&built.model, &built.input, [c, h, w], d.pixel_max, &task.preprocessing)
        .map_err(step("adding preprocessing"))?;
    Ok(Built { model, input: preprocess::RAW_INPUT.to_string(), ..built })
}

/// Stored [N, C, H, W] images in the layout the artifact's raw image input takes (the
/// backbone's: [N, H, W, C] for NHWC).
fn raw_images(task: &crate::pack::manifest::TaskRecord, t: Tensor) -> Tensor {
    if task.preprocessing.layout != Some(crate::data::Layout::Nhwc) {
        return t;
    }
    match t {
        Tensor::U8(a) if a.ndim() == 4 => Tensor::U8(a.permuted_axes(vec![0, 2, 3, 1]).as_standard_layout().to_owned()),
        Tensor::F32(a) if a.ndim() == 4 => {
            Tensor::F32(a.permuted_axes(vec![0, 2, 3, 1]).as_standard_layout().to_owned())
        }
        other => other,
    }
}

fn task_feed(b: &Built, task: Option<i64>) -> Vec<(String, Tensor)> {
    match (&b.task_input, task) {
        (Some(name), Some(v)) => vec![(name.clone(), Tensor::I64(ndarray::arr1(&[v]).into_dyn()))],
        _ => Vec::new(),
    }
}

/// Runs every query in tract and ONNX Runtime; the largest difference from the engine in each.
fn check_runtimes(b: &Built) -> Result<(f64, f64), ExportError> {
    let bytes = b.model.to_bytes();
    let mut tract = TractSession::from_bytes(&bytes, "artifact").map_err(step("tract"))?;
    let mut ort = OrtSession::from_bytes(&bytes, "artifact").map_err(step("ONNX Runtime"))?;
    let (mut worst_tract, mut worst_ort) = (0f64, 0f64);
    for q in &b.queries {
        let mut feed = vec![(b.input.clone(), q.feed.clone())];
        feed.extend(task_feed(b, q.task));
        let worst = |got: &Named| -> Result<f64, ExportError> {
            Ok(compare(&q.expected, got)
                .map_err(step("comparing outputs"))?
                .iter()
                .map(|(_, d)| *d)
                .fold(0.0, f64::max))
        };
        worst_tract = worst_tract.max(worst(&tract.run(&feed).map_err(step("tract"))?)?);
        worst_ort = worst_ort.max(worst(&ort.run(&feed).map_err(step("ONNX Runtime"))?)?);
    }
    Ok((worst_tract, worst_ort))
}

/// Builds, verifies and writes the artifact. A failed verification writes nothing.
pub fn export(pack_dir: &Path, out: &Path, opts: &ExportOptions) -> Result<Exported, ExportError> {
    let pack = Pack::new(pack_dir);
    // Held while the pack is read: no adapt rewrites it under us.
    let _reading = pack.lock_shared(opts.wait)?;
    let (m, model, data) = load(&pack)?;
    let selected = select(&m, opts)?;
    if opts.with_preprocessing {
        check_one_preprocessing(&m, &data, &selected)?;
    }
    let method = load_method(&pack, &m)?;
    let built = build(&m, &model, &data, &selected, method.as_ref(), opts)?;
    let (tract_diff, ort_diff) = check_runtimes(&built)?;
    let tolerance = tolerance_for(&built);
    if tract_diff > tolerance || ort_diff > tolerance {
        return Err(ExportError::Check(format!(
            "largest difference from the training engine: tract {tract_diff:.3e}, ONNX Runtime {ort_diff:.3e} \
             (tolerance {tolerance:.3e}: {TOLERANCE:.0e} per unit of the largest output)"
        )));
    }
    let tasks = measure(&m, &data, &selected, &built, opts.with_preprocessing)?;
    if !opts.with_preprocessing {
        check_accuracy(&m, &tasks, &selected)?;
    }
    let (manifest_path, probes_path) = sidecars(out);
    let probe_bytes = probes_file(&built)?;
    let verified = Verified {
        tract_max_abs_diff: tract_diff,
        ort_max_abs_diff: ort_diff,
        accuracy_matches_pack: !opts.with_preprocessing,
    };
    let probes = Probes {
        file: probes_path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
        sha256: format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&probe_bytes)),
        count: built.queries.iter().map(|q| q.x.shape().first().copied().unwrap_or(0)).sum(),
        tolerance,
    };
    let manifest = artifact_manifest(&m, &built, tasks, opts, probes, verified)?;
    let json = serde_json::to_string_pretty(&manifest).map_err(step("manifest"))?;
    let mut final_model = built.model;
    // Compact in the model (it counts against the artifact's size), pretty beside it.
    artifact::embed(&mut final_model, &serde_json::to_string(&manifest).map_err(step("manifest"))?);
    let write =
        |p: &Path, b: &[u8]| crate::fsutil::write_atomic(p, b).map_err(step(format!("writing {}", p.display())));
    write(&probes_path, &probe_bytes)?;
    write(&manifest_path, json.as_bytes())?;
    final_model.save(out).map_err(step("writing the model"))?;
    Ok(Exported { manifest, model_path: out.to_path_buf(), manifest_path, probes_path })
}

/// One graph takes one kind of raw image: the selected tasks must share preprocessing and
/// image size.
fn check_one_preprocessing(m: &Manifest, data: &[TaskData], selected: &[usize]) -> Result<(), ExportError> {
    let key = |i: usize| (m.tasks.get(i).map(|t| &t.preprocessing), data.get(i).map(|d| d.test_raw.shape()));
    let first = selected.first().map(|&i| key(i));
    if selected.iter().any(|&i| Some(key(i)) != first) {
        return Err(ExportError::Invalid(
            "--with-preprocessing needs tasks with one preprocessing and image size; pick one with --task".into(),
        ));
    }
    Ok(())
}

/// Each task's accuracy through the artifact equals the pack's last accuracy row.
fn check_accuracy(m: &Manifest, tasks: &[ArtifactTask], selected: &[usize]) -> Result<(), ExportError> {
    let last = m.accuracy_matrix.last().cloned().unwrap_or_default();
    let offset = usize::from(m.backbone.own_head.is_some());
    for (t, &i) in tasks.iter().zip(selected) {
        let recorded = last.get(offset + i).copied().flatten();
        if t.accuracy != recorded {
            return Err(ExportError::Check(format!(
                "task '{}': accuracy through the artifact {:?} differs from the pack's {:?}",
                t.name, t.accuracy, recorded
            )));
        }
    }
    Ok(())
}

/// The artifact's manifest: the pack's record, how the graph serves the tasks, its digests
/// and what verified it.
fn artifact_manifest(
    m: &Manifest,
    built: &Built,
    tasks: Vec<ArtifactTask>,
    opts: &ExportOptions,
    probes: Probes,
    verified: Verified,
) -> Result<ArtifactManifest, ExportError> {
    let own = m.backbone.own_head.as_ref().filter(|_| opts.task.is_none());
    Ok(ArtifactManifest {
        schema: ARTIFACT_SCHEMA.into(),
        mtpack_version: env!("CARGO_PKG_VERSION").into(),
        backbone_source: m.backbone.source.clone(),
        backbone_sha256: m.backbone.sha256.clone(),
        method: m.method,
        method_params: m.method_params.clone(),
        plan: serde_json::to_value(&m.plan).map_err(step("the plan for the manifest"))?,
        design: built.design,
        input: built.input.clone(),
        input_type: if opts.with_preprocessing { InputType::Uint8 } else { InputType::Float32 },
        task_input: built.task_input.clone(),
        tasks,
        extra_outputs: own.map(|h| h.output.clone()).into_iter().collect(),
        extra_outputs_task_value: built.task_input.as_ref().and(own).map(|_| masks::OWN_HEAD_TASK),
        masks: built.masks.clone(),
        columns: m.columns.clone(),
        rows: m.rows.clone(),
        accuracy_matrix: m.accuracy_matrix.clone(),
        metrics: m.metrics.clone(),
        tensors: artifact::tensor_digests(&built.model).map_err(step("digests"))?,
        probes,
        verified,
    })
}

/// The probes file: `input` (every query's rows), `task` (each row's task value, when the
/// artifact has a task input) and `expected/<output>` (the rows of that output's query).
fn probes_file(b: &Built) -> Result<Vec<u8>, ExportError> {
    let mut t: Vec<(String, Tensor)> =
        vec![("input".into(), stack(&b.queries.iter().map(|q| q.feed.clone()).collect::<Vec<_>>())?)];
    if b.task_input.is_some() {
        let tasks: Vec<i64> =
            b.queries.iter().flat_map(|q| std::iter::repeat_n(q.task.unwrap_or(0), q.x.shape()[0])).collect();
        t.push(("task".into(), Tensor::I64(ndarray::arr1(&tasks).into_dyn())));
    }
    for q in &b.queries {
        t.extend(q.expected.iter().map(|(n, v)| (format!("expected/{n}"), v.clone())));
    }
    let refs: Vec<(&str, &Tensor)> = t.iter().map(|(n, v)| (n.as_str(), v)).collect();
    crate::store::to_bytes(&refs, HashMap::new()).map_err(step("encoding probes"))
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
    b: &Built,
    raw: bool,
) -> Result<Vec<ArtifactTask>, ExportError> {
    let mut out = Vec::new();
    for &i in selected {
        let rec = &m.tasks[i];
        let x = if raw { raw_images(rec, data[i].test_raw.clone()) } else { data[i].test_x.clone() };
        let value = b.task_input.as_ref().map(|_| i as i64);
        let scores =
            eval::run_batched_with(&b.model, &task_feed(b, value), &b.input, &rec.logits, &x, eval::eval_batch(&x))
                .map_err(step(format!("task '{}'", rec.name)))?;
        let accuracy = eval::accuracy(&scores, &data[i].test_y).map_err(step("accuracy"))?;
        out.push(ArtifactTask {
            name: rec.name.clone(),
            output: rec.logits.clone(),
            task_value: value,
            classes: rec.labels.len(),
            labels: rec.labels.clone(),
            preprocessing: if raw { Default::default() } else { rec.preprocessing.clone() },
            pixel_max: rec.pixel_max,
            accuracy: Some(accuracy),
        });
    }
    Ok(out)
}
