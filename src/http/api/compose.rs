//! What a send request becomes: the JSON and raw request shapes, their checks (each
//! refusal naming the field at fault), and the MIME message built from a JSON request.

use std::collections::{HashMap, HashSet};

use base64::Engine;
use hyper::{Response, StatusCode};
use serde::Deserialize;

use crate::address::{self, Sender};
use crate::http::{Body, json, query_pairs};
use crate::queue::QueueId;
use crate::smtp::message;
use crate::wire;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    /// Required; defaulted only so that its absence is refused naming `from`.
    #[serde(default)]
    pub from: String,
    #[serde(default)]
    pub to: Vec<String>,
    #[serde(default)]
    pub cc: Vec<String>,
    #[serde(default)]
    pub bcc: Vec<String>,
    pub reply_to: Option<String>,
    #[serde(default)]
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
    #[serde(default)]
    pub headers: HashMap<String, String>,
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    pub campaign: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Attachment {
    pub filename: String,
    pub content_type: String,
    /// Base64.
    pub content: String,
}

/// Headers the API sets itself; `headers{}` may not override them.
const RESERVED: &[&str] = &[
    "from",
    "to",
    "cc",
    "bcc",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "received",
    "sender",
];

pub(super) enum Body_ {
    Json(Box<SendRequest>),
    Raw(Vec<u8>),
}

/// A request checked for shape, before the door.
pub(super) struct Prepared {
    pub sender: String,
    pub recipients: Vec<String>,
    pub campaign: Option<String>,
    pub body: Body_,
}

/// A request field at fault: answered 400 with the field named.
pub(super) struct FieldError {
    field: String,
    why: String,
}

impl FieldError {
    pub fn response(&self) -> Response<Body> {
        json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({ "error": format!("{}: {}", self.field, self.why), "field": self.field }),
        )
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.why)
    }
}

pub(super) fn field_error(field: &str, why: &str) -> FieldError {
    FieldError {
        field: field.to_owned(),
        why: why.to_owned(),
    }
}

pub(super) fn json_message(body: &[u8]) -> Result<Prepared, FieldError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let req: SendRequest = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "body".to_owned() } else { path };
        field_error(&field, &e.into_inner().to_string())
    })?;
    let sender = check_fields(&req)?;
    if req.to.is_empty() && req.cc.is_empty() && req.bcc.is_empty() {
        return Err(field_error("to", "at least one recipient in to, cc or bcc"));
    }
    let mut seen = HashSet::new();
    let recipients: Vec<String> = req
        .to
        .iter()
        .chain(&req.cc)
        .chain(&req.bcc)
        .map(|a| bare_address(a).to_owned())
        .filter(|a| seen.insert(a.to_ascii_lowercase()))
        .collect();
    Ok(Prepared {
        sender,
        recipients,
        campaign: req.campaign.clone(),
        body: Body_::Json(Box::new(req)),
    })
}

/// Every check of a JSON message but its recipients (a batch's template has none):
/// the header-bound fields, the sender, the attachments. Returns the envelope sender.
pub(super) fn check_fields(req: &SendRequest) -> Result<String, FieldError> {
    if req.from.is_empty() {
        return Err(field_error("from", "missing field `from`"));
    }
    check_headers(req)?;
    let sender = match address::parse_sender(bare_address(&req.from)) {
        Ok(Sender::Mailbox(m)) => m,
        Ok(Sender::Null) => return Err(field_error("from", "a From: header needs an address")),
        Err(_) => return Err(field_error("from", "not a valid address")),
    };
    for (i, a) in req.attachments.iter().enumerate() {
        if base64::engine::general_purpose::STANDARD
            .decode(a.content.as_bytes())
            .is_err()
        {
            return Err(field_error(
                &format!("attachments[{i}].content"),
                "not valid base64",
            ));
        }
    }
    Ok(sender.address)
}

