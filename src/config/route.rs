//! `[[route]]` tables: which recipient domains go where, and how.

use serde::Deserialize;

use super::Dur;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// The recipient domain's MX hosts (or its A/AAAA when it has no MX).
    Mx,
    /// One relay host for every recipient of the route.
    Smarthost,
    /// An HTTP endpoint that receives each message as signed JSON.
    Webhook,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain text only.
    None,
    /// STARTTLS when offered, plain text otherwise.
    #[default]
    Opportunistic,
    /// STARTTLS or the delivery fails (transiently).
    Starttls,
    /// TLS from the first byte (port 465 style).
    Tls,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// A name for operators (`ctl probe --route NAME`, probe reports): letters, digits,
    /// `.`, `_` and `-`, at most 64, unique among the routes.
    pub name: Option<String>,
    /// `example.com` (exact), `*.example.com` (its subdomains) or `*` (every domain).
    /// Stored as lower-case IDNA A-labels, the form recipients' domains are matched in.
    #[serde(deserialize_with = "domain_patterns")]
    pub domains: Vec<String>,
    pub transport: Transport,
    /// Look the recipient's domain up at RCPT time. Default: on for mx and smarthost,
    /// off for webhook (its domains need not exist in DNS).
    pub check_dns: Option<bool>,
    /// mx: the port MX hosts are contacted on (default 25). smarthost: the relay's port.
    pub port: Option<u16>,
    /// smarthost: the relay's host name or address.
    pub host: Option<String>,
    pub tls: Option<TlsMode>,
    /// Verify the peer's certificate when TLS is used (default: on for smarthost,
    /// off for mx, where opportunistic TLS with self-signed certificates is the norm).
    pub tls_verify: Option<bool>,
    /// A PEM file of certificate authorities to trust for this route's TLS, instead of
    /// the built-in web roots (an internal smarthost with a private CA).
    pub tls_ca: Option<std::path::PathBuf>,
    /// smarthost: AUTH credentials.
    pub auth_user: Option<String>,
    pub auth_password: Option<String>,
    /// webhook: the endpoint and its `whsec_` signing secret.
    pub url: Option<String>,
    pub secret: Option<String>,
    /// webhook: total time for one request, connect to response body (default 10 s).
    pub timeout: Option<Dur>,
    /// webhook: consecutive failures (timeouts, connection errors, 5xx) that open the
    /// endpoint's circuit (default 5).
    pub breaker_threshold: Option<u32>,
    /// webhook: how long an open circuit waits before one probe request (default 30 s).
    pub breaker_cooldown: Option<Dur>,
    /// mx: overrides `[delivery] mta_sts` for this route's domains.
    pub mta_sts: Option<super::delivery::StsMode>,
}

impl Route {
    /// `*` to each domain's MX on port 25.
    pub fn default_mx() -> Route {
        Route {
            name: None,
            domains: vec!["*".into()],
            transport: Transport::Mx,
            check_dns: None,
            port: None,
            host: None,
            tls: None,
            tls_verify: None,
            tls_ca: None,
            auth_user: None,
            auth_password: None,
            url: None,
            secret: None,
            timeout: None,
            breaker_threshold: None,
            breaker_cooldown: None,
            mta_sts: None,
        }
    }

    pub fn check_dns(&self) -> bool {
        self.check_dns
            .unwrap_or(!matches!(self.transport, Transport::Webhook))
    }

    pub fn webhook_timeout(&self) -> std::time::Duration {
        self.timeout
            .map_or(std::time::Duration::from_secs(10), |d| d.0)
    }

    pub fn breaker_threshold(&self) -> u32 {
        self.breaker_threshold.unwrap_or(5).max(1)
    }

    pub fn breaker_cooldown(&self) -> std::time::Duration {
        self.breaker_cooldown
            .map_or(std::time::Duration::from_secs(30), |d| d.0)
    }

    /// Whether this route serves `domain` and how specifically: exact beats the longest
    /// `*.suffix`, which beats `*`.
    pub fn specificity(&self, domain: &str) -> Option<usize> {
        self.domains
            .iter()
            .filter_map(|pattern| match_pattern(pattern, domain))
            .max()
    }

    pub(super) fn validate(&self) -> Result<(), String> {
        if let Some(name) = &self.name
            && !valid_name(name)
        {
            return Err(format!(
                "route name `{}`: use 1 to 64 letters, digits, `.`, `_` or `-`",
                name.escape_debug()
            ));
        }
        if self.domains.is_empty() {
            return Err("`domains` must list at least one pattern".into());
        }
        for d in &self.domains {
            if d.is_empty() || (d.contains('*') && d != "*" && !d.starts_with("*.")) {
                return Err(format!(
                    "domain pattern `{d}`: use `example.com`, `*.example.com` or `*`"
                ));
            }
        }
        match self.transport {
            Transport::Mx => {
                if self.host.is_some() || self.url.is_some() {
                    return Err("transport `mx` takes no `host` or `url`".into());
                }
            }
            Transport::Smarthost => {
                if self.host.as_deref().is_none_or(str::is_empty) {
                    return Err("transport `smarthost` needs `host`".into());
                }
                if self.auth_user.is_some() != self.auth_password.is_some() {
                    return Err("`auth_user` and `auth_password` go together".into());
                }
            }
            Transport::Webhook => {
                let url = self.url.as_deref().unwrap_or_default();
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err("transport `webhook` needs an http:// or https:// `url`".into());
                }
                let secret = self.secret.as_deref().unwrap_or_default();
                crate::signing::Secret::parse(secret)
                    .map_err(|e| format!("webhook `secret` (whsec_<base64>): {e}"))?;
                if self.timeout.is_some_and(|t| t.0.is_zero()) || self.breaker_threshold == Some(0)
                {
                    return Err("webhook `timeout` and `breaker_threshold` must be above 0".into());
                }
            }
        }
        Ok(())
    }
}

