//! AFL++ target: dataset files as mtpack reads them (see mtpack::fuzz::read_dataset).
fn main() {
    afl::fuzz!(|bytes: &[u8]| {
        let _ = mtpack::fuzz::read_dataset(
            bytes,
            &std::env::temp_dir().join(format!("mtpack-fuzz-{}.safetensors", std::process::id())),
        );
    });
}
