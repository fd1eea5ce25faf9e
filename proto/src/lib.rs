//! The `cutover.v1` wire types and gRPC services: the only place they are
//! defined.
#![forbid(unsafe_code)]

pub mod v1 {
    #![allow(clippy::all)]
    tonic::include_proto!("cutover.v1");
}
