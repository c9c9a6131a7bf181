//! What the relay tests share: delivery on with the MX port pointed at a sink, the daemon
//! on a movable clock, and polling a recipient's row until it gets where a test expects.

use std::sync::Arc;
use std::time::Duration;

use floodgate::clock::ShiftedClock;
use floodgate::queue::StoredRecipient;

use super::dns::TestDns;
use super::floodgate::TestApp;
use super::sink::{RcptScript, Sink, SinkConfig};

/// How long a recipient may take to reach the state a test waits for.
pub const WAIT: Duration = Duration::from_secs(15);

/// Delivery on, MX port pointed at `port`, short timeouts, plus `delivery_extra` keys
/// under `[delivery]` and any further tables in `more`.
pub fn relay_config(port: u16, delivery_extra: &str, more: &str) -> String {
    format!(
        r#"
[delivery]
enabled = true
connect_timeout = "2s"
command_timeout = "2s"
data_timeout = "2s"
{delivery_extra}

[[route]]
domains = ["*"]
transport = "mx"
port = {port}
{more}
"#
    )
}

/// The daemon with `config`, on `clock`, with a 30 s lease (longer than any test's
/// deliveries, so that nothing is claimed twice while in flight).
pub async fn start(dns: &TestDns, config: &str, clock: Arc<ShiftedClock>) -> TestApp {
    TestApp::start_full("", "lease = \"30s\"", config, dns.addr, clock).await
}

/// Polls `address` of message `queue_id` until `done`, within [`WAIT`]; returns its row.
pub async fn wait_recipient(
    t: &TestApp,
    queue_id: &str,
    address: &str,
    what: &str,
    done: impl Fn(&StoredRecipient) -> bool,
) -> StoredRecipient {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let msg = t
            .app
            .queue()
            .message(queue_id)
            .await
            .unwrap()
            .expect("message");
        let r = msg
            .recipients
            .into_iter()
            .find(|r| r.address == address)
            .expect("recipient");
        if done(&r) {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{address}: {what} never happened: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A receiver answering partially: `gone@mx.test` 550 5.1.1 (permanent), `busy@mx.test`
/// 450 4.2.1 (temporary), every other recipient accepted.
pub async fn partial_sink() -> Sink {
    Sink::start_with(SinkConfig {
        rcpt: Box::new(|r| match r {
            "gone@mx.test" => RcptScript::Reply(550, "5.1.1 no such user"),
            "busy@mx.test" => RcptScript::Reply(450, "4.2.1 mailbox busy"),
            _ => RcptScript::Accept,
        }),
        ..Default::default()
    })
    .await
}
