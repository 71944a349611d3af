//! A backbone exported for a batch of one ([`crate::graph::batch`]) is freed for batches,
//! then checked in ONNX Runtime before anything trains: two seeded images as one batch must
//! give what each gives alone through the model as exported. A model whose batch of one is
//! baked in beyond Reshape shapes (a constant token concatenated, an Expand to [1, ...]) is
//! refused, naming the input, rather than trained on wrong values.

use std::path::Path;

use super::{backbone_err, AdaptError};
use crate::graph::batch::{free_batch, FreedBatch};
use crate::onnx::{tensor_proto, tensor_type, Dim, Model};
use crate::runtime::ort_rt::OrtSession;
use crate::runtime::Backend;
use crate::tensor::{DType, Tensor};

/// Outputs of the batch and of each image alone may differ by this much relative to the
/// largest output value (float rounding of batched kernels).
const TOLERANCE: f64 = 1e-4;

/// `model` taking batches where it was exported for one image, with what was changed.
pub(super) fn free_fixed_batch(path: &Path, model: Model) -> Result<(Model, Option<FreedBatch>), AdaptError> {
    let Some((freed, what)) = free_batch(&model).map_err(|e| backbone_err(path, e))? else {
        return Ok((model, None));
    };
    batch_independent(&model, &freed, &what.input).map_err(|why| {
        AdaptError::Plan(format!(
            "{}: input '{}' is exported for a batch of 1, and the model does not compute each image of a \
             batch as it computes it alone ({why}); export it with a dynamic batch axis",
            path.display(),
            what.input
        ))
    })?;
    Ok((freed, Some(what)))
}

/// Ok when `freed` run on two seeded images gives, for every output, what `original` gives
/// for each image alone.
fn batch_independent(original: &Model, freed: &Model, input: &str) -> Result<(), String> {
    let v = original.graph().input.iter().find(|i| i.name() == input).ok_or("no such input")?;
    let Some((code, Some(dims))) = tensor_type(v) else { return Err("it declares no shape".into()) };
    if tensor_proto::dtype_of(code) != Some(DType::F32) {
        return Err(format!("the check feeds float32 images; the input is {}", tensor_proto::data_type_name(code)));
    }
    let shape = dims
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) if *n > 0 => Ok(*n as usize),
            d => Err(format!("its axis {d} is not a fixed size")),
        })
        .collect::<Result<Vec<usize>, String>>()?;
    let images: Vec<Tensor> = (0..2u64).map(|k| seeded(&shape, k)).collect();
    let err = |e: crate::runtime::RuntimeError| format!("{e:#}");
    let mut alone = OrtSession::from_bytes(&original.to_bytes(), "the backbone as exported").map_err(err)?;
    let mut each = Vec::new();
    for x in &images {
        each.push(alone.run(&[(input.to_string(), x.clone())]).map_err(err)?);
    }
    let mut batched = OrtSession::from_bytes(&freed.to_bytes(), "the backbone taking batches").map_err(err)?;
    let stacked = Tensor::concat_rows(&images.iter().collect::<Vec<_>>())?;
    let both = batched.run(&[(input.to_string(), stacked)]).map_err(|e| format!("on a batch of 2: {e:#}"))?;
    for (j, (name, got)) in both.iter().enumerate() {
        let parts: Vec<&Tensor> = each.iter().filter_map(|outs| outs.get(j).map(|(_, t)| t)).collect();
        let want: Vec<f64> = parts.iter().flat_map(|t| t.to_f64_vec()).collect();
        let one = parts.first().map(|t| t.shape()).unwrap_or_default();
        if one.first() != Some(&1) || got.shape().first() != Some(&2) || got.shape().get(1..) != one.get(1..) {
            return Err(format!("output '{name}' is {:?} for two images and {one:?} for one", got.shape()));
        }
        let got = got.to_f64_vec();
        let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        if worst > TOLERANCE * scale || got.iter().any(|v| v.is_nan()) {
            return Err(format!("output '{name}' differs by {worst:.3e} between the batch and each image alone"));
        }
    }
    Ok(())
}

/// An image of `shape` (batch 1) with seeded values in [0, 1).
fn seeded(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = crate::rng::Rng::new(0x6261_7463_6800 + seed);
    let n = shape.iter().product();
    let values = (0..n).map(|_| rng.uniform() as f32).collect();
    Tensor::F32(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(shape), values).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::build::{model, node, value_info};
    use crate::onnx::pb::GraphProto;

    /// x [1, 2, 3] -> Reshape [1, -1] -> Concat (axis 1) with `extra` [1, 2].
    fn fixed_batch_model(concat_constant: bool) -> Model {
        let i64s = |name: &str, v: &[i64]| {
            tensor_proto::from_tensor(name, &Tensor::I64(ndarray::Array1::from(v.to_vec()).into_dyn()))
        };
        let extra = Tensor::F32(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[1, 2]), 0.5));
        let mut nodes = vec![node("Reshape", "flat", &["x", "s"], &["y"], vec![])];
        if concat_constant {
            nodes = vec![
                node("Reshape", "flat", &["x", "s"], &["f"], vec![]),
                node("Concat", "cat", &["f", "extra"], &["y"], vec![crate::onnx::attr::make_int("axis", 1)]),
            ];
        }
        let graph = GraphProto {
            node: nodes,
            input: vec![value_info("x", DType::F32, Some(&[Dim::Fixed(1), Dim::Fixed(2), Dim::Fixed(3)]))],
            output: vec![value_info("y", DType::F32, None)],
            initializer: vec![i64s("s", &[1, -1]), tensor_proto::from_tensor("extra", &extra)],
            ..Default::default()
        };
        model(graph, 13)
    }

    #[test]
    fn a_model_whose_only_batch_is_in_reshapes_takes_batches() {
        let (m, freed) = free_fixed_batch(Path::new("m.onnx"), fixed_batch_model(false)).unwrap();
        assert_eq!(freed.map(|f| f.reshapes), Some(vec!["flat".to_string()]));
        assert_eq!(m.graph().input[0].name(), "x");
    }

    #[test]
    fn a_batch_baked_in_beyond_reshapes_is_refused_naming_the_input() {
        let Err(e) = free_fixed_batch(Path::new("m.onnx"), fixed_batch_model(true)) else {
            panic!("a constant concatenated per batch of one must be refused");
        };
        let msg = format!("{e:#}");
        assert!(msg.contains("m.onnx") && msg.contains("input 'x'") && msg.contains("dynamic batch axis"), "{msg}");
    }
}
