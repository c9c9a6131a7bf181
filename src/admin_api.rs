//! The admin API's wire types: one request or response struct per endpoint and the enums
//! they share, spoken by the daemon (`http/admin`), `floodgate ctl` and the dashboard.
//!
//! A leaf of the import graph on purpose: it depends on serde alone, so a client can use
//! it without the daemon, and the conversions from the daemon's own types live on the
//! daemon's side (`http/admin/views.rs`). `docs/openapi.yaml` describes the same shapes;
//! `tests/openapi.rs` keeps the two in step.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

mod mail;
pub use mail::*;

/// Every error the admin API answers with: `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// A campaign's state in one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CampaignState {
    Active,
    Paused,
    /// Purged, and refusing new mail until `blocked_until_ms`.
    Blocked,
}

impl CampaignState {
    pub fn as_str(self) -> &'static str {
        match self {
            CampaignState::Active => "active",
            CampaignState::Paused => "paused",
            CampaignState::Blocked => "blocked",
        }
    }
}

/// One campaign's counters: an item of `GET /admin/v1/campaigns`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CampaignView {
    pub name: String,
    pub state: CampaignState,
    pub accepted: u64,
    pub delivered: u64,
    /// Failures that count against the campaign (see the guard).
    pub failed: u64,
    pub failure_ratio: f64,
    pub deferred: u64,
    /// Failures by reason name; reasons without failures are left out.
    pub reasons: BTreeMap<String, u64>,
    /// Failed and deferred delivery attempts by bounce class; classes without any are
    /// left out.
    #[serde(default)]
    pub classes: BTreeMap<String, u64>,
    /// The end of a purge block (ms since the epoch); in the past when not blocked.
    pub blocked_until_ms: i64,
}

/// `POST /admin/v1/campaigns/{name}/{pause|resume|purge}`: the campaign after the action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CampaignActionResponse {
    #[serde(flatten)]
    pub campaign: CampaignView,
    /// Queued recipients deleted (purge only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purged: Option<u64>,
}

/// The body of `POST /admin/v1/campaigns/{name}/purge` (an empty body is the default).
/// Requests leave out what is not given; the daemon takes an absent field and a null alike.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    /// Refuse the campaign's new submissions for this long after the purge (`"10m"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_for: Option<String>,
    /// Purge only recipients up to this id: the `through` of an export saved first
    /// (`ctl purge --save`), so that nothing unsaved is removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub through: Option<i64>,
}

/// `POST /admin/v1/intake/{pause|resume}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntakeResponse {
    pub intake_paused: bool,
}

/// How much of each failure reaches failures.db.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailLogMode {
    /// A row per failure, at most `rows_per_sec` per campaign; aggregates for everything.
    Full,
    /// One row in `sample_rate` per campaign (and the same rate cap); aggregates for everything.
    Sampled,
    /// Aggregates only: rows per minute bounded by distinct keys, never by volume.
    Aggregate,
    /// Nothing written. In-memory counters still feed metrics and the guard.
    Off,
}

impl FailLogMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FailLogMode::Full => "full",
            FailLogMode::Sampled => "sampled",
            FailLogMode::Aggregate => "aggregate",
            FailLogMode::Off => "off",
        }
    }
}

/// The failure log's runtime switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailLogSettings {
    pub mode: FailLogMode,
    /// `sampled`: one event row in this many per campaign (0 and 1 keep every event).
    pub sample_rate: u32,
    /// Event rows per second per campaign; 0 writes no event rows.
    pub rows_per_sec: u32,
    /// Rows a campaign may write at once above its rate.
    pub burst: u32,
}

/// The failure log's counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailLogCounters {
    /// Events counted in the aggregates (every mode but off).
    pub recorded: u64,
    /// Events seen in mode off: not counted anywhere in failures.db.
    pub off_skipped: u64,
    /// Events recorded after `close`.
    pub closed_skipped: u64,
    /// Event rows handed to the writer.
    pub queued: u64,
    pub rows_written: u64,
    /// Rows refused by the per-campaign governor.
    pub suppressed: u64,
    /// Rows passed over by sampling.
    pub sampled_out: u64,
    /// Rows dropped because the writer's channel was full.
    pub dropped: u64,
    /// Rows lost because their transaction failed.
    pub lost_rows: u64,
    /// Aggregate counts given up at shutdown because the final flush kept failing.
    pub lost_aggregates: u64,
    /// Committed flush transactions.
    pub transactions: u64,
    pub failed_transactions: u64,
    pub pruned_rows: u64,
    pub pruned_stats: u64,
    /// Retention passes run (successful or not).
    pub prune_runs: u64,
    pub pending_aggregate_keys: u64,
}

