//! Conversions between `google.protobuf.Timestamp` and `chrono::DateTime<Utc>`.

use chrono::{DateTime, Utc};
use prost_types::Timestamp;

/// A `chrono` time as a protobuf timestamp.
pub fn to_timestamp(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        // Always < 1e9, so it fits.
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// An optional `chrono` time as an optional protobuf timestamp.
pub fn to_timestamp_opt(t: Option<DateTime<Utc>>) -> Option<Timestamp> {
    t.map(to_timestamp)
}

/// A protobuf timestamp as a `chrono` time; `None` when out of range or with
/// nanos outside 0..1e9 (so callers can reject it as an invalid field).
pub fn from_timestamp(ts: &Timestamp) -> Option<DateTime<Utc>> {
    let nanos = u32::try_from(ts.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)?;
    DateTime::from_timestamp(ts.seconds, nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_nanoseconds() {
        let t = DateTime::from_timestamp(1_700_000_000, 123_456_789).unwrap();
        assert_eq!(from_timestamp(&to_timestamp(t)), Some(t));
    }

    #[test]
    fn rejects_negative_nanos() {
        assert_eq!(
            from_timestamp(&Timestamp {
                seconds: 1,
                nanos: -1
            }),
            None
        );
        assert_eq!(
            from_timestamp(&Timestamp {
                seconds: i64::MAX,
                nanos: 0
            }),
            None
        );
    }
}
