//! The JSON a webhook receives for one message, and the little MIME reading it needs:
//! the header section as a name/value list, the subject, and the first `text/plain` and
//! `text/html` bodies of a single-part or (nested) multipart message. Not a full MIME
//! parser: anything it does not understand is still there in `raw`.

use std::borrow::Cow;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Serialize;

use crate::deliver::Job;

/// Deepest multipart nesting followed (mixed > alternative > related is 3).
const MAX_DEPTH: usize = 4;

#[derive(Serialize)]
struct Payload<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    queue_id: &'a str,
    campaign: Option<&'a str>,
    envelope: Envelope<'a>,
    headers: Vec<Header>,
    subject: Option<String>,
    text: Option<String>,
    html: Option<String>,
    /// The whole message as relayed, base64.
    raw: String,
}

#[derive(Serialize)]
struct Envelope<'a> {
    from: &'a str,
    to: Vec<&'a str>,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
struct Header {
    name: String,
    value: String,
}

/// The request body for `job`.
pub fn build(job: &Job) -> Vec<u8> {
    let message = Message::parse(&job.body);
    let payload = Payload {
        kind: "message",
        queue_id: &job.queue_id,
        campaign: job.recipients.first().and_then(|r| r.campaign.as_deref()),
        envelope: Envelope {
            from: &job.sender,
            to: job.recipients.iter().map(|r| r.address.as_str()).collect(),
        },
        subject: message.header("subject").map(decode_words),
        headers: message.headers,
        text: message.text,
        html: message.html,
        raw: B64.encode(job.body.as_slice()),
    };
    serde_json::to_vec(&payload).expect("plain structs serialize")
}

/// `msg_<queue id>_<route>_<first recipient row>`: the same on every retry of this
/// message to this destination (receivers deduplicate on it), and distinct when a
/// message's recipients were split over two jobs.
pub fn webhook_id(job: &Job) -> String {
    let first = job.recipients.iter().map(|r| r.id).min().unwrap_or(0);
    format!("msg_{}_{}_{first}", job.queue_id, job.destination.route)
}

struct Message {
    headers: Vec<Header>,
    text: Option<String>,
    html: Option<String>,
}

impl Message {
    fn parse(raw: &[u8]) -> Message {
        let (head, body) = split(raw);
        let headers = parse_headers(head);
        let mut message = Message {
            headers: Vec::new(),
            text: None,
            html: None,
        };
        extract(&headers, body, 0, &mut message.text, &mut message.html);
        message.headers = headers;
        message
    }

    fn header(&self, name: &str) -> Option<&str> {
        find(&self.headers, name)
    }
}

fn find<'a>(headers: &'a [Header], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}

/// Header section and body, split at the first empty line (CRLF or bare LF).
fn split(raw: &[u8]) -> (&[u8], &[u8]) {
    if raw.starts_with(b"\r\n") {
        return (&[], &raw[2..]);
    }
    if raw.starts_with(b"\n") {
        return (&[], &raw[1..]);
    }
    let mut i = 0;
    while let Some(pos) = raw[i..].iter().position(|&b| b == b'\n') {
        let next = i + pos + 1;
        if raw[next..].starts_with(b"\r\n") {
            return (&raw[..next], &raw[next + 2..]);
        }
        if raw[next..].starts_with(b"\n") {
            return (&raw[..next], &raw[next + 1..]);
        }
        i = next;
    }
    (raw, &[])
}

/// Unfolded `Name: value` fields; lines that are neither a field nor a continuation are
/// skipped.
fn parse_headers(head: &[u8]) -> Vec<Header> {
    let text = String::from_utf8_lossy(head);
    let mut headers: Vec<Header> = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.starts_with([' ', '\t']) {
            if let Some(last) = headers.last_mut() {
                last.value.push(' ');
                last.value.push_str(line.trim());
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':')
            && !name.is_empty()
            && !name.contains(' ')
        {
            headers.push(Header {
                name: name.to_owned(),
                value: value.trim().to_owned(),
            });
        }
    }
    headers
}

