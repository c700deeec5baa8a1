//! Generated code for `proto/example.proto`: the seed's `example.UserService`.
//!
//! The `.proto` file is compiled at build time by `protox` (a pure-Rust protobuf compiler) and
//! `tonic-prost-build`, so building this crate never needs `protoc`. [`FILE_DESCRIPTOR_SET`] is
//! the encoded descriptor set, ready for `tonic-reflection`.

/// Messages, client and server for the `example` protobuf package.
#[allow(missing_docs, unreachable_pub, missing_debug_implementations, clippy::all)]
pub mod example {
    tonic::include_proto!("example");
}

/// A streaming service for tests of proxies (`proto/feed.proto`): server streaming and
/// bidirectional calls.
#[allow(missing_docs, unreachable_pub, missing_debug_implementations, clippy::all)]
pub mod feed {
    tonic::include_proto!("feed");
}

/// Encoded `FileDescriptorSet` of `example.proto`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("example_descriptor");

pub use example::{GetUserRequest, GetUserResponse, user_service_client, user_service_server};
