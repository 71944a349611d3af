//! The pipeline's layers, lowest first. A module uses only modules of lower layers (and
//! itself): the ONNX model is read, its graph cut, run by the runtimes or trained by the
//! engine, methods shape that training, a plan says what to learn, a pack keeps what was
//! learned, `adapt` runs a plan into a pack, and the tools around it (bench, report, cli)
//! sit on top. The test below reads every source file and holds each `crate::` path outside
//! unit tests to this order, so a reader tracing a plan or a method never climbs back up
//! (a unit test may check its layer with anything, such as running a graph in tract).

/// Modules by layer, lowest first; modules in one layer do not use each other.
pub const LAYERS: &[&[&str]] = &[
    // Where the process's work runs (rayon's pool), below the process settings that build it.
    &["parallel"],
    // Shared below everything (`report_chain` is the crate root's error formatter).
    &["tensor", "rng", "fsutil", "alloc", "interrupt", "report_chain"],
    &["store", "onnx"],
    &["data"],
    &["graph", "runtime"],
    &["engine"],
    &["train"],
    &["methods"],
    &["plan"],
    &["pack"],
    &["adapt", "serve"],
    &["bench", "fuzz"],
    &["report"],
    &["cli"],
];

/// The layer of a top-level module, None for one missing from the table.
pub fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The top-level modules a source names through `crate::`.
    fn used_modules(text: &str) -> Vec<String> {
        text.match_indices("crate::")
            .map(|(at, m)| {
                let rest = &text[at + m.len()..];
                rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>()
            })
            .filter(|name| !name.is_empty())
            .collect()
    }

    #[test]
    fn every_module_uses_only_lower_layers() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        let mut wrong = Vec::new();
        for file in files {
            let rel = file.strip_prefix(&src).unwrap();
            let top =
                rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
            if ["lib", "main", "layers"].contains(&top.as_str()) {
                continue;
            }
            let own = layer_of(&top).unwrap_or_else(|| panic!("src/{} is in no layer of LAYERS", rel.display()));
            let text = std::fs::read_to_string(&file).unwrap();
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or_default();
            for used in used_modules(code).into_iter().filter(|m| *m != top) {
                match layer_of(&used) {
                    Some(l) if l < own => {}
                    _ => wrong.push(format!("src/{} ({top}) uses crate::{used}", rel.display())),
                }
            }
        }
        wrong.sort();
        wrong.dedup();
        assert!(wrong.is_empty(), "imports against the layers:\n{}", wrong.join("\n"));
    }

    #[test]
    fn the_check_sees_an_upward_import() {
        assert_eq!(used_modules("use crate::adapt::plan::Hyper; crate::cli::parse_hw(v)"), ["adapt", "cli"]);
        assert!(layer_of("methods") < layer_of("adapt"));
        assert_eq!(layer_of("nowhere"), None);
    }
}
