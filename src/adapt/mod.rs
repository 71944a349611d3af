//! `mtpack adapt`: learn a sequence of tasks on one backbone with one method, into a pack
//! directory that survives being killed at any point.

pub mod checkpoint;
mod fixed_batch;

mod probe;
pub mod report;
mod task;
mod tune;

use std::path::{Path, PathBuf};

use crate::graph::analysis::{find_feature, find_head, nearest_names, trainable_layers, trainable_names};
use crate::graph::features::{attach, Pool, FEATURE};
use crate::graph::index::validate;
use crate::graph::materialize::weights_from_nodes;
use crate::methods::{Inputs, Record};
use crate::onnx::{tensor_type, Dim, Model};
use crate::pack::manifest::{BackboneRecord, CutRecord, OwnHead};
use crate::pack::{Manifest, Metrics, Pack, PACK_SCHEMA};
use crate::plan::{self, data, Plan};

#[derive(Debug, thiserror::Error)]
pub enum AdaptError {
    /// A plan this backbone or its data cannot serve, explained.
    #[error("{0}")]
    Plan(String),
    #[error("--device")]
    Device(#[source] crate::runtime::RuntimeError),
    #[error("{}: finding the shape of '{tensor}'", path.display())]
    Probe {
        path: PathBuf,
        tensor: String,
        #[source]
        source: crate::runtime::RuntimeError,
    },
    #[error(transparent)]
    TaskData(Box<data::PrepareError>),
    #[error("the plan cannot be recorded in the pack's manifest (a path that is not UTF-8?)")]
    PlanRecord(#[source] serde_json::Error),
    #[error("{path}")]
    Backbone {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    #[error(transparent)]
    Pack(#[from] crate::pack::PackError),
    #[error(transparent)]
    Graph(#[from] crate::graph::GraphError),
    #[error(transparent)]
    Onnx(#[from] crate::onnx::OnnxError),
    /// Stopped by a signal after writing a checkpoint; the same command resumes.
    #[error(
        "interrupted in task '{task}' {}; the checkpoint is in {pack}: rerun the same command to resume",
        match step { Some(s) => format!("at epoch {}, step {s}", epoch + 1), None => format!("before epoch {}", epoch + 1) }
    )]
    Interrupted {
        pack: PathBuf,
        task: String,
        /// The epoch (from 0) the resumed run continues.
        epoch: u64,
        /// Steps of that epoch already done, for a mid-epoch stop.
        step: Option<usize>,
    },
}

impl From<data::PrepareError> for AdaptError {
    fn from(e: data::PrepareError) -> Self {
        AdaptError::TaskData(Box::new(e))
    }
}

pub struct Options {
    pub pack: PathBuf,
    /// Add the plan's tasks to an existing pack (its method and settings stay).
    pub extend: bool,
    pub quiet: bool,
    /// Whether to wait for another process writing the same pack (else refuse at once).
    pub wait: crate::pack::lock::Wait,
}

/// What the runner knows about the backbone.
pub struct Backbone {
    pub record: BackboneRecord,
    pub input_shape: Option<Vec<Dim>>,
    /// Shared weights that may train (the backbone's own head excluded).
    pub shared: std::collections::BTreeSet<String>,
    /// The Conv/Gemm/MatMul weights among them: what mask methods mask.
    pub masked: std::collections::BTreeSet<String>,
    /// What was changed so that a backbone exported for one image takes batches.
    pub freed_batch: Option<crate::graph::batch::FreedBatch>,
}

fn backbone_err(path: &Path, e: impl std::error::Error + Send + Sync + 'static) -> AdaptError {
    AdaptError::Backbone { path: path.to_path_buf(), source: Box::new(e) }
}

/// Loads and analyses the backbone: weights made by nodes folded into initializers, the
/// feature tensor (the plan's `at` with its pooling, or the own head's input, or the graph
/// output), the own head, what can train.
pub fn analyse_backbone(path: &Path, plan: &Plan) -> Result<(Model, Backbone), AdaptError> {
    let loaded = Model::load(path).map_err(|e| backbone_err(path, e))?;
    validate(loaded.graph()).map_err(|e| backbone_err(path, e))?;
    let (model, _folded) = weights_from_nodes(&loaded).map_err(|e| backbone_err(path, e))?;
    let (model, freed_batch) = fixed_batch::free_fixed_batch(path, model)?;
    let (model, head, feature, feature_dim, cut) = choose_feature(path, model, plan)?;
    let g = model.graph();
    let missing = crate::engine::missing_ops_with_nodes(&model);
    if !missing.is_empty() && plan.method.spec().data.inputs != Inputs::FrozenFeatures {
        return Err(AdaptError::Plan(format!(
            "{}: the training engine cannot execute {} (method feature-extract trains only the head; \
             --at TENSOR drops what follows it)",
            path.display(),
            missing.join(", ")
        )));
    }
    let inputs: Vec<_> = g.input.iter().filter(|i| !g.initializer.iter().any(|t| t.name() == i.name())).collect();
    let [input] = inputs.as_slice() else {
        return Err(AdaptError::Plan(format!(
            "{}: a backbone needs exactly one input, it has {}",
            path.display(),
            inputs.len()
        )));
    };
    let input_shape = tensor_type(input).and_then(|(_, s)| s);
    let mut shared = trainable_names(g);
    let own_head = head.map(|h| {
        let params: Vec<String> = std::iter::once(h.weight.clone()).chain(h.bias.clone()).collect();
        for p in &params {
            shared.remove(p);
        }
        OwnHead { output: h.output, logits: h.logits, classes: h.classes, params }
    });
    let masked = trainable_layers(g).into_iter().map(|l| l.weight).filter(|w| shared.contains(w)).collect();
    let sha256 = crate::pack::file_sha256(path)?;
    let record = BackboneRecord {
        source: path.display().to_string(),
        sha256,
        input: input.name().to_string(),
        feature,
        feature_dim,
        own_head,
        cut,
    };
    Ok((model, Backbone { record, input_shape, shared, masked, freed_batch }))
}

type FeatureChoice = (Model, Option<crate::graph::analysis::Head>, String, usize, Option<CutRecord>);

/// Where the heads attach. With `at`, or for a headless model whose output is not one vector
/// per image, the backbone is cut there and pooled (shapes found by running it once in ONNX
/// Runtime); otherwise the own head's input or the graph output, as declared.
fn choose_feature(path: &Path, model: Model, plan: &Plan) -> Result<FeatureChoice, AdaptError> {
    let g = model.graph();
    let head = if plan.at.is_some() { None } else { find_head(g) };
    let guess = find_feature(g, head.as_ref())
        .ok_or_else(|| AdaptError::Plan(format!("{}: no feature tensor found for new heads", path.display())))?;
    let at = match (&plan.at, head.is_some(), guess.dim) {
        (Some(at), _, _) => at.clone(),
        (None, true, Some(dim)) => return Ok((model, head, guess.tensor, dim, None)),
        (None, false, Some(dim)) if declared_rank(g, &guess.tensor) == Some(2) => {
            return Ok((model, head, guess.tensor, dim, None))
        }
        _ => guess.tensor,
    };
    if !g.node.iter().any(|n| n.output.contains(&at)) {
        return Err(AdaptError::Plan(format!(
            "{}: --at {at}: no tensor of that name is computed by the graph; nearest: {}",
            path.display(),
            nearest_names(g, &at, 5).join(", ")
        )));
    }
    let shapes = crate::runtime::probe::shapes(&model, std::slice::from_ref(&at))
        .map_err(|source| AdaptError::Probe { path: path.to_path_buf(), tensor: at.clone(), source })?;
    let dims = shapes.get(&at).cloned().unwrap_or_default();
    let pool = plan.pool.unwrap_or(Pool::Mean);
    let layout = plan.layout.unwrap_or_else(|| {
        crate::graph::analysis::single_input_shape(g).map(|d| crate::data::Layout::of_input(&d)).unwrap_or_default()
    });
    let (cut_model, width) = attach(&model, &at, &dims, pool, layout).map_err(|e| backbone_err(path, e))?;
    let record = CutRecord { at: at.clone(), shape: dims, pool };
    Ok((cut_model, None, FEATURE.to_string(), width, Some(record)))
}

/// The rank a graph output declares, if it does.
fn declared_rank(g: &crate::onnx::pb::GraphProto, tensor: &str) -> Option<usize> {
    g.output.iter().find(|o| o.name() == tensor).and_then(tensor_type).and_then(|(_, s)| s).map(|s| s.len())
}

fn new_manifest(plan: &Plan, plan_digest: String, backbone: &Backbone, model: &Model) -> Manifest {
    let own = backbone.record.own_head.is_some();
    Manifest {
        schema: PACK_SCHEMA.into(),
        mtpack_version: env!("CARGO_PKG_VERSION").into(),
        backbone: backbone.record.clone(),
        method: plan.method,
        method_params: plan.params.for_backbone(plan.method, model).effective(plan.method),
        needs_old_data: plan.method.needs_old_data(),
        seed: plan.seed,
        plan: plan.clone(),
        plan_digest,
        tasks: Vec::new(),
        columns: own
            .then(|| "backbone".to_string())
            .into_iter()
            .chain(plan.tasks.iter().map(|t| t.name.clone()))
            .collect(),
        rows: own.then(|| "initial".to_string()).into_iter().collect(),
        accuracy_matrix: Vec::new(),
        metrics: Metrics::default(),
        files: Default::default(),
    }
}

/// Opens the pack for `plan`: new, a rerun of the same plan (resume), or an extension.
fn open_pack(
    pack: &Pack,
    plan: &Plan,
    backbone: &Backbone,
    model: &Model,
    extend: bool,
) -> Result<Manifest, AdaptError> {
    let digest = plan.digest().map_err(AdaptError::PlanRecord)?;
    if pack.exists() {
        let mut m = pack.load_manifest()?;
        if m.plan_digest == digest {
            return Ok(m);
        }
        let prefix_ok = plan.tasks.len() >= m.plan.tasks.len() && plan.tasks[..m.plan.tasks.len()] == m.plan.tasks[..];
        let same_setup = plan.method == m.plan.method && plan.params == m.plan.params && plan.seed == m.plan.seed;
        if !(extend && prefix_ok && same_setup) {
            return Err(AdaptError::Plan(format!(
                "{} holds a pack made with a different plan; rerun the same command to resume it, \
                 use --resume {} to add tasks to it, or choose another -o",
                pack.dir.display(),
                pack.dir.display()
            )));
        }
        for t in &plan.tasks[m.plan.tasks.len()..] {
            m.columns.push(t.name.clone());
            for row in &mut m.accuracy_matrix {
                row.push(None);
            }
        }
        m.plan = plan.clone();
        m.plan_digest = digest;
        return Ok(m);
    }
    pack.create_dirs()?;
    model.save(&pack.backbone())?;
    model.save(&pack.model())?;
    let mut m = new_manifest(plan, digest, backbone, model);
    m.files.insert("backbone.onnx".into(), String::new());
    m.files.insert("model.onnx".into(), String::new());
    if m.backbone.own_head.is_some() {
        // Before any task the backbone's head agrees with itself.
        let mut row = vec![None; m.columns.len()];
        row[0] = Some(1.0);
        m.accuracy_matrix.push(row);
    }
    pack.save_manifest(&mut m)?;
    Ok(m)
}

/// Runs the plan into `opts.pack`; returns the final manifest.
pub fn run(plan: &Plan, opts: &Options) -> Result<Manifest, AdaptError> {
    plan.validate().map_err(AdaptError::Plan)?;
    let backbone_path = plan.backbone.clone().unwrap_or_else(plan::default_backbone);
    let (model, backbone) = analyse_backbone(&backbone_path, plan)?;
    let plan = &plan.for_backbone(&model);
    // Settings that conflict only with a default the backbone decided (LwF's frozen statistics).
    plan.validate().map_err(AdaptError::Plan)?;
    let params = plan.params.for_backbone(plan.method, &model);
    let mut method = plan.method.create(&params).map_err(AdaptError::Plan)?;
    // Every task's data is read and checked before anything trains.
    let mut prepared = Vec::with_capacity(plan.tasks.len());
    for t in &plan.tasks {
        prepared.push(data::prepare(t, backbone.input_shape.as_deref(), plan.seed)?);
    }
    let device = crate::runtime::device::candle_device(plan.device).map_err(AdaptError::Device)?;
    if !opts.quiet {
        if let Some(f) = &backbone.freed_batch {
            eprintln!(
                "input '{}' is exported for a batch of 1: it takes batches here ({} Reshape shape(s) follow the batch; \
                 a batch of two computes what each image does alone)",
                f.input,
                f.reshapes.len()
            );
        }
        eprintln!("{}", where_it_runs(plan, &model, &backbone.shared));
    }
    let pack = Pack::new(&opts.pack);
    // Held until the run ends, however it ends: one writer per pack.
    let _writing = pack.lock_exclusive(opts.wait)?;
    let mut manifest = open_pack(&pack, plan, &backbone, &model, opts.extend)?;
    let done: Vec<String> = manifest.tasks.iter().filter(|t| t.done).map(|t| t.name.clone()).collect();
    if let Some(last) = done.last() {
        method.restore(&Record::load(&pack.state_dir().join(format!("after_{last}")))?)?;
    }
    let runner = task::Runner {
        pack: &pack,
        plan,
        backbone: &backbone,
        data: &prepared,
        device: &device,
        quiet: opts.quiet,
        agreement: task::agreement_reference(
            &pack,
            &backbone,
            &prepared,
            crate::train::eval::Inference::beside_training(&device, plan.kernels),
        )?,
        trial: false,
    };
    for t in 0..plan.tasks.len() {
        if manifest.tasks.get(t).is_some_and(|r| r.done) {
            continue;
        }
        if crate::interrupt::requested() {
            return Err(runner.interrupted(&plan.tasks[t].name, 0, None));
        }
        if plan.tune == Some(true) && manifest.tasks.len() <= t {
            let last = manifest.tasks.iter().rev().find(|r| r.done).map(|r| r.name.clone());
            let tuned = runner.tune(t, &params, &manifest, last.as_deref())?;
            runner.model_with_head(t, &mut manifest)?;
            if let Some(rec) = manifest.tasks.get_mut(t) {
                rec.hyper.optim.lr = tuned.chosen_lr;
                rec.tune = Some(tuned);
            }
            pack.save_manifest(&mut manifest)?;
        }
        runner.learn(t, method.as_mut(), &mut manifest)?;
    }
    Ok(manifest)
}

/// Which library runs each part of `adapt`, on which device: never left for the user to guess.
fn where_it_runs(plan: &Plan, model: &Model, shared: &std::collections::BTreeSet<String>) -> String {
    use crate::engine::kernels::Precision;
    let place = where_it_trains(plan);
    match plan.precision {
        Precision::F32 => place,
        Precision::Bf16 => format!("{place}; {}", bf16_reach(model, shared)),
    }
}

/// What `--precision bf16` changes on this backbone, counted from its graph: the linear
/// layers (MatMul or Gemm with a `shared` weight: the backbone's own head is not one) and
/// the heads train in bf16; convolutions do not. On a CNN that is the heads alone, and the
/// run says so rather than promise a speed-up.
fn bf16_reach(model: &Model, shared: &std::collections::BTreeSet<String>) -> String {
    let count = |ops: &[&str]| {
        let layers = model.graph().node.iter().filter(|n| ops.contains(&n.op_type()));
        layers.filter(|n| n.input.iter().any(|i| shared.contains(i))).count()
    };
    let (linear, convs) = (count(&["MatMul", "Gemm"]), count(&["Conv"]));
    let convs = match convs {
        0 => String::new(),
        1 => "; its convolution stays f32".into(),
        n => format!("; its {n} convolutions stay f32"),
    };
    match linear {
        0 => format!(
            "--precision bf16 reaches only the heads: the backbone has no linear layers (MatMul or Gemm with a \
             weight){convs}, so expect f32's speed"
        ),
        1 => format!("the heads and the backbone's linear layer train in bf16 on AMX tiles (f32 sums){convs}"),
        n => format!("the heads and the backbone's {n} linear layers train in bf16 on AMX tiles (f32 sums){convs}"),
    }
}

fn where_it_trains(plan: &Plan) -> String {
    use crate::engine::kernels::Kernels;
    use crate::runtime::device::DeviceChoice;
    match (plan.device, plan.kernels) {
        (DeviceChoice::Cpu, Kernels::Native) => {
            "runs on the CPU: training in candle with mtpack's kernels; frozen prefix, recorded outputs and evaluation in ONNX Runtime".into()
        }
        (DeviceChoice::Cpu, Kernels::Portable) => {
            "runs on the CPU as a GPU run would: training in candle with its portable ops; frozen prefix, recorded outputs and evaluation in mtpack's engine with the same ops".into()
        }
        (DeviceChoice::Cuda, _) => {
            "runs on cuda: training in candle with its portable ops; frozen prefix, recorded outputs and evaluation in mtpack's engine on cuda (the ONNX Runtime mtpack loads is a CPU build); export and verify run on the CPU".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::bf16_reach;
    use crate::onnx::build::{model, node};
    use crate::onnx::pb::GraphProto;

    /// The first line's account of `--precision bf16`, on any CPU (the CLI test needs AMX):
    /// linear layers counted only where their weight may train, convolutions always.
    #[test]
    fn bf16_reach_counts_trainable_linear_layers_and_convolutions() {
        let graph = GraphProto {
            node: vec![
                node("Conv", "c1", &["x", "cw1"], &["a"], vec![]),
                node("Conv", "c2", &["a", "cw2"], &["b"], vec![]),
                node("MatMul", "attn", &["b", "b"], &["s"], vec![]),
                node("MatMul", "fc", &["s", "fw"], &["f"], vec![]),
                node("Gemm", "own_head", &["f", "hw"], &["y"], vec![]),
            ],
            ..Default::default()
        };
        let m = model(graph, 13);
        let shared = |names: &[&str]| names.iter().map(|s| s.to_string()).collect();
        let cnn = bf16_reach(&m, &shared(&["cw1", "cw2"]));
        assert!(cnn.contains("reaches only the heads") && cnn.contains("its 2 convolutions stay f32"), "{cnn}");
        let one = bf16_reach(&m, &shared(&["cw1", "fw"]));
        assert!(one.contains("the backbone's linear layer train") && one.contains("its convolution stays"), "{one}");
        let two = bf16_reach(&m, &shared(&["fw", "hw"]));
        assert!(two.contains("the backbone's 2 linear layers train") && !two.contains("convolution"), "{two}");
    }
}
