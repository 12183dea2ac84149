//! The key format: 16 symbols shown as `XXXX-XXXX-XXXX-XXXX`, 15 random data
//! symbols from the OS CSPRNG and a check symbol; the normalisation every
//! typed code goes through; and the rules for custom event codes.
//!
//! The alphabet is Crockford base32 without `Z` (31 symbols), so every symbol
//! is a letter or digit (safe in URLs, e-mails, CSV and shells). With a prime
//! modulus of 31 and the weights 1..=16, `Σ i·vᵢ ≡ 0 (mod 31)` catches every
//! single-symbol substitution (a change `w·Δ` with `w, Δ ≢ 0` is never ≡ 0 in
//! a field) and every transposition of two different symbols, adjacent or not
//! (`(wᵢ − wⱼ)·Δ` with `wᵢ ≢ wⱼ`). The price is 15·log2(31) ≈ 74.3 random bits
//! per key instead of 75: far beyond guessing with the redemption rate limits.

use rand::TryRng as _;
use rand::rngs::SysRng;

/// The 31 symbols of generated keys, by value.
pub const ALPHABET: &[u8; 31] = b"0123456789ABCDEFGHJKMNPQRSTVWXY";
/// Symbols in a generated key, check symbol included.
pub const KEY_LEN: usize = 16;
/// Data symbols in a generated key.
const DATA_LEN: usize = KEY_LEN - 1;
/// The check modulus: prime, and the alphabet size.
const MODULUS: u32 = 31;
/// Shortest custom event code looked up (codes set before the 6-symbol
/// rule keep working).
pub const CUSTOM_MIN: usize = 4;
/// Fewest symbols (letters, digits, underscores) a new custom event code
/// must hold: 37^6 ≈ 2.6 billion codes (the README's guessing math).
pub const CUSTOM_NEW_MIN: usize = 6;
/// Longest custom event code.
pub const CUSTOM_MAX: usize = 64;

/// The value of an alphabet symbol, if it is one.
fn value(symbol: u8) -> Option<u32> {
    ALPHABET.iter().position(|&s| s == symbol).map(|p| p as u32)
}

/// The weighted sum `Σ i·vᵢ` (weights 1..) of `values`, mod 31.
fn weighted_sum(values: impl Iterator<Item = u32>) -> u32 {
    values
        .zip(1u32..)
        .fold(0, |acc, (v, w)| (acc + w * v) % MODULUS)
}

/// The check value that makes the weighted sum of the 16 symbols ≡ 0: with
/// weight 16 on the check symbol, `c ≡ −S·16⁻¹ ≡ −2S (mod 31)`.
fn check_value(data: &[u32; DATA_LEN]) -> u32 {
    let sum = weighted_sum(data.iter().copied());
    (2 * (MODULUS - sum)) % MODULUS
}

/// Normalises a typed code (the shared rule: drops whitespace and hyphens,
/// upper-cases, `I`/`L` → `1`, `O` → `0`). The same function serves generated
/// and custom codes, so a custom code typed in any case finds itself.
pub use trainingkeys_shared::validate::normalize_code as normalize;

/// True when a normalised code has the shape of a generated key (16 letters
/// and digits): such codes are checked, and custom codes may not take it.
pub fn is_key_shaped(normalized: &str) -> bool {
    normalized.len() == KEY_LEN && normalized.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// True when a normalised, key-shaped code's symbols are all in the alphabet
/// and its check symbol holds.
pub fn check_ok(normalized: &str) -> bool {
    let values: Option<Vec<u32>> = normalized.bytes().map(value).collect();
    match values {
        Some(values) if values.len() == KEY_LEN => weighted_sum(values.into_iter()) == 0,
        _ => false,
    }
}

/// `XXXXXXXXXXXXXXXX` as `XXXX-XXXX-XXXX-XXXX`.
pub fn display(normalized: &str) -> String {
    let mut out = String::with_capacity(KEY_LEN + 3);
    for (i, c) in normalized.chars().enumerate() {
        if i > 0 && i % 4 == 0 {
            out.push('-');
        }
        out.push(c);
    }
    out
}

/// How a typed code reads after normalisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Typed {
    /// A code that can name a key (generated with a good check symbol, or
    /// custom-shaped), normalised.
    Code(String),
    /// Key-shaped but with a failed check symbol or a symbol outside the
    /// alphabet: a typing mistake, rejected before any lookup.
    Mistyped,
    /// Cannot be any key: empty, too short or long, or with other characters.
    Malformed,
}

