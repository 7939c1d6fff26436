//! Generates the peer protocol's code from `proto/`. protoc comes from `$PROTOC` when set,
//! otherwise from the vendored binary of protoc-bin-vendored.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    // A forwarded state is the owner's shared encoded body: `Bytes` lets every follower's
    // update reference it instead of copying it.
    config.bytes([".xdsrelay.peer.v1.KeyUpdate.response", ".xdsrelay.peer.v1.Candidate.response"]);
    match std::env::var_os("PROTOC") {
        Some(protoc) => config.protoc_executable(protoc),
        None => config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?),
    };
    tonic_prost_build::configure().build_client(true).build_server(true).compile_with_config(
        config,
        &["proto/xdsrelay/peer/v1/peer.proto"],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    Ok(())
}
