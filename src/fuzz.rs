//! Byte mutations for robustness testing of mtpack's readers (models, datasets, plans,
//! manifests, artifacts): the suite's seeded fuzz tests and `examples/fuzz.rs`, which runs
//! them for as long as asked, share them. Each mutation is one of the ways files break in
//! practice or by malice: a flipped bit, a cut, an inserted or duplicated chunk, bytes
//! zeroed, and a huge varint or length written over whatever was there.

use std::path::Path;

use crate::rng::Rng;

/// How a reader ended on one input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Read (and, for an artifact, verified).
    Read = 0,
    /// Refused with an error (exit code 2).
    Refused = 1,
    /// Read, but a check found a difference (exit code 1).
    CheckFailed = 2,
}

fn class<T, E>(r: Result<T, E>) -> Class {
    if r.is_ok() {
        Class::Read
    } else {
        Class::Refused
    }
}

/// An ONNX model as `adapt` reads a backbone: decoded, checked, weights made by nodes
/// folded, and a training engine built on it.
pub fn read_model(bytes: &[u8]) -> Class {
    let origin = Path::new("mutated.onnx");
    let read = || -> Result<(), Box<dyn std::error::Error>> {
        let m = crate::onnx::Model::from_bytes(bytes, origin)?;
        crate::graph::index::validate(m.graph())?;
        let (m, _) = crate::graph::materialize::weights_from_nodes(&m)?;
        let names = crate::graph::analysis::trainable_names(m.graph());
        let dev = candle_core::Device::Cpu;
        crate::engine::Engine::new(&m, &|n| names.contains(n), candle_core::DType::F32, &dev)?;
        Ok(())
    };
    class(read())
}

/// A dataset file, written to `scratch` and loaded.
pub fn read_dataset(bytes: &[u8], scratch: &Path) -> Class {
    if std::fs::write(scratch, bytes).is_err() {
        return Class::Refused;
    }
    class(crate::data::Dataset::load(scratch))
}

/// A TOML plan, parsed and validated.
pub fn read_plan(bytes: &[u8]) -> Class {
    let text = String::from_utf8_lossy(bytes);
    class(crate::plan::Plan::from_toml(&text).and_then(|p| p.validate()))
}

/// A pack's manifest written over `pack`'s, loaded and its file digests checked.
pub fn read_pack_manifest(bytes: &[u8], pack: &Path) -> Class {
    let pack = crate::pack::Pack::new(pack);
    if std::fs::write(pack.manifest_path(), bytes).is_err() {
        return Class::Refused;
    }
    class(pack.load_manifest().and_then(|m| pack.verify_files(&m)))
}

/// `file` (the artifact or one of its sidecars) replaced by `bytes`, then the artifact
/// verified as `mtpack verify` does.
pub fn verify_artifact(bytes: &[u8], file: &Path, model: &Path, manifest: &Path) -> Class {
    if std::fs::write(file, bytes).is_err() {
        return Class::Refused;
    }
    match crate::pack::verify::verify(model, Some(manifest)) {
        Err(_) => Class::Refused,
        Ok(r) if r.ok => Class::Read,
        Ok(_) => Class::CheckFailed,
    }
}

/// One to three mutations of `original`.
pub fn mutate(original: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = original.to_vec();
    for _ in 0..1 + rng.below(3) {
        mutate_once(&mut b, rng);
    }
    b
}

fn mutate_once(b: &mut Vec<u8>, rng: &mut Rng) {
    if b.is_empty() {
        b.push(rng.next_u64() as u8);
        return;
    }
    let at = rng.below(b.len());
    let span = (1 + rng.below(64)).min(b.len() - at);
    match rng.below(7) {
        0 => b[at] ^= 1 << rng.below(8),
        1 => b.truncate(at),
        2 => {
            let chunk: Vec<u8> = (0..span).map(|_| rng.next_u64() as u8).collect();
            b.splice(at..at, chunk);
        }
        3 => {
            let chunk = b[at..at + span].to_vec();
            b.splice(at..at, chunk);
        }
        4 => b[at..at + span].fill(0),
        // A varint of 2^63 - 1: protobuf lengths and tag values beyond any real file.
        5 => {
            let huge = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
            b.splice(at..(at + huge.len()).min(b.len()), huge);
        }
        // A little-endian u64 near the top: safetensors' header length, offsets in JSON.
        _ => {
            let huge = (u64::MAX - rng.below(1 << 16) as u64).to_le_bytes();
            b.splice(at..(at + huge.len()).min(b.len()), huge);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_change_the_bytes_and_are_reproducible() {
        let original: Vec<u8> = (0..200u8).collect();
        let (mut a, mut b) = (Rng::new(1), Rng::new(1));
        let changed = (0..100).filter(|_| mutate(&original, &mut a) != original).count();
        assert!(changed > 95, "{changed} of 100 mutations changed something");
        let (x, y) = (mutate(&original, &mut Rng::new(9)), mutate(&original, &mut Rng::new(9)));
        assert_eq!(x, y);
        let _ = mutate(&original, &mut b);
        assert!(!mutate(&[], &mut b).is_empty());
    }
}
