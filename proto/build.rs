//! Generates the medfl.v1 tonic/prost code from `proto/` with protox, a pure-Rust
//! protobuf compiler, so a fresh machine needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "proto/medfl/v1/medfl.proto";
    let trainer = "proto/medfl/trainer/v1/trainer.proto";
    println!("cargo:rerun-if-changed={file}");
    println!("cargo:rerun-if-changed={trainer}");
    let descriptors = protox::compile([file], ["proto"])?;
    let trainer_descriptors = protox::compile([trainer], ["proto"])?;
    // The descriptors themselves, for tests that cover every RPC the protocol has.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("medfl_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .codec_path("crate::codec::StrictCodec")
        // Tensor chunks are `Bytes`: decoded as slices of the received buffer (no copy),
        // and one encoded model shared by every site's download stream.
        .bytes(".medfl.v1.DataChunk.values")
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    // The local trainer protocol: messages only (framed on stdin/stdout, no gRPC).
    tonic_prost_build::configure()
        .bytes(".medfl.trainer.v1.Chunk.data")
        .build_client(false)
        .build_server(false)
        .compile_fds(trainer_descriptors)?;
    Ok(())
}
