//! The trainable part: ONNX graphs executed as candle operations, with chosen initializers as
//! `Var`s so that `backward()` gives their gradients.

mod calibrate;
mod fuse;
#[cfg(test)]
pub mod gradcheck;
pub mod kernels;
mod ops;
pub mod portable;
pub mod registry;
mod session;

pub use session::CandleSession;

use std::collections::{BTreeMap, HashMap, HashSet};

use candle_core::{DType, Device, Tensor, Var};

use crate::onnx::attr::node_label;
use crate::onnx::{tensor_proto, Model, OnnxError};

/// Failures compiling or running a graph on candle. Each names the node.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    #[error("node '{node}': op {op} is not supported by the training engine")]
    Unsupported { node: String, op: String },
    #[error("node '{node}' ({op}): {given} {what}, the engine accepts {min} to {max}")]
    Arity { node: String, op: String, what: &'static str, given: usize, min: usize, max: usize },
    #[error("node '{node}' ({op}): the model imports opset {opset}, the engine follows {op} from opset {since}")]
    Opset { node: String, op: String, opset: i64, since: i64 },
    #[error("node '{node}' ({op}): {problem}")]
    Invalid { node: String, op: String, problem: String },
    #[error("node '{node}' ({op}) failed")]
    Exec {
        node: String,
        op: String,
        #[source]
        source: Box<candle_core::Error>,
    },
    #[error("tensor '{tensor}': {problem}")]
    Tensor { tensor: String, problem: String },
    #[error("{context}")]
    Candle {
        context: String,
        #[source]
        source: Box<candle_core::Error>,
    },
}

/// Host tensor to candle; floats become `float`, integers int64, bools and bytes uint8.
pub fn to_candle(t: &crate::tensor::Tensor, float: DType) -> candle_core::Result<Tensor> {
    to_candle_on(t, float, &Device::Cpu)
}

pub fn to_candle_on(t: &crate::tensor::Tensor, float: DType, dev: &Device) -> candle_core::Result<Tensor> {
    use crate::tensor::Tensor as H;
    let shape = t.shape().to_vec();
    let v = match t {
        H::F32(a) => flat(a, dev)?.to_dtype(float)?,
        H::F64(a) => flat(a, dev)?.to_dtype(float)?,
        H::I64(a) => flat(a, dev)?,
        H::I32(a) => Tensor::from_iter(a.iter().map(|&v| v as i64), dev)?,
        H::I8(a) => Tensor::from_iter(a.iter().map(|&v| v as i64), dev)?,
        H::U8(a) => flat(a, dev)?,
        H::Bool(a) => Tensor::from_iter(a.iter().map(|&v| v as u8), dev)?,
    };
    v.reshape(shape)
}

/// The elements of `a` in logical order as a 1-D tensor: one copy of the buffer when it is
/// already in that order (a batch always is), where going element by element through
/// ndarray's n-dimensional iterator was 3% of a MobileNetV2 `adapt` at 64x64 (perf); any
/// other layout is first copied into row-major order by ndarray, row by row.
fn flat<T: candle_core::WithDType>(a: &ndarray::ArrayD<T>, dev: &Device) -> candle_core::Result<Tensor> {
    let standard = a.as_standard_layout();
    let s = standard.as_slice().ok_or_else(|| candle_core::Error::Msg("a row-major array without a slice".into()))?;
    Tensor::from_slice(s, s.len(), dev)
}

/// candle tensor to host; floats come back as float32.
pub fn from_candle(t: &Tensor) -> candle_core::Result<crate::tensor::Tensor> {
    use crate::tensor::Tensor as H;
    let shape = ndarray::IxDyn(t.dims());
    let flat = t.flatten_all()?;
    let shaped = |e: ndarray::ShapeError| candle_core::Error::Msg(e.to_string());
    Ok(match t.dtype() {
        DType::I64 => H::I64(ndarray::ArrayD::from_shape_vec(shape, flat.to_vec1::<i64>()?).map_err(shaped)?),
        DType::U8 => H::U8(ndarray::ArrayD::from_shape_vec(shape, flat.to_vec1::<u8>()?).map_err(shaped)?),
        _ => H::F32(
            ndarray::ArrayD::from_shape_vec(shape, flat.to_dtype(DType::F32)?.to_vec1::<f32>()?).map_err(shaped)?,
        ),
    })
}

