//! Fine-tuning: the backbone and the new head train on the new task's images; nothing
//! protects the old tasks. The baseline every other method is measured against.

use super::simple::Simple;
use super::{Spec, TrainingData};

pub const SPEC: Spec = Spec::plain(TrainingData::IMAGES, |_| {
    Simple::boxed(|name, ctx| ctx.head_params.contains(name) || ctx.backbone_params.contains(name))
});
