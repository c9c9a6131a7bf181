//! RFC 3464 delivery status notifications: the bounce sent to an envelope sender when
//! recipients of its message failed for good.

use chrono::{DateTime, Utc};

use super::Reply;

/// One recipient's failure as reported in the notification.
pub struct Failed<'a> {
    pub recipient: &'a str,
    /// The last reply, e.g. `550 5.1.1 no such user`: its enhanced code is the Status.
    pub reply: &'a Reply,
}

/// Builds the notification (a `multipart/report` message) for `failed` recipients of the
/// message `original`. The caller sends it from the null sender, so it can never bounce
/// in turn.
pub fn build(
    hostname: &str,
    queue_id: &str,
    original: &[u8],
    failed: &[Failed<'_>],
    now_ms: i64,
) -> Vec<u8> {
    let date = DateTime::<Utc>::from_timestamp_millis(now_ms)
        .unwrap_or_default()
        .to_rfc2822();
    let boundary = format!("{queue_id}.{now_ms}/{hostname}");
    let mut out = String::new();
    out.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
    ));
    out.push_str("Subject: Undelivered Mail Returned to Sender\r\n");
    out.push_str(&format!("Date: {date}\r\n"));
    out.push_str("Auto-Submitted: auto-replied\r\n");
    out.push_str("MIME-Version: 1.0\r\n");
    out.push_str(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\r\n"
    ));
    out.push_str(&format!(
        "--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    ));
    out.push_str(&format!(
        "This is the mail system at host {hostname}.\r\n\r\nYour message (queue id {queue_id}) could not be delivered to:\r\n\r\n"
    ));
    for f in failed {
        out.push_str(&format!(
            "  <{}>: {}\r\n",
            f.recipient,
            one_line(&f.reply.to_string())
        ));
    }
    out.push_str(&format!(
        "\r\n--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"
    ));
    out.push_str(&format!(
        "Reporting-MTA: dns; {hostname}\r\nX-Floodgate-Queue-ID: {queue_id}\r\n"
    ));
    for f in failed {
        out.push_str(&format!(
            "\r\nFinal-Recipient: rfc822; {}\r\nAction: failed\r\nStatus: {}\r\nDiagnostic-Code: smtp; {}\r\n",
            f.recipient,
            f.reply.status(),
            one_line(&f.reply.to_string())
        ));
    }
    out.push_str(&format!(
        "\r\n--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
    ));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(headers(original));
    bytes.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    bytes
}

fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The original's header section, without the blank line that ends it.
fn headers(message: &[u8]) -> &[u8] {
    let end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 2)
        .unwrap_or(message.len());
    &message[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_shape() {
        let dsn = build(
            "relay.test",
            "Q1",
            b"Subject: hi\r\nFrom: a@b.test\r\n\r\nsecret body\r\n",
            &[Failed {
                recipient: "x@y.test",
                reply: &Reply::smtp(550, "5.1.1 no such user"),
            }],
            0,
        );
        let text = String::from_utf8(dsn).unwrap();
        assert!(text.contains("report-type=delivery-status"));
        assert!(
            text.contains(
                "Final-Recipient: rfc822; x@y.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
            )
        );
        assert!(text.contains("Subject: hi\r\n"));
        assert!(!text.contains("secret body"), "only headers are returned");
    }
}