struct Step {
    /// Running statistics this step updates in training mode: (mean, variance) names.
    running: Option<(String, String)>,
    label: String,
    op_type: String,
    inputs: Vec<Option<String>>,
    outputs: Vec<String>,
    op: Box<dyn registry::Op>,
}

/// A re-parameterisation of a weight: the ops read `f(W)` where the graph names `W` (e.g.
/// `W * mask`). Op code never knows.
pub type Reparam = std::sync::Arc<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

/// An ONNX graph compiled to candle operations.
pub struct Engine {
    steps: Vec<Step>,
    inputs: Vec<String>,
    outputs: Vec<String>,
    constants: HashMap<String, Tensor>,
    params: BTreeMap<String, Var>,
    reparams: HashMap<String, Reparam>,
    /// Index of the last step reading each tensor, to free intermediates early.
    last_use: HashMap<String, usize>,
    float: DType,
    device: Device,
    training: std::sync::Arc<std::sync::atomic::AtomicBool>,
    calibrating: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// mtpack's CPU kernels or candle's portable ops (always portable off the CPU).
    kernels: kernels::Kernels,
    /// Of the linear layers' matrix products (mtpack's CPU kernels only).
    precision: kernels::Precision,
    /// Steps whose outputs depend only on constants and on the shapes of the graph inputs
    /// (shape arithmetic, constants expanded to the batch, resized position embeddings).
    statics: Vec<bool>,
    /// Their outputs, per tuple of graph-input shapes: evaluated once for each input size, the
    /// way ONNX Runtime folds them at load, instead of on every step.
    static_cache: std::sync::Mutex<HashMap<Vec<Vec<usize>>, StaticValues>>,
}

/// Outputs of static steps by tensor name, for one tuple of graph-input shapes.
type StaticValues = HashMap<String, Tensor>;

/// An engine's initializers: constants, and the parameters that train (or hold state).
type Initializers = (HashMap<String, Tensor>, BTreeMap<String, Var>);

/// The running statistics of each BatchNormalization whose scale trains: state that the
/// training step updates.
fn running_statistics(g: &crate::onnx::pb::GraphProto, trainable: &dyn Fn(&str) -> bool) -> HashSet<String> {
    g.node
        .iter()
        .filter(|n| n.op_type() == "BatchNormalization" && n.input.get(1).is_some_and(|s| trainable(s)))
        .flat_map(|n| n.input.iter().skip(3).take(2).cloned())
        .collect()
}

/// One step per node, in graph order, with BatchNormalization + clamp pairs whose
/// parameters are `fixed` fused into one step, a BatchNormalization (+ clamp) that only a
/// grouped Conv reads fused into the Conv's step, and written-out LayerNorm and GELU chains
/// each fused into one step at their last node.
fn build_steps(
    g: &crate::onnx::pb::GraphProto,
    ctx: &registry::BuildCtx,
    fixed: &dyn Fn(&str) -> bool,
) -> Result<Vec<Step>, EngineError> {
    let folded = fuse::batch_norm_clamps(g, ctx.opset, fixed);
    let fed = fuse::batch_norm_convs(g, &folded);
    let chains = fuse::written_out(&fuse::View::new(g), ctx.opset, fixed);
    let chain_at: HashMap<usize, &fuse::Chain> = chains.iter().map(|c| (c.last, c)).collect();
    let folded_away: HashSet<usize> = folded
        .values()
        .map(|f| f.clamp_node)
        .chain(fed.values().copied())
        .chain(chains.iter().flat_map(|c| c.nodes.iter().copied().filter(|&i| i != c.last)))
        .collect();
    let mut steps = Vec::with_capacity(g.node.len());
    for (idx, n) in g.node.iter().enumerate() {
        if folded_away.contains(&idx) {
            continue;
        }
        if let Some(chain) = chain_at.get(&idx) {
            steps.push(chain_step(g, chain, n));
            continue;
        }
        if let Some(bn) = fed.get(&idx).and_then(|&b| g.node.get(b).map(|bn| (b, bn))) {
            steps.push(batch_norm_conv_step(g, ctx, bn, folded.get(&bn.0), n)?);
            continue;
        }
        let mut step = Step {
            running: running_of(n, ctx),
            label: node_label(n),
            op_type: n.op_type().to_string(),
            inputs: n.input.iter().map(|i| (!i.is_empty()).then(|| i.clone())).collect(),
            outputs: n.output.clone(),
            op: registry::build(n, ctx)?,
        };
        if let Some((f, c)) = folded.get(&idx).and_then(|f| Some((f, g.node.get(f.clamp_node)?))) {
            // The clamp node is still checked as if it ran on its own.
            registry::build(c, ctx)?;
            step.op = ops::build_batch_norm_clamped(n, ctx, Some(f.clamp))?;
            step.label = format!("{}+{}", step.label, node_label(c));
            step.op_type = format!("{}+{}", n.op_type(), c.op_type());
            if let (Some(first), Some(out)) = (step.outputs.first_mut(), c.output.first()) {
                first.clone_from(out);
            }
        }
        steps.push(step);
    }
    Ok(steps)
}

