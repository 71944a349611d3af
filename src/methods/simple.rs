//! Finetune, feature extraction and joint training: no state, no extra loss.
//!
//! - finetune: the backbone and the new head train; nothing protects old tasks.
//! - feature-extract: only the new head trains; the runner feeds it features of the frozen
//!   backbone computed once through ONNX Runtime.
//! - joint: like finetune, but the runner interleaves batches of every task seen so far, and
//!   all their heads train.

use std::collections::HashMap;

use candle_core::Tensor;

use super::{Method, MethodKind, TaskCtx};
use crate::engine::Engine;
use crate::train::{Hooks, TrainError};

pub struct Simple {
    kind: MethodKind,
    masks: HashMap<String, Tensor>,
}

impl Simple {
    pub fn new(kind: MethodKind) -> Simple {
        Simple { kind, masks: HashMap::new() }
    }
}

impl Hooks for Simple {
    fn grad_masks(&self) -> &HashMap<String, Tensor> {
        &self.masks
    }
}

impl Method for Simple {
    fn kind(&self) -> MethodKind {
        self.kind
    }

    fn trainable(&self, name: &str, ctx: &TaskCtx) -> bool {
        match self.kind {
            MethodKind::FeatureExtract => ctx.head_params.contains(name),
            MethodKind::Joint => {
                ctx.head_params.contains(name)
                    || ctx.backbone_params.contains(name)
                    || ctx.old_head_params.contains(name)
            }
            _ => ctx.head_params.contains(name) || ctx.backbone_params.contains(name),
        }
    }

    fn hooks(&mut self, _epoch: u64, _lr: f64, _engine: &Engine, _ctx: &TaskCtx) -> Result<&mut dyn Hooks, TrainError> {
        Ok(self)
    }
}
