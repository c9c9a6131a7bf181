//! `floodgate ctl` for one message's whereabouts and the queue operations: `message`,
//! `find`, `retry`, `cancel`, `hold`, `release`, `holds`, `backup`, `requeue`, and the
//! export behind `purge --save`. Commands of several calls (a saved purge, a requeue in
//! pieces) run here; the rest are one call each, like every other command.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::Value;

use super::client::{Client, CtlError, encode};
use super::render::{Table, utc};
use crate::admin_api as api;

/// A requeue request stays below this (the daemon takes up to 16 MiB).
const REQUEUE_CHUNK: usize = 8 * 1024 * 1024;

#[derive(Subcommand, Debug)]
pub enum MailCommand {
    /// Where one message is: envelope, source, and each recipient's state, attempts,
    /// last reply, bounce class, next attempt.
    Message { queue_id: String },
    /// Search queued and recent recipients, newest first.
    Find(FindArgs),
    /// Make deferred recipients due now (exactly one of the selectors).
    Retry(Select),
    /// Fail waiting recipients as `cancelled` (a notification goes to the sender when
    /// `[delivery] bounces` is on). By message or recipient.
    Cancel {
        #[command(flatten)]
        select: Select,
        /// Do not ask; required when not run from a terminal.
        #[arg(long, short)]
        yes: bool,
    },
    /// Hold a destination domain (its recipients wait, others flow; kept across restarts)
    /// or a campaign (as `pause`).
    Hold(HoldTarget),
    /// Release a held domain, or resume a campaign.
    Release(HoldTarget),
    /// Held destination domains.
    Holds,
    /// Copy queue.db (and with --failures failures.db) into a new folder NAME in
    /// `[queue] backup_dir`, while the daemon runs.
    Backup {
        name: String,
        #[arg(long)]
        failures: bool,
    },
    /// Put back what `purge --save FILE` saved (safe to run twice).
    Requeue { file: PathBuf },
}

#[derive(Args, Debug)]
pub struct FindArgs {
    #[arg(long)]
    rcpt: Option<String>,
    #[arg(long)]
    sender: Option<String>,
    #[arg(long)]
    campaign: Option<String>,
    /// scheduled, held, delivered or failed.
    #[arg(long)]
    state: Option<String>,
    /// Received since: a duration ago (`1h`) or ms since the epoch.
    #[arg(long)]
    since: Option<String>,
    #[arg(long)]
    until: Option<String>,
    /// Continue from a previous page's cursor.
    #[arg(long)]
    cursor: Option<String>,
    #[arg(long, default_value_t = 50)]
    limit: usize,
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct Select {
    #[arg(long, value_name = "QUEUE_ID")]
    message: Option<String>,
    #[arg(long, value_name = "ADDRESS")]
    recipient: Option<String>,
    #[arg(long)]
    domain: Option<String>,
    #[arg(long)]
    campaign: Option<String>,
}

impl Select {
    /// The selector in words, for the confirmation.
    fn describe(&self) -> String {
        match (&self.message, &self.recipient, &self.domain, &self.campaign) {
            (Some(m), ..) => format!("message {m}"),
            (_, Some(r), ..) => format!("recipient <{r}>"),
            (_, _, Some(d), _) => format!("domain {d}"),
            (.., Some(c)) => format!("campaign `{c}`"),
            _ => "nothing".into(),
        }
    }

