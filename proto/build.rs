//! Compiles `trainingkeys/v1/*.proto` with protox (pure Rust: no protoc needed)
//! and writes the file descriptor set that server reflection serves.

use prost::Message as _;

const PROTOS: &[&str] = &[
    "trainingkeys/v1/enrollment.proto",
    "trainingkeys/v1/key_issuance.proto",
    "trainingkeys/v1/redemption.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("trainingkeys_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
