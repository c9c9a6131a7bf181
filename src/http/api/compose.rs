//! What a send request becomes: the JSON and raw request shapes, their checks (each
//! refusal naming the field at fault), and the MIME message built from a JSON request.

use std::collections::{HashMap, HashSet};

use base64::Engine;
use hyper::{Response, StatusCode};
use serde::Deserialize;

use crate::address::{self, Mailbox};
use crate::http::{Body, json, query_pairs};
use crate::queue::QueueId;
use crate::smtp::message;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
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

#[derive(Debug, Deserialize)]
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

fn field_error(field: &str, why: &str) -> FieldError {
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
    let sender =
        parse_mailbox(&req.from).ok_or_else(|| field_error("from", "not a valid address"))?;
    for (list, name) in [(&req.to, "to"), (&req.cc, "cc"), (&req.bcc, "bcc")] {
        for (i, a) in list.iter().enumerate() {
            if a.contains(['\r', '\n']) {
                return Err(field_error(
                    &format!("{name}[{i}]"),
                    "line breaks are not allowed",
                ));
            }
        }
    }
    if req.to.is_empty() && req.cc.is_empty() && req.bcc.is_empty() {
        return Err(field_error("to", "at least one recipient in to, cc or bcc"));
    }
    for (name, value) in &req.headers {
        let bad_name = name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
        if bad_name || value.contains(['\r', '\n']) {
            return Err(field_error(
                &format!("headers.{name}"),
                "not a valid header",
            ));
        }
        if RESERVED.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(field_error(
                &format!("headers.{name}"),
                "set by its own field, not in headers",
            ));
        }
    }
    if req.subject.contains(['\r', '\n']) {
        return Err(field_error("subject", "line breaks are not allowed"));
    }
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
        sender: sender.address,
        recipients,
        campaign: req.campaign.clone(),
        body: Body_::Json(Box::new(req)),
    })
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
    if !sender.is_empty() && parse_mailbox(&sender).is_none() {
        return Err(field_error("from", "not a valid address"));
    }
    if recipients.is_empty() {
        return Err(field_error("to", "at least one recipient (?to=)"));
    }
    if body.is_empty() {
        return Err(field_error("body", "the RFC 5322 message is empty"));
    }
    let mut body = body;
    // Normalise bare LF line ends: the stored message is sent over SMTP as is.
    if body.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r') || body.first() == Some(&b'\n') {
        let mut fixed = Vec::with_capacity(body.len() + body.len() / 40);
        let mut prev = 0u8;
        for &b in &body {
            if b == b'\n' && prev != b'\r' {
                fixed.push(b'\r');
            }
            fixed.push(b);
            prev = b;
        }
        body = fixed;
    }
    let mut seen = HashSet::new();
    recipients.retain(|a| seen.insert(a.to_ascii_lowercase()));
    Ok(Prepared {
        sender,
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

fn parse_mailbox(s: &str) -> Option<Mailbox> {
    address::parse(bare_address(s)).ok()
}

fn mb_address(s: &str) -> mail_builder::headers::address::Address<'_> {
    mail_builder::headers::address::Address::new_address(display_name(s), bare_address(s))
}

pub(super) fn build_mime(
    req: &SendRequest,
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
        tags = req.tags.join(", ").replace(['\r', '\n'], " ");
        b = b.header("X-Floodgate-Tags", Raw::new(tags.as_str()));
    }
    let metadata;
    if !req.metadata.is_empty() {
        metadata = serde_json::Value::Object(req.metadata.clone()).to_string();
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
    if req.text.is_none() && req.html.is_none() && req.attachments.is_empty() {
        b = b.text_body("");
    }
    for a in &req.attachments {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(a.content.as_bytes())
            .map_err(|_| format!("attachment {}: not valid base64", a.filename))?;
        b = b.attachment(a.content_type.as_str(), a.filename.as_str(), bytes);
    }
    b.write_to_vec()
        .map_err(|e| format!("cannot build the message: {e}"))
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
