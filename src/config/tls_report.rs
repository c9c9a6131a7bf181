//! `[tls_report]`: the daily SMTP TLS reports (RFC 8460) Floodgate sends, as a sender,
//! to receiving domains that publish an `_smtp._tls` record.

use serde::Deserialize;

use super::Dur;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsReportConfig {
    /// Send reports. Sessions are counted either way (while MTA-STS is not `off`), so
    /// `ctl tls-report` and `/metrics` show them.
    pub enabled: bool,
    /// `organization-name` of the report (default: `[server] hostname`).
    pub organization: Option<String>,
    /// `contact-info` of the report, an address (default: `postmaster@` the hostname).
    pub contact: Option<String>,
    /// `From:` of mailed reports, which DKIM signs by its domain (default:
    /// `tls-reports@` the hostname).
    pub from: Option<String>,
    /// How long the daily counters and the record of sent reports are kept.
    pub retention: Dur,
}

impl Default for TlsReportConfig {
    fn default() -> Self {
        TlsReportConfig {
            enabled: false,
            organization: None,
            contact: None,
            from: None,
            retention: Dur::secs(14 * 86_400),
        }
    }
}

impl TlsReportConfig {
    /// Values that go into a header or the JSON hold no control characters; addresses parse.
    pub(super) fn check(&self) -> Result<(), (&'static str, String)> {
        if let Some(org) = &self.organization
            && (org.is_empty() || org.len() > 200 || org.chars().any(char::is_control))
        {
            return Err((
                "organization",
                "must be 1 to 200 characters without control characters".into(),
            ));
        }
        for (key, value) in [("contact", &self.contact), ("from", &self.from)] {
            if let Some(v) = value
                && crate::address::parse(v).is_err()
            {
                return Err((key, format!("{v:?} is not an email address")));
            }
        }
        if self.retention.0 < std::time::Duration::from_secs(2 * 86_400) {
            return Err((
                "retention",
                "must be at least 2d: yesterday's counters are reported today".into(),
            ));
        }
        Ok(())
    }

    pub fn organization<'a>(&'a self, hostname: &'a str) -> &'a str {
        self.organization.as_deref().unwrap_or(hostname)
    }

    pub fn contact(&self, hostname: &str) -> String {
        self.contact
            .clone()
            .unwrap_or_else(|| format!("postmaster@{hostname}"))
    }

    pub fn from(&self, hostname: &str) -> String {
        self.from
            .clone()
            .unwrap_or_else(|| format!("tls-reports@{hostname}"))
    }
}
