//! One task's model cut from the multi-task artifact: the task selector becomes a constant and
//! only that task's output stays, so a runtime folds the mask unpacking and the per-task
//! BatchNorm gathering once, when it loads the model, instead of on every call.

use super::artifact::{self, ArtifactManifest, ArtifactTask};
use crate::graph::{masks, GraphError, Patch};
use crate::onnx::{tensor_proto, Model};
use crate::tensor::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum SpecializeError {
    #[error("{model} has no mtpack manifest in its metadata; was it written by `mtpack export`?")]
    NoManifest { model: String },
    #[error("the manifest embedded in {model} is not an artifact manifest")]
    Manifest {
        model: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("no task '{task}' in the artifact; its tasks: {known}")]
    UnknownTask { task: String, known: String },
    #[error("task '{task}' has no task value in the manifest, yet the artifact selects tasks by an input")]
    NoTaskValue { task: String },
    #[error("task '{task}': the artifact has no output '{output}'")]
    MissingOutput { task: String, output: String },
    #[error("specialising the artifact for task '{task}'")]
    Graph {
        task: String,
        #[source]
        source: GraphError,
    },
}

/// The manifest embedded in an artifact.
pub fn manifest_of(model: &Model, origin: &str) -> Result<ArtifactManifest, SpecializeError> {
    let text = artifact::embedded(model).ok_or_else(|| SpecializeError::NoManifest { model: origin.to_string() })?;
    serde_json::from_str(text).map_err(|source| SpecializeError::Manifest { model: origin.to_string(), source })
}

/// The task called `name`, or an error listing the tasks there are.
pub fn find_task<'a>(m: &'a ArtifactManifest, name: &str) -> Result<&'a ArtifactTask, SpecializeError> {
    m.tasks.iter().find(|t| t.name == name).ok_or_else(|| SpecializeError::UnknownTask {
        task: name.to_string(),
        known: m.tasks.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", "),
    })
}

