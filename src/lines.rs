//! Cutting a streamed body into lines as its chunks arrive, for every upload that is one
//! record a line (suppression imports, batch recipient lists): at most one partial line
//! is held, and a line over the limit is reported once and skipped to its end without
//! being buffered.

/// One line of the stream: its text (without CR LF), or that it was too long.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    Text(&'a [u8]),
    TooLong,
}

pub struct LineCutter {
    max: usize,
    partial: Vec<u8>,
    /// Inside a line longer than `max`: drop bytes until its end.
    skipping: bool,
}

impl LineCutter {
    pub fn new(max: usize) -> LineCutter {
        LineCutter {
            max,
            partial: Vec::new(),
            skipping: false,
        }
    }

    /// Bytes held for the line not yet ended; never more than the limit.
    pub fn held(&self) -> usize {
        self.partial.len()
    }

    /// Feeds one chunk; `each` sees every line the chunk completes, in order.
    pub fn feed(&mut self, mut chunk: &[u8], mut each: impl FnMut(Line<'_>)) {
        while let Some(pos) = chunk.iter().position(|&b| b == b'\n') {
            let (head, rest) = chunk.split_at(pos);
            chunk = &rest[1..];
            if self.skipping {
                self.skipping = false;
                self.partial.clear();
                continue;
            }
            if self.partial.len() + head.len() > self.max {
                self.partial.clear();
                each(Line::TooLong);
                continue;
            }
            if self.partial.is_empty() {
                each(Line::Text(trim_cr(head)));
            } else {
                self.partial.extend_from_slice(head);
                let line = std::mem::take(&mut self.partial);
                each(Line::Text(trim_cr(&line)));
            }
        }
        if self.skipping {
            return;
        }
        if self.partial.len() + chunk.len() > self.max {
            self.partial.clear();
            self.skipping = true;
            each(Line::TooLong);
        } else {
            self.partial.extend_from_slice(chunk);
        }
    }

    /// The stream ended: a last line needs no newline.
    pub fn finish(mut self, mut each: impl FnMut(Line<'_>)) {
        if !self.skipping && !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            each(Line::Text(trim_cr(&line)));
        }
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(body: &[u8], chunk: usize, max: usize) -> Vec<Option<Vec<u8>>> {
        let mut cutter = LineCutter::new(max);
        let mut out = Vec::new();
        let mut push = |l: Line<'_>| {
            out.push(match l {
                Line::Text(t) => Some(t.to_vec()),
                Line::TooLong => None,
            })
        };
        for c in body.chunks(chunk) {
            cutter.feed(c, &mut push);
            assert!(cutter.held() <= max);
        }
        cutter.finish(&mut push);
        out
    }

    #[test]
    fn lines_in_any_chunking() {
        let body = b"one\r\ntwo\n\nthree-is-long\nfour";
        for chunk in [1, 2, 5, 100] {
            assert_eq!(
                cut(body, chunk, 8),
                vec![
                    Some(b"one".to_vec()),
                    Some(b"two".to_vec()),
                    Some(Vec::new()),
                    None,
                    Some(b"four".to_vec())
                ],
                "chunk {chunk}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn matches_a_plain_split(body in proptest::collection::vec(proptest::sample::select(vec![b'a', b'\n', b'\r']), 0..300), chunk in 1usize..40) {
            let got = cut(&body, chunk, 1000);
            let mut want: Vec<Option<Vec<u8>>> = body
                .split(|&b| b == b'\n')
                .map(|l| Some(l.strip_suffix(b"\r").unwrap_or(l).to_vec()))
                .collect();
            // A trailing newline ends the last line; it does not start an empty one.
            if body.is_empty() || body.last() == Some(&b'\n') {
                want.pop();
            }
            proptest::prop_assert_eq!(got, want);
        }
    }
}
