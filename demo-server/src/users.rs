//! The seed's user lookup, shared by the HTTP and gRPC front ends.

/// A user as the seed's `GetUser` returns it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct User {
    pub(crate) user_id: i64,
    pub(crate) username: String,
    pub(crate) email: String,
}

/// Why an id was refused; the message is shown to clients as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum InvalidUserId {
    #[error("user id must be an integer, got {0:?}")]
    NotANumber(String),
    #[error("user id {0} is out of range for a 64-bit integer")]
    OutOfRange(String),
    #[error("user id must be positive, got {0}")]
    NotPositive(i64),
}

/// Parses a path segment as a user id.
pub(crate) fn parse_id(raw: &str) -> Result<i64, InvalidUserId> {
    use std::num::IntErrorKind;
    let id = raw.parse::<i64>().map_err(|err| match err.kind() {
        IntErrorKind::PosOverflow | IntErrorKind::NegOverflow => InvalidUserId::OutOfRange(raw.to_owned()),
        _ => InvalidUserId::NotANumber(raw.to_owned()),
    })?;
    positive(id)
}

/// Checks that an id is positive.
pub(crate) fn positive(id: i64) -> Result<i64, InvalidUserId> {
    if id > 0 { Ok(id) } else { Err(InvalidUserId::NotPositive(id)) }
}

/// The seed's answer: `user_{id}` / `user_{id}@example.com`.
pub(crate) fn lookup(user_id: i64) -> User {
    User { user_id, username: format!("user_{user_id}"), email: format!("user_{user_id}@example.com") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert_eq!(parse_id("42"), Ok(42));
        assert!(matches!(parse_id("abc"), Err(InvalidUserId::NotANumber(_))));
        assert!(matches!(parse_id(""), Err(InvalidUserId::NotANumber(_))));
        assert!(matches!(parse_id("99999999999999999999"), Err(InvalidUserId::OutOfRange(_))));
        assert!(matches!(parse_id("-99999999999999999999"), Err(InvalidUserId::OutOfRange(_))));
        assert_eq!(parse_id("0"), Err(InvalidUserId::NotPositive(0)));
        assert_eq!(parse_id("-3"), Err(InvalidUserId::NotPositive(-3)));
        assert_eq!(lookup(7).email, "user_7@example.com");
    }
}
