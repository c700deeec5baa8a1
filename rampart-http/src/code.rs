//! gRPC status codes, without depending on tonic.

use std::fmt;

/// A gRPC status code (the numbering of `grpc/status.proto`). The same variants as
/// `tonic::Code`, into which it converts (feature `grpc`), so an HTTP-only build needs no tonic.
///
/// ```
/// use rampart_http::GrpcCode;
///
/// assert_eq!(GrpcCode::from_i32(8), GrpcCode::ResourceExhausted);
/// assert_eq!(GrpcCode::Unavailable.as_i32(), 14);
/// assert_eq!(GrpcCode::from_i32(99), GrpcCode::Unknown); // out of range, as gRPC says
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GrpcCode {
    /// 0: not an error.
    Ok,
    /// 1: the operation was cancelled, typically by the caller.
    Cancelled,
    /// 2: an unknown error.
    Unknown,
    /// 3: the client specified an invalid argument.
    InvalidArgument,
    /// 4: the deadline expired before the operation could complete.
    DeadlineExceeded,
    /// 5: some requested entity was not found.
    NotFound,
    /// 6: the entity a client tried to create already exists.
    AlreadyExists,
    /// 7: the caller may not execute the operation.
    PermissionDenied,
    /// 8: some resource has been exhausted (a rate limit, a quota).
    ResourceExhausted,
    /// 9: the system is not in a state required for the operation.
    FailedPrecondition,
    /// 10: the operation was aborted, typically by a concurrency conflict (a busy lock).
    Aborted,
    /// 11: the operation was attempted past the valid range.
    OutOfRange,
    /// 12: the operation is not implemented or not supported.
    Unimplemented,
    /// 13: an internal error.
    Internal,
    /// 14: the service is currently unavailable; retrying may help.
    Unavailable,
    /// 15: unrecoverable data loss or corruption.
    DataLoss,
    /// 16: the request lacks valid authentication credentials.
    Unauthenticated,
}

const CODES: [GrpcCode; 17] = [
    GrpcCode::Ok,
    GrpcCode::Cancelled,
    GrpcCode::Unknown,
    GrpcCode::InvalidArgument,
    GrpcCode::DeadlineExceeded,
    GrpcCode::NotFound,
    GrpcCode::AlreadyExists,
    GrpcCode::PermissionDenied,
    GrpcCode::ResourceExhausted,
    GrpcCode::FailedPrecondition,
    GrpcCode::Aborted,
    GrpcCode::OutOfRange,
    GrpcCode::Unimplemented,
    GrpcCode::Internal,
    GrpcCode::Unavailable,
    GrpcCode::DataLoss,
    GrpcCode::Unauthenticated,
];

impl GrpcCode {
    /// The code numbered `code`; a number gRPC does not define is [`GrpcCode::Unknown`].
    pub fn from_i32(code: i32) -> Self {
        usize::try_from(code).ok().and_then(|i| CODES.get(i).copied()).unwrap_or(Self::Unknown)
    }

    /// The code's number, as sent in `grpc-status`.
    pub fn as_i32(self) -> i32 {
        self as i32
    }

    /// The code's name in `status.proto` (`RESOURCE_EXHAUSTED`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Ok => "OK",
            Self::Cancelled => "CANCELLED",
            Self::Unknown => "UNKNOWN",
            Self::InvalidArgument => "INVALID_ARGUMENT",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Self::NotFound => "NOT_FOUND",
            Self::AlreadyExists => "ALREADY_EXISTS",
            Self::PermissionDenied => "PERMISSION_DENIED",
            Self::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Self::FailedPrecondition => "FAILED_PRECONDITION",
            Self::Aborted => "ABORTED",
            Self::OutOfRange => "OUT_OF_RANGE",
            Self::Unimplemented => "UNIMPLEMENTED",
            Self::Internal => "INTERNAL",
            Self::Unavailable => "UNAVAILABLE",
            Self::DataLoss => "DATA_LOSS",
            Self::Unauthenticated => "UNAUTHENTICATED",
        }
    }
}

impl fmt::Display for GrpcCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(feature = "grpc")]
impl From<GrpcCode> for tonic::Code {
    fn from(code: GrpcCode) -> Self {
        tonic::Code::from_i32(code.as_i32())
    }
}

#[cfg(feature = "grpc")]
impl From<tonic::Code> for GrpcCode {
    fn from(code: tonic::Code) -> Self {
        GrpcCode::from_i32(code as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip() {
        for (i, code) in CODES.iter().enumerate() {
            assert_eq!(code.as_i32(), i32::try_from(i).unwrap());
            assert_eq!(GrpcCode::from_i32(code.as_i32()), *code);
        }
        assert_eq!(GrpcCode::from_i32(-1), GrpcCode::Unknown);
        assert_eq!(GrpcCode::from_i32(17), GrpcCode::Unknown);
    }

    #[cfg(feature = "grpc")]
    #[test]
    fn converts_to_and_from_tonic() {
        for code in CODES {
            let tonic_code = tonic::Code::from(code);
            assert_eq!(tonic_code as i32, code.as_i32());
            assert_eq!(GrpcCode::from(tonic_code), code);
            assert_eq!(format!("{code}").replace('_', "").to_lowercase(), format!("{tonic_code:?}").to_lowercase());
        }
    }
}
