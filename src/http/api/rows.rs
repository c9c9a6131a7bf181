//! One line of a batch's recipient upload turned into a row: NDJSON (`{"to": "...",
//! "vars": {...}}`) or CSV (a header row naming a `to` column; every other column
//! becomes a variable). Lines arrive cut by [`crate::lines`]; this never sees more than
//! one line, and never panics on any input.

use serde::Deserialize;

use crate::suppression::import::split_csv;

/// Longest line taken (and so the largest variables of one row); a longer line is a
/// rejected row, skipped without being buffered.
pub const MAX_LINE: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Ndjson,
    Csv,
}

impl Format {
    pub fn of_content_type(ct: &str) -> Option<Format> {
        match ct.split(';').next().unwrap_or_default().trim() {
            "application/x-ndjson" | "application/ndjson" => Some(Format::Ndjson),
            "text/csv" => Some(Format::Csv),
            _ => None,
        }
    }
}

/// One recipient row: its address and its variables (a JSON object, compact).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub to: String,
    pub vars: serde_json::Map<String, serde_json::Value>,
}

/// What one line was.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// A blank line, or the CSV header row: not a recipient.
    Skip,
    Row(Row),
    /// Not a row; why (answered with its line number).
    Bad(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRow {
    to: String,
    #[serde(default)]
    vars: serde_json::Map<String, serde_json::Value>,
}

/// The CSV header row did not name a `to` column: the upload is refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoToColumn;

pub struct Rows {
    format: Format,
    /// CSV: the header's column names, once read.
    columns: Option<Vec<String>>,
    to: usize,
}

impl Rows {
    pub fn new(format: Format) -> Rows {
        Rows {
            format,
            columns: None,
            to: 0,
        }
    }

    pub fn line(&mut self, raw: &[u8]) -> Result<Parsed, NoToColumn> {
        let Ok(line) = std::str::from_utf8(raw) else {
            return Ok(Parsed::Bad("not UTF-8".into()));
        };
        if line.trim().is_empty() {
            return Ok(Parsed::Skip);
        }
        Ok(match self.format {
            Format::Ndjson => match serde_json::from_str::<JsonRow>(line) {
                Ok(r) => Parsed::Row(Row {
                    to: r.to,
                    vars: r.vars,
                }),
                Err(e) => Parsed::Bad(format!("not a recipient row: {e}")),
            },
            Format::Csv => return self.csv(line),
        })
    }

    fn csv(&mut self, line: &str) -> Result<Parsed, NoToColumn> {
        let Some(fields) = split_csv(line) else {
            return Ok(Parsed::Bad("unbalanced quotes".into()));
        };
        let Some(columns) = &self.columns else {
            let names: Vec<String> = fields.iter().map(|f| f.trim().to_owned()).collect();
            self.to = names
                .iter()
                .position(|n| n.eq_ignore_ascii_case("to"))
                .ok_or(NoToColumn)?;
            self.columns = Some(names);
            return Ok(Parsed::Skip);
        };
        if fields.len() != columns.len() {
            return Ok(Parsed::Bad(format!(
                "{} fields, the header has {}",
                fields.len(),
                columns.len()
            )));
        }
        let mut vars = serde_json::Map::new();
        let mut to = String::new();
        for (i, (name, value)) in columns.iter().zip(fields).enumerate() {
            if i == self.to {
                to = value.trim().to_owned();
            } else {
                vars.insert(name.clone(), serde_json::Value::String(value));
            }
        }
        Ok(Parsed::Row(Row { to, vars }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndjson_rows() {
        let mut r = Rows::new(Format::Ndjson);
        let Ok(Parsed::Row(row)) = r.line(br#"{"to":"a@b.test","vars":{"n":1}}"#) else {
            panic!()
        };
        assert_eq!(row.to, "a@b.test");
        assert_eq!(row.vars["n"], 1);
        assert_eq!(r.line(b"  "), Ok(Parsed::Skip));
        assert!(matches!(r.line(b"{\"to\":1}"), Ok(Parsed::Bad(_))));
        assert!(matches!(r.line(b"{\"vars\":{}}"), Ok(Parsed::Bad(_))));
        assert!(matches!(r.line(b"\xff"), Ok(Parsed::Bad(_))));
    }

    #[test]
    fn csv_rows_with_a_header() {
        let mut r = Rows::new(Format::Csv);
        assert_eq!(r.line(b"name,To,city"), Ok(Parsed::Skip));
        let Ok(Parsed::Row(row)) = r.line(br#""Bob, Jr",bob@b.test,Paris"#) else {
            panic!()
        };
        assert_eq!(row.to, "bob@b.test");
        assert_eq!(row.vars["name"], "Bob, Jr");
        assert_eq!(row.vars["city"], "Paris");
        assert!(matches!(r.line(b"x,y"), Ok(Parsed::Bad(_))));
        assert!(matches!(r.line(b"\"x,y,z"), Ok(Parsed::Bad(_))));
        assert_eq!(Rows::new(Format::Csv).line(b"email,name"), Err(NoToColumn));
    }

    proptest::proptest! {
        #[test]
        fn no_line_panics(line in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200), csv: bool) {
            let format = if csv { Format::Csv } else { Format::Ndjson };
            let mut r = Rows::new(format);
            let _ = r.line(b"to,a,b");
            let _ = r.line(&line);
            let _ = r.line(&line);
        }

        #[test]
        fn csv_shaped_lines_never_panic(fields in proptest::collection::vec("[a-z\",@. ]{0,8}", 0..6)) {
            let mut r = Rows::new(Format::Csv);
            let _ = r.line(b"to,name");
            let line = fields.join(",");
            if let Ok(Parsed::Row(row)) = r.line(line.as_bytes()) {
                proptest::prop_assert_eq!(row.vars.len(), 1);
            }
        }
    }
}
