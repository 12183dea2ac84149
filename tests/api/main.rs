//! One test binary for the whole suite; a module per area.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod chaos;
mod enrollment;
mod exactly_once;
mod health;
mod key_issuance;
mod lifecycle;
mod metrics;
mod redemption;
mod redis_client;
mod security;
mod traces;
mod wiring;
