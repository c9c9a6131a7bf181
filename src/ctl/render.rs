//! How `floodgate ctl` prints the admin API's answers for people: aligned tables, states in
//! words, the worst campaign on the first line. `--json` bypasses all of this.

use std::fmt::Write as _;

use serde_json::Value;

/// Columns aligned by width; a column whose header is right-aligned holds numbers.
pub struct Table {
    headers: Vec<(&'static str, bool)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// `headers`: name and whether the column is numeric (right-aligned).
    pub fn new(headers: &[(&'static str, bool)]) -> Table {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|(h, _)| h.len()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|(h, _)| h.to_string()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                let (w, numeric) = (widths[i], self.headers[i].1);
                let pad = w.saturating_sub(cell.chars().count());
                let last = i + 1 == row.len();
                if numeric {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    if !last {
                        line.push_str(&" ".repeat(pad));
                    }
                }
                if !last {
                    line.push_str("  ");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

fn u(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn utc(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| ms.to_string())
}

fn uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h}h {m:02}m")
    } else {
        format!("{h}h {m:02}m {s:02}s")
    }
}

/// `{"no_such_domain": 5000, "malformed_address": 12}` as `no_such_domain 5000, malformed_address 12`,
/// the largest first.
fn top_reasons(reasons: &Value, n: usize) -> String {
    let mut list: Vec<(&str, u64)> = reasons
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.as_str(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    list.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    if list.is_empty() {
        return "-".into();
    }
    list.iter()
        .take(n)
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A campaign's state in words, with the end of a purge block (which a pause hides in the
/// API's one-word state, and which `resume` lifts too).
pub fn state(c: &Value) -> String {
    let until = c
        .get("blocked_until_ms")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    match s(c, "state") {
        "blocked" => format!("blocked until {} UTC", utc(until)),
        "paused" if until > chrono::Utc::now().timestamp_millis() => {
            format!("paused, and blocked until {} UTC", utc(until))
        }
        other => other.to_owned(),
    }
}

/// As [`state`], short enough for a table column: `paused, blocked to 06:02 UTC`.
fn state_short(c: &Value) -> String {
    let until = c
        .get("blocked_until_ms")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let word = s(c, "state");
    if until > chrono::Utc::now().timestamp_millis() {
        let hm = chrono::DateTime::from_timestamp_millis(until)
            .map(|t| t.format("%H:%M").to_string())
            .unwrap_or_default();
        match word {
            "blocked" => format!("blocked to {hm} UTC"),
            other => format!("{other}, blocked to {hm} UTC"),
        }
    } else {
        word.to_owned()
    }
}

/// `GET /admin/v1/campaigns`: the API sorts by failures, the worst first; keep that order.
pub fn campaigns(list: &Value) -> String {
    let items = list.as_array().map(Vec::as_slice).unwrap_or_default();
    if items.is_empty() {
        return "no campaigns yet: nothing has been submitted since the daemon started\n".into();
    }
    let mut t = Table::new(&[
        ("CAMPAIGN", false),
        ("STATE", false),
        ("ACCEPTED", true),
        ("FAILED", true),
        ("RATIO", true),
        ("TOP REASONS", false),
    ]);
    for c in items {
        let ratio = c
            .get("failure_ratio")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        t.row(vec![
            s(c, "name").to_owned(),
            state_short(c),
            u(c, "accepted").to_string(),
            u(c, "failed").to_string(),
            format!("{:.1}%", ratio * 100.0),
            top_reasons(c.get("reasons").unwrap_or(&Value::Null), 3),
        ]);
    }
    t.render()
}

/// `GET /admin/v1/status`.
pub fn status(addr: &str, v: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "floodgate at {addr}, up {}",
        uptime(u(v, "uptime_secs"))
    );
    let intake = if v.get("intake_paused").and_then(Value::as_bool) == Some(true) {
        "PAUSED: new mail is answered 451 4.7.1 (floodgate ctl intake resume)"
    } else {
        "accepting"
    };
    let _ = writeln!(out, "intake        {intake}");
    let queue = v
        .get("queue")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, n)| format!("{k} {}", n.as_u64().unwrap_or(0)))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .filter(|q| !q.is_empty())
        .unwrap_or_else(|| "empty".into());
    let _ = writeln!(out, "queue         {queue}");
    let _ = writeln!(
        out,
        "recipients    accepted {}, delivered {}, failed {} (refusals and failures of every kind: {})",
        u(v, "accepted_total"),
        u(v, "delivered_total"),
        u(v, "failed_total"),
        u(v, "failures_total"),
    );
    let held: Vec<&str> = v
        .get("paused_campaigns")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let held = if held.is_empty() {
        "none paused".to_owned()
    } else {
        format!("paused or blocked: {}", held.join(", "))
    };
    let _ = writeln!(out, "campaigns     {}, {held}", u(v, "campaigns"));
    let _ = writeln!(
        out,
        "failure log   {}",
        faillog_line(v.get("faillog").unwrap_or(&Value::Null))
    );
    let _ = writeln!(
        out,
        "alerts        {} (floodgate ctl alerts)",
        u(v, "alerts")
    );
    out
}

fn faillog_line(f: &Value) -> String {
    let Some(settings) = f.get("settings").filter(|s| !s.is_null()) else {
        return "not running".into();
    };
    let counters = f.get("counters").unwrap_or(&Value::Null);
    format!(
        "mode {}, writing {:.1} rows/s, {} rows written, {} dropped",
        s(settings, "mode"),
        f.get("rows_per_sec").and_then(Value::as_f64).unwrap_or(0.0),
        u(counters, "rows_written"),
        u(counters, "dropped"),
    )
}

/// `GET|PUT /admin/v1/faillog`.
pub fn faillog(f: &Value) -> String {
    let Some(settings) = f.get("settings").filter(|s| !s.is_null()) else {
        return "failure log: not running\n".into();
    };
    let c = f.get("counters").unwrap_or(&Value::Null);
    let mut out = String::new();
    let _ = writeln!(out, "mode          {}", s(settings, "mode"));
    let _ = writeln!(
        out,
        "sample rate   1 in {} (mode sampled)",
        u(settings, "sample_rate").max(1)
    );
    let _ = writeln!(
        out,
        "row cap       {} rows/s per campaign, burst {} (modes full and sampled)",
        u(settings, "rows_per_sec"),
        u(settings, "burst")
    );
    let _ = writeln!(
        out,
        "write rate    {:.1} rows/s",
        f.get("rows_per_sec").and_then(Value::as_f64).unwrap_or(0.0)
    );
    let _ = writeln!(
        out,
        "since start   {} failures counted, {} rows written, {} suppressed by the cap, {} sampled out, {} dropped",
        u(c, "recorded"),
        u(c, "rows_written"),
        u(c, "suppressed"),
        u(c, "sampled_out"),
        u(c, "dropped"),
    );
    out
}

/// `GET /admin/v1/queue`: `by_state` is an object, the others are `[name, count]` pairs.
pub fn queue(v: &Value) -> String {
    let mut out = String::new();
    let mut t = Table::new(&[("STATE", false), ("RECIPIENTS", true)]);
    if let Some(m) = v.get("by_state").and_then(Value::as_object) {
        for (k, n) in m {
            t.row(vec![k.clone(), n.as_u64().unwrap_or(0).to_string()]);
        }
    }
    out.push_str(&t.render());
    for (key, header) in [("by_domain", "DOMAIN"), ("by_campaign", "CAMPAIGN")] {
        out.push('\n');
        let pairs = v
            .get(key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut t = Table::new(&[(header, false), ("QUEUED", true)]);
        for p in &pairs {
            let name = p.get(0).and_then(Value::as_str).unwrap_or("-");
            let n = p.get(1).and_then(Value::as_u64).unwrap_or(0);
            t.row(vec![name.to_owned(), n.to_string()]);
        }
        if pairs.is_empty() {
            t.row(vec!["(nothing queued)".into(), String::new()]);
        }
        out.push_str(&t.render());
    }
    out
}

/// `GET /admin/v1/failures`: newest first.
pub fn failures(v: &Value) -> String {
    let rows = v
        .get("failures")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if rows.is_empty() {
        return "no failure rows (in mode aggregate or off only counts are kept: floodgate ctl campaigns)\n".into();
    }
    let mut t = Table::new(&[
        ("TIME (UTC)", false),
        ("STAGE", false),
        ("REASON", false),
        ("RECIPIENT", false),
        ("DETAIL", false),
    ]);
    for r in &rows {
        t.row(vec![
            utc(r.get("at_ms").and_then(Value::as_i64).unwrap_or(0)),
            s(r, "stage").to_owned(),
            s(r, "reason").to_owned(),
            match s(r, "recipient") {
                "" => "<>".to_owned(),
                other => other.to_owned(),
            },
            s(r, "detail").to_owned(),
        ]);
    }
    t.render()
}

/// `GET /admin/v1/webhooks`: one row per endpoint the courier has used.
pub fn webhooks(v: &Value) -> String {
    let rows = v
        .get("endpoints")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut out = String::new();
    let mut t = Table::new(&[
        ("ENDPOINT", false),
        ("STATE", false),
        ("CIRCUIT", false),
        ("FAILURES", true),
    ]);
    for r in &rows {
        let disabled = r.get("disabled").and_then(Value::as_bool).unwrap_or(false);
        t.row(vec![
            s(r, "url").to_owned(),
            if disabled {
                "disabled (410)"
            } else {
                "enabled"
            }
            .to_owned(),
            s(r, "circuit").to_owned(),
            r.get("consecutive_failures")
                .and_then(Value::as_u64)
                .unwrap_or(0)
                .to_string(),
        ]);
    }
    if rows.is_empty() {
        t.row(vec![
            "(no webhook used yet)".into(),
            String::new(),
            String::new(),
            String::new(),
        ]);
    }
    out.push_str(&t.render());
    if rows
        .iter()
        .any(|r| r.get("disabled").and_then(Value::as_bool) == Some(true))
    {
        out.push_str("\ndisabled endpoints' domains are answered 451 4.3.2 until the config is reloaded (SIGHUP)\n");
    }
    out
}

/// `GET /admin/v1/alerts`: newest first.
pub fn alerts(v: &Value) -> String {
    let mut list = v.as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        return "no alerts\n".into();
    }
    list.sort_by_key(|a| std::cmp::Reverse(a.get("at_ms").and_then(Value::as_i64)));
    let mut t = Table::new(&[
        ("TIME (UTC)", false),
        ("KIND", false),
        ("CAMPAIGN", false),
        ("ACTION", false),
        ("MESSAGE", false),
    ]);
    for a in &list {
        t.row(vec![
            utc(a.get("at_ms").and_then(Value::as_i64).unwrap_or(0)),
            s(a, "kind").to_owned(),
            a.get("campaign")
                .and_then(Value::as_str)
                .unwrap_or("-")
                .to_owned(),
            a.get("action")
                .and_then(Value::as_str)
                .unwrap_or("-")
                .to_owned(),
            s(a, "message").to_owned(),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn campaigns_table_is_aligned_and_keeps_the_api_order() {
        let out = campaigns(&json!([
            {"name": "flood0@client.test", "state": "paused", "accepted": 0, "failed": 5000,
             "failure_ratio": 1.0, "reasons": {"no_such_domain": 5000}},
            {"name": "good", "state": "active", "accepted": 120, "failed": 0,
             "failure_ratio": 0.0, "reasons": {}},
        ]));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            [
                "CAMPAIGN            STATE   ACCEPTED  FAILED   RATIO  TOP REASONS",
                "flood0@client.test  paused         0    5000  100.0%  no_such_domain 5000",
                "good                active       120       0    0.0%  -",
            ]
        );
    }

    #[test]
    fn blocked_state_names_its_end() {
        let c = json!({"state": "blocked", "blocked_until_ms": 0});
        assert_eq!(state(&c), "blocked until 1970-01-01 00:00:00 UTC");
    }
}
