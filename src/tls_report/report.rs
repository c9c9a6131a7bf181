//! One day's SMTP TLS report for one policy domain (RFC 8460 §4): the JSON from the
//! counters, gzipped, and the `multipart/report` message that carries it by mail (§5.3).

use std::io::Write as _;

use base64::Engine;
use serde_json::{Value, json};

use crate::deliver::sts::{Cached, CountRow};

/// Who writes the report.
pub struct Submitter<'a> {
    pub organization: &'a str,
    pub contact: &'a str,
    /// The host name, part of the report id and the file name.
    pub hostname: &'a str,
}

/// The report of `domain` for `day` (`YYYY-MM-DD`) from its counters `rows`, with its
/// current policy if it has one.
pub fn json(
    who: &Submitter<'_>,
    domain: &str,
    day: &str,
    rows: &[CountRow],
    policy: Option<&Cached>,
) -> Value {
    let mut policies = Vec::new();
    for policy_type in ["sts", "no-policy-found"] {
        let mine: Vec<&CountRow> = rows
            .iter()
            .filter(|r| r.policy_type == policy_type)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let ok: u64 = mine
            .iter()
            .filter(|r| r.result == "success")
            .map(|r| r.sessions)
            .sum();
        let failed: u64 = mine
            .iter()
            .filter(|r| r.result != "success")
            .map(|r| r.sessions)
            .sum();
        let mut p = json!({
            "policy-type": policy_type,
            "policy-domain": domain,
        });
        if let (Some(c), "sts") = (policy, policy_type) {
            p["policy-string"] = c
                .body
                .lines()
                .map(|l| l.trim_end_matches('\r'))
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .into();
            p["mx-host"] = c.policy.mx.clone().into();
        }
        let details: Vec<Value> = mine
            .iter()
            .filter(|r| r.result != "success")
            .map(|r| {
                let mut d = json!({
                    "result-type": r.result,
                    "failed-session-count": r.sessions,
                });
                if !r.mx.is_empty() {
                    d["receiving-mx-hostname"] = r.mx.clone().into();
                }
                if !r.ip.is_empty() {
                    d["receiving-ip"] = r.ip.clone().into();
                }
                d
            })
            .collect();
        let mut entry = json!({
            "policy": p,
            "summary": {
                "total-successful-session-count": ok,
                "total-failure-session-count": failed,
            },
        });
        if !details.is_empty() {
            entry["failure-details"] = details.into();
        }
        policies.push(entry);
    }
    json!({
        "organization-name": who.organization,
        "date-range": {
            "start-datetime": format!("{day}T00:00:00Z"),
            "end-datetime": format!("{day}T23:59:59Z"),
        },
        "contact-info": who.contact,
        "report-id": report_id(who, domain, day),
        "policies": policies,
    })
}

/// Unique per submitter, domain and day, so a resent report is recognisable as the same.
pub fn report_id(who: &Submitter<'_>, domain: &str, day: &str) -> String {
    format!("{day}.{domain}@{}", who.hostname)
}

pub fn gzip(report: &Value) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing to a Vec cannot fail.
    let _ = enc.write_all(report.to_string().as_bytes());
    enc.finish().unwrap_or_default()
}

