//! `mtpack verify`: recompute every tensor digest of an exported model, check the manifest
//! and the probes file, and run the probes in tract (and ONNX Runtime when it is available).

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::artifact::{self, ArtifactManifest};
use super::specialize::specialize;
use crate::onnx::{Model, OnnxError};
use crate::runtime::Runtime;
use crate::runtime::{compare, Backend, Named};
use crate::store;
use crate::tensor::Tensor;

#[derive(Debug, Serialize)]
pub struct OutputCheck {
    pub output: String,
    pub runtime: &'static str,
    /// Set when the check ran the task's specialised model (the task selector a constant,
    /// other outputs removed) rather than the whole artifact.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    pub max_abs_diff: f64,
    pub ok: bool,
}

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub schema: &'static str,
    pub model: String,
    pub tensors_checked: usize,
    pub outputs: Vec<OutputCheck>,
    /// Everything that did not hold, each naming the tensor, file or output.
    pub problems: Vec<String>,
    pub ok: bool,
}

/// Verifies `model_path`. An unreadable model is an `Err` (exit 2); anything that does not
/// match is a problem in the report (exit 1).
pub fn verify(model_path: &Path, manifest_path: Option<&Path>) -> Result<VerifyReport, OnnxError> {
    let model = Model::load(model_path)?;
    let mut problems = Vec::new();
    let embedded = artifact::embedded(&model).map(str::to_string);
    let external = manifest_path
        .map(|p| std::fs::read_to_string(p).map_err(|e| format!("cannot read manifest {}: {e}", p.display())));
    let text = match (&external, &embedded) {
        (Some(Ok(ext)), Some(emb)) => {
            let parsed = |t: &str| serde_json::from_str::<serde_json::Value>(t).ok();
            if ext.trim() != emb.trim() && parsed(ext).is_none_or(|e| Some(e) != parsed(emb)) {
                problems.push("the manifest file differs from the manifest embedded in the model".to_string());
            }
            Some(ext.clone())
        }
        (Some(Ok(ext)), None) => Some(ext.clone()),
        (Some(Err(e)), _) => {
            problems.push(e.clone());
            embedded.clone()
        }
        (None, Some(emb)) => Some(emb.clone()),
        (None, None) => {
            problems.push("no manifest: none embedded in the model and none given with --manifest".into());
            None
        }
    };
    let manifest: Option<ArtifactManifest> = text.and_then(|t| match serde_json::from_str(&t) {
        Ok(m) => Some(m),
        Err(e) => {
            problems.push(format!("the manifest is not a valid artifact manifest: {e}"));
            None
        }
    });
    let mut report = VerifyReport {
        schema: "mtpack.verify/1",
        model: model_path.display().to_string(),
        tensors_checked: 0,
        outputs: Vec::new(),
        problems,
        ok: false,
    };
    if let Some(m) = &manifest {
        check_tensors(&model, m, &mut report)?;
        let dir = model_path.parent().unwrap_or(Path::new(".")).to_path_buf();
        check_probes(&model, m, &dir.join(&m.probes.file), &mut report);
    }
    report.ok = report.problems.is_empty();
    Ok(report)
}

fn check_tensors(model: &Model, m: &ArtifactManifest, r: &mut VerifyReport) -> Result<(), OnnxError> {
    let actual = artifact::tensor_digests(model)?;
    r.tensors_checked = actual.len();
    for (name, want) in &m.tensors {
        match actual.get(name) {
            None => r.problems.push(format!("tensor '{name}' is in the manifest but not in the model")),
            Some(got) if got != want => {
                r.problems.push(format!("tensor '{name}': sha256 {got} differs from the manifest's {want}"))
            }
            Some(_) => {}
        }
    }
    for name in actual.keys().filter(|n| !m.tensors.contains_key(*n)) {
        r.problems.push(format!("tensor '{name}' is in the model but not in the manifest"));
    }
    Ok(())
}

fn check_probes(model: &Model, m: &ArtifactManifest, file: &PathBuf, r: &mut VerifyReport) {
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) => return r.problems.push(format!("probes {}: {e}", file.display())),
    };
    let sha = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&bytes));
    if sha != m.probes.sha256 {
        r.problems.push(format!(
            "probes {}: sha256 {sha} differs from the manifest's {}",
            file.display(),
            m.probes.sha256
        ));
        return;
    }
    let (mut t, _) = match store::from_bytes(&bytes, file) {
        Ok(v) => v,
        Err(e) => return r.problems.push(crate::report_chain(&e)),
    };
    let Some(input) = t.remove("input") else {
        return r.problems.push(format!("probes {}: no 'input'", file.display()));
    };
    let task = t.remove("task");
    let expected: Vec<(String, crate::tensor::Tensor)> = {
        let mut v: Vec<_> =
            t.into_iter().filter_map(|(k, v)| k.strip_prefix("expected/").map(|n| (n.to_string(), v))).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let groups = match probe_groups(m, input, task, expected) {
        Ok(g) => g,
        Err(e) => return r.problems.push(format!("probes {}: {e}", file.display())),
    };
    let mut kinds = Vec::new();
    for kind in [Runtime::Tract, Runtime::Ort] {
        let mut rt = match kind.session(model, "artifact") {
            Ok(s) => s,
            // ONNX Runtime joins when its library is present; tract alone is the verifier.
            Err(_) if kind == Runtime::Ort => continue,
            Err(e) => {
                r.problems.push(format!("tract cannot load the model: {}", crate::report_chain(&e)));
                continue;
            }
        };
        for (feed, expected) in &groups {
            run_group(rt.as_mut(), feed, expected, m.probes.tolerance, None, r);
        }
        kinds.push(kind);
    }
    check_specialised(model, m, &groups, &kinds, r);
}

