//! Floodgate: an SMTP relay and webhook gateway that checks recipients at the door,
//! queues durably in SQLite, relays at governed rates, and survives floods of bad
//! recipients. `main.rs` is only the CLI; everything lives here so tests can run it.

pub mod address;
pub mod admin_api;
pub mod app;
pub mod batch_stats;
pub mod bounce;
pub mod campaign;
pub mod canary;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod ctl;
pub mod deliver;
pub mod dkim;
pub mod dns;
pub mod events;
pub mod faillog;
pub mod future;
pub mod guard;
pub mod http;
pub mod intake;
pub mod lines;
pub mod mta_sts;
mod names;
pub mod net;
pub mod policy;
pub mod queue;
pub mod reason;
pub mod scheduler;
pub mod signing;
pub mod smtp;
pub mod sqlite;
pub mod supervise;
pub mod suppression;
pub mod template;
pub mod tls_report;
pub mod unsubscribe;
pub mod wire;
