//! Do-not-contact: bounces are classed, a dead mailbox (and only it) is suppressed with
//! its queue id, the door refuses it from memory until an operator lifts it, imports of a
//! hundred thousand rows are counted exactly, and operator bounce rules reload live.

mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use common::dns::{TestDns, Zone};
use common::floodgate::{TOKEN, TestApp, admin, check_config, ctl, http, message};
use common::relay::{WAIT, relay_config, start, wait_recipient};
use common::sink::{RcptScript, Sink, SinkConfig};
use floodgate::bounce::BounceClass;
use floodgate::queue::RecipientState;

fn zone() -> Zone {
    Zone::new()
        .mx("mx.test", 10, "mail.mx.test")
        .a("mail.mx.test", Ipv4Addr::LOCALHOST)
}

const BLOCKED: &str = "5.7.1 Service unavailable; client [127.0.0.1] blocked using bl.test";

/// Gone is unknown, blocked is refused for the sender's reputation, ok is accepted.
async fn sink() -> Sink {
    Sink::start_with(SinkConfig {
        rcpt: Box::new(|r| match r {
            "gone@mx.test" => RcptScript::Reply(550, "5.1.1 <gone@mx.test>: no such user"),
            "blocked@mx.test" => RcptScript::Reply(550, BLOCKED),
            _ => RcptScript::Accept,
        }),
        ..Default::default()
    })
    .await
}

