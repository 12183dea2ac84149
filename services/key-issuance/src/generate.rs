//! Making keys: random codes from the OS CSPRNG (or a custom event code),
//! their lookup HMAC and sealed display form. The bulk path runs on a
//! blocking thread and hands the database ready-encoded `COPY` chunks, so
//! crypto and PostgreSQL work in parallel and memory stays bounded.

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::code::{self, Entropy};
use crate::copy;
use crate::domain::CustomCode;
use crate::domain::NewKey;
use crate::error::Error;
use crate::secrets::{Keyring, NONCE_LEN};

/// Keys per `COPY` chunk (about 1.5 MB of COPY data).
const CHUNK_KEYS: usize = 10_000;

/// A new generated key and its display code.
pub fn generated(keyring: &Keyring, entropy: &mut Entropy) -> Result<(NewKey, String), Error> {
    let key_id = Uuid::now_v7();
    let normalized = entropy.key()?;
    let display = code::display_bytes(&normalized);
    let mut nonce = [0u8; NONCE_LEN];
    entropy.fill(&mut nonce)?;
    let mut code_cipher = Vec::with_capacity(64);
    keyring.seal(key_id, &display, nonce, &mut code_cipher);
    let key = NewKey {
        key_id,
        code_hmac: keyring.lookup_hash(&normalized),
        code_cipher,
    };
    Ok((key, String::from_utf8_lossy(&display).into_owned()))
}

/// A key for a custom event code: shown as typed, found by its normalised form.
pub fn custom(
    keyring: &Keyring,
    entropy: &mut Entropy,
    code: &CustomCode,
) -> Result<NewKey, Error> {
    let key_id = Uuid::now_v7();
    let mut nonce = [0u8; NONCE_LEN];
    entropy.fill(&mut nonce)?;
    let mut code_cipher = Vec::with_capacity(64 + code.display.len());
    keyring.seal(key_id, code.display.as_bytes(), nonce, &mut code_cipher);
    Ok(NewKey {
        key_id,
        code_hmac: keyring.lookup_hash(code.normalized.as_bytes()),
        code_cipher,
    })
}

/// The settings every key of one bulk generation shares.
#[derive(Debug, Clone, Copy)]
pub struct Batch {
    /// The pool the keys go into.
    pub pool_id: Uuid,
    /// Uses per key.
    pub max_uses: i32,
    /// One creation time for the whole call (the list order then follows the ids).
    pub created_at: DateTime<Utc>,
    /// Keys to make.
    pub count: usize,
}

/// Generates `batch.count` subscription keys as binary `COPY` chunks into
/// `out`. Blocking: run it with `spawn_blocking`. Stops early when the
/// receiver is gone (the call failed or was cancelled).
pub fn subscription_chunks(
    keyring: &Keyring,
    batch: Batch,
    out: &mpsc::Sender<Result<Vec<u8>, Error>>,
) {
    let mut entropy = Entropy::new();
    let mut key = NewKey {
        key_id: Uuid::nil(),
        code_hmac: [0; 32],
        code_cipher: Vec::with_capacity(64),
    };
    let mut left = batch.count;
    let mut first = true;
    while left > 0 || first {
        let n = left.min(CHUNK_KEYS);
        let mut chunk = Vec::with_capacity(n * 170 + 32);
        if first {
            copy::copy_header(&mut chunk);
            first = false;
        }
        for _ in 0..n {
            let normalized = match entropy.key() {
                Ok(k) => k,
                Err(e) => {
                    let _ = out.blocking_send(Err(e.into()));
                    return;
                }
            };
            let mut nonce = [0u8; NONCE_LEN];
            if let Err(e) = entropy.fill(&mut nonce) {
                let _ = out.blocking_send(Err(e.into()));
                return;
            }
            key.key_id = Uuid::now_v7();
            key.code_hmac = keyring.lookup_hash(&normalized);
            keyring.seal(
                key.key_id,
                &code::display_bytes(&normalized),
                nonce,
                &mut key.code_cipher,
            );
            copy::copy_row(
                &mut chunk,
                &key,
                batch.pool_id,
                keyring.cipher_id(),
                batch.max_uses,
                batch.created_at,
            );
        }
        left -= n;
        if left == 0 {
            copy::copy_trailer(&mut chunk);
        }
        if out.blocking_send(Ok(chunk)).is_err() {
            return;
        }
    }
}