/// The running statistics a BatchNormalization node updates while training.
fn running_of(n: &crate::onnx::pb::NodeProto, ctx: &registry::BuildCtx) -> Option<(String, String)> {
    match (n.op_type(), n.input.get(3), n.input.get(4)) {
        ("BatchNormalization", Some(m), Some(v)) if ctx.stateful.contains(m) => Some((m.clone(), v.clone())),
        _ => None,
    }
}

/// The step of a BatchNormalization `bn` (index, node), with its folded clamp, and the Conv
/// `conv` that alone reads it, at the Conv's place: the BatchNormalization's inputs, then
/// the Conv's weight (and bias); the Conv's outputs. Each node is still checked as if it ran
/// on its own.
fn batch_norm_conv_step(
    g: &crate::onnx::pb::GraphProto,
    ctx: &registry::BuildCtx,
    (_, bn): (usize, &crate::onnx::pb::NodeProto),
    folded: Option<&fuse::Folded>,
    conv: &crate::onnx::pb::NodeProto,
) -> Result<Step, EngineError> {
    let clamp_node = folded.and_then(|f| g.node.get(f.clamp_node));
    let nodes: Vec<&crate::onnx::pb::NodeProto> = std::iter::once(bn).chain(clamp_node).chain([conv]).collect();
    for n in &nodes {
        registry::build(n, ctx)?;
    }
    let join =
        |f: &dyn Fn(&crate::onnx::pb::NodeProto) -> String| nodes.iter().map(|n| f(n)).collect::<Vec<_>>().join("+");
    let inputs = bn.input.iter().take(5).chain(conv.input.iter().skip(1));
    Ok(Step {
        running: running_of(bn, ctx),
        label: join(&node_label),
        op_type: join(&|n| n.op_type().to_string()),
        inputs: inputs.map(|i| (!i.is_empty()).then(|| i.clone())).collect(),
        outputs: conv.output.clone(),
        op: ops::build_batch_norm_depthwise(bn, folded.map(|f| f.clamp), conv, ctx)?,
    })
}

/// The step of a fused chain, labelled by its first and last nodes, producing `last`'s outputs.
fn chain_step(g: &crate::onnx::pb::GraphProto, chain: &fuse::Chain, last: &crate::onnx::pb::NodeProto) -> Step {
    let first = chain.nodes.first().and_then(|&i| g.node.get(i)).map(node_label).unwrap_or_default();
    let (op, op_type): (Box<dyn registry::Op>, &str) = match chain.kind {
        fuse::Kind::LayerNorm { eps } => (ops::layer_norm_op(-1, eps), "LayerNorm (written out)"),
        fuse::Kind::Gelu => (ops::gelu_op(false), "Gelu (written out)"),
    };
    Step {
        running: None,
        label: format!("{first}..{}", node_label(last)),
        op_type: op_type.to_string(),
        inputs: chain.inputs.iter().map(|i| Some(i.clone())).collect(),
        outputs: last.output.clone(),
        op,
    }
}