/// Classifies a code as typed by a person.
pub fn parse_typed(input: &str) -> Typed {
    let n = normalize(input);
    if is_key_shaped(&n) {
        return if check_ok(&n) {
            Typed::Code(n)
        } else {
            Typed::Mistyped
        };
    }
    let allowed = n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if allowed && (CUSTOM_MIN..=CUSTOM_MAX).contains(&n.len()) {
        Typed::Code(n)
    } else {
        Typed::Malformed
    }
}

/// Why a custom event code is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CustomCodeError {
    /// Not 4-64 of `A-Z a-z 0-9 - _`.
    Charset,
    /// Fewer than 6 symbols once hyphens are dropped.
    TooShort,
    /// 16 letters and digits: the shape of generated keys.
    KeyShaped,
}

impl CustomCodeError {
    /// The reason, for people.
    pub fn message(self) -> &'static str {
        match self {
            Self::Charset => "must be 4-64 of A-Z a-z 0-9 - _",
            Self::TooShort => "must hold at least 6 letters, digits or underscores",
            Self::KeyShaped => {
                "16 letters and digits (ignoring hyphens) are reserved for generated keys"
            }
        }
    }
}

/// Checks a custom event code; returns its normalised form.
pub fn custom(code: &str) -> Result<String, CustomCodeError> {
    let ok = (CUSTOM_MIN..=CUSTOM_MAX).contains(&code.len())
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        return Err(CustomCodeError::Charset);
    }
    let n = normalize(code);
    if n.len() < CUSTOM_NEW_MIN {
        return Err(CustomCodeError::TooShort);
    }
    if is_key_shaped(&n) {
        return Err(CustomCodeError::KeyShaped);
    }
    Ok(n)
}

/// A normalised generated key as shown: `XXXX-XXXX-XXXX-XXXX`, without allocating.
pub fn display_bytes(key: &[u8; KEY_LEN]) -> [u8; KEY_LEN + 3] {
    let mut out = [b'-'; KEY_LEN + 3];
    for (i, b) in key.iter().enumerate() {
        out[i + i / 4] = *b;
    }
    out
}

/// Random bytes from the OS CSPRNG, fetched in large blocks so generating a
/// million keys costs a handful of system calls.
pub struct Entropy {
    buffer: Vec<u8>,
    next: usize,
}

/// Bytes fetched from the OS per refill.
const ENTROPY_BLOCK: usize = 64 * 1024;

impl Entropy {
    /// An empty source; the first use fills it.
    pub fn new() -> Self {
        Self {
            buffer: vec![0; ENTROPY_BLOCK],
            next: ENTROPY_BLOCK,
        }
    }

    /// One random byte.
    fn byte(&mut self) -> Result<u8, rand::rngs::SysError> {
        if self.next == self.buffer.len() {
            SysRng.try_fill_bytes(&mut self.buffer)?;
            self.next = 0;
        }
        let b = self.buffer[self.next];
        self.next += 1;
        Ok(b)
    }

    /// Fills `out` with random bytes.
    pub fn fill(&mut self, out: &mut [u8]) -> Result<(), rand::rngs::SysError> {
        for b in out {
            *b = self.byte()?;
        }
        Ok(())
    }

    /// A uniform value in 0..31: five random bits, redrawn when they are 31,
    /// so no symbol is more likely than another.
    fn symbol(&mut self) -> Result<u32, rand::rngs::SysError> {
        loop {
            let v = u32::from(self.byte()? & 0x1f);
            if v < MODULUS {
                return Ok(v);
            }
        }
    }

    /// A new key in normalised form (16 symbols, no hyphens).
    pub fn key(&mut self) -> Result<[u8; KEY_LEN], rand::rngs::SysError> {
        let mut data = [0u32; DATA_LEN];
        for v in &mut data {
            *v = self.symbol()?;
        }
        let mut key = [0u8; KEY_LEN];
        for (k, v) in key.iter_mut().zip(data.iter()) {
            *k = ALPHABET[*v as usize];
        }
        key[DATA_LEN] = ALPHABET[check_value(&data) as usize];
        Ok(key)
    }
}

impl Default for Entropy {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;

    fn new_key() -> String {
        String::from_utf8(Entropy::new().key().unwrap().to_vec()).unwrap()
    }

    /// A valid key built from 15 chosen data values (so proptest can shrink).
    fn key_from(data: [u32; DATA_LEN]) -> String {
        let mut s: String = data.iter().map(|v| ALPHABET[*v as usize] as char).collect();
        s.push(ALPHABET[check_value(&data) as usize] as char);
        s
    }

