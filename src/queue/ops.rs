//! The SQL of operators' queue operations: retry deferred recipients now, cancel
//! recipients, hold and release a destination domain, export what a purge is about to
//! remove and put it back. Each function is one batch: it changes at most `limit` rows
//! inside one operation of the writer's group commit, and the caller repeats it until a
//! batch comes back short, so a million recipients never make one long transaction.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use rusqlite::{Connection, OptionalExtension, params};

use super::QueueError;
use super::store::{Totals, free_bodies};
use crate::admin_api as api;

/// Which recipients an operation touches, as a SQL condition on `recipients` and its one
/// parameter (`?1`); each is served by an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Message(String),
    Recipient(String),
    Domain(String),
    Campaign(String),
}

impl Target {
    /// The selector's one given field; `Err` names what is wrong with it.
    pub fn of(s: &api::Selector) -> Result<Target, &'static str> {
        let given = [&s.message, &s.recipient, &s.domain, &s.campaign]
            .iter()
            .filter(|v| v.is_some())
            .count();
        if given != 1 {
            return Err("give exactly one of message, recipient, domain, campaign");
        }
        Ok(match s {
            api::Selector {
                message: Some(m), ..
            } => Target::Message(m.clone()),
            api::Selector {
                recipient: Some(r), ..
            } => Target::Recipient(r.clone()),
            api::Selector {
                domain: Some(d), ..
            } => Target::Domain(d.to_ascii_lowercase()),
            api::Selector {
                campaign: Some(c), ..
            } => Target::Campaign(c.clone()),
            _ => unreachable!("exactly one field is given"),
        })
    }

    fn condition(&self) -> &'static str {
        match self {
            Target::Message(_) => "message_id = (SELECT id FROM messages WHERE queue_id = ?1)",
            Target::Recipient(_) => "address = ?1",
            Target::Domain(_) => "domain = ?1",
            Target::Campaign(_) => "campaign = ?1",
        }
    }

    fn value(&self) -> &str {
        match self {
            Target::Message(v) | Target::Recipient(v) | Target::Domain(v) | Target::Campaign(v) => {
                v
            }
        }
    }
}

/// Makes up to `limit` deferred recipients (scheduled, tried before, next attempt later
/// than now) due now; returns how many.
pub fn retry_batch(
    conn: &Connection,
    target: &Target,
    limit: usize,
    now_ms: i64,
) -> Result<usize, QueueError> {
    let sql = format!(
        "UPDATE recipients SET next_attempt = ?3, updated_at = ?3
         WHERE id IN (SELECT id FROM recipients WHERE {} AND state = 0 AND attempts > 0
                        AND next_attempt > ?3 LIMIT ?2)",
        target.condition()
    );
    Ok(conn
        .prepare_cached(&sql)?
        .execute(params![target.value(), limit as i64, now_ms])?)
}

/// The text a cancelled recipient's row and notification carry.
pub const CANCELLED: &str = "550 5.0.0 delivery cancelled by an operator";

/// What a cancel batch failed, per message, for the notifications.
#[derive(Debug, Clone)]
pub struct Cancelled {
    pub queue_id: String,
    pub sender: String,
    pub campaign: Option<String>,
    /// The message's header section, quoted by the notification.
    pub headers: Vec<u8>,
    pub addresses: Vec<String>,
}

/// Fails up to `limit` waiting recipients (scheduled or held) as `cancelled`, moves the
/// totals, frees bodies nobody needs any more; returns what it failed, by message.
pub fn cancel_batch(
    conn: &Connection,
    target: &Target,
    limit: usize,
    now_ms: i64,
) -> Result<(usize, Vec<Cancelled>), QueueError> {
    let sql = format!(
        "UPDATE recipients SET state = 2, reason = 'cancelled', last_reply = '{CANCELLED}',
             lease_until = NULL, updated_at = ?3
         WHERE id IN (SELECT id FROM recipients WHERE {} AND state IN (0, 3) LIMIT ?2)
         RETURNING message_id, address",
        target.condition()
    );
    let rows: Vec<(i64, String)> = conn
        .prepare_cached(&sql)?
        .query_map(params![target.value(), limit as i64, now_ms], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<Result<_, _>>()?;
    let count = rows.len();
    let mut by_message: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for (m, a) in rows {
        by_message.entry(m).or_default().push(a);
    }
    let mut meta = conn.prepare_cached(
        "SELECT m.queue_id, m.sender, m.campaign, b.body FROM messages m
         LEFT JOIN bodies b ON b.message_id = m.id WHERE m.id = ?1",
    )?;
    let mut out = Vec::with_capacity(by_message.len());
    for (&id, addresses) in &by_message {
        let (queue_id, sender, campaign, body): (String, String, Option<String>, Option<Vec<u8>>) =
            meta.query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
        out.push(Cancelled {
            queue_id,
            sender,
            campaign,
            headers: header_section(&body.unwrap_or_default()).to_vec(),
            addresses: addresses.clone(),
        });
    }
    let mut totals = Totals::default();
    totals.add(super::RecipientState::Failed, count as i64);
    totals.save(conn)?;
    free_bodies(conn, by_message.into_keys())?;
    Ok((count, out))
}

/// A message's header section (up to and including the blank line), or all of it.
fn header_section(body: &[u8]) -> &[u8] {
    match body.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => &body[..i + 4],
        None => body,
    }
}

