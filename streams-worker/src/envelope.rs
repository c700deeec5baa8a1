//! What a stream entry holds, and what a handler receives.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Value;
use serde::{Serialize, de::DeserializeOwned};

/// Stream entry fields: the task (id, type, payload) plus the enqueue time, and for a
/// retry the number of runs before it.
pub(crate) const F_ID: &str = "id";
pub(crate) const F_TYPE: &str = "type";
pub(crate) const F_PAYLOAD: &str = "payload";
pub(crate) const F_ENQUEUED: &str = "enqueued_at";
pub(crate) const F_ATTEMPT: &str = "attempt";
/// On a retry or a requeued dead letter: the one group it is for (other groups skip it).
pub(crate) const F_GROUP: &str = "for_group";

/// A fetched entry's fields, each name once (a repeated name keeps its last value, as a map
/// would). An entry has a handful: a linear search costs less than hashing them.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Fields(Vec<(String, Value)>);

impl Fields {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Value> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    pub(crate) fn insert(&mut self, name: String, value: Value) {
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.0.iter().map(|(n, v)| (n, v))
    }
}

/// A new task id: 128 random bits in hex.
pub(crate) fn new_task_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The fields of a new entry.
pub(crate) fn fields<T: Serialize>(
    id: String,
    kind: &str,
    payload: &T,
) -> Result<[(&'static str, String); 4], serde_json::Error> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    Ok([
        (F_ID, id),
        (F_TYPE, kind.to_owned()),
        (F_PAYLOAD, serde_json::to_string(payload)?),
        (F_ENQUEUED, now.to_string()),
    ])
}

/// A task waiting in the delayed set: the fields its stream entry will have, as a JSON object
/// of strings (unique per task and attempt, so it is also the set member).
pub(crate) fn delayed_member(fields: &[(&str, String)]) -> String {
    let map: serde_json::Map<String, serde_json::Value> =
        fields.iter().map(|(k, v)| ((*k).to_owned(), serde_json::Value::String(v.clone()))).collect();
    serde_json::Value::Object(map).to_string()
}

/// The delayed-set member that runs this entry again, for `group` only: same task, one more
/// attempt behind it.
pub(crate) fn retry_member(map: &Fields, attempts_done: u64, group: &str) -> Result<String, Undecodable> {
    let fields = [
        (F_ID, text(map, F_ID)?),
        (F_TYPE, text(map, F_TYPE)?),
        (F_PAYLOAD, text(map, F_PAYLOAD)?),
        (F_ENQUEUED, text(map, F_ENQUEUED)?),
        (F_ATTEMPT, attempts_done.to_string()),
        (F_GROUP, group.to_owned()),
    ];
    Ok(delayed_member(&fields))
}

/// The most runs an entry may claim to have behind it: a larger `attempt` field is garbage.
const MAX_ATTEMPTS: u64 = u32::MAX as u64;

/// Runs of this task before this entry (0 for a first entry; retries carry it).
pub(crate) fn attempts_before(map: &Fields) -> u64 {
    optional(map, F_ATTEMPT).and_then(|a| a.parse::<u64>().ok()).unwrap_or(0).min(MAX_ATTEMPTS)
}

/// The group an entry is for, if only one.
pub(crate) fn for_group(map: &Fields) -> Option<&str> {
    optional(map, F_GROUP)
}

/// The task id of an entry, if it has one.
pub(crate) fn task_id(map: &Fields) -> Option<&str> {
    optional(map, F_ID)
}

/// One delivery of a task to a handler: what a [`Worker`](crate::Worker)'s service is called
/// with. `T` is the payload type, decoded from the JSON the producer sent (an entry that does
/// not decode goes to the dead-letter stream).
///
/// ```
/// use std::{convert::Infallible, time::SystemTime};
/// use serde::Deserialize;
/// use streams_worker::Delivery;
/// use tower::ServiceExt;
///
/// #[derive(Deserialize)]
/// struct Email {
///     to: String,
/// }
///
/// let handler = tower::service_fn(|task: Delivery<Email>| async move {
///     if task.deliveries > 1 {
///         // A retry: the task id is the same on every delivery, for idempotent writes.
///     }
///     Ok::<_, Infallible>(format!("{} {} to {}", task.task_id, task.kind, task.payload.to))
/// });
///
/// // A handler is a plain tower service: test it without Redis.
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let task = Delivery {
///     message_id: "1700000000000-0".into(),
///     task_id: "t-1".into(),
///     kind: "email".into(),
///     payload: Email { to: "a@example.com".into() },
///     enqueued_at: SystemTime::now(),
///     deliveries: 1,
/// };
/// assert_eq!(handler.oneshot(task).await, Ok("t-1 email to a@example.com".to_owned()));
/// # });
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery<T> {
    /// The stream entry id (`1700000000000-0`); a retry is a new entry with a new id.
    pub message_id: String,
    /// The task id given by the producer; the same on every retry.
    pub task_id: String,
    /// The task type.
    pub kind: String,
    /// The decoded payload.
    pub payload: T,
    /// When the producer enqueued it.
    pub enqueued_at: SystemTime,
    /// How many times this task has been delivered, this delivery included: the runs before
    /// this entry (a retry is a new entry that carries that count) plus Redis' delivery count of
    /// this entry (from the consumer group's pending list).
    pub deliveries: u64,
}

/// Why an entry could not become a [`Delivery`]: it goes to the dead-letter stream at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable entry: {0}")]
pub struct Undecodable(pub String);

/// A field's text, borrowed; the error says what is wrong with it.
fn field<'a>(map: &'a Fields, field: &str) -> Result<&'a str, Undecodable> {
    match map.get(field) {
        Some(Value::BulkString(bytes)) => {
            std::str::from_utf8(bytes).map_err(|_| Undecodable(format!("field `{field}` is not UTF-8")))
        }
        Some(Value::SimpleString(s)) => Ok(s),
        Some(_) => Err(Undecodable(format!("field `{field}` is not a string"))),
        None => Err(Undecodable(format!("field `{field}` is missing"))),
    }
}

fn text(map: &Fields, name: &str) -> Result<String, Undecodable> {
    field(map, name).map(str::to_owned)
}

/// A field's text if it is there and is text (no error to build for an absent one).
fn optional<'a>(map: &'a Fields, name: &str) -> Option<&'a str> {
    match map.get(name)? {
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

pub(crate) fn decode<T: DeserializeOwned>(
    message_id: &str,
    map: &Fields,
    deliveries: u64,
) -> Result<Delivery<T>, Undecodable> {
    let payload = serde_json::from_str(field(map, F_PAYLOAD)?).map_err(|e| Undecodable(format!("payload: {e}")))?;
    let enqueued_ms: u64 =
        field(map, F_ENQUEUED)?.parse().map_err(|_| Undecodable("enqueued_at is not a number".into()))?;
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
pub(crate) fn raw_fields(map: &Fields) -> Vec<(String, Vec<u8>)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_field_keeps_its_last_value_as_a_map_would() {
        let mut fields = Fields::with_capacity(3);
        fields.insert("id".into(), Value::BulkString(b"first".to_vec()));
        fields.insert("type".into(), Value::BulkString(b"t".to_vec()));
        fields.insert("id".into(), Value::BulkString(b"last".to_vec()));
        assert_eq!(task_id(&fields), Some("last"));
        assert_eq!(fields.iter().count(), 2);
        assert_eq!(
            raw_fields(&fields),
            vec![("orig_id".into(), b"last".to_vec()), ("orig_type".into(), b"t".to_vec())]
        );
        assert_eq!(fields.get("missing"), None);
    }
}
