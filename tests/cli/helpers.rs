//! A small harness around the real binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn tiny() -> PathBuf {
    root().join("fixtures/tiny/tiny_digits.onnx")
}

pub fn digits() -> PathBuf {
    root().join("fixtures/digits/digits.safetensors")
}

/// A file fetched by `scripts/fetch.sh`; a missing one fails the test with the fix.
pub fn fetched(rel: &str) -> PathBuf {
    let p = root().join(".cache").join(rel);
    assert!(p.exists(), "{} is missing: run scripts/fetch.sh first", p.display());
    p
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Asserts the exit code, showing both streams when it differs.
    pub fn expect(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "exit code {} (wanted {code})\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }
}

pub fn mtpack<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_mtpack")).args(args).output().expect("the mtpack binary runs").into()
}

impl From<Output> for Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

pub fn p(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// Every file in a directory, for checking that a failed command wrote nothing.
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// Starts `mtpack args`, kills it (SIGKILL) once the pack's checkpoint records `epochs`
/// finished epochs, and waits for it.
pub fn kill_after_epochs(args: &[String], pack: &Path, epochs: u64) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mtpack")).args(args).spawn().expect("mtpack starts");
    let progress = pack.join("checkpoint/progress.json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let done = std::fs::read(&progress)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["epochs_done"].as_u64())
            .unwrap_or(0);
        if done >= epochs {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().expect("kill");
    child.wait().expect("wait");
}

/// Checks `value` against the subset of JSON Schema mtpack's schemas use: `type`,
/// `required`, `properties`, `additionalProperties: false`, `items`, `enum`, `const`.
/// Returns the first violation, with its JSON path.
pub fn schema_violation(schema: &serde_json::Value, value: &serde_json::Value, path: &str) -> Option<String> {
    use serde_json::Value;
    let type_ok = |t: &str| match t {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => value.is_i64() || value.is_u64(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => true,
    };
    match &schema["type"] {
        Value::String(t) if !type_ok(t) => return Some(format!("{path}: not {t}")),
        Value::Array(ts) if !ts.iter().any(|t| t.as_str().is_some_and(type_ok)) => {
            return Some(format!("{path}: none of {ts:?}"))
        }
        _ => {}
    }
    if let Some(options) = schema["enum"].as_array() {
        if !options.contains(value) {
            return Some(format!("{path}: {value} not in {options:?}"));
        }
    }
    if !schema["const"].is_null() && schema["const"] != *value {
        return Some(format!("{path}: {value} is not {}", schema["const"]));
    }
    if let (Some(obj), Some(props)) = (value.as_object(), schema["properties"].as_object()) {
        for r in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            if !obj.contains_key(r) {
                return Some(format!("{path}: missing {r}"));
            }
        }
        for (k, v) in obj {
            match props.get(k) {
                Some(s) => {
                    if let Some(e) = schema_violation(s, v, &format!("{path}.{k}")) {
                        return Some(e);
                    }
                }
                None if schema["additionalProperties"] == Value::Bool(false) => {
                    return Some(format!("{path}: unexpected {k}"))
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), value.as_array()) {
        for (i, v) in arr.iter().enumerate() {
            if let Some(e) = schema_violation(items, v, &format!("{path}[{i}]")) {
                return Some(e);
            }
        }
    }
    None
}

/// The JSON schema `schemas/<name>`.
pub fn schema(name: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(root().join("schemas").join(name)).expect("schema file"))
        .expect("schema JSON")
}

/// A task on the bundled digits: `NAME=DIGITS` plus `extra` options.
pub fn digits_task(name: &str, extra: &str) -> String {
    format!("{name}={}{extra}", p(&digits()))
}

/// A pack's manifest as JSON.
pub fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// Initializer bytes by name.
pub fn weights(model: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let m = mtpack::onnx::Model::load(model).unwrap();
    m.graph()
        .initializer
        .iter()
        .map(|t| (t.name().to_string(), mtpack::onnx::tensor_proto::to_tensor(t).unwrap().to_le_bytes()))
        .collect()
}

/// A PackNet pack of the built-in default sequence (one epoch per task) in `dir/pack`, and its
/// artifact exported to `dir/<artifact>`.
pub fn packnet_pack_and_artifact(dir: &Path, artifact: &str) -> (PathBuf, PathBuf) {
    let pack = dir.join("pack");
    mtpack(["adapt", "--method", "packnet", "--epochs", "1", "-o", p(&pack), "--quiet"]).expect(0);
    let artifact = dir.join(artifact);
    mtpack(["export", p(&pack), "-o", p(&artifact), "--quiet"]).expect(0);
    (pack, artifact)
}
