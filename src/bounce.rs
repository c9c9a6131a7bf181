//! Bounce classification: names why a delivery attempt failed or was deferred, from the
//! reply (code, enhanced code, text) or the transport error, by an ordered rule set —
//! an operator file first, then the shipped `conf/bounce_rules.toml`, then the IANA
//! enhanced status code registry.
//!
//! The class decides what Floodgate learns from a failure: only a dead mailbox
//! (`invalid_recipient`, `bad_domain`, `inactive_mailbox`) says anything about the
//! recipient; `policy_block` is about the sender and must never suppress a recipient.

use std::path::Path;

use regex::RegexSet;
use serde::Deserialize;

/// The shipped rules, compiled into the binary so that a missing `conf/` never changes
/// what a bounce means.
pub const SHIPPED_RULES: &str = include_str!("../conf/bounce_rules.toml");

crate::names::closed_names! {
    /// Why an attempt failed, as one of a closed set of names that aggregate the same
    /// way in the failure log, metrics, events and the admin API.
    BounceClass {
        InvalidRecipient => "invalid_recipient",
        BadDomain => "bad_domain",
        InactiveMailbox => "inactive_mailbox",
        Quota => "quota",
        PolicyBlock => "policy_block",
        Content => "content",
        Tls => "tls",
        Connection => "connection",
        Throttled => "throttled",
        // A batch message that did not render for its recipient (never a reply).
        Template => "template",
        Other => "other",
    }
}

impl BounceClass {
    /// Whether a permanent failure of this class means the mailbox itself is gone, so
    /// that sending to it again can only hurt the sender's reputation.
    pub fn is_dead_mailbox(self) -> bool {
        matches!(
            self,
            BounceClass::InvalidRecipient | BounceClass::BadDomain | BounceClass::InactiveMailbox
        )
    }
}

/// Why a rules file was refused.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("{origin}: {source}")]
    Toml {
        origin: String,
        source: Box<toml::de::Error>,
    },
    #[error("{origin}: rule {index}: unknown class {class:?}")]
    UnknownClass {
        origin: String,
        index: usize,
        class: String,
    },
    #[error("{origin}: rule {index}: has no patterns")]
    NoPatterns { origin: String, index: usize },
    #[error("{origin}: rule {index}: pattern {pattern:?}: {message}")]
    Pattern {
        origin: String,
        index: usize,
        pattern: String,
        message: String,
    },
    #[error("{origin}: {source}")]
    Read {
        origin: String,
        source: std::io::Error,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default, rename = "rule")]
    rules: Vec<RuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    class: String,
    patterns: Vec<String>,
}

/// The compiled rule set: every pattern of every rule in one `RegexSet`, so a line is
/// scanned once however many rules there are; `owner[i]` is the class of pattern `i`,
/// and patterns keep the rules' order.
#[derive(Debug)]
pub struct Classifier {
    set: RegexSet,
    owner: Vec<BounceClass>,
}

impl Classifier {
    /// The shipped rules alone.
    pub fn shipped() -> Classifier {
        Classifier::new(None).expect("the shipped bounce rules compile (tested)")
    }

    /// The operator's rules (if any) before the shipped ones.
    pub fn new(operator: Option<(&str, &str)>) -> Result<Classifier, RulesError> {
        let mut patterns = Vec::new();
        let mut owner = Vec::new();
        if let Some((origin, text)) = operator {
            parse_rules(origin, text, &mut patterns, &mut owner)?;
        }
        parse_rules(
            "shipped bounce rules",
            SHIPPED_RULES,
            &mut patterns,
            &mut owner,
        )?;
        let set = RegexSet::new(&patterns).map_err(|e| RulesError::Pattern {
            origin: "bounce rules".into(),
            index: 0,
            pattern: String::new(),
            message: e.to_string(),
        })?;
        Ok(Classifier { set, owner })
    }

