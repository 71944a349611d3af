//! A BatchNormalization (with the clamp folded into it, if any) whose output only a grouped
//! Conv reads: the expand-then-depthwise pair of every MobileNet block, which the engine
//! runs as one step (see `ops::build_batch_norm_depthwise`), so that in training the
//! normalised activation need not be stored.

use std::collections::HashMap;

use super::clamp::Folded;
use super::{default_domain, View};
use crate::onnx::attr;
use crate::onnx::pb::GraphProto;

/// For each Conv node index, the index of the BatchNormalization feeding it: a
/// BatchNormalization with one output, read (after its folded clamp in `folded`) by that
/// Conv alone, as its data input; the Conv has groups and no bias.
pub fn batch_norm_convs(g: &GraphProto, folded: &HashMap<usize, Folded>) -> HashMap<usize, usize> {
    let view = View::new(g);
    let mut fed = HashMap::new();
    for (i, n) in g.node.iter().enumerate() {
        if n.op_type() != "BatchNormalization" || !default_domain(n) || n.output.len() != 1 {
            continue;
        }
        let last = match folded.get(&i) {
            Some(f) => g.node.get(f.clamp_node),
            None => Some(n),
        };
        let Some(out) = last.and_then(|l| l.output.first()) else { continue };
        let Some((j, conv)) = view.only_reader(out) else { continue };
        let grouped = attr::int_or(conv, "group", 1).is_ok_and(|groups| groups > 1);
        let biased = conv.input.get(2).is_some_and(|b| !b.is_empty());
        if conv.op_type() == "Conv" && default_domain(conv) && conv.input.first() == Some(out) && grouped && !biased {
            fed.insert(j, i);
        }
    }
    fed
}
