//! The typed answer of one delivery attempt: the reply code and RFC 3463 enhanced status
//! code kept apart from the text, so that classification, bounces and operators read the
//! code, not a string. Shown and stored as `code enhanced text`, the form it had on the wire.

use std::fmt;

/// An RFC 3463 enhanced status code, `class.subject.detail` (e.g. `5.1.1`, `5.1.10`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Enhanced {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

impl Enhanced {
    pub const fn new(class: u8, subject: u16, detail: u16) -> Enhanced {
        Enhanced {
            class,
            subject,
            detail,
        }
    }

    /// Parses one word: class 2, 4 or 5, subject and detail of 1 to 3 digits each.
    pub fn parse(word: &str) -> Option<Enhanced> {
        let mut parts = word.split('.');
        let (class, subject, detail) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let number = |p: &str, max: usize| {
            (!p.is_empty() && p.len() <= max && p.bytes().all(|b| b.is_ascii_digit()))
                .then(|| p.parse::<u16>().ok())
                .flatten()
        };
        let class = number(class, 1)?;
        if !matches!(class, 2 | 4 | 5) {
            return None;
        }
        Some(Enhanced::new(
            class as u8,
            number(subject, 3)?,
            number(detail, 3)?,
        ))
    }
}

impl fmt::Display for Enhanced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// What a destination answered, or what Floodgate concluded in the same terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The SMTP reply code; `None` for answers that are not SMTP (a webhook's HTTP status
    /// line, or why no request went out), whose whole form is `text`.
    pub code: Option<u16>,
    pub enhanced: Option<Enhanced>,
    pub text: String,
}

impl Reply {
    /// A reply as read from the wire: `code` and the text after it. The text's first word
    /// is taken as the enhanced code when it is one of the same class as `code`
    /// (RFC 2034 §3); otherwise it stays part of the text.
    pub fn smtp(code: u16, text: &str) -> Reply {
        let text = text.trim();
        let (first, rest) = text.split_once(' ').unwrap_or((text, ""));
        match Enhanced::parse(first) {
            Some(e) if u16::from(e.class) == code / 100 => Reply {
                code: Some(code),
                enhanced: Some(e),
                // Kept verbatim so the shown form is exactly what was said.
                text: rest.to_owned(),
            },
            _ => Reply {
                code: Some(code),
                enhanced: None,
                text: text.to_owned(),
            },
        }
    }

    /// One of Floodgate's own replies, written as on the wire: `"451 4.4.3 DNS lookup failed"`.
    /// Only for literals and formats Floodgate writes itself; a line without a leading
    /// code becomes a codeless reply.
    pub fn local(line: &str) -> Reply {
        let code = line
            .get(..3)
            .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|c| c.parse::<u16>().ok())
            .filter(|c| (200..600).contains(c))
            .filter(|_| line.len() == 3 || line.as_bytes()[3] == b' ');
        match code {
            Some(code) => Reply::smtp(code, line.get(4..).unwrap_or("")),
            None => Reply::other(line),
        }
    }

    /// An answer that is not an SMTP reply (webhooks).
    pub fn other(text: impl Into<String>) -> Reply {
        Reply {
            code: None,
            enhanced: None,
            text: text.into(),
        }
    }

    /// The enhanced code given, or the generic one of the reply's class (`5.0.0`), for
    /// delivery status notifications.
    pub fn status(&self) -> Enhanced {
        self.enhanced.unwrap_or(match self.code.map(|c| c / 100) {
            Some(2) => Enhanced::new(2, 0, 0),
            Some(4) => Enhanced::new(4, 0, 0),
            _ => Enhanced::new(5, 0, 0),
        })
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        if let Some(code) = self.code {
            write!(f, "{code}")?;
            sep = " ";
        }
        if let Some(e) = self.enhanced {
            write!(f, "{sep}{e}")?;
            sep = " ";
        }
        if !self.text.is_empty() {
            write!(f, "{sep}{}", self.text)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn enhanced_code_table() {
        let e = Enhanced::new;
        let table: &[(&str, Option<Enhanced>)] = &[
            ("5.1.1", Some(e(5, 1, 1))),
            ("4.4.3", Some(e(4, 4, 3))),
            ("2.0.0", Some(e(2, 0, 0))),
            ("5.1.10", Some(e(5, 1, 10))),
            ("5.123.999", Some(e(5, 123, 999))),
            ("5.1234.1", None),
            ("5.1.1000", None),
            ("3.1.1", None),
            ("6.0.0", None),
            ("55.1.1", None),
            ("5.1", None),
            ("5.1.1.1", None),
            ("5..1", None),
            ("5.1.x", None),
            ("5.+1.1", None),
            ("", None),
            ("OK", None),
        ];
        for (word, want) in table {
            assert_eq!(Enhanced::parse(word), *want, "{word:?}");
        }
    }

    #[test]
    fn smtp_replies_keep_code_enhanced_code_and_text() {
        let r = Reply::smtp(550, "5.1.1 no such user");
        assert_eq!(r.code, Some(550));
        assert_eq!(r.enhanced, Some(Enhanced::new(5, 1, 1)));
        assert_eq!(r.text, "no such user");
        assert_eq!(r.to_string(), "550 5.1.1 no such user");
        // Without ENHANCEDSTATUSCODES the text is all there is.
        let r = Reply::smtp(550, "no such user");
        assert_eq!((r.enhanced, r.text.as_str()), (None, "no such user"));
        assert_eq!(r.status(), Enhanced::new(5, 0, 0));
        // A class that contradicts the code is not an enhanced code (RFC 3463 §2).
        let r = Reply::smtp(451, "5.1.1 confused");
        assert_eq!(r.enhanced, None);
        assert_eq!(r.to_string(), "451 5.1.1 confused");
        let r = Reply::smtp(250, "2.0.0");
        assert_eq!((r.to_string().as_str(), r.text.as_str()), ("250 2.0.0", ""));
        assert_eq!(Reply::smtp(421, "").to_string(), "421");
    }

    #[test]
    fn local_replies_parse_like_wire_replies() {
        let r = Reply::local("451 4.4.3 DNS lookup failed");
        assert_eq!(r, Reply::smtp(451, "4.4.3 DNS lookup failed"));
        let r = Reply::local("HTTP 503 Service Unavailable");
        assert_eq!((r.code, r.enhanced), (None, None));
        assert_eq!(r.to_string(), "HTTP 503 Service Unavailable");
        assert_eq!(Reply::local("4511 x").code, None);
        assert_eq!(Reply::local("webhook circuit open").code, None);
    }

    proptest! {
        /// Whatever a server sends, parsing never panics and the shown form keeps every
        /// word of the reply (what the queue stores stays what was said).
        #[test]
        fn shown_form_round_trips(code in 200u16..600, text in "[ -~]{0,60}") {
            let r = Reply::smtp(code, &text);
            let shown = r.to_string();
            let want = format!("{code} {}", text.trim());
            prop_assert_eq!(shown.trim_end(), want.trim_end());
            prop_assert_eq!(Reply::local(&shown), r);
        }

        #[test]
        fn enhanced_parse_never_panics(word in "\\PC{0,20}") {
            if let Some(e) = Enhanced::parse(&word) {
                prop_assert_eq!(Enhanced::parse(&e.to_string()), Some(e));
            }
        }
    }
}