/// Polls the admin API until `address` has an entry on disk (the door refuses it from
/// memory at once; the listing reads suppressions.db).
async fn wait_suppressed(t: &TestApp, address: &str) -> serde_json::Value {
    let addr = t.app.admin_addr.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let path = format!("/admin/v1/suppressions/{address}");
        let (status, text) = http(addr, "GET", &path, Some(TOKEN), None).await;
        if status == 200 {
            return serde_json::from_str(&text).unwrap();
        }
        assert_eq!(status, 404, "{text}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "{address} never suppressed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn rcpt(t: &TestApp, address: &str, want: &str) -> String {
    let mut c = t.client().await;
    c.ehlo().await;
    c.cmd("MAIL FROM:<app@client.test>", "250").await;
    c.rcpt(address, want).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_dead_mailbox_is_suppressed_until_an_operator_lifts_it() {
    let dns = TestDns::start(zone()).await;
    let sink = sink().await;
    let config = relay_config(sink.addr.port(), "", "");
    let t = start(&dns, &config, Arc::default()).await;
    let mut c = t.client().await;
    c.ehlo().await;
    let id = c
        .send_mail(
            "app@client.test",
            &["gone@mx.test", "blocked@mx.test", "ok@mx.test"],
            &message("three", ""),
        )
        .await;
    let got = sink.wait_for(1, WAIT).await;
    assert_eq!(got[0].rcpts, ["ok@mx.test"]);
    let failed = |r: &floodgate::queue::StoredRecipient| r.state == RecipientState::Failed;
    let gone = wait_recipient(&t, &id, "gone@mx.test", "failure", failed).await;
    assert_eq!(gone.class, Some(BounceClass::InvalidRecipient));
    let blocked = wait_recipient(&t, &id, "blocked@mx.test", "failure", failed).await;
    assert_eq!(blocked.class, Some(BounceClass::PolicyBlock));
    let ok = wait_recipient(&t, &id, "ok@mx.test", "delivery", |r| {
        r.state == RecipientState::Delivered
    })
    .await;
    assert_eq!(ok.class, None);

    // Its next RCPT is refused from memory as soon as its failure is recorded, before the
    // entry's own commit.
    let reply = rcpt(&t, "gone@mx.test", "550").await;
    assert!(reply.starts_with("550 5.7.1"), "{reply}");
    assert!(reply.contains("suppressed"), "{reply}");
    // On disk too, with the message's queue id as its source.
    let entry = wait_suppressed(&t, "gone@mx.test").await;
    let entry = &entry["suppressions"][0];
    assert_eq!(entry["reason"], "invalid_recipient", "{entry}");
    assert_eq!(entry["source"], id.as_str(), "{entry}");

    // The sender was refused, not the mailbox: nothing learnt about it.
    let admin_addr = t.app.admin_addr.unwrap();
    let (status, _) = http(
        admin_addr,
        "GET",
        "/admin/v1/suppressions/blocked@mx.test",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 404);
    rcpt(&t, "blocked@mx.test", "250").await;

    // `ctl suppressions list` names the reason and the queue id.
    let listed = ctl(admin_addr, &["suppressions", "list"]).await;
    let line = listed
        .lines()
        .find(|l| l.contains("gone@mx.test"))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(line.contains("invalid_recipient"), "{line}");
    assert!(line.contains(&id), "{line}");
    assert!(!listed.contains("blocked@mx.test"), "{listed}");
    let json: serde_json::Value =
        serde_json::from_str(&ctl(admin_addr, &["--json", "suppressions", "list"]).await).unwrap();
    assert_eq!(json["suppressions"].as_array().unwrap().len(), 1, "{json}");

    // Bounce classes reach the failure log, the campaign's view and `ctl failures`.
    let campaigns = admin(admin_addr, "GET", "/admin/v1/campaigns", None).await;
    let campaign = campaigns
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "app@client.test")
        .unwrap();
    assert_eq!(campaign["classes"]["invalid_recipient"], 1, "{campaign}");
    assert_eq!(campaign["classes"]["policy_block"], 1, "{campaign}");
    // Failure rows are flushed by the failure log's writer: wait for them.
    let deadline = tokio::time::Instant::now() + WAIT;
    let failures = loop {
        let out = ctl(admin_addr, &["failures", "app@client.test"]).await;
        if out.contains("policy_block") && out.contains("invalid_recipient") {
            break out;
        }
        assert!(tokio::time::Instant::now() < deadline, "{out}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(failures.contains("CLASS"), "{failures}");

    // Refused at the door, counted like every refusal.
    let counted = t.app.campaigns().get(Some("app@client.test"));
    assert_eq!(counted.failures(floodgate::reason::Reason::Suppressed), 1);

    // Lifted, the address gets through again.
    ctl(admin_addr, &["suppressions", "remove", "gone@mx.test"]).await;
    rcpt(&t, "gone@mx.test", "250").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_are_counted_exactly_and_refused_at_the_door() {
    let dns = TestDns::start(zone()).await;
    let key = "fg_dnc_key_0123456789";
    let api_key = format!(
        "[[http.api_keys]]\nname = \"crm\"\nkey_sha256 = \"{}\"\ncampaign = \"spring\"\n",
        floodgate::http::api::key_hash(key)
    );
    let t = TestApp::start("", &api_key, dns.addr).await;
    let admin_addr = t.app.admin_addr.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ndjson = dir.path().join("dnc.ndjson");
    let mut body = String::new();
    for i in 0..100_000 {
        body.push_str(&format!("{{\"address\": \"user{i}@mx.test\"}}\n"));
    }
    std::fs::write(&ndjson, &body).unwrap();
    let out = ctl(
        admin_addr,
        &["--json", "suppressions", "import", ndjson.to_str().unwrap()],
    )
    .await;
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["accepted"], 100_000, "{report}");
    assert_eq!(report["invalid"], 0, "{report}");
    rcpt(&t, "user99999@mx.test", "550").await;
    rcpt(&t, "USER5@mx.test", "550").await;
    rcpt(&t, "user100000@mx.test", "250").await;

    // A CRM export: a header, a campaign column, two bad lines named by number.
    let csv = dir.path().join("crm.csv");
    std::fs::write(
        &csv,
        "email,campaign,reason\nann@mx.test,spring,unsubscribed\nnot an address,,\n@whole.test,,manual\nbob@mx.test,,sometimes\n",
    )
    .unwrap();
    let out = ctl(
        admin_addr,
        &["suppressions", "import", csv.to_str().unwrap()],
    )
    .await;
    assert!(out.contains("2 suppressions imported, 2 rejected"), "{out}");
    assert!(out.contains("line 3:"), "{out}");
    assert!(out.contains("line 5:"), "{out}");
    // Per campaign: suppressed for spring only, so another campaign still reaches ann.
    rcpt(&t, "ann@mx.test", "250").await;
    let listed = ctl(
        admin_addr,
        &["suppressions", "list", "--campaign", "spring"],
    )
    .await;
    assert!(listed.contains("ann@mx.test"), "{listed}");
    assert!(listed.contains("unsubscribed"), "{listed}");
    // A whole domain.
    rcpt(&t, "anyone@whole.test", "550").await;

    // The HTTP door: per recipient, `rejected` with reason `suppressed`; the API key's
    // campaign is spring, so ann's campaign entry applies there.
    let bearer = format!("Bearer {key}");
    let body = serde_json::json!({
        "from": "news@client.test",
        "to": ["user7@mx.test", "ann@mx.test", "new@mx.test"],
        "subject": "spring",
        "text": "hello",
    });
    let (status, _, text) = common::http::request(
        t.app.http_addr.unwrap(),
        "POST",
        "/v1/messages",
        &[
            ("Authorization", &bearer),
            ("Content-Type", "application/json"),
        ],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 202, "{text}");
    let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
    let results = answer["recipients"].as_array().unwrap();
    for (i, want) in [(0, "suppressed"), (1, "suppressed")] {
        assert_eq!(results[i]["status"], "rejected", "{answer}");
        assert_eq!(results[i]["reason"], want, "{answer}");
        assert_eq!(results[i]["code"], 550, "{answer}");
    }
    assert_eq!(results[2]["status"], "accepted", "{answer}");

    // Export pages through everything.
    let exported = ctl(admin_addr, &["suppressions", "export"]).await;
    assert_eq!(exported.lines().count(), 100_002);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_bounce_rules_come_first_and_a_bad_file_keeps_the_old_ones() {
    let dns = TestDns::start(zone()).await;
    let sink = sink().await;
    let rules_dir = tempfile::tempdir().unwrap();
    let rules = rules_dir.path().join("rules.toml");
    // This receiver says "no such user" when its quota store is down: not a dead mailbox.
    std::fs::write(
        &rules,
        "[[rule]]\nclass = \"quota\"\npatterns = ['(?i)no such user']\n",
    )
    .unwrap();
    let delivery = format!("bounce_rules = \"{}\"", rules.display());
    let config = relay_config(sink.addr.port(), &delivery, "");
    let t = start(&dns, &config, Arc::default()).await;
    let send = |to: &'static str| {
        let t = &t;
        async move {
            let mut c = t.client().await;
            c.ehlo().await;
            c.send_mail("app@client.test", &[to], &message("x", ""))
                .await
        }
    };
    let id = send("gone@mx.test").await;
    let gone = wait_recipient(&t, &id, "gone@mx.test", "failure", |r| {
        r.state == RecipientState::Failed
    })
    .await;
    assert_eq!(gone.class, Some(BounceClass::Quota));
    rcpt(&t, "gone@mx.test", "250").await;

    // A file that does not compile refuses the reload; the running rules stay.
    std::fs::write(&rules, "[[rule]]\nclass = \"quota\"\npatterns = ['(']\n").unwrap();
    let mut new = t.app.intake.config.load().as_ref().clone();
    new.delivery.bounce_rules = Some(rules.clone());
    let err = t.app.reload(new.clone()).unwrap_err();
    assert!(err.to_string().contains("bounce rules"), "{err}");
    let id = send("gone@mx.test").await;
    let again = wait_recipient(&t, &id, "gone@mx.test", "failure", |r| {
        r.state == RecipientState::Failed
    })
    .await;
    assert_eq!(again.class, Some(BounceClass::Quota));

    // Without the operator file the shipped rules apply again: a dead mailbox.
    new.delivery.bounce_rules = None;
    t.app.reload(new).unwrap();
    let id = send("gone@mx.test").await;
    let shipped = wait_recipient(&t, &id, "gone@mx.test", "failure", |r| {
        r.state == RecipientState::Failed
    })
    .await;
    assert_eq!(shipped.class, Some(BounceClass::InvalidRecipient));
}

/// The token key: `whsec_` + base64 of 32 bytes, as webhook secrets are written.
const UNSUBSCRIBE_SECRET: &str = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_click_unsubscribe_from_a_delivered_message() {
    let dns = TestDns::start(zone()).await;
    let sink = Sink::start().await;
    let more = format!(
        r#"
[suppression.unsubscribe]
enabled = true
campaigns = ["spring"]
base_url = "https://mail.test/u/"
mailto = "unsubscribe@mail.test"
secret = "{UNSUBSCRIBE_SECRET}"
listen = "127.0.0.1:0"
"#
    );
    let t = start(
        &dns,
        &relay_config(sink.addr.port(), "", &more),
        Arc::default(),
    )
    .await;
    let public = t.app.unsubscribe_addr.expect("unsubscribe listener");
    assert_ne!(Some(public), t.app.admin_addr);
    let mut c = t.client().await;
    c.ehlo().await;
    let spring = "X-Campaign-ID: spring\r\n";
    c.send_mail(
        "app@client.test",
        &["ann@mx.test"],
        &message("sale", spring),
    )
    .await;
    // Transactional mail (no campaign listed) gets no headers; a message's own are kept.
    c.send_mail("app@client.test", &["bob@mx.test"], &message("receipt", ""))
        .await;
    let own = "X-Campaign-ID: spring\r\nList-Unsubscribe: <https://crm.test/out>\r\n";
    c.send_mail("app@client.test", &["cy@mx.test"], &message("own", own))
        .await;
    let got = sink.wait_for(3, WAIT).await;
    let body_of = |to: &str| {
        let r = got.iter().find(|r| r.rcpts == [to]).unwrap();
        String::from_utf8_lossy(&r.data).into_owned()
    };
    let ann = body_of("ann@mx.test");
    assert!(
        ann.contains("List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"),
        "{ann}"
    );
    assert!(
        ann.contains("<mailto:unsubscribe@mail.test?subject=unsubscribe%20"),
        "{ann}"
    );
    assert!(!body_of("bob@mx.test").contains("List-Unsubscribe"));
    let cy = body_of("cy@mx.test");
    assert_eq!(cy.matches("List-Unsubscribe").count(), 1, "{cy}");
    assert!(cy.contains("<https://crm.test/out>"), "{cy}");

    // The URL as the mailbox provider reads it from the delivered message.
    let start_at = ann.find("<https://mail.test/u/").unwrap() + "<https://mail.test".len();
    let path = &ann[start_at..start_at + ann[start_at..].find('>').unwrap()];
    let admin_addr = t.app.admin_addr.unwrap();
    let entry = "/admin/v1/suppressions/ann@mx.test";

    // A link scanner's GET shows a button and unsubscribes nobody.
    let (status, page) = http(public, "GET", path, None, None).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("<form method=\"post\""), "{page}");
    assert_eq!(
        http(admin_addr, "GET", entry, Some(TOKEN), None).await.0,
        404
    );

    // Forged tokens are refused and suppress nobody.
    let mut forged = path.to_owned();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    for bad in [forged.as_str(), "/u/garbage", "/u/"] {
        let (status, _) = http(
            public,
            "POST",
            bad,
            None,
            Some("List-Unsubscribe=One-Click"),
        )
        .await;
        assert_eq!(status, 404, "{bad}");
    }
    assert_eq!(
        http(admin_addr, "GET", entry, Some(TOKEN), None).await.0,
        404
    );

    let (status, page) = http(
        public,
        "POST",
        path,
        None,
        Some("List-Unsubscribe=One-Click"),
    )
    .await;
    assert_eq!(status, 200, "{page}");
    let listed = admin(admin_addr, "GET", entry, None).await;
    let e = &listed["suppressions"][0];
    assert_eq!(e["reason"], "unsubscribed", "{e}");
    assert_eq!(e["campaign"], "spring", "{e}");
    assert_eq!(e["source"], "unsubscribe", "{e}");

    // Spring's next message to ann is refused once its campaign header is read; other
    // campaigns still reach her.
    let mut c = t.client().await;
    c.ehlo().await;
    c.cmd("MAIL FROM:<app@client.test>", "250").await;
    c.rcpt("ann@mx.test", "250").await;
    let reply = c.data(&message("again", spring)).await;
    assert!(reply.starts_with("550 5.7.1"), "{reply}");
    c.send_mail("app@client.test", &["ann@mx.test"], &message("receipt", ""))
        .await;
}

#[test]
fn check_config_refuses_bad_bounce_rules_and_unsubscribe_settings() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, "[[rule]]\nclass = \"gone\"\npatterns = ['x']\n").unwrap();
    let (code, out) = check_config(&format!(
        "[delivery]\nbounce_rules = \"{}\"\n",
        rules.display()
    ));
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("unknown class \"gone\""), "{out}");
    let (code, out) = check_config(
        "[suppression.unsubscribe]\nenabled = true\ncampaigns = [\"*\"]\nbase_url = \"https://m.test/u/\"\nsecret = \"short\"\n",
    );
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("suppression.unsubscribe.secret"), "{out}");
    let (code, out) = check_config(&format!(
        "[suppression.unsubscribe]\nenabled = true\napi_keys = [\"nobody\"]\nbase_url = \"https://m.test/u/\"\nsecret = \"{UNSUBSCRIBE_SECRET}\"\n"
    ));
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("no [[http.api_keys]] is named `nobody`"),
        "{out}"
    );
    let (code, out) = check_config("[suppression]\nexpire_after = { bounced = \"1d\" }\n");
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("not a suppression reason"), "{out}");
}

