//! MTA-STS (RFC 8461) and SMTP TLS reporting (RFC 8460) as text: the `_mta-sts` and
//! `_smtp._tls` TXT records, the policy file served at
//! `https://mta-sts.DOMAIN/.well-known/mta-sts.txt`, and which MX hosts a policy allows.
//! Fetching, caching and enforcing live with the SMTP courier; this module only reads.

/// RFC 8461 §3.2: `max_age` is at most a year.
pub const MAX_AGE_LIMIT: u64 = 31_557_600;
/// Largest policy file read (RFC 8461 §3.3 suggests 64 KiB as a sane limit).
pub const MAX_POLICY_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Deliver only to matching MX hosts over verified TLS.
    Enforce,
    /// Deliver as without a policy; count and report what would have failed.
    Testing,
    /// The domain withdrew its policy.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// Patterns: `mail.example.com`, or `*.example.net` for one label under it.
    pub mx: Vec<String>,
    /// Seconds the policy may be cached.
    pub max_age: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("the policy file is larger than {MAX_POLICY_BYTES} bytes")]
    TooLarge,
    #[error("the policy file is not UTF-8")]
    NotText,
    #[error("version is not STSv1")]
    Version,
    #[error("mode is missing or unknown")]
    Mode,
    #[error("max_age is missing or not a number of seconds")]
    MaxAge,
    #[error("mode {0:?} needs at least one mx line")]
    NoMx(&'static str),
    #[error("mx pattern {0:?} is not a host name")]
    BadMx(String),
}

impl Policy {
    /// Parses a policy file. Unknown keys are ignored (RFC 8461 §3.2); an over-long
    /// `max_age` is capped at a year.
    pub fn parse(body: &[u8]) -> Result<Policy, PolicyError> {
        if body.len() > MAX_POLICY_BYTES {
            return Err(PolicyError::TooLarge);
        }
        let text = std::str::from_utf8(body).map_err(|_| PolicyError::NotText)?;
        let (mut version, mut mode, mut max_age, mut mx) = (None, None, None, Vec::new());
        for line in text.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match key.trim() {
                "version" => version = Some(value == "STSv1"),
                "mode" => {
                    mode = match value {
                        "enforce" => Some(Mode::Enforce),
                        "testing" => Some(Mode::Testing),
                        "none" => Some(Mode::None),
                        _ => return Err(PolicyError::Mode),
                    }
                }
                "max_age" => {
                    let n = value
                        .parse::<u64>()
                        .ok()
                        .filter(|_| value.len() <= 10)
                        .ok_or(PolicyError::MaxAge)?;
                    max_age = Some(n.min(MAX_AGE_LIMIT));
                }
                "mx" => mx.push(mx_pattern(value)?),
                _ => {}
            }
        }
        if version != Some(true) {
            return Err(PolicyError::Version);
        }
        let mode = mode.ok_or(PolicyError::Mode)?;
        let max_age = max_age.ok_or(PolicyError::MaxAge)?;
        match mode {
            Mode::Enforce if mx.is_empty() => return Err(PolicyError::NoMx("enforce")),
            Mode::Testing if mx.is_empty() => return Err(PolicyError::NoMx("testing")),
            _ => {}
        }
        Ok(Policy { mode, mx, max_age })
    }

    /// Whether the MX host `host` is one the policy names (RFC 8461 §4.1: a wildcard
    /// stands for exactly one leftmost label).
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx.iter().any(|p| match p.strip_prefix("*.") {
            Some(suffix) => host
                .strip_suffix(suffix)
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
            None => *p == host,
        })
    }
}

fn mx_pattern(value: &str) -> Result<String, PolicyError> {
    let bad = || PolicyError::BadMx(value.chars().take(80).collect());
    let pattern = value.trim_end_matches('.').to_ascii_lowercase();
    let host = pattern.strip_prefix("*.").unwrap_or(&pattern);
    crate::address::ascii_domain(host).ok_or_else(bad)?;
    Ok(pattern)
}

/// The `id` of an `_mta-sts.DOMAIN` TXT record (`v=STSv1; id=20260101T000000;`), or
/// `None` when the record is not one (RFC 8461 §3.1).
pub fn parse_sts_record(txt: &str) -> Option<String> {
    let fields = record_fields(txt)?;
    if fields.first() != Some(&("v", "STSv1")) {
        return None;
    }
    let id = fields.iter().find(|(k, _)| *k == "id")?.1;
    let ok = !id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_alphanumeric());
    ok.then(|| id.to_owned())
}

/// Where a domain wants TLS reports sent (RFC 8460 §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportTo {
    Mailto(String),
    Https(String),
}