    /// Loads the operator file at `path` (for `[delivery] bounce_rules`).
    pub fn load(path: Option<&Path>) -> Result<Classifier, RulesError> {
        let Some(path) = path else {
            return Ok(Classifier::shipped());
        };
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
            origin: origin.clone(),
            source,
        })?;
        Classifier::new(Some((&origin, &text)))
    }

    /// Classes one attempt's result. `enhanced` is the reply's enhanced status code, if
    /// it had one.
    ///
    /// Called once per failed recipient on the delivery path: one regex-set scan of a
    /// short line and one small allocation; no I/O.
    pub fn classify(&self, code: u16, enhanced: Option<[u16; 3]>, text: &str) -> BounceClass {
        let line = match enhanced {
            Some([a, b, c]) => format!("{code} {a}.{b}.{c} {text}"),
            None => format!("{code} - {text}"),
        };
        // `matches` reports every pattern; the lowest index is the earliest rule.
        if let Some(first) = self.set.matches(&line).iter().next() {
            return self.owner[first];
        }
        enhanced.map_or(BounceClass::Other, registry_class)
    }

    /// Classes a reply line as stored ("550 5.1.1 text", or "451 text").
    pub fn classify_line(&self, reply: &str) -> BounceClass {
        let (code, enhanced, text) = split_reply(reply);
        self.classify(code, enhanced, text)
    }
}

fn parse_rules(
    origin: &str,
    text: &str,
    patterns: &mut Vec<String>,
    owner: &mut Vec<BounceClass>,
) -> Result<(), RulesError> {
    let file: RulesFile = toml::from_str(text).map_err(|source| RulesError::Toml {
        origin: origin.to_owned(),
        source: Box::new(source),
    })?;
    for (index, rule) in file.rules.into_iter().enumerate() {
        let class = BounceClass::parse(&rule.class).ok_or_else(|| RulesError::UnknownClass {
            origin: origin.to_owned(),
            index,
            class: rule.class.clone(),
        })?;
        if rule.patterns.is_empty() {
            return Err(RulesError::NoPatterns {
                origin: origin.to_owned(),
                index,
            });
        }
        for pattern in rule.patterns {
            // Compiled alone first so that an error names the pattern at fault.
            if let Err(e) = regex::Regex::new(&pattern) {
                return Err(RulesError::Pattern {
                    origin: origin.to_owned(),
                    index,
                    pattern,
                    message: e.to_string(),
                });
            }
            patterns.push(pattern);
            owner.push(class);
        }
    }
    Ok(())
}

/// Splits "550 5.1.1 text" into its code, enhanced code and text. A reply without a
/// valid code reads as code 0.
pub fn split_reply(reply: &str) -> (u16, Option<[u16; 3]>, &str) {
    let reply = reply.trim_start();
    let (code, rest) = match reply.get(..3).and_then(|c| c.parse::<u16>().ok()) {
        Some(code) if reply.len() == 3 || reply.as_bytes()[3] == b' ' => {
            (code, reply[3..].trim_start())
        }
        _ => return (0, None, reply),
    };
    let (word, after) = rest.split_once(' ').unwrap_or((rest, ""));
    match parse_enhanced(word) {
        Some(e) => (code, Some(e), after.trim_start()),
        None => (code, None, rest),
    }
}

/// "5.1.1" → [5, 1, 1] (RFC 3463: class 2, 4 or 5; subject and detail up to 3 digits).
pub fn parse_enhanced(word: &str) -> Option<[u16; 3]> {
    let mut parts = word.split('.');
    let mut out = [0u16; 3];
    for slot in &mut out {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *slot = part.parse().ok()?;
    }
    if parts.next().is_some() || !matches!(out[0], 2 | 4 | 5) {
        return None;
    }
    Some(out)
}

