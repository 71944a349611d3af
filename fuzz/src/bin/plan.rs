//! AFL++ target: plan files as mtpack reads them (see mtpack::fuzz::read_plan).
fn main() {
    afl::fuzz!(|bytes: &[u8]| {
        let _ = mtpack::fuzz::read_plan(bytes);
    });
}
