//! The reads behind "where is my mail?": one message's trace (its envelope and, per
//! recipient, the state its row holds: attempts, last reply, next attempt, finish time)
//! and the search over recipients by address, sender, campaign, state and time. Every
//! search is driven by an index (`recipients_address`, `messages_sender`,
//! `messages_campaign`, `messages_received`) and pages with a keyset cursor, so its cost
//! is the page, not the queue.

use rusqlite::{Connection, OptionalExtension, ToSql};

use super::{QueueError, RecipientState};
use crate::admin_api as api;

/// Most recipients one search page returns.
pub const MAX_PAGE: usize = 1000;

/// A message's trace; recipients in the order they were given, each with the bounce class
/// of its last failed or deferred attempt (stored with the outcome).
pub fn message(conn: &Connection, queue_id: &str) -> Result<Option<api::MessageTrace>, QueueError> {
    let row = conn
        .prepare_cached(
            "SELECT m.id, m.queue_id, m.sender, m.campaign, m.source, m.client, m.identity,
                    m.size, m.received_at, EXISTS (SELECT 1 FROM bodies b WHERE b.message_id = m.id)
             FROM messages m WHERE m.queue_id = ?1",
        )?
        .query_row([queue_id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                api::MessageTrace {
                    queue_id: r.get(1)?,
                    sender: r.get(2)?,
                    campaign: r.get(3)?,
                    source: r.get(4)?,
                    client: r.get(5)?,
                    identity: r.get(6)?,
                    size: r.get::<_, i64>(7)?.max(0) as u64,
                    received_at_ms: r.get(8)?,
                    body_stored: r.get(9)?,
                    recipients: Vec::new(),
                },
            ))
        })
        .optional()?;
    let Some((id, mut trace)) = row else {
        return Ok(None);
    };
    let mut stmt = conn.prepare_cached(
        "SELECT address, state, attempts, last_reply, reason, next_attempt, updated_at, class
         FROM recipients WHERE message_id = ?1 ORDER BY id",
    )?;
    trace.recipients = stmt
        .query_map([id], |r| {
            let state = RecipientState::from_i64(r.get(1)?);
            let last: Option<String> = r.get(3)?;
            let next: i64 = r.get(5)?;
            let updated: i64 = r.get(6)?;
            Ok(api::RecipientTrace {
                address: r.get(0)?,
                state: state.as_str().to_owned(),
                attempts: r.get(2)?,
                last_reply: last.as_deref().map(split_reply),
                class: r.get(7)?,
                reason: r.get(4)?,
                next_attempt_ms: waiting(state).then_some(next),
                delivered_at_ms: (state == RecipientState::Delivered).then_some(updated),
                failed_at_ms: (state == RecipientState::Failed).then_some(updated),
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(Some(trace))
}

fn waiting(state: RecipientState) -> bool {
    matches!(state, RecipientState::Scheduled | RecipientState::Held)
}

/// A stored reply line ("550 5.1.1 text") as code, enhanced code and text.
pub fn split_reply(line: &str) -> api::LastReply {
    let (code, enhanced, text) = crate::bounce::split_reply(line);
    api::LastReply {
        code: (code != 0).then_some(code),
        enhanced: enhanced.map(|[a, b, c]| format!("{a}.{b}.{c}")),
        text: if code == 0 { line } else { text }.to_owned(),
    }
}

/// What a search asks for; every field given narrows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Find {
    pub rcpt: Option<String>,
    pub sender: Option<String>,
    pub campaign: Option<String>,
    pub state: Option<RecipientState>,
    /// Received at or after, before (ms since the epoch).
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Continue after this (message id, recipient id), from a previous page.
    pub cursor: Option<(i64, i64)>,
    pub limit: usize,
}

/// A page cursor as the API passes it: `"<message id>.<recipient id>"`.
pub fn cursor_text((m, r): (i64, i64)) -> String {
    format!("{m}.{r}")
}

pub fn parse_cursor(text: &str) -> Option<(i64, i64)> {
    let (m, r) = text.split_once('.')?;
    Some((m.parse().ok()?, r.parse().ok()?))
}

/// The statement for `find`'s filters: only the given ones appear, so that the planner
/// sees a plain equality on the indexed column (an `?1 IS NULL OR ...` term would hide it).
pub fn find_sql(f: &Find) -> String {
    let mut sql = String::from(
        "SELECT m.id, r.id, m.queue_id, m.sender, m.campaign, m.received_at, r.address,
                r.state, r.attempts, r.last_reply, r.next_attempt
         FROM messages m JOIN recipients r ON r.message_id = m.id WHERE 1",
    );
    let terms = [
        (f.rcpt.is_some(), " AND r.address = :rcpt"),
        (f.sender.is_some(), " AND m.sender = :sender"),
        (f.campaign.is_some(), " AND m.campaign = :campaign"),
        (f.state.is_some(), " AND r.state = :state"),
        (f.since_ms.is_some(), " AND m.received_at >= :since"),
        (f.until_ms.is_some(), " AND m.received_at < :until"),
        (f.cursor.is_some(), " AND (m.id, r.id) < (:cm, :cr)"),
    ];
    for (given, term) in terms {
        if given {
            sql.push_str(term);
        }
    }
    sql.push_str(" ORDER BY m.id DESC, r.id DESC LIMIT :limit");
    sql
}

/// One page of recipients matching `f`, newest message first, and the cursor of the next.
pub fn find(
    conn: &Connection,
    f: &Find,
) -> Result<(Vec<api::FoundRecipient>, Option<String>), QueueError> {
    let limit = f.limit.clamp(1, MAX_PAGE) as i64;
    let state = f.state.map(RecipientState::as_i64);
    let (cm, cr) = f.cursor.unzip();
    let mut named: Vec<(&str, &dyn ToSql)> = vec![(":limit", &limit)];
    let optional: [(&str, Option<&dyn ToSql>); 8] = [
        (":rcpt", f.rcpt.as_ref().map(|v| v as &dyn ToSql)),
        (":sender", f.sender.as_ref().map(|v| v as &dyn ToSql)),
        (":campaign", f.campaign.as_ref().map(|v| v as &dyn ToSql)),
        (":state", state.as_ref().map(|v| v as &dyn ToSql)),
        (":since", f.since_ms.as_ref().map(|v| v as &dyn ToSql)),
        (":until", f.until_ms.as_ref().map(|v| v as &dyn ToSql)),
        (":cm", cm.as_ref().map(|v| v as &dyn ToSql)),
        (":cr", cr.as_ref().map(|v| v as &dyn ToSql)),
    ];
    named.extend(optional.into_iter().filter_map(|(k, v)| Some((k, v?))));
    let mut stmt = conn.prepare_cached(&find_sql(f))?;
    let mut last = None;
    let rows = stmt
        .query_map(named.as_slice(), |r| {
            let state = RecipientState::from_i64(r.get(7)?);
            let next: i64 = r.get(10)?;
            Ok((
                (r.get::<_, i64>(0)?, r.get::<_, i64>(1)?),
                api::FoundRecipient {
                    queue_id: r.get(2)?,
                    sender: r.get(3)?,
                    campaign: r.get(4)?,
                    received_at_ms: r.get(5)?,
                    address: r.get(6)?,
                    state: state.as_str().to_owned(),
                    attempts: r.get(8)?,
                    last_reply: r.get(9)?,
                    next_attempt_ms: waiting(state).then_some(next),
                },
            ))
        })?
        .map(|row| {
            row.map(|(key, found)| {
                last = Some(key);
                found
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let next = (rows.len() as i64 == limit).then_some(last).flatten();
    Ok((rows, next.map(cursor_text)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;
    use crate::queue::store::{insert_message, open_writer};
    use crate::queue::{NewMessage, NewRecipient, QueueId, Source};

    fn plan(conn: &Connection, f: &Find) -> String {
        let sql = format!("EXPLAIN QUERY PLAN {}", find_sql(f));
        let mut stmt = conn.prepare(&sql).unwrap();
        let count = stmt.parameter_count();
        let params: Vec<i64> = vec![1; count];
        let rows: Vec<String> = stmt
            .query_map(rusqlite::params_from_iter(params), |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        rows.join("\n")
    }

    #[test]
    fn each_filter_is_served_by_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writer(&dir.path().join("queue.db"), Synchronous::Normal, 0).unwrap();
        let rcpt = Find {
            rcpt: Some("a@b.test".into()),
            since_ms: Some(0),
            cursor: Some((5, 5)),
            ..Find::default()
        };
        let p = plan(&conn, &rcpt);
        assert!(p.contains("USING INDEX recipients_address"), "{p}");
        assert!(!p.contains("SCAN"), "{p}");
        for (f, index) in [
            (
                Find {
                    sender: Some("s@c.test".into()),
                    ..Find::default()
                },
                "messages_sender",
            ),
            (
                Find {
                    campaign: Some("c".into()),
                    state: Some(RecipientState::Scheduled),
                    ..Find::default()
                },
                "messages_campaign",
            ),
        ] {
            let p = plan(&conn, &f);
            assert!(p.contains(index), "{f:?}: {p}");
            assert!(!p.contains("SCAN r") && !p.contains("SCAN m"), "{f:?}: {p}");
        }
    }

    #[test]
    fn pages_follow_the_cursor_newest_first_and_end() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writer(&dir.path().join("queue.db"), Synchronous::Normal, 0).unwrap();
        for i in 0..5 {
            let msg = NewMessage {
                queue_id: QueueId::generate(i),
                sender: format!("s{}@c.test", i % 2),
                campaign: None,
                source: Source::Http,
                client: "k".into(),
                identity: Some("k".into()),
                body: b"x".to_vec(),
                smtputf8: false,
                recipients: vec![
                    NewRecipient {
                        address: "a@b.test".into(),
                        domain: "b.test".into(),
                    },
                    NewRecipient {
                        address: format!("x{i}@b.test"),
                        domain: "b.test".into(),
                    },
                ],
            };
            insert_message(&conn, &msg, i * 1000, None).unwrap();
        }
        let mut f = Find {
            rcpt: Some("a@b.test".into()),
            limit: 2,
            ..Find::default()
        };
        let mut seen = Vec::new();
        loop {
            let (rows, next) = find(&conn, &f).unwrap();
            seen.extend(rows.into_iter().map(|r| r.received_at_ms));
            match next {
                Some(c) => f.cursor = parse_cursor(&c),
                None => break,
            }
        }
        assert_eq!(seen, [4000, 3000, 2000, 1000, 0]);
        let window = Find {
            sender: Some("s0@c.test".into()),
            since_ms: Some(1000),
            until_ms: Some(4000),
            limit: 10,
            ..Find::default()
        };
        let (rows, next) = find(&conn, &window).unwrap();
        assert_eq!(next, None);
        let got: Vec<(i64, String)> = rows
            .into_iter()
            .map(|r| (r.received_at_ms, r.address))
            .collect();
        assert_eq!(got, [(2000, "x2@b.test".into()), (2000, "a@b.test".into())]);
    }

    #[test]
    fn replies_split_into_code_enhanced_and_text() {
        let r = split_reply("550 5.1.1 no such user");
        assert_eq!(
            (r.code, r.enhanced.as_deref(), r.text.as_str()),
            (Some(550), Some("5.1.1"), "no such user")
        );
        let r = split_reply("purged by an operator");
        assert_eq!(
            (r.code, r.enhanced, r.text.as_str()),
            (None, None, "purged by an operator")
        );
    }
}
