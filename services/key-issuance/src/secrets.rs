//! Keys at rest. A code is stored twice, never plain: an HMAC-SHA256 of its
//! normalised form (keyed by `KEY_HMAC_SECRET`) to find it and keep it unique,
//! and an AES-256-GCM ciphertext of its display form (keyed by
//! `KEY_ENCRYPTION_KEY`, bound to the key's id) to show it to administrators.
//! A dump of the database alone therefore redeems nothing.
//!
//! Rotation: every ciphertext row records the id of the encryption key that
//! sealed it, and older keys stay usable for decryption through
//! `KEY_ENCRYPTION_OLD_KEYS`; lookups try the current HMAC secret and every
//! secret in `KEY_HMAC_OLD_SECRETS`.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use uuid::Uuid;

/// Bytes of an AES-GCM nonce, stored in front of the ciphertext.
pub const NONCE_LEN: usize = 12;
/// Bytes of an HMAC-SHA256 output.
pub const HMAC_LEN: usize = 32;
/// Fewest bytes of an HMAC secret.
const MIN_HMAC_SECRET: usize = 32;

/// A configuration value that must never be printed: `Debug` and `Display`
/// show a placeholder.
#[derive(Clone, Default)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for parsing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl FromStr for SecretString {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// Why the configured secrets are unusable (reported at start-up; the
/// messages never contain secret material).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An HMAC secret is too short.
    #[error("{0} must be at least 32 bytes (raw) or 64 hex characters")]
    HmacTooShort(&'static str),
    /// An encryption key is not 64 hex characters.
    #[error("{0} must be 32 bytes written as 64 hex characters")]
    BadEncryptionKey(&'static str),
    /// `KEY_ENCRYPTION_OLD_KEYS` is not `id:hex,...`.
    #[error("KEY_ENCRYPTION_OLD_KEYS must be a comma-separated list of id:hex")]
    BadOldKeys,
    /// Two encryption keys share an id.
    #[error("encryption key id {0} is configured twice")]
    DuplicateKeyId(i16),
}

/// A stored code could not be decrypted: unknown key id or a failed tag.
#[derive(Debug, thiserror::Error)]
#[error("cannot decrypt the code of key {key_id} (encryption key id {cipher_key_id})")]
pub struct DecryptError {
    /// The key whose code failed.
    pub key_id: Uuid,
    /// The encryption key id the row names.
    pub cipher_key_id: i16,
}

/// The server's code secrets, parsed once at start-up.
#[derive(Clone)]
pub struct Keyring {
    /// HMAC keyed with the current secret (cloned per code: the keyed state
    /// is computed once).
    hmac: Hmac<Sha256>,
    /// HMACs keyed with retired secrets, tried on lookup only.
    old_hmacs: Vec<Hmac<Sha256>>,
    /// Id of the encryption key new codes are sealed with.
    cipher_id: i16,
    /// Every usable encryption key by id, the current one included.
    ciphers: HashMap<i16, Aes256Gcm>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("cipher_id", &self.cipher_id)
            .finish_non_exhaustive()
    }
}

fn hmac_secret(name: &'static str, value: &str) -> Result<Hmac<Sha256>, ConfigError> {
    let value = value.trim();
    let bytes = match hex::decode(value) {
        Ok(bytes) if value.len() >= 2 * MIN_HMAC_SECRET => bytes,
        _ => value.as_bytes().to_vec(),
    };
    if bytes.len() < MIN_HMAC_SECRET {
        return Err(ConfigError::HmacTooShort(name));
    }
    // HMAC takes keys of any length, so this cannot fail.
    Hmac::<Sha256>::new_from_slice(&bytes).map_err(|_| ConfigError::HmacTooShort(name))
}

fn cipher(name: &'static str, value: &str) -> Result<Aes256Gcm, ConfigError> {
    let bytes = hex::decode(value.trim()).map_err(|_| ConfigError::BadEncryptionKey(name))?;
    Aes256Gcm::new_from_slice(&bytes).map_err(|_| ConfigError::BadEncryptionKey(name))
}

