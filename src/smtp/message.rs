//! What Floodgate reads from and writes into a message: the `Received:` trace header and
//! header lookups for campaign attribution.

use std::net::IpAddr;

use chrono::{DateTime, Utc};

pub struct Trace<'a> {
    pub helo: &'a str,
    pub peer: IpAddr,
    pub hostname: &'a str,
    pub protocol: &'static str,
    pub queue_id: &'a str,
    pub single_recipient: Option<&'a str>,
    pub now_us: i64,
}

/// RFC 5321 §4.4 / RFC 3848 protocol names.
pub fn protocol(esmtp: bool, tls: bool, auth: bool) -> &'static str {
    match (esmtp, tls, auth) {
        (false, _, _) => "SMTP",
        (true, false, false) => "ESMTP",
        (true, true, false) => "ESMTPS",
        (true, false, true) => "ESMTPA",
        (true, true, true) => "ESMTPSA",
    }
}

/// The `Received:` header prepended to every accepted message.
pub fn received_header(t: &Trace<'_>) -> String {
    let date = DateTime::<Utc>::from_timestamp_micros(t.now_us)
        .unwrap_or_default()
        .to_rfc2822();
    let helo: String = t
        .helo
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect();
    let recipient = t
        .single_recipient
        .map(|r| format!("\r\n\tfor <{r}>"))
        .unwrap_or_default();
    format!(
        "Received: from {helo} ([{}])\r\n\tby {} (Floodgate) with {} id {}{recipient};\r\n\t{date}\r\n",
        t.peer, t.hostname, t.protocol, t.queue_id
    )
}

pub use crate::wire::header_value;

/// A campaign name as stored and shown: printable, trimmed, at most 128 characters.
/// Never the canary's reserved name.
pub fn campaign_name(raw: &str) -> String {
    crate::campaign::unreserved(
        raw.trim()
            .chars()
            .filter(|c| !c.is_control())
            .take(128)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_cannot_claim_the_canary_campaign() {
        assert_eq!(
            campaign_name(" floodgate-canary "),
            "floodgate-canary-client"
        );
        assert_eq!(campaign_name("spring"), "spring");
    }

    #[test]
    fn header_lookup_unfolds_and_stops_at_body() {
        let msg = b"Subject: hi\r\nX-Campaign-ID: spring\r\n  sale\r\n\r\nX-Campaign-ID: body\r\n";
        assert_eq!(
            header_value(msg, "x-campaign-id").as_deref(),
            Some("spring sale")
        );
        assert_eq!(
            header_value(b"Subject: x\r\n\r\nX-Campaign-ID: b\r\n", "X-Campaign-ID"),
            None
        );
    }

    #[test]
    fn received_header_shape() {
        let h = received_header(&Trace {
            helo: "client.test",
            peer: "127.0.0.1".parse().unwrap(),
            hostname: "relay.test",
            protocol: "ESMTPS",
            queue_id: "ABC",
            single_recipient: Some("a@b.test"),
            now_us: 0,
        });
        assert!(h.starts_with("Received: from client.test ([127.0.0.1])\r\n\tby relay.test (Floodgate) with ESMTPS id ABC\r\n\tfor <a@b.test>;"), "{h}");
        assert!(h.ends_with("+0000\r\n"), "{h}");
    }
}
