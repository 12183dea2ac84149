//! The binary `COPY` format for bulk-loading subscription keys: one stream
//! of rows that PostgreSQL reads straight into `keys`. Generation encodes
//! the rows; the store sends the stream with [`COPY_SUBSCRIPTION_KEYS`].

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::{Kind, NewKey};

/// Microseconds between the Unix and PostgreSQL (2000-01-01) epochs.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// The columns [`copy_row`] writes, in order.
pub const COPY_SUBSCRIPTION_KEYS: &str = "COPY keys (key_id, kind, pool_id, code_hmac, code_cipher, cipher_key_id, max_uses, created_at) \
     FROM STDIN (FORMAT binary)";

/// Starts a binary `COPY` stream.
pub fn copy_header(out: &mut Vec<u8>) {
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0i32.to_be_bytes()); // flags
    out.extend_from_slice(&0i32.to_be_bytes()); // header extension length
}

/// Ends a binary `COPY` stream.
pub fn copy_trailer(out: &mut Vec<u8>) {
    out.extend_from_slice(&(-1i16).to_be_bytes());
}

fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    // Fields are a few dozen bytes: the length always fits.
    out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Appends one subscription key to a binary `COPY` stream (the columns of
/// `COPY_SUBSCRIPTION_KEYS`).
pub fn copy_row(
    out: &mut Vec<u8>,
    key: &NewKey,
    pool_id: Uuid,
    cipher_key_id: i16,
    max_uses: i32,
    created_at: DateTime<Utc>,
) {
    out.extend_from_slice(&8i16.to_be_bytes());
    field(out, key.key_id.as_bytes());
    field(out, &Kind::Subscription.code().to_be_bytes());
    field(out, pool_id.as_bytes());
    field(out, &key.code_hmac);
    field(out, &key.code_cipher);
    field(out, &cipher_key_id.to_be_bytes());
    field(out, &max_uses.to_be_bytes());
    field(
        out,
        &(created_at.timestamp_micros() - PG_EPOCH_MICROS).to_be_bytes(),
    );
}
