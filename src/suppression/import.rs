//! Bulk import of suppressions from NDJSON or CSV, read as a stream of chunks: lines are
//! cut as they arrive and turned into entries in batches, so that a million-row import
//! holds one batch and one partial line, never the body.

use serde::Deserialize;

use super::{NewEntry, Reason, Scope, Target};
use crate::lines::{Line, LineCutter};

/// Longest line taken; a longer one is an error and is skipped without being buffered.
pub const MAX_LINE: usize = 4096;
/// Errors reported back in full; the rest are only counted.
const MAX_REPORTED: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line: `{"address": "...", "campaign": "...", "reason": "...",
    /// "expires_at": ms}`; `domain` instead of `address` suppresses a whole domain.
    Ndjson,
    /// A header line naming the columns (`address` or `email`, and optionally `campaign`,
    /// `reason`, `expires_at`), or no header and one address per line.
    Csv,
}

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub lines: u64,
    pub accepted: u64,
    pub invalid: u64,
    /// The first errors: line number and why.
    pub errors: Vec<(u64, String)>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRow {
    address: Option<String>,
    domain: Option<String>,
    campaign: Option<String>,
    reason: Option<String>,
    expires_at: Option<i64>,
}

/// Which CSV column holds what.
#[derive(Debug, Clone, Copy)]
struct Columns {
    address: usize,
    campaign: Option<usize>,
    reason: Option<usize>,
    expires_at: Option<usize>,
}

pub struct Importer {
    lines: LineCutter,
    rows: Rows,
}

/// Turns complete lines into entries, remembering the CSV header and the report.
struct Rows {
    format: Format,
    source: String,
    columns: Option<Columns>,
    report: Report,
}

impl Importer {
    pub fn new(format: Format, source: &str) -> Importer {
        Importer {
            lines: LineCutter::new(MAX_LINE),
            rows: Rows {
                format,
                source: source.to_owned(),
                columns: None,
                report: Report::default(),
            },
        }
    }

    /// Feeds one chunk of the body; the entries of every line it completes are appended
    /// to `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<NewEntry>) {
        self.lines.feed(chunk, |line| self.rows.line(line, out));
    }

    /// The body ended: the last line needs no newline.
    pub fn finish(mut self, out: &mut Vec<NewEntry>) -> Report {
        self.lines.finish(|line| self.rows.line(line, out));
        self.rows.report
    }
}

impl Rows {
    fn line(&mut self, line: Line<'_>, out: &mut Vec<NewEntry>) {
        match line {
            Line::Text(text) => out.extend(self.take_line(text)),
            Line::TooLong => self.fail("line too long".into()),
        }
    }

    fn fail(&mut self, why: String) {
        self.report.lines += 1;
        self.report.invalid += 1;
        if self.report.errors.len() < MAX_REPORTED {
            self.report.errors.push((self.report.lines, why));
        }
    }

    fn take_line(&mut self, raw: &[u8]) -> Option<NewEntry> {
        let Ok(line) = std::str::from_utf8(raw) else {
            self.fail("not UTF-8".into());
            return None;
        };
        if line.trim().is_empty() {
            return None;
        }
        let parsed = match self.format {
            Format::Ndjson => self.json_row(line),
            Format::Csv => match self.csv_row(line) {
                Ok(None) => {
                    // The header line.
                    self.report.lines += 1;
                    return None;
                }
                Ok(Some(e)) => Ok(e),
                Err(e) => Err(e),
            },
        };
        match parsed {
            Ok(entry) => {
                self.report.lines += 1;
                self.report.accepted += 1;
                Some(entry)
            }
            Err(why) => {
                self.fail(why);
                None
            }
        }
    }

    fn json_row(&self, line: &str) -> Result<NewEntry, String> {
        let row: JsonRow = serde_json::from_str(line).map_err(|e| e.to_string())?;
        let target = match (&row.address, &row.domain) {
            (Some(a), None) => Target::parse(a).filter(|t| matches!(t, Target::Address(_))),
            (None, Some(d)) => Target::parse(&format!("@{d}")),
            _ => return Err("give exactly one of address and domain".into()),
        }
        .ok_or("not a valid address or domain")?;
        self.entry(
            target,
            row.campaign.as_deref(),
            row.reason.as_deref(),
            row.expires_at,
        )
    }

    /// `Ok(None)` for the header line.
    fn csv_row(&mut self, line: &str) -> Result<Option<NewEntry>, String> {
        let fields = split_csv(line).ok_or("unbalanced quotes")?;
        let columns = match self.columns {
            Some(c) => c,
            None => {
                let (columns, header) = header_columns(&fields);
                self.columns = Some(columns);
                if header {
                    return Ok(None);
                }
                columns
            }
        };
        let get = |i: Option<usize>| {
            i.and_then(|i| fields.get(i))
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
        };
        let address = get(Some(columns.address)).ok_or("no address")?;
        let target = Target::parse(address).ok_or("not a valid address or domain")?;
        let expires = match get(columns.expires_at) {
            None => None,
            Some(t) => Some(
                t.parse::<i64>()
                    .map_err(|_| "expires_at is not milliseconds")?,
            ),
        };
        self.entry(target, get(columns.campaign), get(columns.reason), expires)
            .map(Some)
    }

