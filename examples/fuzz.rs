//! The test suite's mutation fuzzing, for as long as asked: every reader (ONNX model,
//! dataset, plan, pack manifest, artifact with its manifest and probes) on mutations of the
//! committed fixtures and of a pack and artifact made from them, round after round with new
//! seeds, until the time is up. A panic stops the run with the seed and round to reproduce.
//!
//! Run: cargo run --release --example fuzz -- [--minutes M] [--seed S]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mtpack::adapt::Options;
use mtpack::fuzz::{self, mutate, Class};
use mtpack::methods::MethodKind;
use mtpack::pack::export::{export, sidecars, ExportOptions};
use mtpack::plan::Plan;
use mtpack::rng::Rng;

type Reader<'a> = (&'a str, Vec<u8>, Box<dyn Fn(&[u8]) -> Class + 'a>);

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1));
    let minutes: f64 = flag("--minutes").map(|s| s.parse()).transpose()?.unwrap_or(5.0);
    let first_seed: u64 = flag("--seed").map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir()?;
    let (pack, artifact) = pack_and_artifact(&root, dir.path())?;
    let (manifest, probes) = sidecars(&artifact);
    let scratch = dir.path().join("mutated.safetensors");
    let pack_manifest = std::fs::read(pack.join("manifest.json"))?;
    let mut readers: Vec<Reader> = vec![
        ("model", std::fs::read(root.join("fixtures/tiny/tiny_digits.onnx"))?, Box::new(fuzz::read_model)),
        (
            "dataset",
            std::fs::read(root.join("fixtures/digits/digits.safetensors"))?,
            Box::new(|b| fuzz::read_dataset(b, &scratch)),
        ),
        ("plan", std::fs::read(root.join("fixtures/plans/digits.toml"))?, Box::new(fuzz::read_plan)),
        ("pack manifest", pack_manifest, Box::new(|b| fuzz::read_pack_manifest(b, &pack))),
    ];
    let (artifact, manifest) = (&artifact, &manifest);
    for file in [artifact, manifest, &probes] {
        let original = std::fs::read(file)?;
        let verify = move |b: &[u8]| {
            let class = fuzz::verify_artifact(b, file, artifact, manifest);
            // Put the original back so the next case mutates one file only.
            let _ = std::fs::write(file, &original);
            class
        };
        let name = match file.extension().and_then(|e| e.to_str()) {
            Some("onnx") => "artifact",
            Some("json") => "artifact manifest",
            _ => "artifact probes",
        };
        readers.push((name, std::fs::read(file)?, Box::new(verify)));
    }
    let deadline = Instant::now() + Duration::from_secs_f64(minutes * 60.0);
    let mut counts = vec![[0usize; 3]; readers.len()];
    let mut round = 0u64;
    while Instant::now() < deadline {
        let seed = first_seed + round;
        for ((name, original, read), count) in readers.iter().zip(&mut counts) {
            let bytes = mutate(original, &mut Rng::new(seed));
            let class = catch_unwind(AssertUnwindSafe(|| read(&bytes)))
                .map_err(|_| anyhow::anyhow!("{name}: seed {seed} panicked"))?;
            // A plan or JSON may change harmlessly (a comment, a number); an artifact may not.
            if name.starts_with("artifact") && class == Class::Read && bytes != *original {
                eprintln!("note: {name}: seed {seed}: a changed file was read without complaint");
            }
            count[class as usize] += 1;
        }
        round += 1;
    }
    println!("{round} rounds from seed {first_seed}, no panic");
    println!("{:<18} {:>8} {:>8} {:>13}", "reader", "read", "refused", "check failed");
    for ((name, _, _), c) in readers.iter().zip(&counts) {
        println!("{name:<18} {:>8} {:>8} {:>13}", c[0], c[1], c[2]);
    }
    Ok(())
}

/// A PackNet pack of the committed plan (one epoch per task) and its exported artifact.
fn pack_and_artifact(root: &Path, dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let text = std::fs::read_to_string(root.join("fixtures/plans/digits.toml"))?;
    let mut plan = Plan::from_toml(&text).map_err(anyhow::Error::msg)?;
    plan.method = MethodKind::Packnet;
    plan.defaults.epochs = Some(1);
    plan.backbone = plan.backbone.map(|b| root.join(b));
    for t in &mut plan.tasks {
        t.dataset = root.join(&t.dataset);
    }
    let pack = dir.join("pack");
    let wait = mtpack::pack::lock::Wait::No;
    mtpack::adapt::run(&plan, &Options { pack: pack.clone(), extend: false, quiet: true, wait })?;
    let artifact = dir.join("artifact.onnx");
    export(&pack, &artifact, &ExportOptions::default())?;
    Ok((pack, artifact))
}
