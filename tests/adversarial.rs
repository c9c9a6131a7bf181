//! The adversarial corpus (`tests/corpus/`) and random transcripts, replayed against the
//! real daemon with STARTTLS and AUTH on: every reply is in the documented set, nothing
//! with CR, LF or NUL reaches a stored envelope or failure row, and the daemon stays up
//! and serves a normal client after each.

mod common;

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use common::dns::{TestDns, Zone};
use common::floodgate::{Smtp, TestApp, message};
use common::sink::self_signed;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};

/// Every reply code the door may send (README, "SMTP replies").
const DOCUMENTED: &[u16] = &[
    214, 220, 221, 235, 250, 252, 334, 354, 421, 451, 452, 454, 500, 501, 502, 503, 504, 535, 538,
    550, 552, 554, 556,
];

async fn start() -> (TestDns, TestApp) {
    let dns = TestDns::start(
        Zone::new()
            .mx("mx.test", 10, "mail.mx.test")
            .a("mail.mx.test", Ipv4Addr::LOCALHOST),
    )
    .await;
    let (cert, key) = self_signed(&["floodgate.test"]);
    let certs = tempfile::tempdir().unwrap();
    std::fs::write(certs.path().join("cert.pem"), &cert).unwrap();
    std::fs::write(certs.path().join("key.pem"), &key).unwrap();
    let hash = floodgate::smtp::auth::hash_password("s3cret");
    let smtp = format!(
        "auth_without_tls_on_loopback = true\nmax_bad_commands = 1000\n\
         [smtp.tls]\ncert = \"{}\"\nkey = \"{}\"\n\
         [[smtp.users]]\nname = \"app\"\npassword_hash = \"{hash}\"\n",
        certs.path().join("cert.pem").display(),
        certs.path().join("key.pem").display(),
    );
    let t = TestApp::start(&smtp, "", dns.addr).await;
    // The certificates must outlive the app (a reload would read them again).
    std::mem::forget(certs);
    (dns, t)
}

/// Sends `bytes` on a fresh session (one byte at a time when `slow`), half-closes and
/// checks every reply line against the documented set.
async fn replay(t: &TestApp, bytes: &[u8], slow: bool) -> Result<(), String> {
    let mut c = Smtp::connect_raw(t.smtp()).await;
    if slow {
        for b in bytes {
            if c.try_send(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    } else {
        let _ = c.try_send(bytes).await;
    }
    c.finish().await;
    let lines = c.replies_until_close(Duration::from_secs(30)).await;
    for line in &lines {
        // After STARTTLS the server speaks TLS (alerts); only SMTP lines are judged.
        if line.len() < 4
            || !line.is_char_boundary(3)
            || !line.as_bytes()[..3].iter().all(u8::is_ascii_digit)
        {
            continue;
        }
        let code: u16 = line[..3].parse().unwrap();
        if !DOCUMENTED.contains(&code) {
            return Err(format!("undocumented reply {line:?}"));
        }
    }
    if !lines.first().is_some_and(|l| l.starts_with("220 ")) {
        return Err(format!("no greeting: {lines:?}"));
    }
    Ok(())
}

/// A normal client still completes a transaction.
async fn still_serves(t: &TestApp) {
    let mut c = t.client().await;
    c.ehlo().await;
    c.send_mail("app@client.test", &["user@mx.test"], &message("after", ""))
        .await;
    c.cmd("QUIT", "221").await;
}

/// No stored sender, recipient or failure row holds CR, LF, NUL or a U+FFFD left by a
/// lossy decoding of invalid UTF-8.
fn envelopes_are_clean(t: &TestApp) {
    let check = |db: &Path, sql: &str| {
        let conn =
            rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap();
        let mut stmt = conn.prepare(sql).unwrap();
        let values: Vec<String> = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        for v in values {
            assert!(!v.contains(['\r', '\n', '\0', '\u{FFFD}']), "{sql}: {v:?}");
        }
    };
    let queue = t.app.queue().path();
    check(queue, "SELECT sender FROM messages");
    check(queue, "SELECT address FROM recipients");
    check(t.app.faillog.path(), "SELECT recipient FROM failures");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_corpus_never_breaks_the_door() {
    let (_dns, t) = start().await;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "smtp"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "corpus: {files:?}");
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(file).unwrap();
        if let Err(e) = replay(&t, &bytes, name.ends_with(".slow.smtp")).await {
            panic!("{name}: {e}");
        }
        still_serves(&t).await;
    }
    envelopes_are_clean(&t);
}

/// Pieces of a transcript: real commands, commands around arbitrary bytes, raw bytes.
fn piece() -> impl Strategy<Value = Vec<u8>> {
    let any_bytes = proptest::collection::vec(any::<u8>(), 0..64);
    prop_oneof![
        Just(b"EHLO fuzz.test\r\n".to_vec()),
        Just(b"MAIL FROM:<a@client.test>\r\n".to_vec()),
        Just(b"RCPT TO:<user@mx.test>\r\n".to_vec()),
        Just(b"DATA\r\n".to_vec()),
        Just(b"\r\n.\r\n".to_vec()),
        Just(b"RSET\r\n".to_vec()),
        Just(b"AUTH PLAIN\r\n".to_vec()),
        Just(b"STARTTLS\r\n".to_vec()),
        any_bytes
            .clone()
            .prop_map(|b| [b"MAIL FROM:<".as_slice(), &b, b">\r\n"].concat()),
        any_bytes
            .clone()
            .prop_map(|b| [b"RCPT TO:<".as_slice(), &b, b"@mx.test>\r\n"].concat()),
        any_bytes
            .clone()
            .prop_map(|b| [b"EHLO ".as_slice(), &b, b"\r\n"].concat()),
        any_bytes,
    ]
}

#[test]
fn random_transcripts_get_only_documented_replies() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (_dns, t) = rt.block_on(start());
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let transcript = proptest::collection::vec(piece(), 1..24).prop_map(|p| p.concat());
    runner
        .run(&transcript, |bytes| {
            rt.block_on(replay(&t, &bytes, false))
                .map_err(TestCaseError::fail)
        })
        .unwrap();
    rt.block_on(still_serves(&t));
    envelopes_are_clean(&t);
}
