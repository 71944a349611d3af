//! Joint training: like fine-tuning, but every batch mixes the data of all tasks so far (see
//! `train::mixed`) and all their heads train. Needs the old data; the upper bound the
//! methods that do without it are compared with.

use super::simple::Simple;
use super::{Inputs, Spec, Tasks, TrainingData};

pub const SPEC: Spec = Spec::plain(TrainingData { inputs: Inputs::Images, tasks: Tasks::AllSoFar }, |_| {
    Simple::boxed(|name, ctx| {
        ctx.head_params.contains(name) || ctx.backbone_params.contains(name) || ctx.old_head_params.contains(name)
    })
});
