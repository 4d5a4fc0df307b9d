//! The one record pg2ch moves: a login event, and its JSON form on the topic.
//!
//! The message value is a JSON object with every column of the row, so other
//! consumers can read the topic without pg2ch:
//! `{"id":42,"username":"alice","event_time":"2024-05-01T12:00:00.123456Z"}`.
//! `event_time` is RFC 3339 in UTC with exactly six fractional digits, which is
//! PostgreSQL's own precision, so nothing is rounded on the way. The key is the
//! id as decimal ASCII.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// A row of `user_logins` as it travels. Time is kept as microseconds since the
/// Unix epoch: an integer cannot lose precision between the three systems.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LoginEvent {
    pub id: i64,
    pub username: String,
    pub event_time_us: i64,
}

#[derive(Serialize, Deserialize)]
struct Wire<'a> {
    id: i64,
    #[serde(borrow)]
    username: std::borrow::Cow<'a, str>,
    event_time: String,
}

/// Why a message value could not be turned back into a [`LoginEvent`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty or null message value")]
    Empty,
    #[error("not a login event: {0}")]
    Json(String),
    #[error("event_time {0:?} is not an RFC 3339 timestamp")]
    Time(String),
}

impl LoginEvent {
    /// The time as chrono sees it; `None` only outside chrono's range.
    pub fn event_time(&self) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp_micros(self.event_time_us)
    }

    /// The Kafka key: the id in decimal, so the same row always lands in the same partition.
    pub fn key(&self) -> Vec<u8> {
        self.id.to_string().into_bytes()
    }

    /// The JSON message value documented above.
    pub fn encode(&self) -> Vec<u8> {
        let event_time = self.event_time().map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true)).unwrap_or_default();
        serde_json::to_vec(&Wire { id: self.id, username: std::borrow::Cow::Borrowed(&self.username), event_time })
            .expect("a struct of strings and integers always serialises")
    }

    /// Parses a message value written by [`LoginEvent::encode`] (or by anyone
    /// following the documented format).
    pub fn decode(value: Option<&[u8]>) -> Result<Self, DecodeError> {
        let bytes = match value {
            None => return Err(DecodeError::Empty),
            Some(b) if b.is_empty() => return Err(DecodeError::Empty),
            Some(b) => b,
        };
        let wire: Wire<'_> = serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(e.to_string()))?;
        let time =
            DateTime::parse_from_rfc3339(&wire.event_time).map_err(|_| DecodeError::Time(wire.event_time.clone()))?;
        Ok(LoginEvent {
            id: wire.id,
            username: wire.username.into_owned(),
            event_time_us: time.with_timezone(&Utc).timestamp_micros(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_awkward_text_and_microseconds() {
        let e = LoginEvent {
            id: 7,
            username: "quote\" back\\slash\nnew\ttab 🦀 '; DROP TABLE x; --".into(),
            event_time_us: 1_700_000_000_123_456,
        };
        let bytes = e.encode();
        assert!(std::str::from_utf8(&bytes).unwrap().contains("2023-11-14T22:13:20.123456Z"));
        assert_eq!(LoginEvent::decode(Some(&bytes)).unwrap(), e);
    }

    #[test]
    fn rejects_what_is_not_an_event() {
        assert_eq!(LoginEvent::decode(None), Err(DecodeError::Empty));
        assert_eq!(LoginEvent::decode(Some(b"")), Err(DecodeError::Empty));
        assert!(matches!(LoginEvent::decode(Some(b"nope")), Err(DecodeError::Json(_))));
        assert!(matches!(
            LoginEvent::decode(Some(br#"{"username":"a","event_time":"2024-01-01T00:00:00Z"}"#)),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            LoginEvent::decode(Some(br#"{"id":1,"username":"a","event_time":"yesterday"}"#)),
            Err(DecodeError::Time(_))
        ));
    }
}