/// The class an enhanced status code gives by itself (RFC 3463 and the IANA registry of
/// enhanced status codes), for lines no rule names.
fn registry_class([_, subject, detail]: [u16; 3]) -> BounceClass {
    use BounceClass::*;
    match (subject, detail) {
        (1, 0 | 1 | 3) => InvalidRecipient,
        (1, 2 | 10) => BadDomain,
        (1, 6) => InactiveMailbox,
        (2, 1) => InactiveMailbox,
        (2, 2) => Quota,
        (2, 3) | (3, 4) => Content,
        (4, 5) => Throttled,
        (4, _) => Connection,
        (6, _) => Content,
        (7, 5 | 10 | 11) => Tls,
        (7, 28) => Throttled,
        (7, _) => PolicyBlock,
        _ => Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_rules_compile_and_every_class_round_trips() {
        let c = Classifier::shipped();
        assert!(c.owner.len() > 50, "{} patterns", c.owner.len());
        for class in BounceClass::ALL {
            assert_eq!(BounceClass::parse(class.as_str()), Some(*class));
        }
    }

    #[test]
    fn classification_table() {
        let c = Classifier::shipped();
        let table: &[(&str, BounceClass)] = &[
            (
                "550 5.1.1 <bob@example.com>: Recipient address rejected: User unknown",
                BounceClass::InvalidRecipient,
            ),
            (
                "550 5.1.1 The email account that you tried to reach does not exist.",
                BounceClass::InvalidRecipient,
            ),
            ("550 No such user here", BounceClass::InvalidRecipient),
            (
                "553 5.1.3 bad recipient address syntax",
                BounceClass::InvalidRecipient,
            ),
            ("552 5.2.2 Mailbox full", BounceClass::Quota),
            (
                "452 4.2.2 The email account that you tried to reach is over quota",
                BounceClass::Quota,
            ),
            (
                "550 5.7.1 Service unavailable; client [192.0.2.1] blocked using zen.spamhaus.org",
                BounceClass::PolicyBlock,
            ),
            (
                "554 5.7.1 Message rejected because of poor IP reputation",
                BounceClass::PolicyBlock,
            ),
            (
                "550 5.1.1 sender blocked using bl.example",
                BounceClass::PolicyBlock,
            ),
            (
                "421 4.7.0 too many connections from your host",
                BounceClass::Throttled,
            ),
            (
                "450 4.7.28 rate limited, try again later",
                BounceClass::Throttled,
            ),
            (
                "451 4.4.1 connection to 127.0.0.1:25 failed: Connection refused (os error 111)",
                BounceClass::Connection,
            ),
            (
                "451 4.4.1 timeout waiting for greeting",
                BounceClass::Connection,
            ),
            ("451 4.4.3 DNS lookup failed", BounceClass::Connection),
            (
                "454 4.7.0 STARTTLS required but not offered",
                BounceClass::Tls,
            ),
            ("451 4.7.5 TLS setup: invalid certificate", BounceClass::Tls),
            (
                "556 5.1.10 domain accepts no mail (null MX)",
                BounceClass::BadDomain,
            ),
            ("550 5.1.2 domain does not exist", BounceClass::BadDomain),
            (
                "550 5.2.1 mailbox disabled, not accepting messages",
                BounceClass::InactiveMailbox,
            ),
            (
                "550 5.1.1 user account is disabled",
                BounceClass::InactiveMailbox,
            ),
            (
                "552 5.3.4 Message size exceeds fixed limit",
                BounceClass::Content,
            ),
            ("554 5.6.0 Message contains a virus", BounceClass::Content),
            (
                "500 Line too long (see RFC5321 4.5.3.1.6)",
                BounceClass::Content,
            ),
            (
                "550 5.7.26 Unauthenticated email from example.com is not accepted due to domain's DMARC policy",
                BounceClass::PolicyBlock,
            ),
            ("554 5.5.0 transaction failed", BounceClass::Other),
            (
                "550 5.7.1 Service unavailable; client [127.0.0.1] blocked using bl.test",
                BounceClass::PolicyBlock,
            ),
            ("550 Requested action not taken", BounceClass::Other),
        ];
        for (line, want) in table {
            assert_eq!(c.classify_line(line), *want, "{line}");
        }
    }

    /// Webhook attempts have no SMTP code: they are classed by their HTTP status before
    /// any word of a response body.
    #[test]
    fn webhook_replies_by_status() {
        let c = Classifier::shipped();
        let table: &[(&str, BounceClass)] = &[
            ("HTTP 429 Too Many Requests", BounceClass::Throttled),
            (
                "HTTP 503 Service Unavailable: user unknown",
                BounceClass::Connection,
            ),
            ("HTTP 404 Not Found: no such user", BounceClass::Other),
            ("HTTP 422 Unprocessable Entity", BounceClass::Content),
            (
                "webhook request failed: connection refused",
                BounceClass::Connection,
            ),
            ("webhook TLS setup: bad key", BounceClass::Tls),
        ];
        for (text, want) in table {
            assert_eq!(c.classify(0, None, text), *want, "{text}");
        }
    }

    #[test]
    fn operator_rules_come_first() {
        let operator = r#"
[[rule]]
class = "throttled"
patterns = ['(?i)user unknown, try later']
"#;
        let c = Classifier::new(Some(("ops.toml", operator))).unwrap();
        assert_eq!(
            c.classify_line("550 5.1.1 user unknown, try later"),
            BounceClass::Throttled
        );
        assert_eq!(
            c.classify_line("550 5.1.1 user unknown"),
            BounceClass::InvalidRecipient
        );
    }

    #[test]
    fn bad_rules_are_refused_with_their_place() {
        let bad_class = "[[rule]]\nclass = \"gone\"\npatterns = ['x']\n";
        let e = Classifier::new(Some(("ops.toml", bad_class))).unwrap_err();
        assert!(
            matches!(e, RulesError::UnknownClass { index: 0, .. }),
            "{e}"
        );
        let bad_pattern = "[[rule]]\nclass = \"quota\"\npatterns = ['(unclosed']\n";
        let e = Classifier::new(Some(("ops.toml", bad_pattern))).unwrap_err();
        assert!(e.to_string().contains("(unclosed"), "{e}");
        let unknown_key = "[[rule]]\nclass = \"quota\"\npatterns = ['x']\nprio = 1\n";
        assert!(Classifier::new(Some(("ops.toml", unknown_key))).is_err());
    }

    #[test]
    fn replies_split_into_code_enhanced_and_text() {
        assert_eq!(
            split_reply("550 5.1.1 no such user"),
            (550, Some([5, 1, 1]), "no such user")
        );
        assert_eq!(split_reply("451 try later"), (451, None, "try later"));
        assert_eq!(
            split_reply("556 5.1.10 null"),
            (556, Some([5, 1, 10]), "null")
        );
        assert_eq!(split_reply("garbage"), (0, None, "garbage"));
        assert_eq!(split_reply("5500 x"), (0, None, "5500 x"));
        assert_eq!(parse_enhanced("3.1.1"), None);
        assert_eq!(parse_enhanced("5.1"), None);
        assert_eq!(parse_enhanced("5.1.1.1"), None);
        assert_eq!(parse_enhanced("5.1234.1"), None);
    }

    #[test]
    fn registry_fallback_for_unmatched_lines() {
        let c = Classifier::shipped();
        assert_eq!(
            c.classify(550, Some([5, 1, 1]), "zzz"),
            BounceClass::InvalidRecipient
        );
        assert_eq!(
            c.classify(550, Some([5, 7, 99]), "zzz"),
            BounceClass::PolicyBlock
        );
        assert_eq!(
            c.classify(451, Some([4, 4, 7]), "zzz"),
            BounceClass::Connection
        );
        assert_eq!(c.classify(550, None, "zzz"), BounceClass::Other);
    }

    static SHIPPED: std::sync::LazyLock<Classifier> = std::sync::LazyLock::new(Classifier::shipped);

    proptest::proptest! {
        #[test]
        fn any_reply_line_classifies_without_panic(line in "\\PC{0,300}") {
            let _ = SHIPPED.classify_line(&line);
            let _ = split_reply(&line);
        }
    }
}
