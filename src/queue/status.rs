//! The status reads behind `/metrics`, `floodgate ctl status|queue` and the dashboard.
//! Each costs O(live rows), never O(history): live recipients are counted through the
//! partial index `recipients_live`, finished ones come from the `counters` table.

use rusqlite::{Connection, params};

use super::{QueueError, RecipientState};

/// Lifetime totals kept in `counters`; they survive restarts and retention.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Recipients ever delivered, and ever failed for good (purged included).
    pub delivered: u64,
    pub failed: u64,
    /// Finished recipients and messages deleted by retention.
    pub pruned_recipients: u64,
    pub pruned_messages: u64,
}

pub fn totals(conn: &Connection) -> Result<Totals, QueueError> {
    let mut stmt = conn.prepare_cached("SELECT name, value FROM counters")?;
    let mut t = Totals::default();
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    for row in rows {
        let (name, value) = row?;
        let value = value.max(0) as u64;
        match name.as_str() {
            "delivered" => t.delivered = value,
            "failed" => t.failed = value,
            "pruned_recipients" => t.pruned_recipients = value,
            "pruned_messages" => t.pruned_messages = value,
            _ => {}
        }
    }
    Ok(t)
}

/// The statement behind [`live_by_state`], public so that a test can prove its plan.
pub const LIVE_BY_STATE: &str =
    "SELECT state, COUNT(*) FROM recipients WHERE state IN (0, 3) GROUP BY state";
/// The statements behind [`summary`]'s top destinations and campaigns.
pub const LIVE_BY_DOMAIN: &str = "SELECT domain, COUNT(*) c FROM recipients WHERE state IN (0, 3) GROUP BY domain ORDER BY c DESC LIMIT 20";
pub const LIVE_BY_CAMPAIGN: &str = "SELECT campaign, COUNT(*) c FROM recipients WHERE state IN (0, 3) GROUP BY campaign ORDER BY c DESC LIMIT 20";

/// Scheduled and held recipients (the ones still waiting).
pub fn live_by_state(conn: &Connection) -> Result<Vec<(RecipientState, u64)>, QueueError> {
    let mut stmt = conn.prepare_cached(LIVE_BY_STATE)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((RecipientState::from_i64(r.get(0)?), r.get::<_, u64>(1)?))
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// Live recipients by state, then the lifetime totals of finished ones; states with
/// nothing in them are left out.
pub fn count_by_state(conn: &Connection) -> Result<Vec<(RecipientState, u64)>, QueueError> {
    let mut rows = live_by_state(conn)?;
    let t = totals(conn)?;
    for (state, n) in [
        (RecipientState::Delivered, t.delivered),
        (RecipientState::Failed, t.failed),
    ] {
        if n > 0 {
            rows.push((state, n));
        }
    }
    Ok(rows)
}

/// Recipients by state, and waiting recipients per domain and campaign (top 20).
pub fn summary(conn: &Connection) -> Result<QueueSummary, QueueError> {
    let by_state = count_by_state(conn)?;
    let top = |sql: &str| -> Result<Vec<(String, u64)>, QueueError> {
        let mut stmt = conn.prepare_cached(sql)?;
        let rows = stmt
            .query_map(params![], |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?.unwrap_or_else(|| "-".into()),
                    r.get(1)?,
                ))
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    };
    Ok(QueueSummary {
        by_state,
        by_domain: top(LIVE_BY_DOMAIN)?,
        by_campaign: top(LIVE_BY_CAMPAIGN)?,
    })
}

#[derive(Debug, Clone)]
pub struct QueueSummary {
    pub by_state: Vec<(RecipientState, u64)>,
    pub by_domain: Vec<(String, u64)>,
    pub by_campaign: Vec<(String, u64)>,
}