    fn entry(
        &self,
        target: Target,
        campaign: Option<&str>,
        reason: Option<&str>,
        expires_ms: Option<i64>,
    ) -> Result<NewEntry, String> {
        let reason = match reason {
            None => Reason::Manual,
            Some(r) => Reason::parse(r).ok_or_else(|| format!("unknown reason {r:?}"))?,
        };
        let scope = Scope::for_campaign(campaign.map(str::trim))
            .ok_or_else(|| "not a valid campaign name".to_owned())?;
        Ok(NewEntry {
            target,
            scope,
            reason,
            source: self.source.clone(),
            expires_ms,
        })
    }
}

/// Column positions from a header line, or the one-address-per-line layout when the
/// first line is not a header.
fn header_columns(fields: &[String]) -> (Columns, bool) {
    let find = |names: &[&str]| {
        fields
            .iter()
            .position(|f| names.contains(&f.trim().to_ascii_lowercase().as_str()))
    };
    match find(&["address", "email", "e-mail", "email_address"]) {
        Some(address) => (
            Columns {
                address,
                campaign: find(&["campaign", "scope"]),
                reason: find(&["reason"]),
                expires_at: find(&["expires_at", "expires"]),
            },
            true,
        ),
        None => (
            Columns {
                address: 0,
                campaign: None,
                reason: None,
                expires_at: None,
            },
            false,
        ),
    }
}

/// RFC 4180 fields: commas separate, double quotes enclose, `""` is a quote.
pub fn split_csv(line: &str) -> Option<Vec<String>> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            ('"', true) => quoted = false,
            ('"', false) if field.trim().is_empty() => {
                field.clear();
                quoted = true;
            }
            (',', false) => fields.push(std::mem::take(&mut field)),
            (c, _) => field.push(c),
        }
    }
    if quoted {
        return None;
    }
    fields.push(field);
    Some(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(format: Format, body: &[u8], chunk: usize) -> (Vec<NewEntry>, Report) {
        let mut importer = Importer::new(format, "import");
        let mut out = Vec::new();
        for c in body.chunks(chunk.max(1)) {
            importer.feed(c, &mut out);
        }
        let report = importer.finish(&mut out);
        (out, report)
    }

    #[test]
    fn csv_with_header_quotes_and_bad_rows() {
        let body = b"email,campaign,reason\r\nA@X.test,,\r\n\"b@x.test\",\"spring, sale\",unsubscribed\nnot-an-address,,\n@dom.test,,manual\nc@x.test,,nonsense";
        for chunk in [1, 3, 7, 1000] {
            let (entries, report) = run(Format::Csv, body, chunk);
            assert_eq!(report.accepted, 3, "chunk {chunk}: {report:?}");
            assert_eq!(report.invalid, 2);
            assert_eq!(report.errors[0].0, 4, "{report:?}");
            assert_eq!(entries[0].target, Target::Address("a@x.test".into()));
            assert_eq!(entries[1].scope, Scope::Campaign("spring, sale".into()));
            assert_eq!(entries[1].reason, Reason::Unsubscribed);
            assert_eq!(entries[2].target, Target::Domain("dom.test".into()));
        }
    }

    #[test]
    fn csv_without_header_is_one_address_per_line() {
        let (entries, report) = run(Format::Csv, b"a@x.test\nb@x.test\n", 5);
        assert_eq!(report.accepted, 2);
        assert_eq!(entries[1].target, Target::Address("b@x.test".into()));
    }

    #[test]
    fn ndjson_rows() {
        let body = br#"{"address":"a@x.test","reason":"complaint","expires_at":5}
{"domain":"Bad.Test"}
{"address":"a@x.test","domain":"x.test"}
{"address":"a@x.test","colour":"red"}
"#;
        let (entries, report) = run(Format::Ndjson, body, 16);
        assert_eq!(report.accepted, 2, "{report:?}");
        assert_eq!(report.invalid, 2);
        assert_eq!(entries[0].expires_ms, Some(5));
        assert_eq!(entries[1].target, Target::Domain("bad.test".into()));
    }

    #[test]
    fn over_long_lines_are_skipped_without_being_held() {
        let mut body = vec![b'a'; MAX_LINE * 3];
        body.extend_from_slice(b"\nok@x.test\n");
        let mut importer = Importer::new(Format::Csv, "import");
        let mut out = Vec::new();
        for c in body.chunks(1000) {
            importer.feed(c, &mut out);
            assert!(importer.lines.held() <= MAX_LINE);
        }
        let report = importer.finish(&mut out);
        assert_eq!((report.accepted, report.invalid), (1, 1), "{report:?}");
    }

    proptest::proptest! {
        #[test]
        fn any_body_in_any_chunks_never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..2000), chunk in 1usize..64, json in proptest::bool::ANY) {
            let format = if json { Format::Ndjson } else { Format::Csv };
            let (entries, report) = run(format, &body, chunk);
            proptest::prop_assert_eq!(entries.len() as u64, report.accepted);
            for e in entries {
                proptest::prop_assert!(!e.target.as_column().chars().any(char::is_control));
            }
        }
    }
}
