//! Opaque page tokens for keyset pagination: the sort position of the last
//! item of a page, (time in microseconds, id), hex-encoded so clients treat it
//! as an opaque string. Tokens are stable across inserts.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::InvalidField;

/// Default page size when the client sends 0.
pub const DEFAULT_PAGE_SIZE: i64 = 100;
/// Largest page size a client may ask for.
pub const MAX_PAGE_SIZE: i64 = 1000;

/// Position after which the next page starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// Sort time of the last item returned.
    pub time: DateTime<Utc>,
    /// Id of the last item returned (tie-breaker).
    pub id: Uuid,
}

/// Checks `page_size`: 0 → default, 1..=MAX, anything else rejected.
pub fn page_size(value: i32) -> Result<i64, InvalidField> {
    match i64::from(value) {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n @ 1..=MAX_PAGE_SIZE => Ok(n),
        _ => Err(InvalidField::new(
            "page_size",
            format!("must be 0-{MAX_PAGE_SIZE}"),
        )),
    }
}

/// Encodes a cursor as an opaque token.
pub fn encode(cursor: Cursor) -> String {
    let raw = format!("{}:{}", cursor.time.timestamp_micros(), cursor.id.simple());
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Decodes `page_token`: empty → first page, malformed → INVALID_ARGUMENT.
pub fn decode(token: &str) -> Result<Option<Cursor>, InvalidField> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || InvalidField::new("page_token", "is not a token this server issued");
    if !token.len().is_multiple_of(2) || token.len() > 200 {
        return Err(bad());
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2).ok_or_else(bad)?, 16).map_err(|_| bad()))
        .collect::<Result<Vec<u8>, _>>()?;
    let raw = String::from_utf8(bytes).map_err(|_| bad())?;
    let (micros, id) = raw.split_once(':').ok_or_else(bad)?;
    let time = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(bad)?;
    let id = Uuid::parse_str(id).map_err(|_| bad())?;
    Ok(Some(Cursor { time, id }))
}

/// The token of the page after `items`, if the page was full.
pub fn next_token<T>(items: &[T], limit: i64, cursor_of: impl Fn(&T) -> Cursor) -> String {
    match items.last() {
        Some(last) if items.len() as i64 == limit => encode(cursor_of(last)),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_garbage() {
        let c = Cursor {
            time: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            id: Uuid::now_v7(),
        };
        assert_eq!(decode(&encode(c)).unwrap(), Some(c));
        assert_eq!(decode("").unwrap(), None);
        for bad in ["zz", "abc", "6162", &"00".repeat(150)] {
            assert!(decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn page_sizes() {
        assert_eq!(page_size(0).unwrap(), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(1000).unwrap(), 1000);
        assert!(page_size(-1).is_err());
        assert!(page_size(1001).is_err());
    }
}