    fn data_strategy() -> impl Strategy<Value = [u32; DATA_LEN]> {
        proptest::array::uniform15(0u32..MODULUS)
    }

    #[test]
    fn generated_keys_check_and_display() {
        for _ in 0..1000 {
            let k = new_key();
            assert!(check_ok(&k), "{k}");
            let shown = display(&k);
            assert_eq!(shown.len(), 19);
            let raw: [u8; KEY_LEN] = k.as_bytes().try_into().unwrap();
            assert_eq!(display_bytes(&raw).as_slice(), shown.as_bytes());
            assert_eq!(parse_typed(&shown), Typed::Code(k.clone()));
            assert_eq!(parse_typed(&shown.to_lowercase()), Typed::Code(k));
        }
    }

    #[test]
    fn typed_codes_are_classified() {
        assert_eq!(parse_typed(""), Typed::Malformed);
        assert_eq!(parse_typed("ab"), Typed::Malformed);
        assert_eq!(parse_typed("spring!2030"), Typed::Malformed);
        assert_eq!(parse_typed("spring-2030"), Typed::Code("SPR1NG2030".into()));
        // Z is not in the alphabet: a key-shaped code holding it is mistyped.
        assert_eq!(parse_typed("ZZZZ-ZZZZ-ZZZZ-ZZZZ"), Typed::Mistyped);
    }

    #[test]
    fn custom_codes() {
        assert_eq!(custom("Spring-2030_a").unwrap(), "SPR1NG2030_A");
        assert_eq!(custom("abc"), Err(CustomCodeError::Charset));
        assert_eq!(custom("ab c"), Err(CustomCodeError::Charset));
        assert_eq!(custom("ab---"), Err(CustomCodeError::TooShort));
        assert_eq!(custom("abcde"), Err(CustomCodeError::TooShort));
        assert_eq!(custom("abc-def").unwrap(), "ABCDEF");
        assert_eq!(
            custom("ABCD-EFGH-JKMN-PQRS"),
            Err(CustomCodeError::KeyShaped)
        );
        assert_eq!(custom(&"a".repeat(65)), Err(CustomCodeError::Charset));
        // A custom code reads as itself when typed in another case.
        let n = custom("Rust-Lol-2030").unwrap();
        assert_eq!(parse_typed("rust lol 2030"), Typed::Code(n));
    }

    proptest! {
        #[test]
        fn every_substitution_is_caught(data in data_strategy(), pos in 0..KEY_LEN, delta in 1u32..MODULUS) {
            let key = key_from(data);
            prop_assert!(check_ok(&key));
            let mut bytes = key.into_bytes();
            let v = value(bytes[pos]).unwrap();
            bytes[pos] = ALPHABET[((v + delta) % MODULUS) as usize];
            let typo = String::from_utf8(bytes).unwrap();
            prop_assert!(!check_ok(&typo));
            prop_assert_eq!(parse_typed(&display(&typo)), Typed::Mistyped);
        }

        #[test]
        fn every_adjacent_transposition_is_caught(data in data_strategy(), pos in 0..KEY_LEN - 1) {
            let key = key_from(data);
            let mut bytes = key.into_bytes();
            prop_assume!(bytes[pos] != bytes[pos + 1]);
            bytes.swap(pos, pos + 1);
            let typo = String::from_utf8(bytes).unwrap();
            prop_assert!(!check_ok(&typo));
            prop_assert_eq!(parse_typed(&typo), Typed::Mistyped);
        }

        #[test]
        fn substitution_by_any_character_is_caught(data in data_strategy(), pos in 0..KEY_LEN, c in "[0-9A-Za-z]") {
            let key = key_from(data);
            let mut typo: Vec<char> = key.chars().collect();
            typo[pos] = c.chars().next().unwrap();
            let typo: String = typo.into_iter().collect();
            // Unless normalisation maps the character back to the original.
            prop_assume!(normalize(&typo) != key);
            prop_assert_eq!(parse_typed(&typo), Typed::Mistyped);
        }

        #[test]
        fn normalisation_is_idempotent(s in "\\PC{0,40}") {
            let once = normalize(&s);
            prop_assert_eq!(normalize(&once), once.clone());
        }

        #[test]
        fn normalisation_ignores_case_spaces_and_hyphens(data in data_strategy(), noise in "[ -]{0,3}") {
            let key = key_from(data);
            let typed = format!("{noise}{}{noise}", display(&key).to_lowercase().replace('-', &format!("-{noise}")));
            prop_assert_eq!(parse_typed(&typed), Typed::Code(key));
        }
    }
}
