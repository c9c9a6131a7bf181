//! Outbound networking: the HTTP client, the TLS client configs, and the one signed
//! (Standard Webhooks) POST that the webhook courier, delivery events and guard alerts
//! all send. Nothing here knows about messages or the daemon.

pub mod client;
pub mod signed;
pub mod tls;
