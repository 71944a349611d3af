//! Mutation fuzzing of every reader, seeded so a failure reproduces: the committed fixtures
//! (an ONNX backbone, a dataset, a plan) and a pack and artifact made from them, with bytes
//! flipped, cut, inserted, duplicated, or overwritten with huge varints and lengths. No case
//! may panic; each must end in a result class (read / refused), and a changed artifact must
//! never verify. `examples/fuzz.rs` runs the same mutations for longer.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use mtpack::fuzz::{self, mutate, Class};
use mtpack::rng::Rng;

use crate::helpers::*;

/// Runs `read` on `cases` mutations of `original`; returns how many ended in each class.
fn fuzz(what: &str, original: &[u8], cases: usize, seed: u64, read: &dyn Fn(&[u8]) -> Class) -> [usize; 3] {
    let mut rng = Rng::new(seed);
    let mut counts = [0; 3];
    for case in 0..cases {
        let bytes = mutate(original, &mut rng);
        let class = catch_unwind(AssertUnwindSafe(|| read(&bytes)))
            .unwrap_or_else(|_| panic!("{what}: case {case} of seed {seed} panicked"));
        counts[class as usize] += 1;
    }
    eprintln!("{what}: {cases} mutations: {counts:?} (read, refused, check failed)");
    counts
}

#[test]
fn mutated_models_are_read_or_refused_never_a_panic() {
    let original = std::fs::read(tiny()).unwrap();
    let counts = fuzz("model", &original, 300, 1, &fuzz::read_model);
    assert!(counts[Class::Refused as usize] > 0, "the mutations must reach the checks");
}

#[test]
fn mutated_datasets_are_read_or_refused() {
    let original = std::fs::read(digits()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mutated.safetensors");
    let counts = fuzz("dataset", &original, 300, 2, &|b| fuzz::read_dataset(b, &file));
    assert!(counts[Class::Refused as usize] > 0);
}

#[test]
fn mutated_plans_are_read_or_refused() {
    let original = std::fs::read(root().join("fixtures/plans/digits.toml")).unwrap();
    assert_eq!(fuzz::read_plan(&original), Class::Read, "the fixture itself must be a valid plan");
    let counts = fuzz("plan", &original, 400, 3, &fuzz::read_plan);
    assert!(counts[Class::Refused as usize] > 0);
}

#[test]
fn mutated_packs_and_artifacts_are_refused_never_verified() {
    let dir = tempfile::tempdir().unwrap();
    let (pack, artifact) = packnet_pack_and_artifact(dir.path(), "artifact.onnx");
    let manifest_file = pack.join("manifest.json");
    let original = std::fs::read(&manifest_file).unwrap();
    fuzz("pack manifest", &original, 300, 4, &|b| fuzz::read_pack_manifest(b, &pack));
    std::fs::write(&manifest_file, &original).unwrap();

    // The artifact and each file beside it, mutated one at a time in a copy.
    let (manifest, probes) = mtpack::pack::export::sidecars(&artifact);
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let copy = |from: &Path| std::fs::copy(from, work.join(from.file_name().unwrap())).unwrap();
    for (file, cases, seed) in [(&artifact, 60, 5), (&manifest, 40, 6), (&probes, 40, 7)] {
        for f in [&artifact, &manifest, &probes] {
            copy(f);
        }
        let target = work.join(file.file_name().unwrap());
        let original = std::fs::read(file).unwrap();
        let model = work.join(artifact.file_name().unwrap());
        let sidecar = work.join(manifest.file_name().unwrap());
        let read = |b: &[u8]| fuzz::verify_artifact(b, &target, &model, &sidecar);
        let name = format!("artifact {}", file.file_name().unwrap().to_string_lossy());
        let mut rng = Rng::new(seed);
        for case in 0..cases {
            let bytes = mutate(&original, &mut rng);
            if bytes == original {
                continue;
            }
            let got = catch_unwind(AssertUnwindSafe(|| read(&bytes)))
                .unwrap_or_else(|_| panic!("{name}: case {case} of seed {seed} panicked"));
            assert_ne!(got, Class::Read, "{name}: case {case} of seed {seed} verified although it was changed");
        }
    }
}

#[test]
fn mutated_models_through_the_binary_exit_0_or_2() {
    let original = std::fs::read(tiny()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mutated.onnx");
    let mut rng = Rng::new(8);
    for case in 0..25 {
        std::fs::write(&file, mutate(&original, &mut rng)).unwrap();
        let r = mtpack(["inspect", p(&file), "--json"]);
        assert!(r.code == 0 || r.code == 2, "case {case}: exit {} (a crash or signal)\n{}", r.code, r.stderr);
        if r.code == 2 {
            assert!(r.stderr.contains("mutated.onnx"), "case {case}: the error must name the file: {}", r.stderr);
        }
    }
}
