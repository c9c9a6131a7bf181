//! The queue's SQL for enqueue, claims, outcomes, holds and purges. The schema and how
//! queue.db is opened live in `schema`, the status reads in `status`, the retention
//! deletes in `retention`, the trace and search in `trace`, operators' queue operations
//! in `ops`, the online copy in `backup`; nothing outside `queue/` speaks SQL to queue.db.

use rusqlite::{Connection, OptionalExtension, params};

use super::batch::Moved;
pub use super::schema::{open_reader, open_writer, set_max_size};
use super::{NewMessage, QueueError, RecipientState, Remembered};
use crate::bounce::BounceClass;

/// Inserts one message and its recipients. Runs inside the writer's batch transaction.
/// `firsts` holds each recipient's first attempt when some must wait (a suspended
/// destination's, see `delays`); without it every recipient is due at `now_ms`.
pub fn insert_message(
    conn: &Connection,
    msg: &NewMessage,
    now_ms: i64,
    firsts: Option<&[i64]>,
) -> Result<(), QueueError> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO messages (queue_id, sender, campaign, source, client, received_at, size, smtputf8, identity)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    stmt.execute(params![
        msg.queue_id.as_str(),
        msg.sender,
        msg.campaign,
        msg.source.as_str(),
        msg.client,
        now_ms,
        msg.body.len() as i64,
        msg.smtputf8,
        msg.identity,
    ])?;
    let message_id = conn.last_insert_rowid();
    conn.prepare_cached("INSERT INTO bodies (message_id, body) VALUES (?1, ?2)")?
        .execute(params![message_id, &msg.body[..]])?;
    // A recipient of a held domain waits held from the start, out of the due index.
    let mut stmt = conn.prepare_cached(
        "INSERT INTO recipients (message_id, address, domain, campaign, state, next_attempt, updated_at)
         VALUES (?1, ?2, ?3, ?4,
                 CASE WHEN EXISTS (SELECT 1 FROM domain_holds WHERE domain = ?3) THEN 3 ELSE 0 END,
                 ?5, ?6)",
    )?;
    for (i, rcpt) in msg.recipients.iter().enumerate() {
        let first = super::delays::first_of(firsts, i, now_ms);
        stmt.execute(params![
            message_id,
            rcpt.address,
            rcpt.domain,
            msg.campaign,
            first,
            now_ms
        ])?;
    }
    Ok(())
}

/// A queued message as stored, for status reads and tests.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub queue_id: String,
    pub sender: String,
    pub campaign: Option<String>,
    pub body: Option<Vec<u8>>,
    pub recipients: Vec<StoredRecipient>,
}

#[derive(Debug, Clone)]
pub struct StoredRecipient {
    pub address: String,
    pub state: RecipientState,
    pub attempts: u32,
    pub last_reply: Option<String>,
    pub reason: Option<String>,
    /// The bounce class of the last failed or deferred attempt.
    pub class: Option<BounceClass>,
}