    fn api(&self) -> api::Selector {
        api::Selector {
            message: self.message.clone(),
            recipient: self.recipient.clone(),
            domain: self.domain.clone(),
            campaign: self.campaign.clone(),
        }
    }
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct HoldTarget {
    #[arg(long)]
    domain: Option<String>,
    #[arg(long)]
    campaign: Option<String>,
}

fn query(pairs: &[(&str, &Option<String>)]) -> String {
    let q: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
    q.join("&")
}

/// The last request a command made, for the message of an answer this ctl cannot read.
pub type Asked = (Method, String);

/// Runs a command; returns the API's answer (or, for the commands of several calls, the
/// answer they add up to) and the request it came from.
pub async fn call(client: &Client, command: &MailCommand) -> Result<(Value, Asked), CtlError> {
    let asked = request_of(command);
    let answer = answer(client, command).await?;
    Ok((answer, asked))
}

fn request_of(command: &MailCommand) -> Asked {
    let post = |p: &str| (Method::POST, p.to_owned());
    match command {
        MailCommand::Message { queue_id } => (
            Method::GET,
            format!("/admin/v1/messages/{}", encode(queue_id)),
        ),
        MailCommand::Find(_) => (Method::GET, "/admin/v1/messages".into()),
        MailCommand::Retry(_) => post("/admin/v1/queue/retry"),
        MailCommand::Cancel { .. } => post("/admin/v1/queue/cancel"),
        MailCommand::Hold(_) | MailCommand::Release(_) => post("/admin/v1/domains"),
        MailCommand::Holds => (Method::GET, "/admin/v1/domains".into()),
        MailCommand::Backup { .. } => post("/admin/v1/backup"),
        MailCommand::Requeue { .. } => post("/admin/v1/requeue"),
    }
}

async fn answer(client: &Client, command: &MailCommand) -> Result<Value, CtlError> {
    let post = |path: String, body: Value| async move { client.post(&path, Some(body)).await };
    match command {
        MailCommand::Message { queue_id } => {
            client
                .get(&format!("/admin/v1/messages/{}", encode(queue_id)))
                .await
        }
        MailCommand::Find(f) => {
            let limit = Some(f.limit.to_string());
            let q = query(&[
                ("rcpt", &f.rcpt),
                ("sender", &f.sender),
                ("campaign", &f.campaign),
                ("state", &f.state),
                ("since", &f.since),
                ("until", &f.until),
                ("cursor", &f.cursor),
                ("limit", &limit),
            ]);
            client.get(&format!("/admin/v1/messages?{q}")).await
        }
        MailCommand::Retry(s) => post("/admin/v1/queue/retry".into(), to_value(&s.api())).await,
        MailCommand::Cancel { select, yes } => {
            if select.domain.is_some() || select.campaign.is_some() {
                return Err(CtlError::Usage(
                    "cancel takes --message or --recipient (a campaign's queue goes with `purge`)"
                        .into(),
                ));
            }
            if !yes {
                super::confirm(&format!(
                    "Fail every waiting recipient of {} as cancelled?",
                    select.describe()
                ))?;
            }
            post("/admin/v1/queue/cancel".into(), to_value(&select.api())).await
        }
        MailCommand::Hold(t) | MailCommand::Release(t) => {
            let hold = matches!(command, MailCommand::Hold(_));
            match (&t.domain, &t.campaign) {
                (Some(d), _) => {
                    let action = if hold { "hold" } else { "release" };
                    client
                        .post(&format!("/admin/v1/domains/{}/{action}", encode(d)), None)
                        .await
                }
                (None, Some(c)) => {
                    let action = if hold { "pause" } else { "resume" };
                    client.post(&super::campaign_path(c, action), None).await
                }
                (None, None) => Err(CtlError::Usage("give --domain or --campaign".into())),
            }
        }
        MailCommand::Holds => client.get("/admin/v1/domains").await,
        MailCommand::Backup { name, failures } => {
            let body = api::BackupRequest {
                name: name.clone(),
                failures: *failures,
            };
            post("/admin/v1/backup".into(), to_value(&body)).await
        }
        MailCommand::Requeue { file } => requeue(client, file).await,
    }
}

fn to_value(v: &impl serde::Serialize) -> Value {
    serde_json::to_value(v).unwrap_or_default()
}

fn file_error(path: &Path, e: impl std::fmt::Display) -> CtlError {
    CtlError::Usage(format!("{}: {e}", path.display()))
}

/// `purge --save FILE`: writes every waiting message of the campaign to FILE (NDJSON, a
/// new file, synced to disk), then purges only what was written.
pub async fn purge_saving(
    client: &Client,
    campaign: &str,
    block_for: Option<String>,
    file: &Path,
) -> Result<Value, CtlError> {
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(file)
        .map_err(|e| file_error(file, e))?;
    let (mut after, mut through, mut saved) = (0i64, 0i64, 0usize);
    loop {
        let path = format!(
            "/admin/v1/export?campaign={}&after={after}",
            encode(campaign)
        );
        let page: api::ExportPage = decode(client.get(&path).await?, &path)?;
        through = through.max(page.through);
        for m in &page.messages {
            let line = serde_json::to_string(m).unwrap_or_default();
            writeln!(out, "{line}").map_err(|e| file_error(file, e))?;
            saved += 1;
        }
        match page.next_cursor.and_then(|c| c.parse().ok()) {
            Some(next) => after = next,
            None => break,
        }
    }
    out.sync_all().map_err(|e| file_error(file, e))?;
    eprintln!("saved {saved} messages to {}", file.display());
    let body = api::PurgeRequest {
        block_for,
        through: Some(through),
    };
    client
        .post(
            &super::campaign_path(campaign, "purge"),
            Some(to_value(&body)),
        )
        .await
}

/// Sends FILE's messages back in requests below [`REQUEUE_CHUNK`]; the counts add up.
async fn requeue(client: &Client, file: &Path) -> Result<Value, CtlError> {
    let reader =
        std::io::BufReader::new(std::fs::File::open(file).map_err(|e| file_error(file, e))?);
    let mut total = api::RequeueResponse::default();
    let (mut chunk, mut bytes) = (Vec::new(), 0usize);
    let mut lines = reader.lines().enumerate().peekable();
    while let Some((n, line)) = lines.next() {
        let line = line.map_err(|e| file_error(file, e))?;
        if !line.trim().is_empty() {
            let m: api::SavedMessage = serde_json::from_str(&line)
                .map_err(|e| file_error(file, format!("line {}: {e}", n + 1)))?;
            bytes += line.len();
            chunk.push(m);
        }
        if !chunk.is_empty() && (bytes >= REQUEUE_CHUNK || lines.peek().is_none()) {
            let body = api::RequeueRequest {
                messages: std::mem::take(&mut chunk),
            };
            let path = "/admin/v1/requeue";
            let done: api::RequeueResponse =
                decode(client.post(path, Some(to_value(&body))).await?, path)?;
            total.messages_restored += done.messages_restored;
            total.recipients += done.recipients;
            total.unchanged += done.unchanged;
            bytes = 0;
        }
    }
    Ok(to_value(&total))
}

fn decode<T: serde::de::DeserializeOwned>(v: Value, path: &str) -> Result<T, CtlError> {
    serde_json::from_value(v)
        .map_err(|e| CtlError::Usage(format!("{path}: unexpected answer: {e}")))
}

fn opt(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("-")
}

/// The answer in words.
pub fn human(command: &MailCommand, answer: Value) -> Result<String, serde_json::Error> {
    use serde_json::from_value as de;
    Ok(match command {
        MailCommand::Message { .. } => message(&de(answer)?),
        MailCommand::Find(_) => found(&de(answer)?),
        MailCommand::Retry(_) => {
            let d: api::QueueOpResponse = de(answer)?;
            format!("{} deferred recipients due now\n", d.recipients)
        }
        MailCommand::Cancel { .. } => {
            let d: api::QueueOpResponse = de(answer)?;
            format!(
                "{} recipients cancelled; {} notifications queued\n",
                d.recipients, d.notifications
            )
        }
        MailCommand::Hold(HoldTarget {
            domain: Some(_), ..
        })
        | MailCommand::Release(HoldTarget {
            domain: Some(_), ..
        }) => {
            let d: api::DomainActionResponse = de(answer)?;
            let (word, state) = if d.held {
                ("held", "wait")
            } else {
                ("released", "are due")
            };
            format!(
                "domain {}: {word}; {} queued recipients {state}\n",
                d.domain, d.recipients
            )
        }
        MailCommand::Hold(_) | MailCommand::Release(_) => {
            let d: api::CampaignActionResponse = de(answer)?;
            format!(
                "campaign {}: {}\n",
                d.campaign.name,
                super::render::state(&d.campaign)
            )
        }
        MailCommand::Holds => {
            let holds: Vec<api::DomainHold> = de(answer)?;
            let mut t = Table::new(&[("DOMAIN", false), ("HELD SINCE (UTC)", false)]);
            for h in holds {
                t.row(vec![h.domain, utc(h.since_ms)]);
            }
            t.render()
        }
        MailCommand::Backup { .. } => {
            let b: api::BackupResponse = de(answer)?;
            let mut out = format!(
                "backup in {} ({} ms): {} messages, {} waiting recipients\n",
                b.dir, b.took_ms, b.messages, b.queued_recipients
            );
            for f in std::iter::once(&b.queue).chain(b.failures.as_ref()) {
                out.push_str(&format!(
                    "  {}  {} bytes  integrity {}\n",
                    f.path, f.bytes, f.integrity
                ));
            }
            out
        }
        MailCommand::Requeue { .. } => {
            let d: api::RequeueResponse = de(answer)?;
            format!(
                "{} recipients queued again ({} messages restored); {} unchanged\n",
                d.recipients, d.messages_restored, d.unchanged
            )
        }
    })
}

fn message(m: &api::MessageTrace) -> String {
    let out = format!(
        "message {}  from <{}>  campaign {}\n  received {} UTC over {} from {} (identity {})  {} bytes{}\n",
        m.queue_id,
        m.sender,
        opt(&m.campaign),
        utc(m.received_at_ms),
        m.source,
        m.client,
        opt(&m.identity),
        m.size,
        if m.body_stored { "" } else { ", body freed" }
    );
    let mut t = Table::new(&[
        ("RECIPIENT", false),
        ("STATE", false),
        ("ATTEMPTS", true),
        ("CLASS", false),
        ("WHEN (UTC)", false),
        ("LAST REPLY", false),
    ]);
    for r in &m.recipients {
        let when = r
            .delivered_at_ms
            .or(r.failed_at_ms)
            .map(utc)
            .or(r.next_attempt_ms.map(|ms| format!("next {}", utc(ms))))
            .unwrap_or_default();
        let reply = r
            .last_reply
            .as_ref()
            .map(|l| {
                [
                    l.code.map(|c| c.to_string()),
                    l.enhanced.clone(),
                    Some(l.text.clone()),
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" ")
            })
            .unwrap_or_default();
        t.row(vec![
            r.address.clone(),
            r.state.clone(),
            r.attempts.to_string(),
            opt(&r.class).to_owned(),
            when,
            reply,
        ]);
    }
    out + &t.render()
}

fn found(f: &api::FindResponse) -> String {
    let mut t = Table::new(&[
        ("RECEIVED (UTC)", false),
        ("QUEUE ID", false),
        ("RECIPIENT", false),
        ("STATE", false),
        ("ATTEMPTS", true),
        ("SENDER", false),
        ("CAMPAIGN", false),
    ]);
    for r in &f.recipients {
        t.row(vec![
            utc(r.received_at_ms),
            r.queue_id.clone(),
            r.address.clone(),
            r.state.clone(),
            r.attempts.to_string(),
            r.sender.clone(),
            opt(&r.campaign).to_owned(),
        ]);
    }
    let mut out = t.render();
    if let Some(c) = &f.next_cursor {
        out.push_str(&format!("more: --cursor {c}\n"));
    }
    out
}
