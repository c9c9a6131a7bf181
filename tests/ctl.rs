//! `floodgate ctl` as an operator runs it: the real binary against a daemon on loopback
//! that has a failing campaign and a good one. Every subcommand, its table and its
//! `--json`, and the exit codes scripts rely on (0 ok, 1 API error, 2 usage, 3 daemon
//! unreachable, 4 wrong token). State changes are checked through the admin API, not
//! through ctl's own output.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::dns::{TestDns, Zone};
use common::floodgate::{Smtp, TOKEN, TestApp, admin, binary, message};

const FLOOD: &str = "flood@client.test";
const GOOD: &str = "good@client.test";
const BAD_RECIPIENTS: usize = 40;

/// Guard off: only ctl pauses campaigns here. Failure rows flushed quickly.
const CONFIG: &str = r#"
[faillog]
mode = "full"
rows_per_sec = 1000
burst = 1000
flush_interval = "50ms"

[guard]
enabled = false
"#;

struct Fixture {
    _dns: TestDns,
    t: TestApp,
    admin: SocketAddr,
}

/// A daemon with one campaign whose every recipient fails (no such domain) and one good
/// campaign with three recipients queued (delivery is off, so they stay queued).
async fn fixture() -> Fixture {
    let dns = TestDns::start(
        Zone::new()
            .mx("good.test", 10, "mx.good.test")
            .a("mx.good.test", Ipv4Addr::LOCALHOST),
    )
    .await;
    let t = TestApp::start("", CONFIG, dns.addr).await;
    let admin_addr = t.app.admin_addr.expect("admin listener");
    let mut c = t.client().await;
    c.ehlo().await;
    c.cmd(&format!("MAIL FROM:<{FLOOD}>"), "250").await;
    for i in 0..BAD_RECIPIENTS {
        c.rcpt(&format!("u{i}@nx.test"), "550 5.1.2").await;
    }
    c.cmd("RSET", "250").await;
    let to = ["a@good.test", "b@good.test", "c@good.test"];
    c.send_mail(GOOD, &to, &message("hello", "")).await;
    // Failure rows are written by the failure log's own thread; wait for them.
    wait_until("failure rows written", || async {
        let v = admin(admin_addr, "GET", "/admin/v1/failures?limit=1", None).await;
        v["failures"].as_array().is_some_and(|a| !a.is_empty())
    })
    .await;
    Fixture {
        _dns: dns,
        t,
        admin: admin_addr,
    }
}

