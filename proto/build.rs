//! Generates the tonic/prost code for every .proto file under `proto/` (STYLE.md §4: one place).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/rlhf/v1/common.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
