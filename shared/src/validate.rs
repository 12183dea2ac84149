//! Validation of request fields shared by the services. Each check names the
//! field it rejects, so the client learns exactly what to fix.

use trainingkeys_proto::prost_types::Timestamp;
use uuid::Uuid;

use crate::InvalidField;

/// A required UUID field.
pub fn id(field: &'static str, value: &str) -> Result<Uuid, InvalidField> {
    if value.is_empty() {
        return Err(InvalidField::new(field, "is required"));
    }
    Uuid::parse_str(value).map_err(|_| InvalidField::new(field, "must be a UUID"))
}

/// An optional UUID field: empty means none.
pub fn optional_id(field: &'static str, value: &str) -> Result<Option<Uuid>, InvalidField> {
    if value.is_empty() {
        Ok(None)
    } else {
        id(field, value).map(Some)
    }
}

/// An organization id: 1-128 of `A-Z a-z 0-9 . _ -`.
pub fn organization_id(field: &'static str, value: &str) -> Result<String, InvalidField> {
    let ok = (1..=128).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(value.to_owned())
    } else {
        Err(InvalidField::new(
            field,
            "must be 1-128 of A-Z a-z 0-9 . _ -",
        ))
    }
}

/// Free text, trimmed, of 1..=max characters (or 0..=max when optional).
pub fn text(
    field: &'static str,
    value: &str,
    max: usize,
    required: bool,
) -> Result<String, InvalidField> {
    let value = value.trim();
    if required && value.is_empty() {
        return Err(InvalidField::new(field, "is required"));
    }
    if value.chars().count() > max {
        return Err(InvalidField::new(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(InvalidField::new(
            field,
            "must not contain control characters",
        ));
    }
    if value.chars().any(is_bidi_control) {
        return Err(InvalidField::new(
            field,
            "must not contain bidirectional formatting characters",
        ));
    }
    Ok(value.to_owned())
}

/// Unicode's bidirectional formatting characters (embeddings, overrides,
/// isolates and marks): in a class title or a name they can make text read
/// differently from what it is (a notification e-mail, a roster, a CSV).
pub fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
    )
}

/// A required timestamp.
pub fn time(
    field: &'static str,
    value: Option<&Timestamp>,
) -> Result<chrono::DateTime<chrono::Utc>, InvalidField> {
    let ts = value.ok_or_else(|| InvalidField::new(field, "is required"))?;
    optional_time(field, Some(ts))?.ok_or_else(|| InvalidField::new(field, "is required"))
}

/// An optional timestamp: unset means none; set but out of range is rejected.
pub fn optional_time(
    field: &'static str,
    value: Option<&Timestamp>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, InvalidField> {
    match value {
        None => Ok(None),
        Some(ts) => trainingkeys_proto::time::from_timestamp(ts)
            .map(Some)
            .ok_or_else(|| InvalidField::new(field, "is not a valid timestamp")),
    }
}

/// Normalises an email (trimmed, lower-cased) and checks its shape: one `@`, a
/// non-empty local part, a dotted domain, no spaces, at most 254 characters.
pub fn email(field: &'static str, value: &str) -> Result<String, InvalidField> {
    let email = value.trim().to_lowercase();
    let bad = || InvalidField::new(field, "must be an email address like name@example.com");
    if email.len() > 254
        || email
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || is_bidi_control(c))
    {
        return Err(bad());
    }
    let (local, domain) = email.split_once('@').ok_or_else(bad)?;
    let domain_ok = !domain.contains('@')
        && domain.contains('.')
        && domain
            .split('.')
            .all(|label| !label.is_empty() && !label.starts_with('-') && !label.ends_with('-'));
    if local.is_empty() || local.len() > 64 || !domain_ok {
        return Err(bad());
    }
    Ok(email)
}