/// `GET|PUT /admin/v1/faillog`, and `faillog` in the status. `settings` is null (and the
/// rest absent) when the failure log is not running.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailLogView {
    pub settings: Option<FailLogSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<FailLogCounters>,
    /// Event rows written per second, recently.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_per_sec: Option<f64>,
}

/// The body of `PUT /admin/v1/faillog`: what is absent (or null) stays as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailLogUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<FailLogMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_rate: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_per_sec: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// One row of failures.db.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureRow {
    pub id: i64,
    pub at_ms: i64,
    pub campaign: String,
    pub stage: String,
    pub reason: String,
    /// The bounce class of a relay failure; absent for refusals at the door.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    pub recipient: String,
    pub detail: String,
}

/// `GET /admin/v1/failures`: newest first; pass `next_before` as `before` for the next page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailuresResponse {
    pub failures: Vec<FailureRow>,
    pub next_before: Option<i64>,
}

/// `GET /admin/v1/queue`: waiting recipients by state, and `[name, count]` pairs of the
/// busiest domains and campaigns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueResponse {
    pub by_state: BTreeMap<String, u64>,
    pub by_domain: Vec<(String, u64)>,
    pub by_campaign: Vec<(String, u64)>,
}

/// An item of `GET /admin/v1/alerts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    pub at_ms: i64,
    pub kind: String,
    pub campaign: Option<String>,
    pub message: String,
    /// What the guard did about it (`paused`), if anything.
    pub action: Option<String>,
}

/// A webhook endpoint's circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CircuitState {
    Closed,
    Open,
    /// One probe request is let through.
    HalfOpen,
}

impl CircuitState {
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half-open",
        }
    }
}

/// One webhook endpoint the courier has used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookEndpoint {
    /// The URL without query or credentials.
    pub url: String,
    /// Disabled by a `410 Gone` until the config is reloaded.
    pub disabled: bool,
    pub circuit: CircuitState,
    pub consecutive_failures: u32,
}

/// `GET /admin/v1/webhooks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhooksResponse {
    pub endpoints: Vec<WebhookEndpoint>,
    /// Delivery events dropped because too many were pending.
    pub events_dropped: u64,
}

/// `GET /admin/v1/status`: totals since start, so that clients compute rates from samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusResponse {
    pub uptime_secs: u64,
    pub accepted_total: u64,
    pub delivered_total: u64,
    /// Refusals and failures of every kind.
    pub failures_total: u64,
    /// Failures that count against campaigns.
    pub failed_total: u64,
    pub intake_paused: bool,
    /// Recipients in queue.db by state.
    pub queue: BTreeMap<String, u64>,
    /// How many campaigns there are.
    pub campaigns: u64,
    /// Campaigns not active (paused or blocked).
    pub paused_campaigns: Vec<String>,
    pub faillog: FailLogView,
    /// How many alerts are kept.
    pub alerts: u64,
    /// The last canary probe of each address probed, by address.
    #[serde(default)]
    pub canary: Vec<ProbeReport>,
    /// Destinations suspended for being unreachable, by name.
    #[serde(default)]
    pub suspended: Vec<SuspendedDestination>,
    /// The cluster as this node sees it; absent without `[cluster]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
}

/// A destination none of whose hosts took a connection: nothing is tried there before
/// its next probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuspendedDestination {
    /// The MX domain, `host:port` of a smarthost.
    pub destination: String,
    pub since_ms: i64,
    /// The next probe (or the one under way, until it is answered).
    pub probe_at_ms: i64,
    /// The failed attempt that suspended it and the failed probes since, in a row.
    pub failures: u32,
    pub last_reply: String,
}

/// `[cluster]` in `GET /admin/v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The node that answered.
    pub node: String,
    /// Whether its last heartbeat reached Redis.
    pub connected: bool,
    /// What a destination's rate is divided by while Redis is away.
    pub fallback_divisor: u32,
    /// Every node in the registry, live or not, by name.
    pub nodes: Vec<ClusterNode>,
    /// Sums over the live nodes.
    pub accepted_per_sec: f64,
    pub delivered_per_sec: f64,
    pub queued: u64,
}

/// One node of the registry, as of its last heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterNode {
    pub node: String,
    pub alive: bool,
    pub last_heartbeat_ms: i64,
    pub accepted_per_sec: f64,
    pub delivered_per_sec: f64,
    /// Recipients waiting in that node's own spool.
    pub queued: u64,
    pub accepted_total: u64,
    pub delivered_total: u64,
}

/// One TLS-RPT counter: sessions of one result with one MX host on one UTC day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsCount {
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    /// The recipient (policy) domain.
    pub domain: String,
    /// `sts` or `no-policy-found`.
    pub policy_type: String,
    /// `success` or an RFC 8460 result type (`starttls-not-supported`, ...).
    pub result: String,
    /// The MX host, empty for failures before any host (a policy fetch).
    pub mx: String,
    pub ip: String,
    pub sessions: u64,
}