/// Every field that becomes a header, through one check (`wire::check_value`), each
/// refusal naming its field.
fn check_headers(req: &SendRequest) -> Result<(), FieldError> {
    let value =
        |field: &str, v: &str| wire::check_value(v).map_err(|e| field_error(field, &e.to_string()));
    value("from", &req.from)?;
    for (list, name) in [(&req.to, "to"), (&req.cc, "cc"), (&req.bcc, "bcc")] {
        for (i, a) in list.iter().enumerate() {
            value(&format!("{name}[{i}]"), a)?;
        }
    }
    if let Some(r) = &req.reply_to {
        value("reply_to", r)?;
        if address::parse(bare_address(r)).is_err() {
            return Err(field_error("reply_to", "not a valid address"));
        }
    }
    value("subject", &req.subject)?;
    for (name, v) in &req.headers {
        let field = format!("headers.{name}");
        wire::check_name(name).map_err(|e| field_error(&field, &e.to_string()))?;
        value(&field, v)?;
        if RESERVED.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(field_error(&field, "set by its own field, not in headers"));
        }
    }
    for (i, a) in req.attachments.iter().enumerate() {
        let ct = format!("attachments[{i}].content_type");
        value(&ct, &a.content_type)?;
        if !valid_media_type(&a.content_type) {
            return Err(field_error(&ct, "not a media type (type/subtype)"));
        }
        let name = format!("attachments[{i}].filename");
        value(&name, &a.filename)?;
        if a.filename.len() > MAX_FILENAME {
            return Err(field_error(&name, "longer than 255 octets"));
        }
    }
    for (i, t) in req.tags.iter().enumerate() {
        value(&format!("tags[{i}]"), t)?;
    }
    if !req.metadata.is_empty() {
        value("metadata", &metadata_header(req))?;
    }
    if let Some(c) = &req.campaign {
        value("campaign", c)?;
    }
    Ok(())
}

/// An attachment's filename becomes one RFC 2047 encoded word, which is never folded.
const MAX_FILENAME: usize = 255;

/// `type/subtype` in RFC 2045 tokens, optionally followed by `; parameters`.
fn valid_media_type(ct: &str) -> bool {
    let essence = ct.split(';').next().unwrap_or_default().trim();
    let token = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?=".contains(&b))
    };
    matches!(essence.split_once('/'), Some((t, s)) if token(t) && token(s))
}

fn metadata_header(req: &SendRequest) -> String {
    serde_json::Value::Object(req.metadata.clone()).to_string()
}

pub(super) fn raw_message(query: Option<&str>, body: Vec<u8>) -> Result<Prepared, FieldError> {
    let mut sender = None;
    let mut recipients = Vec::new();
    let mut campaign = None;
    for (k, v) in query_pairs(query) {
        match k.as_str() {
            "from" => sender = Some(v),
            "to" => recipients.push(v),
            "campaign" => campaign = Some(v),
            other => {
                return Err(field_error(
                    other,
                    "unknown parameter (use from, to, campaign)",
                ));
            }
        }
    }
    let sender =
        sender.ok_or_else(|| field_error("from", "the envelope sender is required (?from=)"))?;
    // The envelope holds the parsed address only: `<>` or a mailbox, never the raw text.
    let sender = address::parse_sender(&sender).map_err(|_| {
        field_error(
            "from",
            "not a valid address (control characters and extra text are refused)",
        )
    })?;
    if recipients.is_empty() {
        return Err(field_error("to", "at least one recipient (?to=)"));
    }
    for (i, r) in recipients.iter().enumerate() {
        if r.chars().any(char::is_control) {
            return Err(field_error(
                &format!("to[{i}]"),
                "control characters are not allowed",
            ));
        }
    }
    if let Some(c) = &campaign {
        wire::check_value(c).map_err(|e| field_error("campaign", &e.to_string()))?;
    }
    if body.is_empty() {
        return Err(field_error("body", "the RFC 5322 message is empty"));
    }
    // The stored message is sent over SMTP as is: CRLF line ends, every line relayable.
    let body = wire::prepare(body).map_err(|e| field_error("body", &e.to_string()))?;
    let mut seen = HashSet::new();
    recipients.retain(|a| seen.insert(a.to_ascii_lowercase()));
    Ok(Prepared {
        sender: sender.envelope().to_owned(),
        recipients,
        campaign: campaign.or_else(|| message::header_value(&body, "X-Campaign-ID")),
        body: Body_::Raw(body),
    })
}