/// `task`'s model: the `task` input (when the artifact has one) fixed to the task's value and
/// every other output, with what only it needed, removed. Runs like the artifact fed that
/// task value, with one input.
pub fn specialize(model: &Model, m: &ArtifactManifest, task: &ArtifactTask) -> Result<Model, SpecializeError> {
    let graph_error = |source| SpecializeError::Graph { task: task.name.clone(), source };
    let Some(output) = model.graph().output.iter().find(|o| o.name() == task.output) else {
        return Err(SpecializeError::MissingOutput { task: task.name.clone(), output: task.output.clone() });
    };
    let mut patch = Patch::new();
    patch.set_outputs(vec![output.clone()]);
    if let Some(input) = &m.task_input {
        let value = task.task_value.ok_or_else(|| SpecializeError::NoTaskValue { task: task.name.clone() })?;
        let t = Tensor::I64(ndarray::arr1(&[value]).into_dyn());
        patch.fix_input(tensor_proto::from_tensor(input, &t));
        // The gate that turns the output to NaN under other task values is open for this one;
        // left in, it would stay as a multiplication by one after folding.
        let ungated = masks::ungated(&task.output);
        if model.graph().node.iter().any(|n| n.output.contains(&ungated)) {
            patch.remove_producer(&task.output).rename_tensor(&ungated, &task.output);
        }
    }
    let mut out = patch.apply(model).map_err(graph_error)?;
    // The multi-task manifest describes a file with every task; this model is not that file.
    out.proto.metadata_props.retain(|p| p.key() != artifact::METADATA_KEY);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::masks::TASK_INPUT;
    use crate::onnx::attr::make_int;
    use crate::onnx::build::{model, node, value_info};
    use crate::onnx::pb::GraphProto;
    use crate::runtime::tract_rt::TractSession;
    use crate::runtime::Backend;
    use crate::tensor::DType;

    /// a = x * w[task], b = x + w[task]: a stand-in for per-task parameters gathered by task.
    fn two_task_model() -> (Model, ArtifactManifest) {
        let w = Tensor::F32(ndarray::arr2(&[[2.0f32, 3.0], [5.0, 7.0]]).into_dyn());
        let graph = GraphProto {
            node: vec![
                node("Gather", "pick", &["w", TASK_INPUT], &["row"], vec![make_int("axis", 0)]),
                node("Mul", "a", &["x", "row"], &["a/logits"], vec![]),
                node("Add", "b", &["x", "row"], &["b/logits"], vec![]),
            ],
            input: vec![value_info("x", DType::F32, None), value_info(TASK_INPUT, DType::I64, None)],
            output: vec![value_info("a/logits", DType::F32, None), value_info("b/logits", DType::F32, None)],
            initializer: vec![tensor_proto::from_tensor("w", &w)],
            ..Default::default()
        };
        let json = serde_json::json!({
            "schema": artifact::ARTIFACT_SCHEMA, "mtpack_version": "test", "backbone_source": "b",
            "backbone_sha256": "0", "method": "packnet", "method_params": {}, "plan": {},
            "design": artifact::Design::TaskMasks, "input": "x", "input_type": "float32",
            "tasks": [task_json("a", 0), task_json("b", 1)],
            "task_input": TASK_INPUT, "extra_outputs": [], "columns": [], "rows": [],
            "accuracy_matrix": [], "metrics": {"average_accuracy": 0.0, "bwt": 0.0, "forgetting": 0.0},
            "tensors": {}, "probes": {"file": "p", "sha256": "0", "count": 0, "tolerance": 1e-4},
            "verified": {"tract_max_abs_diff": 0.0, "ort_max_abs_diff": 0.0, "accuracy_matches_pack": true}
        });
        (model(graph, 13), serde_json::from_value(json).unwrap())
    }

    fn task_json(name: &str, value: i64) -> serde_json::Value {
        serde_json::json!({"name": name, "output": format!("{name}/logits"), "task_value": value,
            "classes": 2, "labels": ["0", "1"], "preprocessing": {}, "pixel_max": 1.0, "accuracy": null})
    }

    #[test]
    fn the_task_input_becomes_a_constant_and_other_outputs_go() {
        let (model, m) = two_task_model();
        let b = specialize(&model, &m, find_task(&m, "b").unwrap()).unwrap();
        let g = b.graph();
        assert_eq!(g.input.iter().map(|i| i.name()).collect::<Vec<_>>(), ["x"]);
        assert_eq!(g.output.iter().map(|o| o.name()).collect::<Vec<_>>(), ["b/logits"]);
        let task = g.initializer.iter().find(|t| t.name() == TASK_INPUT).unwrap();
        assert_eq!(tensor_proto::to_tensor(task).unwrap(), Tensor::I64(ndarray::arr1(&[1i64]).into_dyn()));
        assert!(g.node.iter().all(|n| n.op_type() != "Mul"), "task a's output is pruned");
    }

    #[test]
    fn a_specialised_model_computes_what_the_artifact_does_with_that_task_value() {
        let (model, m) = two_task_model();
        let x = Tensor::F32(ndarray::arr2(&[[1.0f32, 10.0]]).into_dyn());
        let mut whole = TractSession::from_bytes(&model.to_bytes(), "artifact").unwrap();
        for (i, t) in m.tasks.iter().enumerate() {
            let feed = [
                ("x".to_string(), x.clone()),
                (TASK_INPUT.to_string(), Tensor::I64(ndarray::arr1(&[i as i64]).into_dyn())),
            ];
            let want = whole.run(&feed).unwrap().into_iter().find(|(n, _)| *n == t.output).unwrap();
            let one = specialize(&model, &m, t).unwrap();
            let got = TractSession::from_bytes(&one.to_bytes(), "task").unwrap().run(&feed[..1]).unwrap();
            assert_eq!(got, vec![want], "task {}", t.name);
        }
    }

    #[test]
    fn an_unknown_task_names_the_known_ones() {
        let (_, m) = two_task_model();
        let e = find_task(&m, "c").unwrap_err().to_string();
        assert!(e.contains("'c'") && e.contains("a, b"), "{e}");
    }
}