/// Reads `domains`, turning each name (after an optional `*.`) into A-labels, so that
/// `*.bücher.test` in the config matches `x@sub.bücher.test` at the door.
fn domain_patterns<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let raw = Vec::<String>::deserialize(d)?;
    raw.into_iter()
        .map(|p| normalise_pattern(&p).map_err(serde::de::Error::custom))
        .collect()
}

fn normalise_pattern(pattern: &str) -> Result<String, String> {
    let (prefix, name) = match pattern.strip_prefix("*.") {
        Some(rest) => ("*.", rest),
        None => ("", pattern),
    };
    // `*` and other shapes are left for `validate` to explain.
    if name.is_ascii() || name.contains('*') {
        return Ok(format!("{prefix}{}", name.to_ascii_lowercase()));
    }
    crate::address::ascii_domain(name)
        .map(|a| format!("{prefix}{a}"))
        .ok_or_else(|| format!("domain pattern `{pattern}` is not a valid domain name"))
}

/// Compares by labels from the right, on bytes: a domain is never sliced at an index that
/// could fall inside a UTF-8 character (queued recipients from before A-label
/// normalisation may still hold one).
fn match_pattern(pattern: &str, domain: &str) -> Option<usize> {
    if pattern == "*" {
        return Some(0);
    }
    if let Some(suffix) = pattern.strip_prefix("*.") {
        let mut labels = domain.rsplit('.');
        let suffix_matches = suffix
            .rsplit('.')
            .all(|s| labels.next().is_some_and(|l| l.eq_ignore_ascii_case(s)));
        let has_more = labels.next().is_some_and(|l| !l.is_empty());
        return (suffix_matches && has_more).then_some(1 + suffix.len());
    }
    // Exact names outrank any wildcard, whatever their length.
    pattern.eq_ignore_ascii_case(domain).then_some(usize::MAX)
}

/// The route serving `domain`, if any: the most specific match wins (see
/// [`Route::specificity`]); among equals, the first in the file.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The route called `name`.
pub fn named<'a>(routes: &'a [Route], name: &str) -> Option<&'a Route> {
    routes.iter().find(|r| r.name.as_deref() == Some(name))
}

pub fn find<'a>(routes: &'a [Route], domain: &str) -> Option<(usize, &'a Route)> {
    let mut best: Option<(usize, usize, &Route)> = None;
    for (i, route) in routes.iter().enumerate() {
        if let Some(score) = route.specificity(domain)
            && best.is_none_or(|(s, _, _)| score > s)
        {
            best = Some((score, i, route));
        }
    }
    best.map(|(_, i, r)| (i, r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_table() {
        for (pattern, domain, matches) in [
            ("*", "a.test", true),
            ("example.com", "example.com", true),
            ("example.com", "EXAMPLE.com", true),
            ("example.com", "sub.example.com", false),
            ("*.example.com", "sub.example.com", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", "badexample.com", false),
        ] {
            assert_eq!(
                match_pattern(pattern, domain).is_some(),
                matches,
                "{pattern} {domain}"
            );
        }
        assert!(match_pattern("a.test", "a.test") > match_pattern("*.test", "a.test"));
        assert!(match_pattern("*.b.test", "a.b.test") > match_pattern("*.test", "a.b.test"));
        assert!(match_pattern("*.test", "a.test") > match_pattern("*", "a.test"));
    }

    #[test]
    fn utf8_domains_never_panic_and_match_as_a_labels() {
        for (pattern, domain, matches) in [
            ("*.b.test", "xé.test", false),
            ("*.b.test", "a.xé.b.test", true),
            ("*.é.test", "xé.test", false),
            ("*.test", ".test", false),
            ("*.b.test", "b.test", false),
            ("*.b.test", "ab.test", false),
            ("é.test", "xé.test", false),
        ] {
            assert_eq!(
                match_pattern(pattern, domain).is_some(),
                matches,
                "{pattern} {domain}"
            );
        }
        let route: Route =
            toml::from_str("domains = [\"*.Bücher.test\", \"É.test\"]\ntransport = \"mx\"")
                .unwrap();
        assert_eq!(route.domains, ["*.xn--bcher-kva.test", "xn--9ca.test"]);
        let a = crate::address::parse("x@sub.bücher.test").unwrap();
        assert!(route.specificity(&a.domain).is_some());
        assert!(
            route
                .specificity(&crate::address::parse("x@é.test").unwrap().domain)
                .is_some()
        );
        assert!(
            toml::from_str::<Route>("domains = [\"bad\\u0000é.test\"]\ntransport = \"mx\"")
                .is_err()
        );
    }

    proptest::proptest! {
        #[test]
        fn matching_never_panics(pattern in "\\*|\\*\\.[a-zé.]{0,12}|[a-zé.]{0,12}", domain in "\\PC{0,20}") {
            let _ = match_pattern(&pattern, &domain);
        }
    }
}
