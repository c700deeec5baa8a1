//! What a stream entry holds, and what a handler receives.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use redis::Value;
use serde::{Serialize, de::DeserializeOwned};

/// Stream entry fields: the seed's `Task` (id, type, payload) plus the enqueue time.
pub(crate) const F_ID: &str = "id";
pub(crate) const F_TYPE: &str = "type";
pub(crate) const F_PAYLOAD: &str = "payload";
pub(crate) const F_ENQUEUED: &str = "enqueued_at";

/// The fields of a new entry.
pub(crate) fn fields<T: Serialize>(kind: &str, payload: &T) -> Result<[(&'static str, String); 4], serde_json::Error> {
    let id = format!("{:032x}", rand::random::<u128>());
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    Ok([
        (F_ID, id),
        (F_TYPE, kind.to_owned()),
        (F_PAYLOAD, serde_json::to_string(payload)?),
        (F_ENQUEUED, now.to_string()),
    ])
}

/// One delivery of a task to a handler.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery<T> {
    /// The stream entry id (`1700000000000-0`).
    pub message_id: String,
    /// The task id given by the producer.
    pub task_id: String,
    /// The task type (the seed's `Type`).
    pub kind: String,
    /// The decoded payload.
    pub payload: T,
    /// When the producer enqueued it.
    pub enqueued_at: SystemTime,
    /// How many times Redis has delivered this entry, this delivery included (from the
    /// consumer group's pending list, never from re-adding the entry).
    pub deliveries: u64,
}

/// Why an entry could not become a [`Delivery`]: it goes to the dead-letter stream at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable entry: {0}")]
pub struct Undecodable(pub String);

fn text(map: &HashMap<String, Value>, field: &str) -> Result<String, Undecodable> {
    match map.get(field) {
        Some(Value::BulkString(bytes)) => {
            String::from_utf8(bytes.clone()).map_err(|_| Undecodable(format!("field `{field}` is not UTF-8")))
        }
        Some(Value::SimpleString(s)) => Ok(s.clone()),
        Some(_) => Err(Undecodable(format!("field `{field}` is not a string"))),
        None => Err(Undecodable(format!("field `{field}` is missing"))),
    }
}

pub(crate) fn decode<T: DeserializeOwned>(
    message_id: &str,
    map: &HashMap<String, Value>,
    deliveries: u64,
) -> Result<Delivery<T>, Undecodable> {
    let payload = text(map, F_PAYLOAD)?;
    let payload = serde_json::from_str(&payload).map_err(|e| Undecodable(format!("payload: {e}")))?;
    let enqueued_ms: u64 =
        text(map, F_ENQUEUED)?.parse().map_err(|_| Undecodable("enqueued_at is not a number".into()))?;
    Ok(Delivery {
        message_id: message_id.to_owned(),
        task_id: text(map, F_ID)?,
        kind: text(map, F_TYPE)?,
        payload,
        enqueued_at: UNIX_EPOCH + Duration::from_millis(enqueued_ms),
        deliveries,
    })
}

/// The raw fields of an entry, for the dead-letter stream.
pub(crate) fn raw_fields(map: &HashMap<String, Value>) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = map
        .iter()
        .map(|(k, v)| {
            let bytes = match v {
                Value::BulkString(b) => b.clone(),
                Value::SimpleString(s) => s.as_bytes().to_vec(),
                other => format!("{other:?}").into_bytes(),
            };
            (format!("orig_{k}"), bytes)
        })
        .collect();
    out.sort();
    out
}
