//! The `trainingkeys.v1` gRPC contract: generated messages, clients and
//! servers, the encoded file descriptor set for server reflection, and the
//! conversions between protobuf timestamps and `chrono` times.

/// Generated code of package `trainingkeys.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("trainingkeys.v1");
}

/// Encoded `FileDescriptorSet` of the contract (with its imports), for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/trainingkeys_descriptor.bin"));

/// The `google.rpc.ErrorInfo` domain of every error this project returns.
pub const ERROR_DOMAIN: &str = "trainingkeys.v1";

pub mod time;

pub use prost_types;
