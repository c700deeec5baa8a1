//! The JSON protocol, decoded defensively and encoded once.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What a client may send.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// `{"type":"subscribe","channel":"c","since":41,"epoch":"e","join_leave":true}` — `since`:
    /// the last offset seen, to recover what was missed; `epoch`: the epoch that offset belongs
    /// to (from the last subscribe ack; without it, the current one is assumed); `join_leave`:
    /// also receive `join`/`leave` frames of this channel.
    Subscribe {
        /// The channel.
        channel: String,
        /// The last offset the client saw.
        #[serde(default)]
        since: Option<u64>,
        /// The epoch of `since`.
        #[serde(default)]
        epoch: Option<String>,
        /// Whether to receive join and leave events.
        #[serde(default)]
        join_leave: bool,
    },
    /// `{"type":"unsubscribe","channel":"c"}`
    Unsubscribe {
        /// The channel.
        channel: String,
    },
    /// `{"type":"message","channel":"c","content":<any JSON>}`
    Message {
        /// The channel.
        channel: String,
        /// Any JSON value.
        content: serde_json::Value,
    },
    /// `{"type":"ping"}`
    Ping,
    /// `{"type":"presence","channel":"c"}` — who is subscribed.
    Presence {
        /// The channel.
        channel: String,
    },
}

/// Error codes of `{"type":"error"}` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, or not the expected shape.
    BadJson,
    /// A `type` the server does not know.
    UnknownType,
    /// A channel name outside `[A-Za-z0-9_.:-]{1,64}`.
    InvalidChannel,
    /// More subscriptions than allowed per connection.
    TooManySubscriptions,
    /// A frame or content over the size limit.
    MessageTooLarge,
    /// More inbound messages per second than allowed.
    RateLimited,
    /// The permission hook refused.
    Forbidden,
    /// This process holds as many channels as it may (`max_channels`).
    TooManyChannels,
    /// A dependency (the Redis bridge) is down, or the server is shutting down (a publish is
    /// then refused, not acked): try again, elsewhere for a shutdown.
    Unavailable,
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// The code sent back.
    pub code: ErrorCode,
    /// A human-readable reason.
    pub message: String,
}

/// Decodes one text frame. Never panics, whatever the bytes.
pub fn decode(text: &str) -> Result<ClientMessage, DecodeError> {
    match serde_json::from_str::<ClientMessage>(text) {
        Ok(message) => Ok(message),
        Err(error) => {
            // Tell "unknown type" from "broken JSON": look at the type field on its own.
            #[derive(Deserialize)]
            struct Tag {
                #[serde(rename = "type")]
                kind: Option<String>,
            }
            let code = match serde_json::from_str::<Tag>(text) {
                Ok(Tag { kind: Some(kind) }) if !KNOWN.contains(&kind.as_str()) => ErrorCode::UnknownType,
                _ => ErrorCode::BadJson,
            };
            Err(DecodeError { code, message: error.to_string() })
        }
    }
}

const KNOWN: [&str; 5] = ["subscribe", "unsubscribe", "message", "ping", "presence"];

/// Whether a channel name is allowed: 1 to 64 of `A-Z a-z 0-9 _ . : -`.
pub fn valid_channel(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

fn to_bytes<T: Serialize>(value: &T) -> Bytes {
    serde_json::to_vec(value).map(Bytes::from).unwrap_or_else(|_| Bytes::from_static(b"{\"type\":\"error\"}"))
}

/// `{"type":"message","channel","content","user_id","offset"}`, serialized once per publish.
pub(crate) fn message_frame(channel: &str, content: &Value, user_id: &str, offset: u64) -> Bytes {
    #[derive(Serialize)]
    struct Frame<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        channel: &'a str,
        content: &'a Value,
        user_id: &'a str,
        offset: u64,
    }
    to_bytes(&Frame { kind: "message", channel, content, user_id, offset })
}

/// The message frame without its offset, for the Redis bridge (which assigns offsets):
/// `prefix + offset + "}"` is the frame.
pub(crate) fn message_frame_prefix(channel: &str, content: &Value, user_id: &str) -> String {
    let frame = message_frame(channel, content, user_id, 0);
    let text = String::from_utf8_lossy(&frame).into_owned();
    text.strip_suffix("0}").map(str::to_owned).unwrap_or(text)
}

