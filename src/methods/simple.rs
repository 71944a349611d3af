//! The methods without state or extra loss (finetune, feature-extract, joint) differ only in
//! what trains and what the runner feeds them (their `Spec`); this is their `Method`.

use std::collections::HashMap;

use candle_core::Tensor;

use super::{Method, TaskCtx};
use crate::engine::Engine;
use crate::train::{Hooks, TrainError};

pub struct Simple {
    trains: fn(&str, &TaskCtx) -> bool,
    masks: HashMap<String, Tensor>,
}

impl Simple {
    /// A method that trains the initializers `trains` accepts.
    pub fn boxed(trains: fn(&str, &TaskCtx) -> bool) -> Box<dyn Method> {
        Box::new(Simple { trains, masks: HashMap::new() })
    }
}

impl Hooks for Simple {
    fn grad_masks(&self) -> &HashMap<String, Tensor> {
        &self.masks
    }
}

impl Method for Simple {
    fn trainable(&self, name: &str, ctx: &TaskCtx) -> bool {
        (self.trains)(name, ctx)
    }

    fn hooks(&mut self, _epoch: u64, _lr: f64, _engine: &Engine, _ctx: &TaskCtx) -> Result<&mut dyn Hooks, TrainError> {
        Ok(self)
    }
}
