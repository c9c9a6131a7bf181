//! Message content as the next hop will see it, shared by both doors: line ends
//! normalised to CRLF (RFC 5321 §2.3.8), header lines over 998 octets folded at whitespace
//! (RFC 5322 §2.2.3), any line still over 998 octets refused (RFC 5322 §2.1.1), and the
//! one check for every value a client gives that becomes a header.
//!
//! Bodies are never re-encoded: that would break MIME structure and signatures. A body
//! line that is too long is refused at the door instead of refused later by the next hop.

use std::borrow::Cow;

/// The longest line, CRLF excluded (RFC 5322 §2.1.1).
pub const MAX_LINE: usize = 998;
/// The longest header name a client may give.
pub const MAX_NAME: usize = 76;
/// The longest run without whitespace in a client's header value: with a name of at most
/// [`MAX_NAME`] octets and `": "`, it still fits on one line once folded.
pub const MAX_UNBROKEN: usize = 900;

/// Why a message cannot be relayed as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContentError {
    #[error(
        "header line {line} is longer than 998 octets and has no whitespace to fold it at (RFC 5322 2.1.1)"
    )]
    UnfoldableHeader { line: usize },
    #[error(
        "line {line} is longer than 998 octets (RFC 5322 2.1.1); encode the body as quoted-printable or base64"
    )]
    LongBodyLine { line: usize },
}

/// Why a client's value cannot become a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("control characters (CR, LF, NUL, ...) are not allowed")]
    Control,
    #[error("more than 900 octets without whitespace cannot be folded into a header")]
    Unfoldable,
    #[error("a header name is 1 to 76 printable ASCII characters without `:`")]
    BadName,
}

/// The unfolded value of the first header called `name` (case-insensitive), looking only
/// at the header section. Cost is bounded by the header section's size.
pub fn header_value(message: &[u8], name: &str) -> Option<String> {
    let mut lines = message.split(|&b| b == b'\n').peekable();
    while let Some(line) = lines.next() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return None;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if !line[..colon].eq_ignore_ascii_case(name.as_bytes()) {
            continue;
        }
        let mut value = String::from_utf8_lossy(&line[colon + 1..])
            .trim()
            .to_owned();
        while let Some(next) = lines.peek() {
            if !next.starts_with(b" ") && !next.starts_with(b"\t") {
                break;
            }
            let next = lines.next().expect("peeked");
            let next = next.strip_suffix(b"\r").unwrap_or(next);
            value.push(' ');
            value.push_str(String::from_utf8_lossy(next).trim());
        }
        return Some(value);
    }
    None
}

/// Checks a value that becomes (part of) a header: no control character but HTAB, and
/// foldable. Cost: one pass over the value, no allocation.
pub fn check_value(value: &str) -> Result<(), HeaderError> {
    let mut run = 0usize;
    for c in value.chars() {
        if c.is_control() && c != '\t' {
            return Err(HeaderError::Control);
        }
        if c == ' ' || c == '\t' {
            run = 0;
        } else {
            run += c.len_utf8();
            if run > MAX_UNBROKEN {
                return Err(HeaderError::Unfoldable);
            }
        }
    }
    Ok(())
}

/// Checks a header field name (RFC 5322 §3.6.8: printable ASCII but `:`).
pub fn check_name(name: &str) -> Result<(), HeaderError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
    ok.then_some(()).ok_or(HeaderError::BadName)
}

/// Turns every bare LF and bare CR into CRLF. Borrows when there is nothing to change.
pub fn normalise_line_ends(input: &[u8]) -> Cow<'_, [u8]> {
    // memchr visits only the CRs and LFs: every rendered batch message passes here, and a
    // byte-at-a-time check was a visible share of delivering them.
    let clean = memchr::memchr2_iter(b'\r', b'\n', input).all(|i| match input[i] {
        b'\r' => input.get(i + 1) == Some(&b'\n'),
        _ => i > 0 && input[i - 1] == b'\r',
    });
    if clean {
        return Cow::Borrowed(input);
    }
    let mut out = Vec::with_capacity(input.len() + input.len() / 32 + 2);
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                if input.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(out)
}

/// What the door stores: line ends normalised, long header lines folded. Refuses a header
/// line that cannot be folded and any body line over [`MAX_LINE`]. Cost: one pass, and
/// one copy only when something had to change.
pub fn prepare(message: Vec<u8>) -> Result<Vec<u8>, ContentError> {
    let message = match normalise_line_ends(&message) {
        Cow::Borrowed(_) => message,
        Cow::Owned(fixed) => fixed,
    };
    let mut section = Section::Headers;
    let mut fold_needed = false;
    for (n, line) in lines(&message).enumerate() {
        section = section.next(line);
        if line.len() > MAX_LINE {
            if section == Section::Body {
                return Err(ContentError::LongBodyLine { line: n + 1 });
            }
            fold_needed = true;
        }
    }
    if !fold_needed {
        return Ok(message);
    }
    let mut out = Vec::with_capacity(message.len() + message.len() / MAX_LINE * 2 + 2);
    let mut section = Section::Headers;
    let total = lines(&message).count();
    for (n, line) in lines(&message).enumerate() {
        section = section.next(line);
        if line.len() > MAX_LINE {
            fold(line, &mut out).ok_or(ContentError::UnfoldableHeader { line: n + 1 })?;
        } else {
            out.extend_from_slice(line);
        }
        // The last line keeps its ending as it came (with or without CRLF).
        if n + 1 < total || message.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
    }
    Ok(out)
}