/// An ack: `{"type":"ack","op","channel"}`, with `offset` (publish: the message's; subscribe:
/// the channel's head), `epoch` (subscribe), `recovered` and, when not recovered, `reason`
/// (subscribe with `since`).
#[derive(Debug, Default, Serialize)]
pub(crate) struct Ack<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    op: &'static str,
    channel: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) epoch: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) recovered: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<&'static str>,
}

impl<'a> Ack<'a> {
    pub(crate) fn new(op: &'static str, channel: &'a str) -> Self {
        Self { kind: "ack", op, channel, ..Self::default() }
    }

    pub(crate) fn encode(&self) -> Bytes {
        to_bytes(self)
    }
}

pub(crate) fn error(code: ErrorCode, message: &str) -> Bytes {
    #[derive(Serialize)]
    struct Error<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        code: ErrorCode,
        message: &'a str,
    }
    to_bytes(&Error { kind: "error", code, message })
}

pub(crate) fn pong() -> Bytes {
    Bytes::from_static(br#"{"type":"pong"}"#)
}

pub(crate) fn presence(channel: &str, users: &[String]) -> Bytes {
    #[derive(Serialize)]
    struct Presence<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        channel: &'a str,
        users: &'a [String],
    }
    to_bytes(&Presence { kind: "presence", channel, users })
}

/// `{"type":"dropped","missed":n}`: this many frames were dropped because the client read too
/// slowly (drop-oldest policy).
pub(crate) fn dropped(missed: u64) -> Bytes {
    to_bytes(&serde_json::json!({"type": "dropped", "missed": missed}))
}

/// Why a subscriber did not get every message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GapReason {
    /// The messages were trimmed from the history (too old, or the history expired).
    Trimmed,
    /// The channel's offsets started again (a new epoch: its Redis state was lost, or it was
    /// idle past `history_ttl`); offsets of the old epoch mean nothing now.
    Epoch,
    /// The client's `since` is ahead of the channel's head (it comes from elsewhere).
    Ahead,
}

/// `{"type":"gap","channel":"c","epoch":"e","from":a,"to":b,"reason":r}`: the client missed
/// offsets `from..=to` (`to` omitted when unknown) and will not get them.
pub(crate) fn gap(channel: &str, epoch: &str, from: u64, to: Option<u64>, reason: GapReason) -> Bytes {
    #[derive(Serialize)]
    struct Gap<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        channel: &'a str,
        epoch: &'a str,
        from: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        to: Option<u64>,
        reason: GapReason,
    }
    to_bytes(&Gap { kind: "gap", channel, epoch, from, to, reason })
}

/// `{"type":"join"|"leave","channel":"c","user_id":"u"}` for subscribers that asked for them.
pub(crate) fn join_leave(join: bool, channel: &str, user_id: &str) -> Bytes {
    let kind = if join { "join" } else { "leave" };
    to_bytes(&serde_json::json!({"type": kind, "channel": channel, "user_id": user_id}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_classifies() {
        assert!(matches!(
            decode(r#"{"type":"subscribe","channel":"a"}"#),
            Ok(ClientMessage::Subscribe { since: None, epoch: None, join_leave: false, .. })
        ));
        assert!(matches!(decode(r#"{"type":"ping"}"#), Ok(ClientMessage::Ping)));
        assert_eq!(decode(r#"{"type":"dance"}"#).unwrap_err().code, ErrorCode::UnknownType);
        assert_eq!(decode("{nope").unwrap_err().code, ErrorCode::BadJson);
        assert_eq!(decode(r#"{"type":"subscribe"}"#).unwrap_err().code, ErrorCode::BadJson);
        let Ok(ClientMessage::Message { content, .. }) =
            decode(r#"{"type":"message","channel":"c","content":{"a":[1,2]}}"#)
        else {
            panic!()
        };
        assert_eq!(content, serde_json::json!({"a": [1, 2]}));
    }

    #[test]
    fn frames() {
        let content = serde_json::json!("hi");
        let frame = message_frame("c", &content, "u1", 7);
        assert_eq!(&frame[..], br#"{"type":"message","channel":"c","content":"hi","user_id":"u1","offset":7}"#);
        assert_eq!(format!("{}7}}", message_frame_prefix("c", &content, "u1")).as_bytes(), &frame[..]);
        assert!(valid_channel("news.eu-1:x_y"));
        assert!(!valid_channel("") && !valid_channel("has space") && !valid_channel(&"a".repeat(65)));
    }
}
