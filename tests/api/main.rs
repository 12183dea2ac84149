//! One test binary for the whole suite; a module per area.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod chaos;
mod enrollment;
mod health;
mod key_issuance;
mod metrics;
mod redemption;
mod traces;
