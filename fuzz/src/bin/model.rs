//! AFL++ target: model files as mtpack reads them (see mtpack::fuzz::read_model).
fn main() {
    afl::fuzz!(|bytes: &[u8]| {
        let _ = mtpack::fuzz::read_model(bytes);
    });
}