pub fn read_message(
    conn: &Connection,
    queue_id: &str,
) -> Result<Option<StoredMessage>, QueueError> {
    let row = conn
        .query_row(
            "SELECT m.id, m.queue_id, m.sender, m.campaign, b.body
             FROM messages m LEFT JOIN bodies b ON b.message_id = m.id WHERE m.queue_id = ?1",
            [queue_id],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    StoredMessage {
                        queue_id: r.get(1)?,
                        sender: r.get(2)?,
                        campaign: r.get(3)?,
                        body: r.get(4)?,
                        recipients: Vec::new(),
                    },
                ))
            },
        )
        .optional()?;
    let Some((id, mut msg)) = row else {
        return Ok(None);
    };
    let mut stmt = conn.prepare_cached(
        "SELECT address, state, attempts, last_reply, reason, class FROM recipients
         WHERE message_id = ?1 ORDER BY id",
    )?;
    msg.recipients = stmt
        .query_map([id], |r| {
            Ok(StoredRecipient {
                address: r.get(0)?,
                state: RecipientState::from_i64(r.get(1)?),
                attempts: r.get(2)?,
                last_reply: r.get(3)?,
                reason: r.get(4)?,
                class: r
                    .get::<_, Option<String>>(5)?
                    .as_deref()
                    .and_then(BounceClass::parse),
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(Some(msg))
}

/// A recipient claimed for delivery, with what the scheduler needs about its message.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    pub message_id: i64,
    pub queue_id: String,
    pub sender: String,
    pub campaign: Option<String>,
    pub address: String,
    pub domain: String,
    pub attempts: u32,
    pub received_at: i64,
    /// The message was submitted with SMTPUTF8.
    pub smtputf8: bool,
    /// A batch recipient's variables (JSON): its message is rendered for it alone.
    pub vars: Option<String>,
}

/// Leases up to `limit` due recipients until `lease_until`, skipping held campaigns and
/// saturated domains. Runs in the writer's transaction, so two passes never claim the
/// same recipient.
pub fn claim(
    conn: &Connection,
    now_ms: i64,
    lease_until: i64,
    limit: usize,
    held_campaigns: &[String],
    skip_domains: &[String],
) -> Result<Vec<Claimed>, QueueError> {
    let held = serde_json::to_string(held_campaigns).expect("strings serialize");
    let skip = serde_json::to_string(skip_domains).expect("strings serialize");
    let mut stmt = conn.prepare_cached(
        "UPDATE recipients SET lease_until = ?1
         WHERE id IN (
             SELECT id FROM recipients
             WHERE state = 0 AND next_attempt <= ?2
               AND (lease_until IS NULL OR lease_until <= ?2)
               AND (campaign IS NULL OR campaign NOT IN (SELECT value FROM json_each(?3)))
               AND domain NOT IN (SELECT value FROM json_each(?4))
               AND domain NOT IN (SELECT domain FROM domain_holds)
             ORDER BY next_attempt LIMIT ?5)
         RETURNING id, message_id, address, domain, campaign, attempts, vars",
    )?;
    let mut claimed: Vec<Claimed> = stmt
        .query_map(
            params![lease_until, now_ms, held, skip, limit as i64],
            |r| {
                Ok(Claimed {
                    id: r.get(0)?,
                    message_id: r.get(1)?,
                    address: r.get(2)?,
                    domain: r.get(3)?,
                    campaign: r.get(4)?,
                    attempts: r.get(5)?,
                    queue_id: String::new(),
                    sender: String::new(),
                    received_at: 0,
                    smtputf8: false,
                    vars: r.get(6)?,
                })
            },
        )?
        .collect::<Result<_, _>>()?;
    let mut meta = conn.prepare_cached(
        "SELECT queue_id, sender, received_at, smtputf8 FROM messages WHERE id = ?1",
    )?;
    let mut cache: std::collections::HashMap<i64, (String, String, i64, bool)> = Default::default();
    for c in &mut claimed {
        if let std::collections::hash_map::Entry::Vacant(slot) = cache.entry(c.message_id) {
            slot.insert(meta.query_row([c.message_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?);
        }
        let (queue_id, sender, received_at, smtputf8) = &cache[&c.message_id];
        c.queue_id = queue_id.clone();
        c.sender = sender.clone();
        c.received_at = *received_at;
        c.smtputf8 = *smtputf8;
    }
    claimed.sort_by_key(|c| (c.message_id, c.id));
    Ok(claimed)
}

/// The earliest `next_attempt` among scheduled recipients, to know how long to sleep.
pub fn next_due(conn: &Connection) -> Result<Option<i64>, QueueError> {
    Ok(conn.query_row(
        "SELECT MIN(next_attempt) FROM recipients WHERE state = 0",
        [],
        |r| r.get(0),
    )?)
}

/// A recipient's new state after a delivery attempt.
#[derive(Debug, Clone)]
pub enum Update {
    Delivered {
        reply: String,
    },
    Retry {
        next_attempt: i64,
        class: BounceClass,
        reply: String,
    },
    Failed {
        reason: String,
        class: BounceClass,
        reply: String,
    },
}

/// Applies attempt outcomes, moves the lifetime totals with them, and frees the bodies
/// no scheduled recipient needs any more.
pub fn apply(conn: &Connection, updates: &[(i64, Update)], now_ms: i64) -> Result<(), QueueError> {
    // A recipient can be reported twice (its lease expired while a slow courier still
    // worked on it) or purged while in flight: totals follow the state it leaves and the
    // state it enters, never the number of reports.
    let mut before = conn.prepare_cached("SELECT state FROM recipients WHERE id = ?1")?;
    let mut totals = Totals::default();
    let mut stmt = conn.prepare_cached(
        // Which outcome may replace which state is `supersedes`' decision.
        "UPDATE recipients SET state = ?2, attempts = attempts + 1, next_attempt = ?3,
             last_reply = ?4, reason = ?5, lease_until = NULL, updated_at = ?6, class = ?7
         WHERE id = ?1 RETURNING message_id",
    )?;
    let mut messages = std::collections::BTreeSet::new();
    let mut batches: std::collections::BTreeMap<i64, Moved> = Default::default();
    for (id, update) in updates {
        let (state, next, reply, reason, class) = match update {
            Update::Delivered { reply } => (RecipientState::Delivered, now_ms, reply, None, None),
            Update::Retry {
                next_attempt,
                class,
                reply,
            } => (
                RecipientState::Scheduled,
                *next_attempt,
                reply,
                None,
                Some(class.as_str()),
            ),
            Update::Failed {
                reason,
                class,
                reply,
            } => (
                RecipientState::Failed,
                now_ms,
                reply,
                Some(reason),
                Some(class.as_str()),
            ),
        };
        let Some(old) = before
            .query_row([id], |r| r.get::<_, i64>(0))
            .optional()?
            .map(RecipientState::from_i64)
        else {
            continue;
        };
        if !supersedes(old, state) {
            continue;
        }
        let message: Option<i64> = stmt
            .query_row(
                params![id, state.as_i64(), next, reply, reason, now_ms, class],
                |r| r.get(0),
            )
            .optional()?;
        totals.leave(old);
        totals.enter(state);
        if let Some(m) = message {
            let moved = batches.entry(m).or_default();
            moved.add(old, -1);
            moved.add(state, 1);
            match update {
                Update::Retry { .. } => moved.deferred += 1,
                Update::Failed { reason, .. }
                    if reason == crate::reason::Reason::Template.as_str() =>
                {
                    moved.failed_template += 1;
                }
                _ => {}
            }
        }
        messages.extend(message);
    }
    totals.save(conn)?;
    super::batch::record_outcomes(conn, &batches)?;
    free_bodies(conn, messages)
}

/// Whether an attempt's outcome may replace a recipient's current state. A finished
/// recipient never goes back to waiting: one purged while its delivery was under way
/// must not be rescheduled by that delivery's 451. Only a delivery that did happen
/// overrides an earlier failure (a purge, or an expired lease's duplicate attempt).
fn supersedes(current: RecipientState, next: RecipientState) -> bool {
    match current {
        RecipientState::Scheduled | RecipientState::Held => true,
        RecipientState::Failed => next == RecipientState::Delivered,
        RecipientState::Delivered => false,
    }
}

/// Changes to the lifetime totals of finished recipients within one operation.
#[derive(Default)]
pub(super) struct Totals {
    delivered: i64,
    failed: i64,
}

impl Totals {
    fn enter(&mut self, state: RecipientState) {
        self.add(state, 1);
    }

    fn leave(&mut self, state: RecipientState) {
        self.add(state, -1);
    }

    pub(super) fn add(&mut self, state: RecipientState, n: i64) {
        match state {
            RecipientState::Delivered => self.delivered += n,
            RecipientState::Failed => self.failed += n,
            RecipientState::Scheduled | RecipientState::Held => {}
        }
    }

    /// Writes the changes, in the caller's transaction.
    pub(super) fn save(&self, conn: &Connection) -> Result<(), QueueError> {
        let mut stmt =
            conn.prepare_cached("UPDATE counters SET value = value + ?2 WHERE name = ?1")?;
        for (name, n) in [("delivered", self.delivered), ("failed", self.failed)] {
            if n != 0 {
                stmt.execute(params![name, n])?;
            }
        }
        Ok(())
    }
}

/// Frees the bodies of `messages` that no scheduled recipient needs any more: a message
/// is stored once, and kept only as long as someone still waits for it.
pub(super) fn free_bodies(
    conn: &Connection,
    messages: impl IntoIterator<Item = i64>,
) -> Result<(), QueueError> {
    // Correlated with the body row: a message without one (a batch, rendered per
    // recipient) costs one primary-key probe, not a walk over its finished recipients.
    let mut free = conn.prepare_cached(
        "DELETE FROM bodies WHERE message_id = ?1
           AND NOT EXISTS (SELECT 1 FROM recipients r
                           WHERE r.message_id = bodies.message_id AND r.state IN (0, 3))",
    )?;
    for m in messages {
        free.execute([m])?;
    }
    Ok(())
}

/// Clears every lease: at start-up this daemon is the only user of the queue, so whatever
/// an earlier process had in flight is due again now.
pub fn release_leases(conn: &Connection) -> Result<usize, QueueError> {
    Ok(conn.execute(
        "UPDATE recipients SET lease_until = NULL WHERE state = 0 AND lease_until IS NOT NULL",
        [],
    )?)
}

pub fn body(conn: &Connection, message_id: i64) -> Result<Option<Vec<u8>>, QueueError> {
    Ok(conn
        .query_row(
            "SELECT body FROM bodies WHERE message_id = ?1",
            [message_id],
            |r| r.get(0),
        )
        .optional()?)
}

/// A campaign's operator state as persisted across restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CampaignState {
    pub name: String,
    pub paused: bool,
    pub blocked_until: i64,
}

pub fn save_campaign(
    conn: &Connection,
    state: &CampaignState,
    now_ms: i64,
) -> Result<(), QueueError> {
    conn.prepare_cached(
        "INSERT INTO campaigns (name, state, blocked_until, updated_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (name) DO UPDATE SET state = excluded.state,
             blocked_until = excluded.blocked_until, updated_at = excluded.updated_at",
    )?
    .execute(params![
        state.name,
        if state.paused { "paused" } else { "active" },
        state.blocked_until,
        now_ms
    ])?;
    Ok(())
}

pub fn load_campaigns(conn: &Connection) -> Result<Vec<CampaignState>, QueueError> {
    let mut stmt = conn.prepare("SELECT name, state, COALESCE(blocked_until, 0) FROM campaigns")?;
    let rows = stmt
        .query_map([], |r| {
            Ok(CampaignState {
                name: r.get(0)?,
                paused: r.get::<_, String>(1)? == "paused",
                blocked_until: r.get(2)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// Fails up to `limit` of a campaign's scheduled recipients with reason `purged` and
/// frees the bodies nobody needs any more. Only recipients with an id up to `through`
/// are purged (`i64::MAX`: all), so that a purge after an export (`ctl purge --save`)
/// removes nothing the export did not save. Returns how many it purged; callers repeat
/// until 0, one short transaction per batch, so intake never waits long behind a purge.
pub fn purge_batch(
    conn: &Connection,
    campaign: &str,
    through: i64,
    limit: usize,
    now_ms: i64,
) -> Result<usize, QueueError> {
    let mut stmt = conn.prepare_cached(
        "UPDATE recipients SET state = 2, reason = 'purged', last_reply = 'purged by an operator',
             lease_until = NULL, updated_at = ?3
         WHERE id IN (SELECT id FROM recipients WHERE campaign = ?1 AND state IN (0, 3)
                        AND id <= ?4 LIMIT ?2)
         RETURNING message_id",
    )?;
    let returned: Vec<i64> = stmt
        .query_map(params![campaign, limit as i64, now_ms, through], |r| {
            r.get(0)
        })?
        .collect::<Result<_, _>>()?;
    let purged = returned.len();
    let mut totals = Totals::default();
    totals.add(RecipientState::Failed, purged as i64);
    totals.save(conn)?;
    let mut batches: std::collections::BTreeMap<i64, Moved> = Default::default();
    for m in &returned {
        batches.entry(*m).or_default().failed += 1;
    }
    super::batch::record_outcomes(conn, &batches)?;
    // Keyed by message: each body is probed once, not once per purged recipient.
    free_bodies(conn, batches.keys().copied())?;
    Ok(purged)
}

/// Which way a campaign's queued recipients move: out of the due index while it is
/// paused (so that what a flood queued costs the scheduler nothing), back when resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// Scheduled, unleased recipients become held (in-flight ones are left alone).
    Hold,
    /// Held recipients are scheduled again; their next attempt stays what it was, so due
    /// ones are due at once.
    Release,
}

impl Holding {
    fn sql(self) -> &'static str {
        match self {
            Holding::Hold => {
                "UPDATE recipients SET state = 3, updated_at = ?3
                 WHERE id IN (SELECT id FROM recipients WHERE campaign = ?1 AND state = 0
                                AND (lease_until IS NULL OR lease_until <= ?3) LIMIT ?2)"
            }
            Holding::Release => {
                // A recipient whose domain is held as well stays held.
                "UPDATE recipients SET state = 0, updated_at = ?3
                 WHERE id IN (SELECT id FROM recipients WHERE campaign = ?1 AND state = 3
                                AND domain NOT IN (SELECT domain FROM domain_holds) LIMIT ?2)"
            }
        }
    }

    /// The log line of a finished move.
    pub fn done(self) -> &'static str {
        match self {
            Holding::Hold => "queued recipients held",
            Holding::Release => "held recipients released",
        }
    }
}

/// Moves up to `limit` of a campaign's recipients the `way` says; returns how many.
pub fn hold_batch(
    conn: &Connection,
    way: Holding,
    campaign: &str,
    limit: usize,
    now_ms: i64,
) -> Result<usize, QueueError> {
    Ok(conn
        .prepare_cached(way.sql())?
        .execute(params![campaign, limit as i64, now_ms])?)
}

/// A stored HTTP response for an idempotency key, if still fresh.
pub fn idempotent_response(
    conn: &Connection,
    key: &str,
    not_before: i64,
) -> Result<Option<Remembered>, QueueError> {
    Ok(conn
        .prepare_cached("SELECT status, body, request_sha256 FROM idempotency WHERE key = ?1 AND created_at >= ?2")?
        .query_row(params![key, not_before], |r| {
            Ok(Remembered {
                status: r.get(0)?,
                body: r.get(1)?,
                request_sha256: r.get(2)?,
            })
        })
        .optional()?)
}

/// Stores `response` under `key` unless a fresh one is there already, which is returned
/// instead (and nothing else happens). Old entries are swept in passing.
pub fn remember_response(
    conn: &Connection,
    key: &str,
    response: &Remembered,
    now_ms: i64,
    not_before: i64,
) -> Result<Option<Remembered>, QueueError> {
    if let Some(existing) = idempotent_response(conn, key, not_before)? {
        return Ok(Some(existing));
    }
    conn.prepare_cached("DELETE FROM idempotency WHERE key IN (SELECT key FROM idempotency WHERE created_at < ?1 LIMIT 100)")?
        .execute([not_before])?;
    conn.prepare_cached("INSERT OR REPLACE INTO idempotency (key, status, body, created_at, request_sha256) VALUES (?1, ?2, ?3, ?4, ?5)")?
        .execute(params![key, response.status, response.body, now_ms, response.request_sha256])?;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;
    use crate::queue::{NewRecipient, QueueId, Source, status};

    #[test]
    fn a_purged_recipient_stays_purged_when_its_delivery_reports_late() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writer(&dir.path().join("queue.db"), Synchronous::Normal, 0).unwrap();
        let msg = NewMessage {
            queue_id: QueueId::generate(1),
            sender: "a@client.test".into(),
            campaign: Some("c".into()),
            source: Source::Smtp,
            client: "test".into(),
            identity: None,
            body: b"x".to_vec(),
            smtputf8: false,
            recipients: vec![NewRecipient {
                address: "u@mx.test".into(),
                domain: "mx.test".into(),
            }],
        };
        insert_message(&conn, &msg, 0, None).unwrap();
        let claimed = claim(&conn, 0, 1000, 10, &[], &[]).unwrap();
        assert_eq!(purge_batch(&conn, "c", i64::MAX, 10, 1).unwrap(), 1);
        // The courier's 451 for the purged recipient arrives after the purge.
        let retry = Update::Retry {
            next_attempt: 10,
            class: BounceClass::Other,
            reply: "451 4.3.0 later".into(),
        };
        apply(&conn, &[(claimed[0].id, retry)], 2).unwrap();
        assert_eq!(
            status::live_by_state(&conn).unwrap(),
            vec![],
            "nothing waits again"
        );
        assert_eq!(status::totals(&conn).unwrap().failed, 1);
        // A delivery that did happen is recorded as such, and counted once.
        let delivered = Update::Delivered {
            reply: "250 ok".into(),
        };
        apply(&conn, &[(claimed[0].id, delivered.clone())], 3).unwrap();
        apply(&conn, &[(claimed[0].id, delivered)], 4).unwrap();
        let t = status::totals(&conn).unwrap();
        assert_eq!((t.delivered, t.failed), (1, 0));
    }
}
