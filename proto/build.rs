//! Generates the tonic/prost code for every .proto file under `proto/` (STYLE.md §4: one place),
//! and the encoded descriptor set that server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut protos: Vec<PathBuf> = std::fs::read_dir("proto/rlhf/v1")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "proto"))
        .collect();
    protos.sort();
    println!("cargo:rerun-if-changed=proto/rlhf/v1");
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .file_descriptor_set_path(out_dir.join("rlhf_v1_descriptor.bin"))
        .compile_protos(&protos, &[PathBuf::from("proto")])?;
    Ok(())
}
