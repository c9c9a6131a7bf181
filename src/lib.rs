//! Floodgate: an SMTP relay and webhook gateway that checks recipients at the door,
//! queues durably in SQLite, relays at governed rates, and survives floods of bad
//! recipients. `main.rs` is only the CLI; everything lives here so tests can run it.

pub mod address;
pub mod app;
pub mod campaign;
pub mod clock;
pub mod config;
pub mod ctl;
pub mod deliver;
pub mod dns;
pub mod events;
pub mod faillog;
pub mod guard;
pub mod http;
pub mod intake;
pub mod policy;
pub mod queue;
pub mod reason;
pub mod scheduler;
pub mod smtp;
pub mod supervise;