/// Normalises a typed training key code as key-issuance reads it: drops
/// whitespace and hyphens, upper-cases ASCII letters, reads `I`/`L` as `1`
/// and `O` as `0`. Two spellings with the same normal form name the same key.
pub fn normalize_code(input: &str) -> String {
    input
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .map(|c| match c.to_ascii_uppercase() {
            'I' | 'L' => '1',
            'O' => '0',
            other => other,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised_and_checked() {
        assert_eq!(
            email("email", "  Ada@Example.COM ").unwrap(),
            "ada@example.com"
        );
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a b@example.com",
            "a@b@c.com",
            "ada@-x.com",
        ] {
            assert!(email("email", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn bidirectional_overrides_are_refused_in_text_and_emails() {
        for bad in ["Rust \u{202E}101", "\u{2066}x\u{2069}", "a\u{200F}"] {
            let e = text("title", bad, 200, true).unwrap_err();
            assert_eq!(e.field, "title", "{bad:?}");
            assert!(email("email", &format!("{bad}@example.com")).is_err());
        }
        assert_eq!(
            text("title", "Grüße, 東京 101", 200, true).unwrap(),
            "Grüße, 東京 101"
        );
    }

    proptest::proptest! {
        /// Every parser answers any input with a value or a precise
        /// InvalidField naming its field, and never panics.
        #[test]
        fn parsers_never_panic(s in "\\PC{0,80}|.{0,80}", seconds in proptest::num::i64::ANY, nanos in proptest::num::i32::ANY, size in proptest::num::i32::ANY) {
            let check = |r: Result<(), InvalidField>, field: &str| match r {
                Ok(()) => Ok(()),
                Err(e) if e.field == field => Ok(()),
                Err(e) => Err(proptest::test_runner::TestCaseError::fail(format!("{e:?} names the wrong field"))),
            };
            check(id("user_id", &s).map(|_| ()), "user_id")?;
            check(optional_id("user_id", &s).map(|_| ()), "user_id")?;
            check(organization_id("organization_id", &s).map(|_| ()), "organization_id")?;
            check(email("email", &s).map(|_| ()), "email")?;
            check(crate::page::decode(&s).map(|_| ()), "page_token")?;
            check(crate::page::page_size(size).map(|_| ()), "page_size")?;
            let ts = Timestamp { seconds, nanos };
            check(optional_time("start_time", Some(&ts)).map(|_| ()), "start_time")?;
            if let Ok(t) = text("title", &s, 50, false) {
                proptest::prop_assert!(t.chars().count() <= 50);
                proptest::prop_assert!(!t.chars().any(|c| c.is_control() || is_bidi_control(c)));
            }
            let n = normalize_code(&s);
            proptest::prop_assert_eq!(normalize_code(&n), n.clone());
        }

        /// An id parses exactly when it is a UUID, in any case.
        #[test]
        fn ids_are_exactly_uuids(u in proptest::num::u128::ANY, upper in proptest::bool::ANY) {
            let text = Uuid::from_u128(u).to_string();
            let text = if upper { text.to_uppercase() } else { text };
            proptest::prop_assert_eq!(id("class_id", &text).unwrap(), Uuid::from_u128(u));
        }

        /// Page tokens survive the round trip.
        #[test]
        fn page_tokens_round_trip(secs in 0i64..4_000_000_000, id in proptest::num::u128::ANY) {
            let time = chrono::DateTime::from_timestamp(secs, 0).unwrap();
            let cursor = crate::page::Cursor { time, id: Uuid::from_u128(id) };
            let back = crate::page::decode(&crate::page::encode(cursor)).unwrap().unwrap();
            proptest::prop_assert_eq!(back.time, time);
            proptest::prop_assert_eq!(back.id, Uuid::from_u128(id));
        }
    }

    #[test]
    fn organization_ids() {
        assert!(organization_id("organization_id", "acme-corp.eu_1").is_ok());
        assert!(organization_id("organization_id", "").is_err());
        assert!(organization_id("organization_id", "a b").is_err());
        assert!(organization_id("organization_id", &"a".repeat(129)).is_err());
    }
}