/// Where a line falls: the header section runs from the start to the blank line; a line
/// that is neither a field nor a continuation ends it early (a message with no headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    Headers,
    Body,
}

impl Section {
    fn next(self, line: &[u8]) -> Section {
        let field = |l: &[u8]| {
            l.iter()
                .position(|&b| b == b':')
                .is_some_and(|c| c > 0 && l[..c].iter().all(|b| b.is_ascii_graphic()))
        };
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        match self {
            Section::Headers if field(line) || continuation => Section::Headers,
            _ => Section::Body,
        }
    }
}

/// The lines of a CRLF-normalised message, without their CRLF.
fn lines(message: &[u8]) -> impl Iterator<Item = &[u8]> {
    let body = message.strip_suffix(b"\r\n").unwrap_or(message);
    let mut rest = Some(body);
    std::iter::from_fn(move || {
        let text = rest?;
        let line = match memchr::memchr(b'\n', text) {
            Some(i) => {
                rest = Some(&text[i + 1..]);
                &text[..i]
            }
            None => {
                rest = None;
                text
            }
        };
        Some(line.strip_suffix(b"\r").unwrap_or(line))
    })
}

/// Folds one header line into lines of at most [`MAX_LINE`] octets, inserting CRLF before
/// whitespace; prefers the space after a comma (address lists). `None` if some stretch
/// has no whitespace to break at.
fn fold(line: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let is_wsp = |b: u8| b == b' ' || b == b'\t';
    // A break must leave visible text after it: a line of whitespace alone is not allowed.
    let last_visible = line.iter().rposition(|&b| !is_wsp(b))?;
    let mut rest = line;
    let mut offset = 0;
    while rest.len() > MAX_LINE {
        let window = &rest[..=MAX_LINE];
        let first_visible = window.iter().position(|&b| !is_wsp(b))?;
        let candidates = (first_visible + 1..window.len())
            .filter(|&p| is_wsp(window[p]) && offset + p < last_visible);
        let mut best = None;
        let mut after_comma = None;
        for p in candidates {
            best = Some(p);
            if window[p - 1] == b',' {
                after_comma = Some(p);
            }
        }
        let p = after_comma.or(best)?;
        out.extend_from_slice(&rest[..p]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[p..];
        offset += p;
    }
    out.extend_from_slice(rest);
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all_lines_short(m: &[u8]) -> bool {
        lines(m).all(|l| l.len() <= MAX_LINE)
    }

    #[test]
    fn line_ends() {
        for (input, want) in [
            (&b"a\r\nb\r\n"[..], &b"a\r\nb\r\n"[..]),
            (b"hello\n.\n", b"hello\r\n.\r\n"),
            (b"a\r.\r\n", b"a\r\n.\r\n"),
            (b"\n.\r\n", b"\r\n.\r\n"),
            (b"a\r\r\n", b"a\r\n\r\n"),
            (b"\r", b"\r\n"),
            (b"", b""),
        ] {
            assert_eq!(normalise_line_ends(input).as_ref(), want, "{input:?}");
        }
        assert!(matches!(
            normalise_line_ends(b"x\r\ny\r\n"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn a_long_to_header_is_folded_after_commas() {
        let to: Vec<String> = (0..100).map(|i| format!("user{i:03}@mx.test")).collect();
        let msg = format!("To: {}\r\nSubject: x\r\n\r\nbody\r\n", to.join(", "));
        assert!(msg.lines().next().unwrap().len() > 1600);
        let out = prepare(msg.clone().into_bytes()).unwrap();
        assert!(all_lines_short(&out));
        let text = String::from_utf8(out).unwrap();
        assert!(text.lines().nth(1).unwrap().starts_with(' '), "{text}");
        assert!(text.lines().next().unwrap().ends_with(','), "{text}");
        assert_eq!(
            text.replace("\r\n ", " "),
            msg,
            "unfolding gives the original"
        );
    }

    #[test]
    fn what_cannot_be_relayed_is_refused() {
        let token = format!("X-Big: {}\r\n\r\nbody\r\n", "a".repeat(100_000));
        assert_eq!(
            prepare(token.into_bytes()),
            Err(ContentError::UnfoldableHeader { line: 1 })
        );
        let body = format!("Subject: x\r\n\r\nok\r\n{}\r\n", "b".repeat(1500));
        assert_eq!(
            prepare(body.into_bytes()),
            Err(ContentError::LongBodyLine { line: 4 })
        );
        let exactly = format!("Subject: x\r\n\r\n{}\r\n", "b".repeat(MAX_LINE));
        assert!(prepare(exactly.into_bytes()).is_ok());
        // No header section at all: the long first line is body.
        assert_eq!(
            prepare(format!("{}\r\n", "c ".repeat(600)).into_bytes()),
            Err(ContentError::LongBodyLine { line: 1 })
        );
    }

    #[test]
    fn header_values_and_names() {
        assert_eq!(check_value("fine\tvalue"), Ok(()));
        for bad in [
            "r@client.test\r\nX-Injected: yes",
            "a\nb",
            "a\0b",
            "a\u{1b}b",
        ] {
            assert_eq!(check_value(bad), Err(HeaderError::Control), "{bad:?}");
        }
        assert_eq!(check_value(&"x".repeat(901)), Err(HeaderError::Unfoldable));
        assert_eq!(check_value(&"x ".repeat(2000)), Ok(()));
        assert_eq!(check_name("X-Thing"), Ok(()));
        for bad in ["", "X Thing", "X:Y", "X-\u{e9}", &"x".repeat(77)] {
            assert_eq!(check_name(bad), Err(HeaderError::BadName), "{bad:?}");
        }
    }

    fn unstuff(wire: &[u8]) -> (Vec<u8>, usize) {
        let mut receiver = smtp_proto::request::receiver::DataReceiver::new();
        let mut out = Vec::new();
        let mut seeded = b"\r\n".iter();
        receiver.ingest(&mut seeded, &mut out);
        let mut bytes = wire.iter();
        assert!(receiver.ingest(&mut bytes, &mut out), "message ended");
        out.drain(..2);
        (out, bytes.as_slice().len())
    }

    fn message_bytes() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(b"\r\n".to_vec()),
            Just(b"\n".to_vec()),
            Just(b"\r".to_vec()),
            Just(b".".to_vec()),
            Just(b"\r\n.\r\n".to_vec()),
            Just(b"\n.\n".to_vec()),
            Just(b"\r.\r\n".to_vec()),
            Just(b"Subject: x\r\n".to_vec()),
            Just(b" ".to_vec()),
            prop::collection::vec(any::<u8>(), 0..8),
            (1usize..1300).prop_map(|n| vec![b'a'; n]),
        ];
        prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn header_check_never_panics_and_passes_no_control(s in "\\PC*|.{0,1000}") {
            if check_value(&s).is_ok() {
                prop_assert!(!s.chars().any(|c| c.is_control() && c != '\t'));
            }
            let _ = check_name(&s);
        }

        #[test]
        fn normalised_output_has_only_crlf(bytes in message_bytes()) {
            let out = normalise_line_ends(&bytes);
            for (i, &b) in out.iter().enumerate() {
                if b == b'\r' { prop_assert_eq!(out.get(i + 1), Some(&b'\n')); }
                if b == b'\n' { prop_assert!(i > 0 && out[i - 1] == b'\r'); }
            }
            prop_assert!(matches!(normalise_line_ends(&out), Cow::Borrowed(_)));
        }

        #[test]
        fn prepared_messages_are_relayable_and_round_trip_dot_stuffing(bytes in message_bytes()) {
            if let Ok(out) = prepare(bytes) {
                prop_assert!(all_lines_short(&out));
                prop_assert!(matches!(normalise_line_ends(&out), Cow::Borrowed(_)));
                let wire = crate::deliver::client::dot_stuff(&out);
                let (back, left) = unstuff(&wire);
                prop_assert_eq!(left, 0, "the message ended exactly at the final dot");
                let mut expect = out.clone();
                if !expect.ends_with(b"\r\n") { expect.extend_from_slice(b"\r\n"); }
                // An empty message goes out as one empty line.
                if out.is_empty() { expect = b"\r\n".to_vec(); }
                prop_assert_eq!(back, expect);
            }
        }

        #[test]
        fn lines_are_the_split_at_lf(bytes in message_bytes()) {
            let body = bytes.strip_suffix(b"\r\n").unwrap_or(&bytes);
            let want: Vec<&[u8]> = body
                .split(|&b| b == b'\n')
                .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
                .collect();
            prop_assert_eq!(lines(&bytes).collect::<Vec<_>>(), want);
        }

        #[test]
        fn folding_keeps_the_header_when_unfolded(words in prop::collection::vec("[a-z@.,]{1,40}", 1..200)) {
            let line = format!("To: {}", words.join(" "));
            let msg = format!("{line}\r\n\r\nbody\r\n");
            let out = prepare(msg.clone().into_bytes()).expect("whitespace every 40 octets folds");
            prop_assert!(all_lines_short(&out));
            let text = String::from_utf8(out).unwrap();
            prop_assert_eq!(text.replace("\r\n ", " "), msg);
        }
    }
}
