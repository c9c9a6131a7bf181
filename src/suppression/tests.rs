use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::*;
use crate::clock::{ShiftedClock, SystemClock};

fn entry(target: &str, scope: Scope, reason: Reason) -> NewEntry {
    NewEntry {
        target: Target::parse(target).unwrap(),
        scope,
        reason,
        source: "test".into(),
        expires_ms: None,
    }
}

async fn wait_added(s: &Suppressions, n: u64) {
    for _ in 0..500 {
        if s.stats.added.load(Ordering::Relaxed) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("writer never persisted {n} entries");
}

#[test]
fn targets_normalise() {
    assert_eq!(
        Target::parse(" Bob.Smith@Example.COM "),
        Some(Target::Address("bob.smith@example.com".into()))
    );
    assert_eq!(
        Target::parse("@Example.com"),
        Some(Target::Domain("example.com".into()))
    );
    assert_eq!(
        Target::parse("example.com"),
        Some(Target::Domain("example.com".into()))
    );
    assert_eq!(Target::parse("a@b.test\r\nX: y"), None);
    assert_eq!(Target::parse(""), None);
    assert_eq!(Target::parse("no spaces@x.test"), None);
    let t = Target::parse("a@x.test").unwrap();
    assert_eq!(Target::from_column(&t.as_column()), Some(t));
}

#[tokio::test]
async fn entries_survive_a_restart_and_scopes_apply() {
    let dir = tempfile::tempdir().unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let (s, writer) = Suppressions::open(dir.path(), clock.clone()).unwrap();
    let added = s
        .add(vec![
            entry("gone@x.test", Scope::Global, Reason::InvalidRecipient),
            entry("@dead.test", Scope::Global, Reason::BadDomain),
            entry(
                "left@x.test",
                Scope::Campaign("spring".into()),
                Reason::Unsubscribed,
            ),
        ])
        .await
        .unwrap();
    assert_eq!(added, 3);
    assert_eq!(s.check("Gone", "x.test", None), Some(Hit::Address));
    assert_eq!(s.check("anyone", "dead.test", Some("c")), Some(Hit::Domain));
    assert_eq!(
        s.check("left", "x.test", Some("spring")),
        Some(Hit::Address)
    );
    assert_eq!(s.check("left", "x.test", Some("autumn")), None);
    assert_eq!(s.check("left", "x.test", None), None);
    drop(s);
    writer.join().unwrap();

    let (s, _writer) = Suppressions::open(dir.path(), clock).unwrap();
    assert_eq!(s.in_memory().0, 3);
    assert_eq!(s.check("gone", "x.test", None), Some(Hit::Address));
    let listed = s
        .list(Filter {
            reason: Some(Reason::Unsubscribed),
            limit: 10,
            ..Filter::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].scope, Scope::Campaign("spring".into()));
    assert!(
        s.remove(Scope::Global, Target::parse("gone@x.test").unwrap())
            .await
            .unwrap()
    );
    assert!(
        !s.remove(Scope::Global, Target::parse("gone@x.test").unwrap())
            .await
            .unwrap()
    );
    assert_eq!(s.check("gone", "x.test", None), None);
    assert_eq!(s.stored().await.unwrap(), 2);
}

#[tokio::test]
async fn delivery_path_records_hold_at_once_and_reach_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let (s, _writer) = Suppressions::open(dir.path(), clock).unwrap();
    s.record(vec![entry(
        "bounced@x.test",
        Scope::Global,
        Reason::InvalidRecipient,
    )]);
    assert_eq!(s.check("bounced", "x.test", None), Some(Hit::Address));
    wait_added(&s, 1).await;
    let got = s
        .get(Target::parse("bounced@x.test").unwrap())
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].reason, Reason::InvalidRecipient);
    assert_eq!(got[0].source, "test");
}

#[tokio::test]
async fn listing_pages_with_a_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _writer) = Suppressions::open(dir.path(), Arc::new(SystemClock)).unwrap();
    let entries: Vec<NewEntry> = (0..25)
        .map(|i| entry(&format!("u{i}@x.test"), Scope::Global, Reason::Manual))
        .collect();
    s.add(entries).await.unwrap();
    let mut seen = 0;
    let mut cursor = None;
    loop {
        let page = s
            .list(Filter {
                cursor,
                limit: 10,
                domain: Some("x.test".into()),
                ..Filter::default()
            })
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        seen += page.len();
        cursor = page.last().map(|e| e.id);
    }
    assert_eq!(seen, 25);
}

#[tokio::test]
async fn expired_entries_stop_applying_and_are_not_loaded_again() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ShiftedClock::default());
    let (s, writer) = Suppressions::open(dir.path(), clock.clone()).unwrap();
    let mut e = entry("brief@x.test", Scope::Global, Reason::Manual);
    e.expires_ms = Some(clock.now_ms() + 60 * 60_000);
    s.add(vec![e]).await.unwrap();
    assert!(s.check("brief", "x.test", None).is_some());
    clock.advance(Duration::from_secs(2 * 3600));
    assert_eq!(s.check("brief", "x.test", None), None);
    drop(s);
    writer.join().unwrap();
    let (s, _writer) = Suppressions::open(dir.path(), clock).unwrap();
    assert_eq!(s.in_memory().0, 0, "expired entries are not loaded");
    assert!(
        s.list(Filter {
            limit: 10,
            ..Filter::default()
        })
        .await
        .unwrap()
        .is_empty()
    );
}

#[test]
fn only_dead_mailboxes_suppress() {
    assert_eq!(
        Reason::for_bounce(BounceClass::InvalidRecipient),
        Some(Reason::InvalidRecipient)
    );
    assert_eq!(Reason::for_bounce(BounceClass::PolicyBlock), None);
    assert_eq!(Reason::for_bounce(BounceClass::Quota), None);
    for r in Reason::ALL {
        assert_eq!(Reason::parse(r.as_str()), Some(*r));
    }
}
