//! Compiles `example.proto` with `protox` (pure Rust), so no `protoc` is needed on any machine.

use std::{env, path::PathBuf};

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=example.proto");
    let fds = protox::compile(["example.proto"], ["."])?;
    // compile_fds does not write the descriptor set; reflection needs it, so write it here.
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("example_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    // The streaming test service, kept out of the demo's reflection descriptor.
    println!("cargo:rerun-if-changed=feed.proto");
    tonic_prost_build::configure().compile_fds(protox::compile(["feed.proto"], ["."])?)?;
    Ok(())
}
