//! Run with `scripts/gen_onnx_proto.sh`; needs `protoc` on PATH.
fn main() -> std::io::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = root.join("src/onnx/pb");
    std::fs::create_dir_all(&out)?;
    prost_build::Config::new()
        .out_dir(&out)
        .compile_protos(&[root.join("schemas/onnx.proto")], &[root.join("schemas")])?;
    Ok(())
}
