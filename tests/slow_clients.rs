//! Slow clients (issue 9, item 4): a thousand connections from ten loopback addresses
//! (100 each, the per-address cap, 1,000 in all, the table's cap) dribble a byte every
//! two seconds, in commands or inside DATA, reconnecting whenever they are closed. A
//! normal client from 127.0.0.1 must still be greeted and complete a transaction within
//! 5 s: the table evicts the idlest session for it, and stress timeouts recycle the rest.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::dns::{TestDns, Zone};
use common::floodgate::{Smtp, TestApp, message, metric};
use floodgate::clock::ShiftedClock;
use tokio_util::sync::CancellationToken;

const DRIBBLERS: usize = 1000;
const BYTE_EVERY: Duration = Duration::from_secs(2);

/// Raises this process's open-file limit to its hard limit: 1,000 client sockets and
/// 1,000 server sockets live in one process.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit on our own process with a valid, initialised struct.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// One attacker slot: connect, then dribble, in a loop until `stop`.
async fn dribble(
    addr: SocketAddr,
    from: IpAddr,
    in_data: bool,
    open: Arc<AtomicUsize>,
    stop: CancellationToken,
) {
    let prelude: &[u8] = if in_data {
        b"EHLO dribble.test\r\nMAIL FROM:<d@client.test>\r\nRCPT TO:<user@mx.test>\r\nDATA\r\n"
    } else {
        b""
    };
    let payload: &[u8] = if in_data {
        b"Subject: slow\r\n\r\nslow body line\r\n"
    } else {
        b"NOOP\r\n"
    };
    while !stop.is_cancelled() {
        let Ok(mut c) = Smtp::connect_from(addr, from).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let greeting = tokio::time::timeout(Duration::from_secs(10), c.reply()).await;
        if !greeting.is_ok_and(|g| g.starts_with("220")) {
            // Refused (421) or closed: try again, as an attacker would.
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        open.fetch_add(1, Ordering::Relaxed);
        if c.try_send(prelude).await.is_err() {
            open.fetch_sub(1, Ordering::Relaxed);
            continue;
        }
        'session: for byte in payload.iter().cycle() {
            tokio::select! {
                () = stop.cancelled() => break 'session,
                () = tokio::time::sleep(BYTE_EVERY) => {}
            }
            if c.try_send(&[*byte]).await.is_err() {
                break;
            }
        }
        open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dribbling_connections_do_not_lock_out_a_normal_client() {
    raise_fd_limit();
    let dns = TestDns::start(
        Zone::new()
            .mx("mx.test", 10, "mail.mx.test")
            .a("mail.mx.test", Ipv4Addr::LOCALHOST),
    )
    .await;
    // The defaults: max_connections = 1000, max_connections_per_ip = 100.
    let t = TestApp::start("", "", dns.addr).await;
    let admin_addr = t.app.admin_addr.unwrap();
    // Warm the DNS cache: the in-process DNS server shares the CPU with the attack.
    let mut warm = t.client().await;
    warm.ehlo().await;
    warm.cmd("MAIL FROM:<app@client.test>", "250").await;
    warm.rcpt("user@mx.test", "250").await;
    warm.cmd("QUIT", "221").await;
    let stop = CancellationToken::new();
    let open = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..DRIBBLERS {
        let from: IpAddr = Ipv4Addr::new(127, 0, 0, 2 + (i % 10) as u8).into();
        tasks.push(tokio::spawn(dribble(
            t.smtp(),
            from,
            i % 2 == 0,
            open.clone(),
            stop.clone(),
        )));
    }
    // The attack is in place once the table is (almost) full of dribblers.
    let full = async {
        while metric(admin_addr, "floodgate_smtp_connections").await < 950.0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), full)
        .await
        .expect("the dribblers fill the table");

    let normal = async {
        // As a real client does, it tries again after a 421: while every dribbler is
        // fresh nobody is idle enough to evict; a second later one is.
        let mut c = loop {
            let mut c = Smtp::connect_from(t.smtp(), Ipv4Addr::LOCALHOST.into())
                .await
                .expect("connect");
            let greeting = c.reply().await;
            if greeting.starts_with("220") {
                break c;
            }
            assert!(greeting.starts_with("421 4.7.0"), "{greeting:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        c.ehlo().await;
        c.send_mail("app@client.test", &["user@mx.test"], &message("normal", ""))
            .await
    };
    let id = tokio::time::timeout(Duration::from_secs(5), normal)
        .await
        .expect("a normal client is greeted and served within 5 s");
    assert!(t.app.queue().message(&id).await.unwrap().is_some());
    let evicted = metric(admin_addr, "floodgate_smtp_sessions_evicted_total").await;
    eprintln!(
        "dribblers open: {}, evicted so far: {evicted}",
        open.load(Ordering::Relaxed)
    );
    stop.cancel();
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test]
async fn a_full_table_evicts_the_idlest_session_for_a_new_client() {
    let dns = TestDns::start(Zone::new()).await;
    let clock = Arc::new(ShiftedClock::default());
    let t = TestApp::start_with_clock("max_connections = 5", "", dns.addr, clock.clone()).await;
    let mut idle = Vec::new();
    for _ in 0..5 {
        let mut c = t.client().await;
        c.ehlo().await;
        idle.push(c);
    }
    // Sessions younger than a second are never evicted: let them age.
    clock.advance(Duration::from_millis(1100));
    // All but the first work again: the first is the only one idle long enough.
    for c in &mut idle[1..] {
        c.cmd("NOOP", "250").await;
    }
    let mut newcomer = t.client().await;
    newcomer.cmd("EHLO new.test", "250").await;
    idle[0].expect("421 4.7.0").await;
    let admin_addr = t.app.admin_addr.unwrap();
    assert_eq!(
        metric(admin_addr, "floodgate_smtp_sessions_evicted_total").await,
        1.0
    );
    idle[4].cmd("NOOP", "250").await;
}

#[tokio::test]
async fn under_stress_waits_get_the_short_timeout_for_a_whole_line() {
    let dns = TestDns::start(Zone::new()).await;
    // idle_timeout is 30 s in tests; with more than one of 10 connections open the
    // stress timeout (1 s) applies.
    let t = TestApp::start(
        "max_connections = 10\nstress_threshold = 0.1\nstress_idle_timeout = \"1s\"",
        "",
        dns.addr,
    )
    .await;
    let mut first = t.client().await;
    first.ehlo().await;
    // A second connection starts the stress: `first`, already waiting with 30 s ahead,
    // is re-judged at once.
    // A client that works keeps the stress on for the rest of the test.
    let mut keeper = t.client().await;
    let stop = CancellationToken::new();
    let keeping = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                keeper.cmd("NOOP", "250").await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    first.expect("421 4.4.2").await;
    // A line dribbled a byte per 400 ms never completes within its 1 s deadline, though
    // every byte came well within it (the old per-read timeout never fired on that).
    let mut slow = t.client().await;
    for b in b"NOO" {
        slow.send(&[*b]).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    slow.expect("421 4.4.2").await;
    stop.cancel();
    keeping.await.unwrap();
}

#[tokio::test]
async fn data_must_keep_the_minimum_rate_while_a_fast_big_message_passes() {
    let dns = TestDns::start(
        Zone::new()
            .mx("mx.test", 10, "mail.mx.test")
            .a("mail.mx.test", Ipv4Addr::LOCALHOST),
    )
    .await;
    // DATA gets 1 s plus one second per 500 bytes received.
    let t = TestApp::start("data_timeout = \"1s\"\ndata_min_rate = 500", "", dns.addr).await;
    let mut slow = t.client().await;
    slow.ehlo().await;
    slow.cmd("MAIL FROM:<a@client.test>", "250").await;
    slow.rcpt("user@mx.test", "250").await;
    slow.cmd("DATA", "354").await;
    for b in b"Subject: x\r\n" {
        if slow.try_send(&[*b]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    slow.expect("421 4.4.2").await;

    // 300 kB at loopback speed: the allowance grows with the bytes, so it is not cut.
    let mut fast = t.client().await;
    fast.ehlo().await;
    let body = format!(
        "Subject: big\r\n\r\n{}",
        "0123456789abcdef\r\n".repeat(16_000)
    );
    fast.send_mail("a@client.test", &["user@mx.test"], &body)
        .await;
}