/// `Name <addr>` or `addr` → `addr`.
fn bare_address(s: &str) -> &str {
    match (s.rfind('<'), s.rfind('>')) {
        (Some(a), Some(b)) if a < b => s[a + 1..b].trim(),
        _ => s.trim(),
    }
}

fn display_name(s: &str) -> Option<&str> {
    s.rfind('<')
        .map(|a| s[..a].trim().trim_matches('"').trim())
        .filter(|n| !n.is_empty())
}

fn mb_address(s: &str) -> mail_builder::headers::address::Address<'_> {
    mail_builder::headers::address::Address::new_address(display_name(s), bare_address(s))
}

/// An attachment with its content decoded from base64.
pub(super) struct Decoded {
    content_type: String,
    filename: String,
    bytes: Vec<u8>,
}

/// Decodes a request's attachments: once per message, or once per batch for every
/// recipient's render.
pub(super) fn decode_attachments(list: &[Attachment]) -> Result<Vec<Decoded>, String> {
    list.iter()
        .map(|a| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(a.content.as_bytes())
                .map_err(|_| format!("attachment {}: not valid base64", a.filename))?;
            Ok(Decoded {
                content_type: a.content_type.clone(),
                filename: a.filename.clone(),
                bytes,
            })
        })
        .collect()
}

pub(super) fn build_mime(
    req: &SendRequest,
    queue_id: &QueueId,
    hostname: &str,
) -> Result<Vec<u8>, String> {
    let attachments = decode_attachments(&req.attachments)?;
    build_mime_with(req, &attachments, queue_id, hostname)
}

