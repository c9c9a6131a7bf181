//! The admin API's types for one message's whereabouts: the trace of a message, the
//! search over queued recipients, the queue operations (retry, cancel, hold, release,
//! requeue), the export a purge saves first, and the online backup.

use serde::{Deserialize, Serialize};

/// A recipient's state in one word (`scheduled`, `held`, `delivered`, `failed`).
pub type RecipientStateName = String;

/// The last reply a destination gave a recipient, split as the trace shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastReply {
    /// The SMTP code; absent for answers that are not SMTP (webhooks, operator actions).
    pub code: Option<u16>,
    /// The enhanced status code (`5.1.1`), if the reply had one.
    pub enhanced: Option<String>,
    pub text: String,
}

/// One recipient of `GET /admin/v1/messages/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientTrace {
    pub address: String,
    pub state: RecipientStateName,
    pub attempts: u32,
    pub last_reply: Option<LastReply>,
    /// The bounce class of the last reply (`invalid_recipient`, `throttled`, ...), when
    /// there was a reply that was not a success.
    pub class: Option<String>,
    /// Why it failed for good (`rejected`, `expired`, `purged`, `cancelled`, ...).
    pub reason: Option<String>,
    /// When it is tried next (ms since the epoch), while scheduled or held.
    pub next_attempt_ms: Option<i64>,
    pub delivered_at_ms: Option<i64>,
    pub failed_at_ms: Option<i64>,
}

/// `GET /admin/v1/messages/{id}`: a message's envelope, where it came from, and where
/// each of its recipients is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageTrace {
    pub queue_id: String,
    pub sender: String,
    pub campaign: Option<String>,
    /// `smtp`, `http` or `bounce` (a notification Floodgate wrote).
    pub source: String,
    /// The client's address (SMTP) or API key name (HTTP).
    pub client: String,
    /// The SMTP AUTH user or the HTTP API key name, if any.
    pub identity: Option<String>,
    pub size: u64,
    pub received_at_ms: i64,
    /// Whether the body is still stored (it is freed once no recipient waits for it).
    pub body_stored: bool,
    pub recipients: Vec<RecipientTrace>,
}

/// One item of `GET /admin/v1/messages`: a recipient that matched, with its message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FoundRecipient {
    pub queue_id: String,
    pub sender: String,
    pub campaign: Option<String>,
    pub received_at_ms: i64,
    pub address: String,
    pub state: RecipientStateName,
    pub attempts: u32,
    pub last_reply: Option<String>,
    pub next_attempt_ms: Option<i64>,
}

/// `GET /admin/v1/messages?rcpt=&sender=&campaign=&state=&since=&until=&cursor=&limit=`:
/// newest first; pass `next_cursor` as `cursor` for the next page (absent on the last).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindResponse {
    pub recipients: Vec<FoundRecipient>,
    pub next_cursor: Option<String>,
}

/// Which queued recipients a queue operation applies to: exactly one selector.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// A queue id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// A recipient address (every message it is queued in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    /// A destination domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign: Option<String>,
}

/// `POST /admin/v1/queue/retry`: deferred recipients made due now.
/// `POST /admin/v1/queue/cancel`: recipients failed as `cancelled`, and the notifications
/// queued for them (when `[delivery] bounces` is on).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueOpResponse {
    /// Recipients the operation changed.
    pub recipients: u64,
    /// Delivery status notifications queued (cancel only).
    #[serde(default)]
    pub notifications: u64,
}

/// A destination domain's suspension.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainHold {
    pub domain: String,
    /// Since when (ms since the epoch).
    pub since_ms: i64,
}

/// `POST /admin/v1/domains/{domain}/{hold|release}`: the hold after the action and how
/// many queued recipients moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainActionResponse {
    pub domain: String,
    pub held: bool,
    pub recipients: u64,
}

/// One queued recipient as saved by `ctl purge --save`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedRecipient {
    pub address: String,
    pub domain: String,
    pub attempts: u32,
}

/// One line of the NDJSON file `ctl purge --save` writes and `ctl requeue` reads: a
/// message with its queued recipients and its body (base64), enough to queue it again
/// under the same queue id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedMessage {
    pub queue_id: String,
    pub sender: String,
    pub campaign: Option<String>,
    pub source: String,
    pub client: String,
    #[serde(default)]
    pub identity: Option<String>,
    pub received_at_ms: i64,
    #[serde(default)]
    pub smtputf8: bool,
    pub body_base64: String,
    pub recipients: Vec<SavedRecipient>,
}

/// `GET /admin/v1/export?campaign=NAME&after=CURSOR`: a page of a campaign's queued
/// messages, oldest first. `through` is the highest recipient id this export has covered
/// so far: a purge given it removes nothing the export did not save.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportPage {
    pub messages: Vec<SavedMessage>,
    pub next_cursor: Option<String>,
    pub through: i64,
}

/// The body of `POST /admin/v1/requeue`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequeueRequest {
    pub messages: Vec<SavedMessage>,
}

/// `POST /admin/v1/requeue`: what was put back. Idempotent by queue id: a message still
/// in the queue has only its purged recipients scheduled again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequeueResponse {
    /// Messages stored again (retention had deleted them).
    pub messages_restored: u64,
    /// Recipients scheduled again.
    pub recipients: u64,
    /// Recipients left as they were (already queued, or delivered since).
    pub unchanged: u64,
}

/// The body of `POST /admin/v1/backup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupRequest {
    /// A new folder's name in `[queue] backup_dir` (or an absolute path inside it).
    pub name: String,
    /// Copy failures.db too.
    #[serde(default)]
    pub failures: bool,
}

/// One database file copied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupFile {
    pub path: String,
    pub bytes: u64,
    /// `PRAGMA integrity_check` of the copy (`ok`).
    pub integrity: String,
}

/// `POST /admin/v1/backup`: where the copy is, and what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupResponse {
    /// The folder holding `queue.db` (and `failures.db`).
    pub dir: String,
    pub queue: BackupFile,
    pub failures: Option<BackupFile>,
    /// Messages, and recipients still waiting, in the copy.
    pub messages: u64,
    pub queued_recipients: u64,
    pub took_ms: u64,
}