/// The `rua` destinations of an `_smtp._tls.DOMAIN` TXT record
/// (`v=TLSRPTv1; rua=mailto:tls@example.com,https://report.example.com/v1`).
pub fn parse_tlsrpt_record(txt: &str) -> Option<Vec<ReportTo>> {
    let fields = record_fields(txt)?;
    if fields.first() != Some(&("v", "TLSRPTv1")) {
        return None;
    }
    let rua = fields.iter().find(|(k, _)| *k == "rua")?.1;
    let mut out = Vec::new();
    for uri in rua.split(',').map(str::trim) {
        if let Some(address) = uri.strip_prefix("mailto:") {
            let address = address.split('?').next().unwrap_or("");
            if crate::address::parse(address).is_ok() {
                out.push(ReportTo::Mailto(address.to_owned()));
            }
        } else if uri.starts_with("https://") && !uri.contains(char::is_whitespace) {
            out.push(ReportTo::Https(uri.to_owned()));
        }
    }
    (!out.is_empty()).then_some(out)
}

/// `k=v; k=v` pairs in order, or `None` when a field has no `=`.
fn record_fields(txt: &str) -> Option<Vec<(&str, &str)>> {
    txt.split(';')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .map(|f| f.split_once('=').map(|(k, v)| (k.trim(), v.trim())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmx: backupmx.example.com\r\nmax_age: 604800\r\n";

    #[test]
    fn rfc_8461_example_policy() {
        let p = Policy::parse(POLICY.as_bytes()).unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.max_age, 604_800);
        assert!(p.allows("mail.example.com"));
        assert!(p.allows("MAIL.example.com."));
        assert!(p.allows("foo.example.net"));
        assert!(!p.allows("bar.foo.example.net"), "a wildcard is one label");
        assert!(!p.allows("example.net"));
        assert!(!p.allows("evil-mail.example.com"));
        assert!(p.allows("backupmx.example.com"));
    }

    #[test]
    fn bad_policies_are_refused() {
        let cases: &[(&str, PolicyError)] = &[
            (
                "mode: enforce\nmx: a.test\nmax_age: 1\n",
                PolicyError::Version,
            ),
            (
                "version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n",
                PolicyError::Version,
            ),
            (
                "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
                PolicyError::Mode,
            ),
            (
                "version: STSv1\nmode: enforce\nmx: a.test\n",
                PolicyError::MaxAge,
            ),
            (
                "version: STSv1\nmode: enforce\nmax_age: 5\n",
                PolicyError::NoMx("enforce"),
            ),
            (
                "version: STSv1\nmode: enforce\nmx: bad host\nmax_age: 5\n",
                PolicyError::BadMx("bad host".into()),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(Policy::parse(text.as_bytes()).as_ref(), Err(want), "{text}");
        }
        let none = Policy::parse(b"version: STSv1\nmode: none\nmax_age: 86400\n").unwrap();
        assert_eq!(none.mode, Mode::None);
        let capped = Policy::parse(
            b"version: STSv1\nmode: testing\nmx: a.test\nmax_age: 999999999\nextension: x\n",
        )
        .unwrap();
        assert_eq!(capped.max_age, MAX_AGE_LIMIT);
        assert_eq!(
            Policy::parse(&vec![b'a'; MAX_POLICY_BYTES + 1]),
            Err(PolicyError::TooLarge)
        );
    }

    #[test]
    fn txt_records() {
        assert_eq!(
            parse_sts_record("v=STSv1; id=20160831085700Z;").as_deref(),
            Some("20160831085700Z")
        );
        assert_eq!(parse_sts_record("v=STSv1;id=abc"), Some("abc".into()));
        assert_eq!(
            parse_sts_record("id=abc; v=STSv1"),
            None,
            "v must come first"
        );
        assert_eq!(parse_sts_record("v=spf1 -all"), None);
        assert_eq!(parse_sts_record("v=STSv1; id=has space"), None);
        assert_eq!(
            parse_tlsrpt_record("v=TLSRPTv1; rua=mailto:tls@example.com,https://r.example.com/v1"),
            Some(vec![
                ReportTo::Mailto("tls@example.com".into()),
                ReportTo::Https("https://r.example.com/v1".into())
            ])
        );
        assert_eq!(parse_tlsrpt_record("v=TLSRPTv1; rua=ftp://x"), None);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_policy_bytes_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..600), host in "\\PC{0,60}") {
            if let Ok(p) = Policy::parse(&body) {
                let _ = p.allows(&host);
            }
            let text = String::from_utf8_lossy(&body);
            let _ = parse_sts_record(&text);
            let _ = parse_tlsrpt_record(&text);
        }
    }
}