/// `[suppression.unsubscribe] api_keys`: mail of a listed key carries the link whatever its
/// campaign; another key's mail (a campaign not listed) does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_links_by_api_key() {
    let dns = TestDns::start(zone()).await;
    let sink = Sink::start().await;
    let (newsletter, billing) = ("fg_news_key_0123456789", "fg_bill_key_0123456789");
    let more = format!(
        r#"
[[http.api_keys]]
name = "newsletter"
key_sha256 = "{}"

[[http.api_keys]]
name = "billing"
key_sha256 = "{}"

[suppression.unsubscribe]
enabled = true
api_keys = ["newsletter"]
base_url = "https://mail.test/u/"
secret = "{UNSUBSCRIBE_SECRET}"
listen = "127.0.0.1:0"
"#,
        floodgate::http::api::key_hash(newsletter),
        floodgate::http::api::key_hash(billing),
    );
    let t = start(
        &dns,
        &relay_config(sink.addr.port(), "", &more),
        Arc::default(),
    )
    .await;
    for (key, to) in [(newsletter, "ann@mx.test"), (billing, "bob@mx.test")] {
        let bearer = format!("Bearer {key}");
        let body = serde_json::json!({
            "from": "app@client.test", "to": [to], "subject": "hi", "text": "hello",
        });
        let (status, _, text) = common::http::request(
            t.app.http_addr.unwrap(),
            "POST",
            "/v1/messages",
            &[
                ("Authorization", &bearer),
                ("Content-Type", "application/json"),
            ],
            body.to_string().as_bytes(),
        )
        .await;
        assert_eq!(status, 202, "{text}");
    }
    let got = sink.wait_for(2, WAIT).await;
    let body_of = |to: &str| {
        let r = got.iter().find(|r| r.rcpts == [to]).unwrap();
        String::from_utf8_lossy(&r.data).into_owned()
    };
    let ann = body_of("ann@mx.test");
    assert!(
        ann.contains("List-Unsubscribe: <https://mail.test/u/"),
        "{ann}"
    );
    assert!(
        ann.contains("List-Unsubscribe-Post: List-Unsubscribe=One-Click"),
        "{ann}"
    );
    assert!(!body_of("bob@mx.test").contains("List-Unsubscribe"));
}