/// Every task's specialised model must reproduce the probes of its output, in every runtime
/// the whole artifact ran in.
fn check_specialised(
    model: &Model,
    m: &ArtifactManifest,
    groups: &[(Named, Named)],
    kinds: &[Runtime],
    r: &mut VerifyReport,
) {
    for task in &m.tasks {
        let Some((feed, expected)) = groups.iter().find(|(_, e)| e.iter().any(|(o, _)| *o == task.output)) else {
            r.problems.push(format!("task '{}': no probes of its output '{}'", task.name, task.output));
            continue;
        };
        let feed: Named = feed.iter().filter(|(n, _)| *n == m.input).cloned().collect();
        let expected: Named = expected.iter().filter(|(o, _)| *o == task.output).cloned().collect();
        let one = match specialize(model, m, task) {
            Ok(one) => one,
            Err(e) => {
                r.problems.push(format!("task '{}': {}", task.name, crate::report_chain(&e)));
                continue;
            }
        };
        for &kind in kinds {
            match kind.session(&one, &format!("task '{}'", task.name)) {
                Ok(mut s) => run_group(s.as_mut(), &feed, &expected, m.probes.tolerance, Some(&task.name), r),
                Err(e) => {
                    r.problems.push(format!("task '{}' in {}: {}", task.name, kind.name(), crate::report_chain(&e)))
                }
            }
        }
    }
}

/// Splits the probes by `task` value: each group's feed and the outputs read with it.
fn probe_groups(
    m: &ArtifactManifest,
    input: Tensor,
    task: Option<Tensor>,
    expected: Vec<(String, Tensor)>,
) -> Result<Vec<(Named, Named)>, String> {
    let (Some(task_input), Some(task)) = (&m.task_input, task) else {
        return Ok(vec![(vec![(m.input.clone(), input)], expected)]);
    };
    let Tensor::I64(task) = task else { return Err("'task' is not int64".into()) };
    let value_of = |output: &str| -> Option<i64> {
        m.tasks
            .iter()
            .find(|t| t.output == output)
            .and_then(|t| t.task_value)
            .or_else(|| m.extra_outputs.iter().any(|o| o == output).then_some(m.extra_outputs_task_value).flatten())
    };
    if let Some((o, _)) = expected.iter().find(|(o, _)| value_of(o).is_none()) {
        return Err(format!("expected output '{o}' has no task value in the manifest"));
    }
    let mut values: Vec<i64> = task.iter().copied().collect();
    values.dedup();
    let mut groups = Vec::new();
    for v in values {
        let rows: Vec<usize> = task.iter().enumerate().filter(|(_, &t)| t == v).map(|(i, _)| i).collect();
        let x = input.select_rows(&rows).map_err(|e| format!("probe rows of task {v}: {e}"))?;
        let exp: Named = expected.iter().filter(|(o, _)| value_of(o) == Some(v)).cloned().collect();
        let feed = vec![(m.input.clone(), x), (task_input.clone(), Tensor::I64(ndarray::arr1(&[v]).into_dyn()))];
        groups.push((feed, exp));
    }
    Ok(groups)
}

fn run_group(
    rt: &mut dyn Backend,
    feed: &Named,
    expected: &Named,
    tolerance: f64,
    task: Option<&str>,
    r: &mut VerifyReport,
) {
    let name = rt.name();
    let which = task.map(|t| format!(" (task '{t}' specialised)")).unwrap_or_default();
    match rt.run(feed).and_then(|out| compare(expected, &out)) {
        Ok(diffs) => {
            for (output, d) in diffs {
                let ok = d <= tolerance;
                if !ok {
                    r.problems.push(format!(
                        "output '{output}' in {name}{which}: differs from the expected probe outputs by {d:.3e}"
                    ));
                }
                let task = task.map(str::to_string);
                r.outputs.push(OutputCheck { output, runtime: name, task, max_abs_diff: d, ok });
            }
        }
        Err(e) => r.problems.push(format!("{name}{which}: {}", crate::report_chain(&e))),
    }
}
