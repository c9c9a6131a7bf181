//! A thousand simultaneous AUTH attempts with wrong passwords (issue 9, item 3): the
//! Argon2 pool bounds how many run at once, so memory stays bounded, and a normal client
//! is served meanwhile. Alone in its binary: it measures the process's peak RSS.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use base64::Engine;
use common::dns::{TestDns, Zone};
use common::floodgate::{Smtp, TestApp, message, metric};

const ATTEMPTS: usize = 1000;
const WORKERS: usize = 1;

/// Peak resident set size of this process (daemon and clients), in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kb / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_auth_attempts_stay_bounded_and_a_client_is_served() {
    let dns = TestDns::start(
        Zone::new()
            .mx("mx.test", 10, "mail.mx.test")
            .a("mail.mx.test", Ipv4Addr::LOCALHOST),
    )
    .await;
    // The real cost: Argon2id with its default parameters (19 MiB per verification).
    let hash = floodgate::smtp::auth::hash_password("s3cret");
    let smtp = format!(
        "max_connections = 1100\nmax_connections_per_ip = 1000\nauth_without_tls_on_loopback = true\nauth_workers = {WORKERS}\nauth_queue = 2\n\
         [[smtp.users]]\nname = \"app\"\npassword_hash = \"{hash}\"\n"
    );
    let t = TestApp::start(&smtp, "", dns.addr).await;
    let admin_addr = t.app.admin_addr.unwrap();
    // Warm the DNS cache: the in-process DNS server shares the CPU with the flood, and
    // this test is about the door, not about DNS under CPU starvation.
    let mut warm = t.client().await;
    warm.ehlo().await;
    warm.cmd("MAIL FROM:<app@client.test>", "250").await;
    warm.rcpt("user@mx.test", "250").await;
    warm.cmd("QUIT", "221").await;
    let rss_before = peak_rss_mib();
    let creds = base64::engine::general_purpose::STANDARD.encode("\0app\0wrong");
    let mut attackers = Vec::new();
    for i in 0..ATTEMPTS {
        // One attacking address: its failure limit, not only the pool, is what keeps
        // the number of verifications (and the test's run time) small.
        let _ = i;
        let from: IpAddr = Ipv4Addr::new(127, 0, 0, 2).into();
        let addr = t.smtp();
        let line = format!("EHLO attacker.test\r\nAUTH PLAIN {creds}\r\n");
        attackers.push(tokio::spawn(async move {
            let mut c = Smtp::connect_from(addr, from).await.expect("connect");
            c.expect("220").await;
            c.send(line.as_bytes()).await;
            c.expect("250").await;
            let reply = c.reply().await;
            assert!(
                reply.starts_with("535 5.7.8") || reply.starts_with("454 4.7.0"),
                "{reply:?}"
            );
            reply.starts_with("535")
        }));
    }
    // Meanwhile a normal client from 127.0.0.1 completes a transaction.
    let mut c = Smtp::connect_from(t.smtp(), Ipv4Addr::LOCALHOST.into())
        .await
        .unwrap();
    c.expect("220").await;
    c.ehlo().await;
    tokio::time::timeout(
        Duration::from_secs(10),
        c.send_mail(
            "app@client.test",
            &["user@mx.test"],
            &message("meanwhile", ""),
        ),
    )
    .await
    .expect("the normal client is served during the AUTH flood");
    let mut verified_here = 0;
    for a in attackers {
        verified_here += usize::from(a.await.unwrap());
    }
    let peak = metric(admin_addr, "floodgate_smtp_auth_running_peak").await;
    let verified = metric(admin_addr, "floodgate_smtp_auth_verifications_total").await;
    let busy = metric(admin_addr, "floodgate_smtp_auth_busy_total").await;
    let rss = peak_rss_mib();
    eprintln!(
        "{ATTEMPTS} attempts: {verified} verified, {busy} refused busy, peak {peak} at once, \
         peak RSS {rss:.0} MiB (before {rss_before:.0} MiB)"
    );
    assert!(peak <= WORKERS as f64, "{peak} verifications at once");
    assert_eq!(verified, verified_here as f64);
    assert!(busy > 0.0);
    assert!(rss < 200.0, "peak RSS {rss:.0} MiB");
}