/// [`build_mime`] with the attachments already decoded; `req.attachments` is not read.
pub(super) fn build_mime_with(
    req: &SendRequest,
    attachments: &[Decoded],
    queue_id: &QueueId,
    hostname: &str,
) -> Result<Vec<u8>, String> {
    use mail_builder::MessageBuilder;
    use mail_builder::headers::address::Address;
    use mail_builder::headers::raw::Raw;

    let mut b = MessageBuilder::new()
        .from(mb_address(&req.from))
        .subject(req.subject.as_str())
        .message_id(format!("{}@{hostname}", queue_id.as_str()));
    if !req.to.is_empty() {
        b = b.to(Address::new_list(
            req.to.iter().map(|a| mb_address(a)).collect(),
        ));
    }
    if !req.cc.is_empty() {
        b = b.cc(Address::new_list(
            req.cc.iter().map(|a| mb_address(a)).collect(),
        ));
    }
    // Bcc recipients are in the envelope only, never in the headers.
    if let Some(r) = &req.reply_to {
        b = b.reply_to(mb_address(r));
    }
    let mut names: Vec<&String> = req.headers.keys().collect();
    names.sort();
    for name in names {
        b = b.header(name.as_str(), Raw::new(req.headers[name].as_str()));
    }
    let tags;
    if !req.tags.is_empty() {
        tags = req.tags.join(", ");
        b = b.header("X-Floodgate-Tags", Raw::new(tags.as_str()));
    }
    let metadata;
    if !req.metadata.is_empty() {
        metadata = metadata_header(req);
        b = b.header("X-Floodgate-Metadata", Raw::new(metadata.as_str()));
    }
    if let Some(c) = &req.campaign {
        b = b.header("X-Campaign-ID", Raw::new(c.as_str()));
    }
    if let Some(text) = &req.text {
        b = b.text_body(text.as_str());
    }
    if let Some(html) = &req.html {
        b = b.html_body(html.as_str());
    }
    if req.text.is_none() && req.html.is_none() && attachments.is_empty() {
        b = b.text_body("");
    }
    for a in attachments {
        b = b.attachment(
            a.content_type.as_str(),
            a.filename.as_str(),
            a.bytes.as_slice(),
        );
    }
    let built = b
        .write_to_vec()
        .map_err(|e| format!("cannot build the message: {e}"))?;
    // mail-builder encodes long body lines and folds most headers; this folds whatever it
    // left long, so the JSON door's output is always relayable.
    wire::prepare(built).map_err(|e| format!("cannot build a relayable message: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_with_names() {
        assert_eq!(bare_address("Alice <alice@a.test>"), "alice@a.test");
        assert_eq!(bare_address("bob@b.test"), "bob@b.test");
        assert_eq!(display_name("\"Alice A\" <alice@a.test>"), Some("Alice A"));
        assert_eq!(display_name("bob@b.test"), None);
    }

    #[test]
    fn field_errors_name_the_field() {
        let err = match json_message(br#"{"from":"a@b.test","to":[1]}"#) {
            Err(e) => e,
            Ok(_) => panic!("accepted a number as an address"),
        };
        assert_eq!(err.field, "to[0]");
        assert_eq!(err.response().status(), StatusCode::BAD_REQUEST);
        assert!(json_message(br#"{"from":"a@b.test","tos":["x@y.test"]}"#).is_err());
        assert!(
            json_message(br#"{"from":"a@b.test","to":["x@y.test"],"headers":{"Subject":"x"}}"#)
                .is_err()
        );
        assert!(json_message(br#"{"from":"a@b.test","to":["x@y.test"]}"#).is_ok());
    }

    fn field_of(body: &str) -> String {
        match json_message(body.as_bytes()) {
            Err(e) => e.field,
            Ok(_) => panic!("accepted {body}"),
        }
    }

    #[test]
    fn every_header_bound_field_is_checked() {
        let base = r#""from":"a@b.test","to":["x@y.test"]"#;
        for (extra, field) in [
            (
                r#""reply_to":"r@client.test\r\nX-Injected: yes""#,
                "reply_to",
            ),
            (r#""reply_to":"not an address""#, "reply_to"),
            (r#""subject":"a\u0000b""#, "subject"),
            (r#""headers":{"X-A":"1\n2"}"#, "headers.X-A"),
            (r#""headers":{"X A":"1"}"#, "headers.X A"),
            (r#""tags":["ok","t\r\nX: y"]"#, "tags[1]"),
            (r#""campaign":"c\rd""#, "campaign"),
            (
                r#""attachments":[{"filename":"a.txt","content_type":"text/plain\r\nX-Injected: yes","content":""}]"#,
                "attachments[0].content_type",
            ),
            (
                r#""attachments":[{"filename":"a.txt","content_type":"text","content":""}]"#,
                "attachments[0].content_type",
            ),
            (
                r#""attachments":[{"filename":"a\r\n.txt","content_type":"text/plain","content":""}]"#,
                "attachments[0].filename",
            ),
        ] {
            assert_eq!(field_of(&format!("{{{base},{extra}}}")), field, "{extra}");
        }
        let long = "x".repeat(1000);
        assert_eq!(
            field_of(&format!(r#"{{{base},"metadata":{{"k":"{long}"}}}}"#)),
            "metadata"
        );
        assert_eq!(
            field_of(r#"{"from":"A\r\nB <a@b.test>","to":["x@y.test"]}"#),
            "from"
        );
        assert_eq!(
            field_of(r#"{"from":"a@b.test","to":["N\r\nBcc: z@z.test <x@y.test>"]}"#),
            "to[0]"
        );
        assert_eq!(field_of(r#"{"to":["x@y.test"]}"#), "from");
        assert_eq!(field_of(r#"{"from":"<>","to":["x@y.test"]}"#), "from");
        assert_eq!(field_of("42"), "body");
        assert!(
            json_message(
                br#"{"from":"a@b.test","to":["x@y.test"],"attachments":[{"filename":"a.txt","content_type":"text/plain; charset=utf-8","content":""}]}"#
            )
            .is_ok()
        );
    }

    #[test]
    fn raw_envelopes_are_parsed_values() {
        let exploit = "from=app%40client.test%3E%0D%0ARCPT%20TO%3A%3Cbcc%40nowhere.example%3E%0D%0ANOOP&to=victim%40good.test";
        match raw_message(Some(exploit), b"Subject: x\r\n\r\nhi\r\n".to_vec()) {
            Err(e) => assert_eq!(e.field, "from"),
            Ok(p) => panic!("accepted sender {:?}", p.sender),
        }
        let p = raw_message(
            Some("from=%3Capp%40client.test%3E&to=v%40good.test"),
            b"Subject: x\n\nhi\n".to_vec(),
        )
        .unwrap_or_else(|e| panic!("{}", e.why));
        assert_eq!(p.sender, "app@client.test");
        let Body_::Raw(body) = p.body else { panic!() };
        assert_eq!(body, b"Subject: x\r\n\r\nhi\r\n");
        let null = raw_message(Some("from=&to=v%40good.test"), b"x\r\n".to_vec());
        assert_eq!(null.map(|p| p.sender).ok().as_deref(), Some(""));
        let long = format!("Subject: x\r\n\r\n{}\r\n", "y".repeat(1500));
        assert_eq!(
            raw_message(Some("from=a%40b.test&to=v%40good.test"), long.into_bytes())
                .err()
                .map(|e| e.field),
            Some("body".to_owned())
        );
        assert_eq!(
            raw_message(
                Some("from=a%40b.test&to=v%40good.test%0D%0A"),
                b"x".to_vec()
            )
            .err()
            .map(|e| e.field),
            Some("to[0]".to_owned())
        );
    }

    #[test]
    fn long_text_and_html_lines_are_encoded() {
        let line = "word".repeat(1250);
        let req: SendRequest = serde_json::from_value(serde_json::json!({
            "from": "a@b.test", "to": ["x@y.test"], "subject": "s ".repeat(700),
            "text": line, "html": format!("<p>{line}</p>"),
            "headers": {"X-Long": "v ".repeat(1000)}
        }))
        .unwrap();
        let mime = build_mime(&req, &QueueId::generate(1), "relay.test").unwrap();
        assert!(
            mime.split(|&b| b == b'\n').all(|l| l.len() <= 999),
            "{}",
            String::from_utf8_lossy(&mime)
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_json_never_panics(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = json_message(&body);
        }

        #[test]
        fn json_shaped_requests_never_panic_and_accept_no_controls(
            from in "\\PC{0,30}", to in proptest::collection::vec("\\PC{0,30}", 0..4),
            subject in "\\PC{0,40}", reply in proptest::option::of("\\PC{0,30}"),
            hname in "\\PC{0,12}", hvalue in "\\PC{0,40}", ct in "\\PC{0,20}",
        ) {
            let body = serde_json::json!({
                "from": from, "to": to, "subject": subject, "reply_to": reply,
                "headers": {hname: hvalue},
                "attachments": [{"filename": "f", "content_type": ct, "content": ""}],
            });
            if let Ok(p) = json_message(body.to_string().as_bytes()) {
                let Body_::Json(req) = &p.body else { unreachable!() };
                let fields = [&req.from, &req.subject, &ct]
                    .into_iter()
                    .chain(req.to.iter())
                    .chain(req.headers.values())
                    .chain(req.reply_to.iter());
                for f in fields {
                    proptest::prop_assert!(!f.chars().any(|c| c.is_control() && c != '\t'), "{:?}", f);
                }
                proptest::prop_assert!(!p.sender.chars().any(char::is_control));
                let mime = build_mime(req, &QueueId::generate(1), "relay.test");
                if let Ok(m) = mime {
                    proptest::prop_assert!(m.split(|&b| b == b'\n').all(|l| l.len() <= 999));
                }
            }
        }
    }

    #[test]
    fn mime_keeps_bcc_out_of_headers() {
        let req: SendRequest = serde_json::from_str(
            r#"{"from":"App <app@a.test>","to":["x@y.test"],"bcc":["hidden@y.test"],"subject":"Hi","text":"hello","html":"<p>hello</p>","headers":{"X-Thing":"1"},"attachments":[{"filename":"a.txt","content_type":"text/plain","content":"aGVsbG8="}],"tags":["t1"]}"#,
        )
        .unwrap();
        let mime =
            String::from_utf8(build_mime(&req, &QueueId::generate(1), "relay.test").unwrap())
                .unwrap();
        assert!(mime.contains("Subject: Hi"), "{mime}");
        assert!(mime.contains("X-Thing: 1"), "{mime}");
        assert!(mime.contains("multipart/"), "{mime}");
        assert!(!mime.contains("hidden@y.test"), "{mime}");
        assert!(mime.contains("X-Floodgate-Tags: t1"), "{mime}");
    }
}