/// One day's report for one domain, as recorded when it was handled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsReportRecord {
    pub day: String,
    pub domain: String,
    pub sent_at_ms: i64,
    /// Per `rua`: `sent https://...`, `queued mailto:...`, `failed ...: why`; or
    /// `no rua published`.
    pub outcome: String,
}

/// `GET /admin/v1/tls-report[?domain=D]`: the TLS-RPT counters (newest day first) and the
/// reports handled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsReportResponse {
    /// `[tls_report] enabled`: whether reports are sent.
    pub enabled: bool,
    /// `[delivery] mta_sts`.
    pub mta_sts: String,
    pub counts: Vec<TlsCount>,
    pub reports: Vec<TlsReportRecord>,
}

/// `POST /admin/v1/tls-report/send`: the reports due (days before today not reported
/// yet) sent now rather than at the next minute's pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsReportSendResponse {
    pub sent: Vec<TlsReportRecord>,
}

/// A batch send's state and progress (`GET /admin/v1/batches`, `GET /admin/v1/batches/{id}`
/// and the send API's `GET /v1/batches/{id}`): counters moved with the rows, never a scan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchView {
    pub id: String,
    pub campaign: Option<String>,
    /// The state of its campaign: `active`, `paused` or `blocked`.
    pub state: CampaignState,
    pub created_at_ms: i64,
    /// Rows read from its recipient lists (blank lines and CSV headers aside).
    pub received: u64,
    pub accepted: u64,
    /// Rows refused at the door, by reason.
    pub rejected: BTreeMap<String, u64>,
    pub delivered: u64,
    /// Delivery attempts deferred (4xx), counted each time.
    pub deferred: u64,
    /// Permanent failures, `failed_template` included.
    pub failed: u64,
    /// Recipients whose message did not render (class `template`).
    pub failed_template: u64,
    /// Accepted and not yet delivered or failed.
    pub queued: u64,
}

/// One do-not-contact entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suppression {
    pub id: i64,
    /// A mailbox (`user@example.com`, local part lower-cased) or a whole domain
    /// (`@example.com`).
    pub address: String,
    /// The campaign the entry applies to; absent for a global entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign: Option<String>,
    /// `invalid_recipient`, `bad_domain`, `inactive_mailbox`, `unsubscribed`,
    /// `complaint` or `manual`.
    pub reason: String,
    /// The queue id of the message whose bounce made it, `api`, `import` or `unsubscribe`.
    pub source: String,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
}

/// `GET /admin/v1/suppressions`: oldest first; pass `next_cursor` as `cursor` for the
/// next page (null on the last page).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuppressionsResponse {
    pub suppressions: Vec<Suppression>,
    pub next_cursor: Option<i64>,
}

/// The body of `POST /admin/v1/suppressions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuppressionAdd {
    /// `user@example.com`, or `@example.com` for a whole domain.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign: Option<String>,
    /// Default `manual`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Default: `[suppression] expire_after` for the reason, else never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<i64>,
}

/// What `POST /admin/v1/suppressions/import` did: exact counts, and the first
/// rejected lines with their numbers (1-based).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportReport {
    pub lines: u64,
    pub accepted: u64,
    pub invalid: u64,
    pub errors: Vec<ImportError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportError {
    pub line: u64,
    pub error: String,
}

/// `DELETE /admin/v1/suppressions/{address}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuppressionRemoved {
    pub removed: bool,
}

/// `POST /admin/v1/probe` (and each scheduled canary probe): one probe's result and the
/// time of each stage, in milliseconds after it was submitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReport {
    pub address: String,
    /// The `name` of the route that serves the address, when it has one.
    #[serde(default)]
    pub route: Option<String>,
    /// Empty when no message was queued (`busy`, or intake refused it).
    pub queue_id: String,
    /// `delivered`, `failed`, `timeout` (not delivered in time; cancelled, never
    /// retried), `refused` (intake did not queue it) or `busy` (one already in flight).
    pub result: String,
    /// Delivered, but slower than `[canary] slow`.
    pub slow: bool,
    pub started_at_ms: i64,
    pub stages: Vec<ProbeStage>,
    /// The receiver's last reply, if one came.
    pub reply: Option<String>,
}

impl ProbeReport {
    /// Delivered in time.
    pub fn healthy(&self) -> bool {
        self.result == "delivered" && !self.slow
    }
}

/// One stage a probe reached: `committed` (queued, on disk), `claimed` (the scheduler
/// leased it), `handed` (a courier started the attempt), then `delivered`, `failed` or
/// `timeout`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeStage {
    pub stage: String,
    pub after_ms: i64,
}
