//! Feature extraction: only the new head trains, on features of the frozen backbone that the
//! runner computes once through ONNX Runtime and caches in the pack. Old tasks cannot be
//! forgotten; the new one gets what the frozen features allow.

use super::simple::Simple;
use super::{Inputs, Spec, Tasks, TrainingData};

pub const SPEC: Spec = Spec::plain(TrainingData { inputs: Inputs::FrozenFeatures, tasks: Tasks::Current }, |_| {
    Simple::boxed(|name, ctx| ctx.head_params.contains(name))
});