async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `floodgate ctl ARGS` with nothing on standard input and no token in the environment.
async fn run(args: &[&str]) -> Out {
    let out = tokio::process::Command::new(binary())
        .arg("ctl")
        .args(args)
        .env_remove("FLOODGATE_ADMIN_TOKEN")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run floodgate ctl");
    Out {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `floodgate ctl --admin ADDR --token TOKEN ARGS`, asserting exit 0.
async fn ctl(addr: SocketAddr, args: &[&str]) -> String {
    let a = addr.to_string();
    let mut all = vec!["--admin", &a, "--token", TOKEN];
    all.extend_from_slice(args);
    let out = run(&all).await;
    assert_eq!(out.code, 0, "ctl {args:?}: {}{}", out.stdout, out.stderr);
    out.stdout
}

async fn ctl_json(addr: SocketAddr, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let text = ctl(addr, &all).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("ctl {args:?} --json: {e}: {text}"))
}

async fn campaign_state(addr: SocketAddr, name: &str) -> serde_json::Value {
    let list = admin(addr, "GET", "/admin/v1/campaigns", None).await;
    list.as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("campaign {name} not listed: {list}"))
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_campaigns_queue_failures_and_alerts_read_the_daemon() {
    let f = fixture().await;

    let status = ctl(f.admin, &["status"]).await;
    assert!(status.contains("intake        accepting"), "{status}");
    assert!(status.contains("queue         scheduled 3"), "{status}");
    assert!(status.contains("accepted 3,"), "{status}");
    assert!(status.contains("failure log   mode full"), "{status}");
    let v = ctl_json(f.admin, &["status"]).await;
    assert_eq!(v["accepted_total"], 3);
    assert_eq!(v["failed_total"], BAD_RECIPIENTS);

    // The failing campaign is the first row of the table, with its ratio and reason.
    let table = ctl(f.admin, &["campaigns"]).await;
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("CAMPAIGN"), "{table}");
    assert!(lines[1].starts_with(FLOOD), "{table}");
    assert!(
        lines[1].contains("active") && lines[1].contains("100.0%"),
        "{table}"
    );
    assert!(lines[1].contains("no_such_domain 40"), "{table}");
    assert!(
        lines[2].starts_with(GOOD) && lines[2].contains("0.0%"),
        "{table}"
    );
    let v = ctl_json(f.admin, &["campaigns"]).await;
    assert_eq!(v[0]["name"], FLOOD);
    assert_eq!(v[0]["failed"], BAD_RECIPIENTS);

    let queue = ctl(f.admin, &["queue"]).await;
    assert!(queue.contains("good.test"), "{queue}");
    assert!(
        queue
            .lines()
            .any(|l| l.starts_with(GOOD) && l.ends_with(" 3")),
        "{queue}"
    );
    let v = ctl_json(f.admin, &["queue"]).await;
    assert_eq!(v["by_state"]["scheduled"], 3);

    let rows = ctl(f.admin, &["failures", FLOOD, "--limit", "5"]).await;
    assert_eq!(rows.lines().count(), 1 + 5, "{rows}");
    assert!(
        rows.contains("no_such_domain") && rows.contains("@nx.test"),
        "{rows}"
    );
    let v = ctl_json(
        f.admin,
        &[
            "failures",
            FLOOD,
            "--reason",
            "no_such_domain",
            "--limit",
            "100",
        ],
    )
    .await;
    assert_eq!(v["failures"].as_array().unwrap().len(), BAD_RECIPIENTS);
    let v = ctl_json(f.admin, &["failures", FLOOD, "--reason", "rejected"]).await;
    assert!(v["failures"].as_array().unwrap().is_empty());

    let alerts = ctl(f.admin, &["alerts"]).await;
    assert_eq!(alerts, "no alerts\n");
    assert!(ctl_json(f.admin, &["alerts"]).await.is_array());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_purge_change_the_campaign() {
    let f = fixture().await;

    let out = ctl(f.admin, &["pause", FLOOD]).await;
    assert_eq!(out, format!("campaign {FLOOD}: paused\n"));
    assert_eq!(campaign_state(f.admin, FLOOD).await["state"], "paused");
    // Paused means refused at the door, temporarily.
    let mut c = Smtp::connect(f.t.smtp()).await;
    c.ehlo().await;
    c.cmd(&format!("MAIL FROM:<{FLOOD}>"), "250").await;
    c.rcpt("x@good.test", "451 4.7.1").await;

    let out = ctl(f.admin, &["resume", FLOOD]).await;
    assert_eq!(out, format!("campaign {FLOOD}: active\n"));
    assert_eq!(campaign_state(f.admin, FLOOD).await["state"], "active");

    // Without a terminal and without --yes, a purge is refused and nothing is removed.
    let a = f.admin.to_string();
    let out = run(&["--admin", &a, "--token", TOKEN, "purge", GOOD]).await;
    assert_eq!(out.code, 2, "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("pass --yes"), "{}", out.stderr);
    let queue = admin(f.admin, "GET", "/admin/v1/queue", None).await;
    assert_eq!(queue["by_state"]["scheduled"], 3);

    let out = ctl(f.admin, &["purge", GOOD, "--yes", "--block-for", "10m"]).await;
    assert!(
        out.starts_with(&format!(
            "campaign {GOOD}: purged 3 queued recipients; now blocked until "
        )),
        "{out}"
    );
    let queue = admin(f.admin, "GET", "/admin/v1/queue", None).await;
    assert!(
        queue["by_state"].get("scheduled").is_none_or(|n| n == 0),
        "{queue}"
    );
    let good = campaign_state(f.admin, GOOD).await;
    assert_eq!(good["state"], "blocked");

    let v = ctl_json(f.admin, &["resume", GOOD]).await;
    assert_eq!(v["state"], "active");
    assert_eq!(campaign_state(f.admin, GOOD).await["state"], "active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intake_pause_and_resume() {
    let f = fixture().await;
    let out = ctl(f.admin, &["intake", "pause"]).await;
    assert!(out.starts_with("intake paused"), "{out}");
    let status = admin(f.admin, "GET", "/admin/v1/status", None).await;
    assert_eq!(status["intake_paused"], true);
    let text = ctl(f.admin, &["status"]).await;
    assert!(text.contains("intake        PAUSED"), "{text}");

    let v = ctl_json(f.admin, &["intake", "resume"]).await;
    assert_eq!(v["intake_paused"], false);
    let status = admin(f.admin, "GET", "/admin/v1/status", None).await;
    assert_eq!(status["intake_paused"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faillog_shows_and_switches_the_mode() {
    let f = fixture().await;
    let shown = ctl(f.admin, &["faillog"]).await;
    assert!(shown.starts_with("mode          full\n"), "{shown}");
    assert!(shown.contains("rows written"), "{shown}");

    let out = ctl(f.admin, &["faillog", "off"]).await;
    assert!(out.starts_with("mode          off\n"), "{out}");
    let v = admin(f.admin, "GET", "/admin/v1/faillog", None).await;
    assert_eq!(v["settings"]["mode"], "off");

    let v = ctl_json(
        f.admin,
        &[
            "faillog",
            "sampled",
            "--sample-rate",
            "7",
            "--rows-per-sec",
            "3",
        ],
    )
    .await;
    assert_eq!(v["settings"]["mode"], "sampled");
    let v = admin(f.admin, "GET", "/admin/v1/faillog", None).await;
    assert_eq!(v["settings"]["mode"], "sampled");
    assert_eq!(v["settings"]["sample_rate"], 7);
    assert_eq!(v["settings"]["rows_per_sec"], 3);

    ctl(f.admin, &["faillog", "aggregate"]).await;
    let v = admin(f.admin, "GET", "/admin/v1/faillog", None).await;
    assert_eq!(v["settings"]["mode"], "aggregate");
    // Only the mode changed.
    assert_eq!(v["settings"]["sample_rate"], 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_file_or_the_environment_gives_address_and_token() {
    let f = fixture().await;
    // A config with keys ctl does not know: it reads only [admin].
    let path = f.t.dir.path().join("ctl.toml");
    std::fs::write(
        &path,
        format!(
            "[smtp]\nlisten = [\"127.0.0.1:0\"]\n\n[admin]\nlisten = \"{}\"\ntoken = \"{TOKEN}\"\n",
            f.admin
        ),
    )
    .unwrap();
    let config = path.to_str().unwrap();
    let out = run(&["--config", config, "campaigns"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.lines().nth(1).unwrap().starts_with(FLOOD),
        "{}",
        out.stdout
    );

    let a = f.admin.to_string();
    let out = tokio::process::Command::new(binary())
        .args(["ctl", "--admin", &a, "status"])
        .env("FLOODGATE_ADMIN_TOKEN", TOKEN)
        .arg("--config")
        .arg(f.t.dir.path().join("absent.toml"))
        .output()
        .await
        .unwrap();
    // An explicit --config that cannot be read is an error even with the token in the env.
    assert_eq!(out.status.code(), Some(2));
    let out = tokio::process::Command::new(binary())
        .args(["ctl", "--admin", &a, "status"])
        .env("FLOODGATE_ADMIN_TOKEN", TOKEN)
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_scripts_rely_on() {
    let f = fixture().await;
    let a = f.admin.to_string();

    // 4: wrong token.
    let out = run(&["--admin", &a, "--token", "wrong-token-0123456789", "status"]).await;
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert_eq!(
        out.stderr,
        format!("floodgate ctl: {a}: the admin token was refused (401)\n")
    );
    assert!(out.stdout.is_empty());

    // 1: the API refuses the request.
    let out = run(&[
        "--admin", &a, "--token", TOKEN, "failures", FLOOD, "--reason", "bogus",
    ])
    .await;
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("400 Bad Request: unknown reason `bogus`"),
        "{}",
        out.stderr
    );

    // 2: usage and configuration errors.
    let absent = f.t.dir.path().join("absent.toml");
    let out = run(&["--config", absent.to_str().unwrap(), "status"]).await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("cannot read"), "{}", out.stderr);
    let out = run(&[
        "--admin",
        &a,
        "--token",
        TOKEN,
        "purge",
        FLOOD,
        "--yes",
        "--block-for",
        "soon",
    ])
    .await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    let out = run(&["--admin", &a, "--token", TOKEN, "frobnicate"]).await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    let out = run(&["--admin", &a, "--token", TOKEN, "faillog", "verbose"]).await;
    assert_eq!(out.code, 2, "{}", out.stderr);

    // 3: nothing listens there.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let down = format!("127.0.0.1:{port}");
    let out = run(&["--admin", &down, "--token", TOKEN, "status"]).await;
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert_eq!(
        out.stderr,
        format!(
            "floodgate ctl: cannot reach the admin API at {down}: connection refused — is floodgate running?\n"
        )
    );

    // The help documents them.
    let out = run(&["--help"]).await;
    assert_eq!(out.code, 0);
    for line in [
        "0  success",
        "1  the admin API answered with an error",
        "2  usage or configuration error",
        "3  the daemon is unreachable",
        "4  the admin token was refused (401)",
    ] {
        assert!(out.stdout.contains(line), "{line}: {}", out.stdout);
    }
}
