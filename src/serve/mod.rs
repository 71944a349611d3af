//! Serving the multi-task artifact from Rust: open the file once, ask for a task by name, run it.
//!
//! Each task gets its own runtime session of the task's specialised model (see
//! [`crate::pack::specialize`]), made on first use and kept: with the task selector a
//! constant, ONNX Runtime and tract unpack the task's masks and gather its per-task
//! parameters once, at load, so a call costs what the plain backbone with one head costs. A
//! session holds the task's unpacked weights and the runtime's buffers (the README's artifact
//! table gives the measured memory).
//!
//! ```no_run
//! use mtpack::runtime::Runtime;
//! use mtpack::serve::Artifact;
//! # fn main() -> Result<(), mtpack::serve::ServeError> {
//! let mut model = Artifact::open("model.onnx".as_ref(), Runtime::Ort)?;
//! let x = mtpack::tensor::Tensor::F32(ndarray::ArrayD::zeros(vec![1, 3, 64, 64]));
//! let scores = model.task("mnist")?.run(&x)?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::onnx::{Model, OnnxError};
use crate::pack::artifact::{ArtifactManifest, ArtifactTask};
use crate::pack::specialize::{self, SpecializeError};
use crate::runtime::{Backend, Named, Runtime, RuntimeError};
use crate::tensor::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot read the artifact")]
    Load(#[from] OnnxError),
    #[error(transparent)]
    Specialize(#[from] SpecializeError),
    #[error("task '{task}': the runtime returned no output '{output}'")]
    MissingOutput { task: String, output: String },
    #[error("{context}")]
    Runtime {
        context: String,
        #[source]
        source: RuntimeError,
    },
}

/// One task's session: the artifact's model for that task alone, in one runtime.
pub struct TaskSession {
    task: ArtifactTask,
    input: String,
    backend: Box<dyn Backend>,
    created: Duration,
}

impl TaskSession {
    /// Builds `task`'s session of the artifact `model` (with manifest `m`).
    pub fn new(model: &Model, m: &ArtifactManifest, task: &ArtifactTask, rt: Runtime) -> Result<Self, ServeError> {
        let start = Instant::now();
        let one = specialize::specialize(model, m, task)?;
        let backend = rt.session(&one, &format!("task '{}'", task.name)).map_err(|source| ServeError::Runtime {
            context: format!("loading task '{}' in {}", task.name, rt.name()),
            source,
        })?;
        Ok(TaskSession { task: task.clone(), input: m.input.clone(), backend, created: start.elapsed() })
    }

    pub fn task(&self) -> &ArtifactTask {
        &self.task
    }

    /// The artifact output this session returns.
    pub fn output(&self) -> &str {
        &self.task.output
    }

    /// How long specialising and loading took (the runtime's folding included).
    pub fn created_in(&self) -> Duration {
        self.created
    }

    /// The task's scores `[N, classes]` for `x`, preprocessed as the task's manifest entry says.
    pub fn run(&mut self, x: &Tensor) -> Result<Tensor, ServeError> {
        let context = format!("running task '{}' in {}", self.task.name, self.backend.name());
        let out = self
            .backend
            .run(&[(self.input.clone(), x.clone())])
            .map_err(|source| ServeError::Runtime { context, source })?;
        out.into_iter()
            .find(|(n, _)| *n == self.task.output)
            .map(|(_, t)| t)
            .ok_or_else(|| ServeError::MissingOutput { task: self.task.name.clone(), output: self.task.output.clone() })
    }
}

/// An exported multi-task model, opened once; tasks are served by name.
pub struct Artifact {
    model: Model,
    manifest: ArtifactManifest,
    runtime: Runtime,
    sessions: HashMap<String, TaskSession>,
    /// The whole artifact, for one pass through every head of a shared backbone.
    whole: Option<Box<dyn Backend>>,
}

impl Artifact {
    pub fn open(path: &Path, runtime: Runtime) -> Result<Artifact, ServeError> {
        Artifact::from_model(Model::load(path)?, runtime)
    }

    pub fn from_model(model: Model, runtime: Runtime) -> Result<Artifact, ServeError> {
        let manifest = specialize::manifest_of(&model, &model.origin.display().to_string())?;
        Ok(Artifact { model, manifest, runtime, sessions: HashMap::new(), whole: None })
    }

    pub fn manifest(&self) -> &ArtifactManifest {
        &self.manifest
    }

    pub fn runtime(&self) -> Runtime {
        self.runtime
    }

    /// `name`'s session, created on first use and kept.
    pub fn task(&mut self, name: &str) -> Result<&mut TaskSession, ServeError> {
        if !self.sessions.contains_key(name) {
            let task = specialize::find_task(&self.manifest, name)?;
            let s = TaskSession::new(&self.model, &self.manifest, task, self.runtime)?;
            self.sessions.insert(name.to_string(), s);
        }
        // Present: inserted above when it was not.
        self.sessions.get_mut(name).ok_or_else(|| {
            ServeError::Specialize(SpecializeError::UnknownTask { task: name.into(), known: String::new() })
        })
    }

    /// Sessions created so far.
    pub fn open_sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Every task's scores for `x`, in the manifest's order. A shared backbone runs once for all
    /// heads (the whole artifact); an artifact that selects tasks by an input runs each task's
    /// session.
    pub fn run_all(&mut self, x: &Tensor) -> Result<Named, ServeError> {
        let tasks: Vec<ArtifactTask> = self.manifest.tasks.clone();
        if self.manifest.task_input.is_some() {
            return tasks.iter().map(|t| Ok((t.output.clone(), self.task(&t.name)?.run(x)?))).collect();
        }
        let context = |what: &str| format!("{what} the whole artifact in {}", self.runtime.name());
        if self.whole.is_none() {
            let s = self
                .runtime
                .session(&self.model, "artifact")
                .map_err(|source| ServeError::Runtime { context: context("loading"), source })?;
            self.whole = Some(s);
        }
        let Some(whole) = self.whole.as_mut() else { return Ok(Vec::new()) };
        let mut out = whole
            .run(&[(self.manifest.input.clone(), x.clone())])
            .map_err(|source| ServeError::Runtime { context: context("running"), source })?;
        tasks
            .iter()
            .map(|t| {
                let i = out
                    .iter()
                    .position(|(n, _)| *n == t.output)
                    .ok_or_else(|| ServeError::MissingOutput { task: t.name.clone(), output: t.output.clone() })?;
                Ok(out.swap_remove(i))
            })
            .collect()
    }
}