/// The initializers on `device`: float ones that `trains` are parameters (candle `Var`s),
/// the rest constants.
fn load_initializers(
    g: &crate::onnx::pb::GraphProto,
    trains: &dyn Fn(&str) -> bool,
    float: DType,
    device: &Device,
) -> Result<Initializers, EngineError> {
    let (mut constants, mut params) = (HashMap::new(), BTreeMap::new());
    for t in &g.initializer {
        let host = tensor_proto::to_tensor(t)?;
        let is_float = matches!(host.dtype(), crate::tensor::DType::F32 | crate::tensor::DType::F64);
        let ct = to_candle_on(&host, float, device).map_err(|source| EngineError::Candle {
            context: format!("initializer '{}'", t.name()),
            source: Box::new(source),
        })?;
        if is_float && trains(t.name()) {
            let var = Var::from_tensor(&ct)
                .map_err(|source| EngineError::Candle { context: t.name().into(), source: Box::new(source) })?;
            params.insert(t.name().to_string(), var);
        } else {
            constants.insert(t.name().to_string(), ct);
        }
    }
    Ok((constants, params))
}

/// For each tensor, the last step that reads it (its value can be dropped after).
fn last_uses(steps: &[Step]) -> HashMap<String, usize> {
    let mut last_use = HashMap::new();
    for (i, s) in steps.iter().enumerate() {
        for name in s.inputs.iter().flatten() {
            last_use.insert(name.clone(), i);
        }
    }
    last_use
}

/// Which steps are static: Shape and Constant always; others when every input they read is a
/// fixed, non-re-parameterised initializer or a static step's output.
fn static_steps(steps: &[Step], fixed: &dyn Fn(&str) -> bool) -> Vec<bool> {
    let mut known: std::collections::HashSet<&str> = std::collections::HashSet::new();
    steps
        .iter()
        .map(|s| {
            let is = s.running.is_none()
                && (s.op_type == "Shape" || s.inputs.iter().flatten().all(|i| known.contains(i.as_str()) || fixed(i)));
            if is {
                known.extend(s.outputs.iter().map(String::as_str));
            }
            is
        })
        .collect()
}

/// "Op" for the default domain, "domain:Op" otherwise.
fn op_key(n: &crate::onnx::pb::NodeProto) -> String {
    if n.domain().is_empty() {
        n.op_type().to_string()
    } else {
        format!("{}:{}", n.domain(), n.op_type())
    }
}

/// Each op of `model` the engine cannot execute, with the first node using it; sorted by op.
fn missing(model: &Model) -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    for n in &model.graph().node {
        if !(n.domain().is_empty() || n.domain() == "ai.onnx") || !registry::supports(n.op_type()) {
            v.entry(op_key(n)).or_insert_with(|| node_label(n));
        }
    }
    v
}

/// Default-domain ops of `model` that the engine cannot execute, sorted and unique.
pub fn missing_ops(model: &Model) -> Vec<String> {
    missing(model).into_keys().collect()
}

/// The same, each as "Op (node 'name')" naming the first node that uses it.
pub fn missing_ops_with_nodes(model: &Model) -> Vec<String> {
    missing(model).into_iter().map(|(op, node)| format!("{op} (node '{node}')")).collect()
}

