//! Shared real-peer test harness for integration tests: include with `mod common;`.
//!
//! * [`dns`]: a real authoritative DNS server (hickory-server) and a black-hole nameserver,
//!   plus the reference notes on how hickory-resolver 0.26 reports each DNS outcome.
//! * [`relay`]: delivery-on configs and waiting on a recipient's row.
//! * [`sink`]: a scriptable receiving SMTP server (STARTTLS, AUTH, failure injection).
//! * [`http`]: a raw HTTP/1.1 client for the send API.
//! * [`http_receiver`]: a scriptable receiving HTTP server (webhooks, delivery events).
//! * [`redis`]: a real `redis-server` on a loopback port, for cluster mode.

// Each test binary compiles its own copy of this module and uses only part of it.
#![allow(dead_code)]

pub mod dns;
pub mod floodgate;
pub mod http;
pub mod http_receiver;
pub mod redis;
pub mod relay;
pub mod sink;