impl Keyring {
    /// Parses the secrets: `hmac_secret` (≥ 32 bytes raw, or ≥ 64 hex
    /// characters), `old_hmac_secrets` (comma-separated, same rule),
    /// `encryption_key` (64 hex characters) with its id, and `old_keys`
    /// (`id:hex,...`).
    pub fn new(
        hmac_secret_value: &str,
        old_hmac_secrets: &str,
        encryption_key: &str,
        cipher_id: i16,
        old_keys: &str,
    ) -> Result<Self, ConfigError> {
        let hmac = hmac_secret("KEY_HMAC_SECRET", hmac_secret_value)?;
        let old_hmacs = old_hmac_secrets
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| hmac_secret("KEY_HMAC_OLD_SECRETS", s))
            .collect::<Result<Vec<_>, _>>()?;
        let mut ciphers =
            HashMap::from([(cipher_id, cipher("KEY_ENCRYPTION_KEY", encryption_key)?)]);
        for entry in old_keys.split(',').filter(|s| !s.trim().is_empty()) {
            let (id, key) = entry.split_once(':').ok_or(ConfigError::BadOldKeys)?;
            let id: i16 = id.trim().parse().map_err(|_| ConfigError::BadOldKeys)?;
            if ciphers
                .insert(id, cipher("KEY_ENCRYPTION_OLD_KEYS", key)?)
                .is_some()
            {
                return Err(ConfigError::DuplicateKeyId(id));
            }
        }
        Ok(Self {
            hmac,
            old_hmacs,
            cipher_id,
            ciphers,
        })
    }

    /// The HMAC of a normalised code under the current secret: what new rows store.
    pub fn lookup_hash(&self, normalized: &[u8]) -> [u8; HMAC_LEN] {
        let mut mac = self.hmac.clone();
        mac.update(normalized);
        mac.finalize().into_bytes().into()
    }

    /// The HMACs of a normalised code under every configured secret, current
    /// first: what a lookup searches for.
    pub fn lookup_hashes(&self, normalized: &[u8]) -> Vec<Vec<u8>> {
        std::iter::once(&self.hmac)
            .chain(&self.old_hmacs)
            .map(|h| {
                let mut mac = h.clone();
                mac.update(normalized);
                mac.finalize().into_bytes().to_vec()
            })
            .collect()
    }

    /// The id of the encryption key new codes are sealed with.
    pub fn cipher_id(&self) -> i16 {
        self.cipher_id
    }

    /// Seals a display code for the key `key_id`: `nonce ‖ ciphertext ‖ tag`.
    /// The key id is the associated data, so a ciphertext copied onto
    /// another row does not decrypt.
    pub fn seal(&self, key_id: Uuid, display: &[u8], nonce: [u8; NONCE_LEN], out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&nonce);
        let Some(cipher) = self.ciphers.get(&self.cipher_id) else {
            return;
        };
        let payload = Payload {
            msg: display,
            aad: key_id.as_bytes(),
        };
        // AES-GCM encryption of a short message cannot fail (the length
        // limits are gigabytes).
        if let Ok(sealed) = cipher.encrypt(&Nonce::from(nonce), payload) {
            out.extend_from_slice(&sealed);
        }
    }

    /// Opens a sealed code of key `key_id` written with encryption key `cipher_key_id`.
    pub fn open(
        &self,
        key_id: Uuid,
        cipher_key_id: i16,
        sealed: &[u8],
    ) -> Result<String, DecryptError> {
        let error = || DecryptError {
            key_id,
            cipher_key_id,
        };
        let cipher = self.ciphers.get(&cipher_key_id).ok_or_else(error)?;
        if sealed.len() < NONCE_LEN {
            return Err(error());
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| error())?;
        let plain = cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: body,
                    aad: key_id.as_bytes(),
                },
            )
            .map_err(|_| error())?;
        String::from_utf8(plain).map_err(|_| error())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const HEX_A: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    const HEX_B: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

    #[test]
    fn seals_open_and_bind_to_the_key_id() {
        let ring = Keyring::new(HEX_A, "", HEX_B, 1, "").unwrap();
        let id = Uuid::now_v7();
        let mut sealed = Vec::new();
        ring.seal(id, b"ABCD-EFGH-JKMN-PQRS", [7; NONCE_LEN], &mut sealed);
        assert!(!sealed.windows(4).any(|w| w == b"ABCD"));
        assert_eq!(ring.open(id, 1, &sealed).unwrap(), "ABCD-EFGH-JKMN-PQRS");
        assert!(ring.open(Uuid::now_v7(), 1, &sealed).is_err());
        assert!(ring.open(id, 2, &sealed).is_err());
    }

    #[test]
    fn rotation_keeps_old_rows_readable_and_findable() {
        let old = Keyring::new("a-raw-secret-that-is-long-enough-32b", "", HEX_A, 1, "").unwrap();
        let id = Uuid::now_v7();
        let mut sealed = Vec::new();
        old.seal(id, b"CODE", [1; NONCE_LEN], &mut sealed);
        let hash = old.lookup_hash(b"CODE");

        let new = Keyring::new(
            HEX_B,
            "a-raw-secret-that-is-long-enough-32b",
            HEX_B,
            2,
            &format!("1:{HEX_A}"),
        )
        .unwrap();
        assert_eq!(new.open(id, 1, &sealed).unwrap(), "CODE");
        assert_ne!(new.lookup_hash(b"CODE"), hash);
        assert!(new.lookup_hashes(b"CODE").contains(&hash.to_vec()));
    }

    #[test]
    fn bad_secrets_are_refused_without_echoing_them() {
        let e = Keyring::new("short", "", HEX_A, 1, "").unwrap_err();
        assert!(!e.to_string().contains("short"));
        assert!(Keyring::new(HEX_A, "", "abcd", 1, "").is_err());
        assert!(Keyring::new(HEX_A, "", HEX_A, 1, "1:zz").is_err());
        assert!(Keyring::new(HEX_A, "", HEX_A, 1, &format!("1:{HEX_B}")).is_err());
        assert!(format!("{:?}", SecretString::new(HEX_A)) == "[redacted]");
    }
}