impl Engine {
    /// Compiles `model`; float initializers for which `trainable` is true become `Var`s.
    pub fn new(
        model: &Model,
        trainable: &dyn Fn(&str) -> bool,
        float: DType,
        device: &Device,
    ) -> Result<Engine, EngineError> {
        let g = model.graph();
        let stateful = running_statistics(g, trainable);
        let training = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let calibrating = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ctx = registry::BuildCtx {
            opset: model.opset("").unwrap_or(1),
            float,
            training: training.clone(),
            calibrating: calibrating.clone(),
            stateful: stateful.clone(),
        };
        let steps = build_steps(g, &ctx, &|name| !(trainable(name) || stateful.contains(name)))?;
        let (constants, params) =
            load_initializers(g, &|name| trainable(name) || stateful.contains(name), float, device)?;
        let inits: std::collections::HashSet<&str> = g.initializer.iter().map(|t| t.name()).collect();
        let statics = static_steps(&steps, &|n| constants.contains_key(n));
        Ok(Engine {
            last_use: last_uses(&steps),
            steps,
            inputs: g.input.iter().map(|i| i.name().to_string()).filter(|n| !inits.contains(n.as_str())).collect(),
            outputs: g.output.iter().map(|o| o.name().to_string()).collect(),
            constants,
            params,
            reparams: HashMap::new(),
            float,
            device: device.clone(),
            training,
            calibrating,
            kernels: kernels::Kernels::Native,
            precision: kernels::Precision::F32,
            statics,
            static_cache: Default::default(),
        })
    }

    /// Re-derives the static steps after a change of what is fixed; drops cached values.
    fn refresh_statics(&mut self) {
        let (constants, reparams) = (&self.constants, &self.reparams);
        self.statics = static_steps(&self.steps, &|n| constants.contains_key(n) && !reparams.contains_key(n));
        if let Ok(mut c) = self.static_cache.lock() {
            c.clear();
        }
    }

