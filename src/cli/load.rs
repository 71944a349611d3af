//! Loading inputs for commands, with the file named in every error.

use std::path::Path;

use anyhow::Context;

use crate::graph::index::validate;
use crate::onnx::Model;

/// Loads and validates a model; errors read "<file>: <problem>".
pub fn model(path: &Path) -> anyhow::Result<Model> {
    let m = Model::load(path)?;
    validate(m.graph()).with_context(|| path.display().to_string())?;
    if m.unknown_bytes > 0 {
        eprintln!(
            "warning: {}: {} bytes belong to fields newer than mtpack's ONNX schema (IR 14) and are not kept",
            path.display(),
            m.unknown_bytes
        );
    }
    Ok(m)
}

/// Saves a model atomically, naming the file on failure.
pub fn save(model: &Model, path: &Path) -> anyhow::Result<()> {
    model.save(path)?;
    Ok(())
}