/// Records a domain hold; returns whether it is new.
pub fn hold_domain(conn: &Connection, domain: &str, now_ms: i64) -> Result<bool, QueueError> {
    Ok(conn
        .prepare_cached("INSERT OR IGNORE INTO domain_holds (domain, since) VALUES (?1, ?2)")?
        .execute(params![domain, now_ms])?
        == 1)
}

/// Forgets a domain hold; returns whether there was one.
pub fn release_domain(conn: &Connection, domain: &str) -> Result<bool, QueueError> {
    Ok(conn
        .prepare_cached("DELETE FROM domain_holds WHERE domain = ?1")?
        .execute([domain])?
        == 1)
}

pub fn domain_holds(conn: &Connection) -> Result<Vec<api::DomainHold>, QueueError> {
    let mut stmt = conn.prepare_cached("SELECT domain, since FROM domain_holds ORDER BY domain")?;
    let rows = stmt
        .query_map([], |r| {
            Ok(api::DomainHold {
                domain: r.get(0)?,
                since_ms: r.get(1)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// Moves up to `limit` of a domain's recipients: scheduled and unleased ones to held
/// (`hold`), or held ones back to scheduled unless their campaign is paused. Returns
/// how many moved.
pub fn domain_batch(
    conn: &Connection,
    domain: &str,
    hold: bool,
    limit: usize,
    now_ms: i64,
) -> Result<usize, QueueError> {
    let sql = if hold {
        "UPDATE recipients SET state = 3, updated_at = ?3
         WHERE id IN (SELECT id FROM recipients WHERE domain = ?1 AND state = 0
                        AND (lease_until IS NULL OR lease_until <= ?3) LIMIT ?2)"
    } else {
        "UPDATE recipients SET state = 0, updated_at = ?3
         WHERE id IN (SELECT id FROM recipients WHERE domain = ?1 AND state = 3
                        AND (campaign IS NULL OR campaign NOT IN
                             (SELECT name FROM campaigns WHERE state = 'paused')) LIMIT ?2)"
    };
    Ok(conn
        .prepare_cached(sql)?
        .execute(params![domain, limit as i64, now_ms])?)
}

/// A page of a campaign's waiting messages after message id `after`, oldest first: each
/// with its waiting recipients and body. Stops at `limit` messages or once the bodies
/// reach `max_bytes`. Returns the page, the last message id and the highest recipient id.
pub fn export_page(
    conn: &Connection,
    campaign: &str,
    after: i64,
    limit: usize,
    max_bytes: usize,
) -> Result<(Vec<api::SavedMessage>, Option<i64>, i64), QueueError> {
    let mut ids = conn.prepare_cached(
        "SELECT id FROM messages WHERE campaign = ?1 AND id > ?2
           AND EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = messages.id AND r.state IN (0, 3))
         ORDER BY id LIMIT ?3",
    )?;
    let ids: Vec<i64> = ids
        .query_map(params![campaign, after, limit as i64], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut meta = conn.prepare_cached(
        "SELECT m.queue_id, m.sender, m.campaign, m.source, m.client, m.identity, m.received_at,
                m.smtputf8, COALESCE(b.body, x'')
         FROM messages m LEFT JOIN bodies b ON b.message_id = m.id WHERE m.id = ?1",
    )?;
    let mut rcpts = conn.prepare_cached(
        "SELECT id, address, domain, attempts FROM recipients
         WHERE message_id = ?1 AND state IN (0, 3) ORDER BY id",
    )?;
    let (mut out, mut bytes, mut last, mut through) = (Vec::new(), 0usize, None, 0i64);
    for id in ids {
        if bytes >= max_bytes && !out.is_empty() {
            break;
        }
        let (mut saved, body) = meta.query_row([id], |r| {
            let body: Vec<u8> = r.get(8)?;
            Ok((
                api::SavedMessage {
                    queue_id: r.get(0)?,
                    sender: r.get(1)?,
                    campaign: r.get(2)?,
                    source: r.get(3)?,
                    client: r.get(4)?,
                    identity: r.get(5)?,
                    received_at_ms: r.get(6)?,
                    smtputf8: r.get(7)?,
                    body_base64: String::new(),
                    recipients: Vec::new(),
                },
                body,
            ))
        })?;
        bytes += body.len();
        saved.body_base64 = B64.encode(&body);
        for row in rcpts.query_map([id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                api::SavedRecipient {
                    address: r.get(1)?,
                    domain: r.get(2)?,
                    attempts: r.get(3)?,
                },
            ))
        })? {
            let (rid, rcpt) = row?;
            through = through.max(rid);
            saved.recipients.push(rcpt);
        }
        last = Some(id);
        out.push(saved);
    }
    Ok((out, last, through))
}

/// Puts saved messages back, idempotently by queue id: a message still stored has its
/// purged (or cancelled) recipients scheduled again and its body restored if it was
/// freed; one retention deleted is stored again under its queue id.
pub fn requeue(
    conn: &Connection,
    messages: &[api::SavedMessage],
    now_ms: i64,
) -> Result<api::RequeueResponse, QueueError> {
    let mut done = api::RequeueResponse::default();
    let mut find = conn.prepare_cached("SELECT id FROM messages WHERE queue_id = ?1")?;
    let mut revive = conn.prepare_cached(
        "UPDATE recipients SET state = 0, reason = NULL, next_attempt = ?3, lease_until = NULL,
             updated_at = ?3
         WHERE message_id = ?1 AND address = ?2 AND state = 2 AND reason IN ('purged', 'cancelled')",
    )?;
    let mut body =
        conn.prepare_cached("INSERT OR IGNORE INTO bodies (message_id, body) VALUES (?1, ?2)")?;
    let mut totals = Totals::default();
    for m in messages {
        let bytes = B64
            .decode(&m.body_base64)
            .map_err(|e| QueueError::Write(format!("{}: body: {e}", m.queue_id)))?;
        let existing: Option<i64> = find.query_row([&m.queue_id], |r| r.get(0)).optional()?;
        let Some(id) = existing else {
            insert_saved(conn, m, &bytes, now_ms)?;
            done.messages_restored += 1;
            done.recipients += m.recipients.len() as u64;
            continue;
        };
        let mut revived = 0;
        for r in &m.recipients {
            revived += revive.execute(params![id, r.address, now_ms])?;
        }
        if revived > 0 {
            body.execute(params![id, bytes])?;
        }
        totals.add(super::RecipientState::Failed, -(revived as i64));
        done.recipients += revived as u64;
        done.unchanged += (m.recipients.len() - revived) as u64;
    }
    totals.save(conn)?;
    Ok(done)
}

fn insert_saved(
    conn: &Connection,
    m: &api::SavedMessage,
    body: &[u8],
    now_ms: i64,
) -> Result<(), QueueError> {
    conn.prepare_cached(
        "INSERT INTO messages (queue_id, sender, campaign, source, client, identity, received_at,
                               size, smtputf8)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        m.queue_id,
        m.sender,
        m.campaign,
        m.source,
        m.client,
        m.identity,
        m.received_at_ms,
        body.len() as i64,
        m.smtputf8
    ])?;
    let id = conn.last_insert_rowid();
    conn.prepare_cached("INSERT INTO bodies (message_id, body) VALUES (?1, ?2)")?
        .execute(params![id, body])?;
    let mut stmt = conn.prepare_cached(
        "INSERT INTO recipients (message_id, address, domain, campaign, state, attempts,
                                 next_attempt, updated_at)
         VALUES (?1, ?2, ?3, ?4,
                 CASE WHEN EXISTS (SELECT 1 FROM domain_holds WHERE domain = ?3) THEN 3 ELSE 0 END,
                 ?5, ?6, ?6)",
    )?;
    for r in &m.recipients {
        stmt.execute(params![
            id, r.address, r.domain, m.campaign, r.attempts, now_ms
        ])?;
    }
    Ok(())
}
