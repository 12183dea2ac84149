//! The one rule for a validity window, used by key-issuance (a key's status)
//! and redemption (whether a key can be redeemed now): a window is open from
//! its start, inclusive, to its end, exclusive. Key-issuance's `STATUS_SQL`
//! states the same rule in SQL for listings.

use chrono::{DateTime, Utc};

/// True before the window's start.
pub fn not_yet_open(now: DateTime<Utc>, from: Option<DateTime<Utc>>) -> bool {
    from.is_some_and(|from| now < from)
}

/// True from the window's end on: the end instant itself is outside.
pub fn ended(now: DateTime<Utc>, until: Option<DateTime<Utc>>) -> bool {
    until.is_some_and(|until| now >= until)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_is_inside_and_the_end_is_outside() {
        let t = Utc::now();
        assert!(!not_yet_open(t, Some(t)));
        assert!(not_yet_open(t - chrono::Duration::nanoseconds(1), Some(t)));
        assert!(ended(t, Some(t)));
        assert!(!ended(t - chrono::Duration::nanoseconds(1), Some(t)));
        assert!(!ended(t, None) && !not_yet_open(t, None));
    }
}