/// `text/plain; charset="utf-8"` as (`text/plain`, parameter lookup).
fn content_type(value: &str) -> (String, Vec<(String, String)>) {
    let mut parts = value.split(';');
    let mime = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    let params = parts
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| {
            (
                k.trim().to_ascii_lowercase(),
                v.trim().trim_matches('"').to_owned(),
            )
        })
        .collect();
    (mime, params)
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn extract(
    headers: &[Header],
    body: &[u8],
    depth: usize,
    text: &mut Option<String>,
    html: &mut Option<String>,
) {
    let (mime, params) = content_type(find(headers, "content-type").unwrap_or("text/plain"));
    let attachment = find(headers, "content-disposition")
        .is_some_and(|d| d.trim().to_ascii_lowercase().starts_with("attachment"));
    if attachment {
        return;
    }
    if mime.starts_with("multipart/") {
        let Some(boundary) = param(&params, "boundary") else {
            return;
        };
        if depth >= MAX_DEPTH {
            return;
        }
        for part in parts(body, boundary) {
            let (head, body) = split(part);
            extract(&parse_headers(head), body, depth + 1, text, html);
        }
        return;
    }
    let slot = match mime.as_str() {
        "text/plain" => text,
        "text/html" => html,
        _ => return,
    };
    if slot.is_none() {
        let encoding = find(headers, "content-transfer-encoding").unwrap_or("7bit");
        let decoded = decode_transfer(encoding, body);
        *slot = Some(decode_charset(&decoded, param(&params, "charset")));
    }
}

/// The parts between `--boundary` lines, up to `--boundary--`.
fn parts<'a>(body: &'a [u8], boundary: &str) -> Vec<&'a [u8]> {
    let delimiter = format!("--{boundary}");
    let mut parts = Vec::new();
    let mut start: Option<usize> = None;
    let mut i = 0;
    while i < body.len() {
        let end = body[i..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(body.len(), |p| i + p + 1);
        let line = trim_eol(&body[i..end]);
        if let Some(rest) = line.strip_prefix(delimiter.as_bytes()) {
            let closing = rest.starts_with(b"--");
            if closing || rest.iter().all(u8::is_ascii_whitespace) {
                if let Some(s) = start {
                    // The line break before a delimiter belongs to the delimiter.
                    parts.push(trim_eol(&body[s..i]));
                }
                if closing {
                    return parts;
                }
                start = Some(end);
            }
        }
        i = end;
    }
    if let Some(s) = start {
        parts.push(&body[s.min(body.len())..]);
    }
    parts
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn decode_transfer<'a>(encoding: &str, body: &'a [u8]) -> Cow<'a, [u8]> {
    match encoding.trim().to_ascii_lowercase().as_str() {
        "base64" => {
            let clean: Vec<u8> = body
                .iter()
                .copied()
                .filter(|b| !b.is_ascii_whitespace())
                .collect();
            match B64.decode(&clean) {
                Ok(d) => Cow::Owned(d),
                Err(_) => Cow::Borrowed(body),
            }
        }
        "quoted-printable" => Cow::Owned(decode_qp(body, false)),
        _ => Cow::Borrowed(body),
    }
}

