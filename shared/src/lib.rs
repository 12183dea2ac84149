//! What every Training Keys service needs and none of them owns: configuration,
//! telemetry, PostgreSQL and Redis set-up, the gRPC server bootstrap (health,
//! reflection, tracing, graceful shutdown), error statuses, validation and
//! page tokens. It knows nothing of any one service.

pub mod auth;
pub mod cli;
pub mod config;
pub mod db;
pub mod error;
pub mod metrics;
pub mod page;
pub mod peer;
pub mod policy;
pub mod redis;
pub mod rpc;
pub mod server;
pub mod shed;
pub mod telemetry;
pub mod tls;
pub mod validate;
pub mod window;

pub use error::InvalidField;
