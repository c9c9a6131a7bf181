//! Self-test of the real-peer harness in `tests/common`: proves the DNS server answers the
//! real hickory-resolver the way `common::dns` documents, and that the SMTP sink speaks SMTP.

mod common;

// The tests live under tests/harness/ (not tests/*.rs) so cargo does not build them as
// separate test binaries; `#[path]` is needed because this file is a crate root.
#[path = "harness/dns_tests.rs"]
mod dns_tests;
#[path = "harness/sink_tests.rs"]
mod sink_tests;