    /// Training mode: BatchNormalization with trainable scale normalises with batch
    /// statistics and updates its running statistics (PyTorch's `train()`); off, every op
    /// uses the recorded statistics (`eval()`).
    pub fn set_training(&self, on: bool) {
        self.training.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Runs the portable ops on the CPU too (`--kernels portable`): the computation a GPU
    /// engine does, to compare against the CPU kernels.
    pub fn set_kernels(&mut self, k: kernels::Kernels) {
        self.kernels = k;
    }

    /// The precision of the linear layers' matrix products, forward and backward (the
    /// portable ops always compute in the engine's float type).
    pub fn set_precision(&mut self, p: kernels::Precision) {
        self.precision = p;
    }

    pub fn input_names(&self) -> &[String] {
        &self.inputs
    }

    pub fn output_names(&self) -> &[String] {
        &self.outputs
    }

    pub fn params(&self) -> &BTreeMap<String, Var> {
        &self.params
    }

    /// Adds a parameter the graph does not name (e.g. a mask's real-valued scores read by a
    /// [`Reparam`]); it trains and is checkpointed like the graph's own.
    pub fn add_param(&mut self, name: &str, var: Var) {
        self.params.insert(name.to_string(), var);
    }

    /// From now on every op reading initializer `name` sees `f(value)`.
    pub fn set_reparam(&mut self, name: &str, f: Reparam) -> Result<(), EngineError> {
        if !(self.constants.contains_key(name) || self.params.contains_key(name)) {
            return Err(EngineError::Tensor {
                tensor: name.into(),
                problem: "is not an initializer of the graph".into(),
            });
        }
        self.reparams.insert(name.to_string(), f);
        self.refresh_statics();
        Ok(())
    }

    /// The value ops see for initializer `name`, after any re-parameterisation.
    pub fn effective(&self, name: &str) -> Option<candle_core::Result<Tensor>> {
        let base =
            self.constants.get(name).cloned().or_else(|| self.params.get(name).map(|v| v.as_tensor().clone()))?;
        Some(match self.reparams.get(name) {
            Some(f) => f(&base),
            None => Ok(base),
        })
    }

    pub fn float(&self) -> DType {
        self.float
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs the graph; returns the graph outputs in order.
    pub fn forward(&self, inputs: &[(&str, Tensor)]) -> Result<Vec<Tensor>, EngineError> {
        let outs: Vec<&str> = self.outputs.iter().map(String::as_str).collect();
        self.forward_to(inputs, &outs)
    }

    /// Runs the graph and returns the named tensors (graph outputs or intermediates).
    pub fn forward_to(&self, inputs: &[(&str, Tensor)], wanted: &[&str]) -> Result<Vec<Tensor>, EngineError> {
        self.run_steps(inputs, wanted, None)
    }

    /// Forward time per op type, slowest first (for benchmarks and profiling).
    pub fn profile_forward(
        &self,
        inputs: &[(&str, Tensor)],
    ) -> Result<Vec<(String, std::time::Duration)>, EngineError> {
        let mut times = HashMap::new();
        let outs: Vec<&str> = self.outputs.iter().map(String::as_str).collect();
        self.run_steps(inputs, &outs, Some(&mut times))?;
        let mut v: Vec<(String, std::time::Duration)> = times.into_iter().collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        Ok(v)
    }

    fn run_steps(
        &self,
        inputs: &[(&str, Tensor)],
        wanted: &[&str],
        times: Option<&mut HashMap<String, std::time::Duration>>,
    ) -> Result<Vec<Tensor>, EngineError> {
        let run = || self.run_steps_with(inputs, wanted, times);
        kernels::with_kernels(self.kernels, || kernels::with_precision(self.precision, run))
    }

    fn run_steps_with(
        &self,
        inputs: &[(&str, Tensor)],
        wanted: &[&str],
        mut times: Option<&mut HashMap<String, std::time::Duration>>,
    ) -> Result<Vec<Tensor>, EngineError> {
        let mut env = self.bind_inputs(inputs)?;
        let key: Vec<Vec<usize>> = self.inputs.iter().filter_map(|n| env.get(n)).map(|t| t.dims().to_vec()).collect();
        let mut cached = self.static_cache.lock().map(|mut c| c.remove(&key).unwrap_or_default()).unwrap_or_default();
        // Recalibration needs no gradient: parameters read detached record no backward graph,
        // so each activation is freed after its last reader instead of at the pass's end.
        let untracked = self.calibrating.load(std::sync::atomic::Ordering::Relaxed);
        let param = |v: &Var| if untracked { v.as_tensor().detach() } else { v.as_tensor().clone() };
        let mut reparam_cache = self.reparam_values()?;
        if untracked {
            reparam_cache.values_mut().for_each(|t| *t = t.detach());
        }
        let lookup = |env: &HashMap<String, Tensor>, name: &str| -> Option<Tensor> {
            env.get(name)
                .or_else(|| reparam_cache.get(name))
                .or_else(|| self.constants.get(name))
                .cloned()
                .or_else(|| self.params.get(name).map(param))
        };
        for (i, s) in self.steps.iter().enumerate() {
            if wanted.iter().all(|w| env.contains_key(*w) || self.constants.contains_key(*w)) {
                break;
            }
            let is_static = self.statics.get(i).copied().unwrap_or(false);
            if is_static && s.outputs.iter().all(|o| o.is_empty() || cached.contains_key(o)) {
                for o in s.outputs.iter().filter(|o| !o.is_empty()) {
                    if let Some(t) = cached.get(o) {
                        env.insert(o.clone(), t.clone());
                    }
                }
                continue;
            }
            let args: Vec<Option<Tensor>> =
                s.inputs.iter().map(|n| n.as_deref().and_then(|n| lookup(&env, n))).collect();
            let args = self.on_device(s, args)?;
            let outs = self.run_step(s, &args, times.as_deref_mut())?;
            for (name, t) in s.outputs.iter().zip(outs) {
                if !name.is_empty() {
                    if is_static {
                        cached.insert(name.clone(), t.clone());
                    }
                    env.insert(name.clone(), t);
                }
            }
            // Free what no later step reads (and nobody asked for).
            for name in s.inputs.iter().flatten() {
                if self.last_use.get(name) == Some(&i) && !wanted.contains(&name.as_str()) {
                    env.remove(name);
                }
            }
        }
        if let Ok(mut c) = self.static_cache.lock() {
            c.insert(key, cached);
        }
        wanted
            .iter()
            .map(|w| {
                lookup(&env, w).ok_or_else(|| EngineError::Tensor {
                    tensor: w.to_string(),
                    problem: "not computed by the graph".into(),
                })
            })
            .collect()
    }

    /// On an accelerator, a step reading both device tensors and CPU ones (what Shape, Range
    /// and the like produce, on the CPU) gets the CPU ones moved to the device: candle refuses
    /// ops across devices. Shape arithmetic among CPU tensors stays on the CPU, and nothing
    /// moves on the CPU.
    fn on_device(&self, s: &Step, args: Vec<Option<Tensor>>) -> Result<Vec<Option<Tensor>>, EngineError> {
        if self.device.is_cpu() || args.iter().flatten().all(|t| t.device().is_cpu()) {
            return Ok(args);
        }
        args.into_iter()
            .map(|a| match a {
                Some(t) if t.device().is_cpu() => {
                    t.to_device(&self.device).map(Some).map_err(|e| EngineError::Candle {
                        context: format!("moving an input of {} to the device", s.label),
                        source: Box::new(e),
                    })
                }
                other => Ok(other),
            })
            .collect()
    }

    /// The graph inputs from `inputs`, each required.
    fn bind_inputs(&self, inputs: &[(&str, Tensor)]) -> Result<HashMap<String, Tensor>, EngineError> {
        let mut env = HashMap::new();
        for name in &self.inputs {
            let t = inputs
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.clone())
                .ok_or_else(|| EngineError::Tensor { tensor: name.clone(), problem: "graph input not given".into() })?;
            env.insert(name.clone(), t);
        }
        Ok(env)
    }

    /// Re-parameterised weights, computed once per pass rather than once per reader.
    fn reparam_values(&self) -> Result<HashMap<&str, Tensor>, EngineError> {
        let mut out = HashMap::new();
        for name in self.reparams.keys() {
            if let Some(v) = self.effective(name) {
                let v = v.map_err(|e| EngineError::Candle {
                    context: format!("re-parameterised weight '{name}'"),
                    source: Box::new(e),
                })?;
                out.insert(name.as_str(), v);
            }
        }
        Ok(out)
    }

    /// Runs one step on its arguments (timed when profiling) and writes a BatchNorm's updated
    /// running statistics into their parameters.
    fn run_step(
        &self,
        s: &Step,
        args: &[Option<Tensor>],
        times: Option<&mut HashMap<String, std::time::Duration>>,
    ) -> Result<Vec<Tensor>, EngineError> {
        if let Some(missing) = s.inputs.iter().zip(args).find(|(n, a)| n.is_some() && a.is_none()) {
            return Err(EngineError::Tensor {
                tensor: missing.0.clone().unwrap_or_default(),
                problem: format!("read by node '{}' but not computed", s.label),
            });
        }
        let exec = |e: candle_core::Error| EngineError::Exec {
            node: s.label.clone(),
            op: s.op_type.clone(),
            source: Box::new(e),
        };
        let started = std::time::Instant::now();
        let outs = s.op.forward(args).map_err(exec)?;
        if let Some(t) = times {
            *t.entry(s.op_type.clone()).or_default() += started.elapsed();
        }
        if let (Some((mean, var)), [_, new_mean, new_var, ..]) = (&s.running, outs.as_slice()) {
            for (name, value) in [(mean, new_mean), (var, new_var)] {
                if let Some(v) = self.params.get(name) {
                    v.set(&value.detach()).map_err(exec)?;
                }
            }
        }
        Ok(outs)
    }

    /// The model with every trainable initializer replaced by the engine's current value.
    pub fn export(&self, model: &Model) -> Result<Model, EngineError> {
        model.with_values(|t| {
            let Some(v) = self.params.get(t.name()) else { return Ok(None) };
            let host = from_candle(v.as_tensor())
                .map_err(|source| EngineError::Candle { context: t.name().to_string(), source: Box::new(source) })?;
            Ok(Some(host))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_tensors_convert_in_logical_order_whatever_their_layout() {
        let a = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[2, 3]), (0..6).map(|v| v as f32).collect()).unwrap();
        let c = to_candle(&crate::tensor::Tensor::F32(a.clone()), DType::F32).unwrap();
        assert_eq!(c.to_vec2::<f32>().unwrap(), [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]);
        // Transposed in place: the buffer is not in logical order.
        let t = crate::tensor::Tensor::F32(a.reversed_axes());
        let c = to_candle(&t, DType::F64).unwrap();
        assert_eq!(c.to_vec2::<f64>().unwrap(), [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]);
    }
}