/// Quoted-printable (RFC 2045 §6.7); `underscore_is_space` for RFC 2047 `Q` words.
fn decode_qp(input: &[u8], underscore_is_space: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'=' if input[i + 1..].starts_with(b"\r\n") => i += 3,
            b'=' if input[i + 1..].starts_with(b"\n") => i += 2,
            b'=' if i + 2 < input.len() => match (hex(input[i + 1]), hex(input[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                }
                _ => {
                    out.push(b'=');
                    i += 1;
                }
            },
            b'_' if underscore_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn decode_charset(bytes: &[u8], charset: Option<&str>) -> String {
    match charset.map(str::to_ascii_lowercase).as_deref() {
        Some("iso-8859-1" | "latin1" | "latin-1" | "windows-1252") => {
            bytes.iter().map(|&b| b as char).collect()
        }
        _ => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// Decodes RFC 2047 encoded words (`=?utf-8?B?...?=`, `=?iso-8859-1?Q?...?=`);
/// whitespace between two encoded words is dropped, as the RFC says.
fn decode_words(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    let mut last_was_word = false;
    while let Some(start) = rest.find("=?") {
        let (before, candidate) = rest.split_at(start);
        let Some((word, after)) = encoded_word(candidate) else {
            out.push_str(&rest[..start + 2]);
            rest = &rest[start + 2..];
            last_was_word = false;
            continue;
        };
        if !(last_was_word && before.trim().is_empty()) {
            out.push_str(before);
        }
        out.push_str(&word);
        rest = after;
        last_was_word = true;
    }
    out.push_str(rest);
    out
}

/// One `=?charset?enc?text?=` at the start of `s`: its decoded text and what follows.
fn encoded_word(s: &str) -> Option<(String, &str)> {
    let inner = s.strip_prefix("=?")?;
    let (charset, inner) = inner.split_once('?')?;
    let (encoding, inner) = inner.split_once('?')?;
    let (text, after) = inner.split_once("?=")?;
    if text.contains(' ') {
        return None;
    }
    let bytes = match encoding {
        "B" | "b" => B64.decode(text).ok()?,
        "Q" | "q" => decode_qp(text.as_bytes(), true),
        _ => return None,
    };
    // `charset*language` (RFC 2231) keeps only the charset.
    let charset = charset.split('*').next();
    Some((decode_charset(&bytes, charset), after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_part_plain() {
        let m = Message::parse(
            b"From: a@b.test\r\nSubject: Hello\r\n there\r\n\r\nLine one\r\nLine two\r\n",
        );
        assert_eq!(m.header("subject"), Some("Hello there"));
        assert_eq!(m.text.as_deref(), Some("Line one\r\nLine two\r\n"));
        assert_eq!(m.html, None);
        assert_eq!(m.headers.len(), 2);
    }

    #[test]
    fn single_part_html_quoted_printable() {
        let m = Message::parse(
            b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n<p>caf=C3=A9 =\r\nbar</p>",
        );
        assert_eq!(m.html.as_deref(), Some("<p>café bar</p>"));
        assert_eq!(m.text, None);
    }

    #[test]
    fn multipart_alternative_nested_in_mixed() {
        let raw = concat!(
            "Subject: =?utf-8?B?Y2Fmw6k=?= =?utf-8?Q?_ouvert?=\r\n",
            "Content-Type: multipart/mixed; boundary=\"outer\"\r\n\r\n",
            "preamble\r\n--outer\r\n",
            "Content-Type: multipart/alternative; boundary=inner\r\n\r\n",
            "--inner\r\nContent-Type: text/plain; charset=\"iso-8859-1\"\r\n",
            "Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=E9\r\n",
            "--inner\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: base64\r\n\r\n",
            "PGI+aGk8L2I+\r\n--inner--\r\n",
            "--outer\r\nContent-Type: text/plain\r\nContent-Disposition: attachment\r\n\r\nnot me\r\n",
            "--outer--\r\nepilogue\r\n"
        );
        let m = Message::parse(raw.as_bytes());
        assert_eq!(m.text.as_deref(), Some("café"));
        assert_eq!(m.html.as_deref(), Some("<b>hi</b>"));
        assert_eq!(
            m.header("subject").map(decode_words).as_deref(),
            Some("café ouvert")
        );
    }

    #[test]
    fn broken_input_does_not_panic() {
        for raw in [
            &b""[..],
            b"\r\n",
            b"no header section",
            b"Content-Type: multipart/mixed\r\n\r\n--x\r\n",
            b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n",
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=",
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=4",
            b"Content-Transfer-Encoding: base64\r\n\r\n!!!",
            b"Subject: =?utf-8?B?!!?= =?x?",
        ] {
            let m = Message::parse(raw);
            let _ = m.header("subject").map(decode_words);
        }
        assert_eq!(decode_words("plain =? text"), "plain =? text");
    }
}