/// The report as a mail (RFC 8460 §5.3) from `from` to `to`, with the gzipped JSON
/// attached. Every header value comes from config or validated domains; anything that
/// is not printable ASCII is dropped all the same.
pub fn message(
    who: &Submitter<'_>,
    from: &str,
    to: &str,
    domain: &str,
    day: &str,
    gzipped: &[u8],
    now_ms: i64,
) -> Vec<u8> {
    let clean = |s: &str| -> String {
        s.chars()
            .filter(|c| c.is_ascii_graphic() || *c == ' ')
            .collect()
    };
    let (org, domain, from, to) = (
        clean(who.organization),
        clean(domain),
        clean(from),
        clean(to),
    );
    let id = clean(&report_id(who, &domain, day));
    let date = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(now_ms)
        .unwrap_or_default()
        .to_rfc2822();
    let boundary = format!("tlsrpt.{now_ms}.{}", clean(who.hostname));
    let start = format!("{day}T00:00:00Z");
    let end = format!("{day}T23:59:59Z");
    let filename = format!("{org}!{domain}!{start}!{end}!{id}.json.gz").replace(['"', ' '], "_");
    let mut out = String::new();
    out.push_str(&format!("From: {from}\r\n"));
    out.push_str(&format!("To: {to}\r\n"));
    out.push_str(&format!(
        "Subject: Report Domain: {domain} Submitter: {org} Report-ID: <{id}>\r\n"
    ));
    out.push_str(&format!("Date: {date}\r\n"));
    out.push_str(&format!("Message-ID: <{id}>\r\n"));
    out.push_str(&format!("TLS-Report-Domain: {domain}\r\n"));
    out.push_str(&format!("TLS-Report-Submitter: {org}\r\n"));
    out.push_str("Auto-Submitted: auto-generated\r\n");
    out.push_str("MIME-Version: 1.0\r\n");
    out.push_str(&format!(
        "Content-Type: multipart/report; report-type=\"tlsrpt\";\r\n\tboundary=\"{boundary}\"\r\n\r\n"
    ));
    out.push_str(&format!(
        "--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ));
    out.push_str(&format!(
        "This is an aggregate TLS report (RFC 8460) from {org} for {domain}, {day}.\r\n\r\n"
    ));
    out.push_str(&format!(
        "--{boundary}\r\nContent-Type: application/tlsrpt+gzip\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment;\r\n\tfilename=\"{filename}\"\r\n\r\n"
    ));
    let b64 = base64::engine::general_purpose::STANDARD.encode(gzipped);
    for chunk in b64.as_bytes().chunks(76) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push_str("\r\n");
    }
    out.push_str(&format!("\r\n--{boundary}--\r\n"));
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(result: &str, sessions: u64) -> CountRow {
        CountRow {
            day: "2026-12-01".into(),
            domain: "a.test".into(),
            policy_type: "sts".into(),
            result: result.into(),
            mx: "mx.a.test".into(),
            ip: "127.0.0.1".into(),
            sessions,
        }
    }

    const WHO: Submitter<'static> = Submitter {
        organization: "Example Org",
        contact: "postmaster@floodgate.test",
        hostname: "floodgate.test",
    };

    #[test]
    fn the_report_sums_sessions_and_lists_failures() {
        let rows = [row("success", 3), row("certificate-expired", 2)];
        let policy = crate::mta_sts::Policy::parse(
            b"version: STSv1\nmode: enforce\nmx: mx.a.test\nmax_age: 60\n",
        )
        .unwrap();
        let cached = Cached {
            id: "1".into(),
            body: "version: STSv1\nmode: enforce\nmx: mx.a.test\nmax_age: 60\n".into(),
            policy,
            expires_ms: 0,
        };
        let r = json(&WHO, "a.test", "2026-12-01", &rows, Some(&cached));
        assert_eq!(r["date-range"]["start-datetime"], "2026-12-01T00:00:00Z");
        let p = &r["policies"][0];
        assert_eq!(p["policy"]["policy-type"], "sts");
        assert_eq!(p["policy"]["mx-host"][0], "mx.a.test");
        assert_eq!(p["summary"]["total-successful-session-count"], 3);
        assert_eq!(p["summary"]["total-failure-session-count"], 2);
        assert_eq!(
            p["failure-details"][0]["result-type"],
            "certificate-expired"
        );
        let gz = gzip(&r);
        let mut text = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut text)
            .unwrap();
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), r);
    }

    #[test]
    fn header_values_cannot_break_lines() {
        let who = Submitter {
            organization: "Evil\r\nBcc: x@y",
            ..WHO
        };
        let m = message(
            &who,
            "a@b.test",
            "c@d.test",
            "a.test",
            "2026-12-01",
            b"x",
            0,
        );
        let text = String::from_utf8(m).unwrap();
        assert!(!text.contains("\r\nBcc:"));
        assert!(text.contains("TLS-Report-Domain: a.test\r\n"));
    }

    proptest::proptest! {
        /// Whatever the names, every header is one line and the JSON parses back.
        #[test]
        fn hostile_names_never_break_the_message_or_the_json(
            org in "\\PC{0,40}[\r\n\0]?\\PC{0,10}",
            domain in "\\PC{0,30}",
            to in "\\PC{0,30}",
        ) {
            let who = Submitter { organization: &org, ..WHO };
            let m = message(&who, "a@b.test", &to, &domain, "2026-12-01", b"gz", 0);
            let text = String::from_utf8(m).unwrap();
            let headers = text.split("\r\n\r\n").next().unwrap();
            for line in headers.split("\r\n") {
                proptest::prop_assert!(!line.contains(['\r', '\n', '\0']));
                proptest::prop_assert!(line.contains(':') || line.starts_with('\t'), "{line:?}");
            }
            let r = json(&who, &domain, "2026-12-01", &[row("success", 1)], None);
            let back: Value = serde_json::from_str(&r.to_string()).unwrap();
            proptest::prop_assert_eq!(back, r);
        }
    }
}
