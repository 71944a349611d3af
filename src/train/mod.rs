//! Training-loop primitives the adaptation methods share: seeded mini-batches, optimizers
//! and schedules, cross-entropy, method hooks, the epoch loop, evaluation through ONNX Runtime,
//! and the frozen prefix computed once in ONNX Runtime.

mod adamw_in_place;
mod batches;
pub mod device_check;
pub mod eval;
pub mod hyper;
pub mod loss;
mod mixed;
pub mod optim;
pub mod prefix;
mod sgd_in_place;
mod trainer;

pub use batches::epoch_batches;
pub use hyper::{Hyper, OptimizerName, Resolved};
pub use mixed::train_epoch_mixed;
pub use optim::{OptimConfig, OptimKind, Optimizer, StepLr};
pub use trainer::{train_epoch, BatchCtx, EpochEnd, EpochPart, EpochRun, EpochStats, Hooks, NoHooks, Task};

use crate::engine::EngineError;
use crate::graph::GraphError;
use crate::runtime::RuntimeError;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error("{context}")]
    Candle {
        context: String,
        #[source]
        source: Box<candle_core::Error>,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("cannot write {path}")]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A state or setting that cannot be used, explained.
    #[error("{0}")]
    Invalid(String),
    /// The loss stopped being a number: the learning rate is too high for this network.
    #[error("loss became {value} at epoch {epoch}, step {step}; lower the learning rate")]
    Diverged { value: f64, epoch: u64, step: usize },
    /// A weight holds NaN or infinity after an epoch whose loss stayed finite (a ReLU or a
    /// max pool passes NaN on as 0, so the loss does not always show it).
    #[error("weight '{weight}' became non-finite in epoch {epoch}; lower the learning rate")]
    WeightsDiverged { weight: String, epoch: u64 },
    /// What was being done, and the error that stopped it.
    #[error("{context}")]
    Failed {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Wraps a candle error with what was being done.
/// Wraps an error with what was being done, keeping it as the source.
pub fn invalid<E: std::error::Error + Send + Sync + 'static>(
    context: impl Into<String>,
) -> impl FnOnce(E) -> TrainError {
    let context = context.into();
    move |e| TrainError::Failed { context, source: Box::new(e) }
}

pub(crate) fn candle(context: impl Into<String>) -> impl FnOnce(candle_core::Error) -> TrainError {
    let context = context.into();
    move |source| TrainError::Candle { context, source: Box::new(source) }
}
