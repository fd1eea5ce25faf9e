//! Compiles `cutover/v1/*.proto` and etcd's v3 API (`etcd/`, clients only)
//! with the pure-Rust `protox`, so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "cutover/v1/agent.proto",
        "cutover/v1/agent_state.proto",
        "cutover/v1/operator.proto",
        "cutover/v1/server.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;

    let etcd = ["etcd/rpc.proto", "etcd/kv.proto", "etcd/auth.proto"];
    for file in etcd {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(etcd, ["etcd"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(descriptors)?;
    Ok(())
}
