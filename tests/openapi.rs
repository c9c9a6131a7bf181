//! docs/openapi.yaml's admin API kept true, as tests/http_api.rs keeps its send API true:
//! every route the admin router serves is documented and every documented admin path is
//! served; every answer of a real daemon matches its documented schema and decodes into
//! its `floodgate::admin_api` type without losing a field; and each type's fields are its
//! schema's properties, the required ones being those always present — so a field added
//! to a type and not to the document fails here.

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use common::dns::{TestDns, Zone};
use common::floodgate::{TOKEN, TestApp, http};
use floodgate::admin_api::*;
use floodgate::http::admin::ROUTES;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

/// The send API key of the daemon that serves a batch to the admin routes.
const API_KEY: &str = "fg_openapi_key_0123456789";

fn document() -> Value {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml")).unwrap();
    serde_norway::from_str(&text).expect("docs/openapi.yaml parses")
}

/// `{"$ref": "#/components/schemas/X"}` followed to X (and a chain of them).
fn resolve<'a>(doc: &'a Value, mut schema: &'a Value) -> &'a Value {
    while let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let pointer = r.strip_prefix('#').expect("local $ref");
        schema = doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("dangling $ref {r}"));
    }
    schema
}

/// The properties and required names of an object schema (merging `allOf`).
fn object_parts(doc: &Value, schema: &Value) -> (Map<String, Value>, BTreeSet<String>) {
    let schema = resolve(doc, schema);
    let mut props = Map::new();
    let mut required = BTreeSet::new();
    let parts = match schema.get("allOf").and_then(Value::as_array) {
        Some(all) => all.iter().map(|s| resolve(doc, s)).collect(),
        None => vec![schema],
    };
    for part in parts {
        if let Some(p) = part.get("properties").and_then(Value::as_object) {
            props.extend(p.clone());
        }
        for r in part["required"].as_array().into_iter().flatten() {
            required.insert(r.as_str().unwrap().to_owned());
        }
    }
    (props, required)
}

fn type_matches(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => false,
    }
}

/// The ways `value` breaks `schema` (the subset of JSON Schema the document uses, with
/// every object closed: a key the schema does not name is an error).
fn check(doc: &Value, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    let schema = resolve(doc, schema);
    if let Some(alternatives) = schema.get("oneOf").and_then(Value::as_array) {
        let fits = |s: &Value| {
            let mut e = Vec::new();
            check(doc, s, value, at, &mut e);
            e.is_empty()
        };
        if !alternatives.iter().any(fits) {
            errors.push(format!("{at}: {value} matches no alternative"));
        }
        return;
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !types.is_empty() && !types.iter().any(|t| type_matches(t, value)) {
        errors.push(format!("{at}: {value} is not of type {types:?}"));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        errors.push(format!("{at}: {value} is not one of {allowed:?}"));
    }
    match value {
        Value::Object(map)
            if schema.get("properties").is_some() || schema.get("allOf").is_some() =>
        {
            let (props, required) = object_parts(doc, schema);
            for key in map.keys().filter(|k| !props.contains_key(*k)) {
                errors.push(format!("{at}.{key}: not in the document"));
            }
            for key in required.iter().filter(|k| !map.contains_key(*k)) {
                errors.push(format!("{at}.{key}: required, but absent"));
            }
            for (key, v) in map {
                if let Some(s) = props.get(key) {
                    check(doc, s, v, &format!("{at}.{key}"), errors);
                }
            }
        }
        Value::Object(map) => {
            if let Some(each) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for (key, v) in map {
                    check(doc, each, v, &format!("{at}.{key}"), errors);
                }
            }
        }
        Value::Array(items) => {
            if let Some(tuple) = schema.get("prefixItems").and_then(Value::as_array) {
                if items.len() != tuple.len() {
                    errors.push(format!(
                        "{at}: {} items, expected {}",
                        items.len(),
                        tuple.len()
                    ));
                }
                for (i, (s, v)) in tuple.iter().zip(items).enumerate() {
                    check(doc, s, v, &format!("{at}[{i}]"), errors);
                }
            } else if let Some(each) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    check(doc, each, v, &format!("{at}[{i}]"), errors);
                }
            }
        }
        _ => {}
    }
}

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// Serialises `samples` of one type and checks them against schema `name`: each fits it,
/// the keys ever present are its properties, the keys always present its required ones.
fn type_is_documented<T: Serialize>(doc: &Value, name: &str, samples: &[T]) {
    let schema = schema_ref(name);
    let (props, required) = object_parts(doc, &schema);
    let values: Vec<Value> = samples
        .iter()
        .map(|s| serde_json::to_value(s).unwrap())
        .collect();
    let mut errors = Vec::new();
    for v in &values {
        check(doc, &schema, v, name, &mut errors);
    }
    assert!(errors.is_empty(), "{name}: {errors:#?}");
    let keys = |v: &Value| -> BTreeSet<String> { v.as_object().unwrap().keys().cloned().collect() };
    let ever: BTreeSet<String> = values.iter().flat_map(keys).collect();
    let always = values
        .iter()
        .map(keys)
        .reduce(|a, b| a.intersection(&b).cloned().collect())
        .unwrap();
    let documented: BTreeSet<String> = props.keys().cloned().collect();
    assert_eq!(
        ever, documented,
        "{name}: the type's fields and the schema's properties"
    );
    assert_eq!(
        always, required,
        "{name}: fields always present and `required`"
    );
}

/// Every variant of an enum type is in schema `name`'s `enum`, and nothing else is.
fn enum_is_documented<T: Serialize>(doc: &Value, name: &str, variants: &[T]) {
    let documented = resolve(doc, &schema_ref(name))["enum"].clone();
    let mut want: Vec<Value> = documented.as_array().unwrap().clone();
    let mut got: Vec<Value> = variants
        .iter()
        .map(|v| serde_json::to_value(v).unwrap())
        .collect();
    want.sort_by_key(Value::to_string);
    got.sort_by_key(Value::to_string);
    assert_eq!(got, want, "{name}");
}

fn campaign(purged: Option<u64>) -> CampaignActionResponse {
    CampaignActionResponse {
        campaign: CampaignView {
            name: "spring-sale".into(),
            state: CampaignState::Blocked,
            accepted: 10,
            delivered: 4,
            failed: 6,
            failure_ratio: 0.6,
            deferred: 1,
            reasons: [("no_such_domain".to_owned(), 6)].into(),
            classes: [("invalid_recipient".to_owned(), 2)].into(),
            blocked_until_ms: 1_700_000_000_000,
        },
        purged,
    }
}

fn settings() -> FailLogSettings {
    FailLogSettings {
        mode: FailLogMode::Sampled,
        sample_rate: 10,
        rows_per_sec: 20,
        burst: 50,
    }
}

fn faillog(running: bool) -> FailLogView {
    FailLogView {
        settings: running.then(settings),
        counters: running.then(FailLogCounters::default),
        rows_per_sec: running.then_some(1.5),
    }
}

#[test]
fn campaign_and_intake_types_match_their_schemas() {
    let doc = document();
    type_is_documented(&doc, "ErrorBody", &[ErrorBody { error: "no".into() }]);
    type_is_documented(&doc, "CampaignView", &[campaign(None).campaign]);
    type_is_documented(
        &doc,
        "CampaignActionResponse",
        &[campaign(None), campaign(Some(3))],
    );
    type_is_documented(
        &doc,
        "PurgeRequest",
        &[
            PurgeRequest::default(),
            PurgeRequest {
                block_for: Some("10m".into()),
                through: Some(5),
            },
        ],
    );
    type_is_documented(
        &doc,
        "IntakeResponse",
        &[IntakeResponse {
            intake_paused: true,
        }],
    );
}

#[test]
fn failure_log_types_match_their_schemas() {
    let doc = document();
    type_is_documented(&doc, "FailLogSettings", &[settings()]);
    type_is_documented(&doc, "FailLogCounters", &[FailLogCounters::default()]);
    type_is_documented(&doc, "FailLogView", &[faillog(true), faillog(false)]);
    type_is_documented(
        &doc,
        "FailLogUpdate",
        &[
            FailLogUpdate::default(),
            FailLogUpdate {
                mode: Some(FailLogMode::Off),
                sample_rate: Some(1),
                rows_per_sec: Some(2),
                burst: Some(3),
            },
        ],
    );
    let row = FailureRow {
        id: 7,
        at_ms: 1_700_000_000_000,
        campaign: "spring-sale".into(),
        stage: "intake".into(),
        reason: "no_such_domain".into(),
        class: None,
        recipient: "a@nx.test".into(),
        detail: "550 5.1.2 Recipient domain does not exist".into(),
    };
    let relayed = FailureRow {
        stage: "relay".into(),
        reason: "rejected".into(),
        class: Some("invalid_recipient".into()),
        detail: "550 5.1.1 no such user".into(),
        ..row.clone()
    };
    type_is_documented(&doc, "FailureRow", &[row.clone(), relayed]);
    type_is_documented(
        &doc,
        "FailuresResponse",
        &[
            FailuresResponse {
                failures: vec![row],
                next_before: Some(7),
            },
            FailuresResponse {
                failures: vec![],
                next_before: None,
            },
        ],
    );
}

#[test]
fn queue_alert_webhook_and_status_types_match_their_schemas() {
    let doc = document();
    type_is_documented(
        &doc,
        "BatchView",
        &[BatchView {
            id: "19A2B3C4D5E6F01234".into(),
            campaign: Some("activation".into()),
            state: CampaignState::Paused,
            created_at_ms: 1,
            received: 10,
            accepted: 6,
            rejected: [("no_such_domain".to_owned(), 4)].into(),
            delivered: 3,
            deferred: 1,
            failed: 1,
            failed_template: 1,
            queued: 2,
        }],
    );
    type_is_documented(
        &doc,
        "QueueResponse",
        &[QueueResponse {
            by_state: [("scheduled".to_owned(), 3)].into(),
            by_domain: vec![("mx.test".into(), 3)],
            by_campaign: vec![("spring-sale".into(), 3)],
        }],
    );
    let alert = |campaign: Option<&str>, action: Option<&str>| Alert {
        at_ms: 1,
        kind: "campaign_failure_ratio".into(),
        campaign: campaign.map(Into::into),
        message: "failure ratio 90%".into(),
        action: action.map(Into::into),
    };
    type_is_documented(
        &doc,
        "Alert",
        &[
            alert(Some("spring-sale"), Some("paused")),
            alert(None, None),
        ],
    );
    let endpoint = WebhookEndpoint {
        url: "https://hooks.test/in".into(),
        disabled: true,
        circuit: CircuitState::HalfOpen,
        consecutive_failures: 2,
    };
    type_is_documented(&doc, "WebhookEndpoint", std::slice::from_ref(&endpoint));
    type_is_documented(
        &doc,
        "WebhooksResponse",
        &[WebhooksResponse {
            endpoints: vec![endpoint],
            events_dropped: 0,
        }],
    );
    let status = |faillog: FailLogView, cluster: bool| StatusResponse {
        uptime_secs: 5,
        accepted_total: 10,
        delivered_total: 4,
        failures_total: 8,
        failed_total: 6,
        intake_paused: false,
        queue: [("scheduled".to_owned(), 3)].into(),
        campaigns: 1,
        paused_campaigns: vec!["spring-sale".into()],
        faillog,
        alerts: 0,
        canary: vec![floodgate::admin_api::ProbeReport {
            address: "probe@mx.test".into(),
            route: Some("outbound".into()),
            queue_id: "18C2F0A1B2C3D4E5F6".into(),
            result: "delivered".into(),
            slow: false,
            started_at_ms: 1_700_000_000_000,
            stages: vec![
                floodgate::admin_api::ProbeStage {
                    stage: "committed".into(),
                    after_ms: 3,
                },
                floodgate::admin_api::ProbeStage {
                    stage: "delivered".into(),
                    after_ms: 41,
                },
            ],
            reply: Some("2.0.0 OK".into()),
        }],
        suspended: vec![floodgate::admin_api::SuspendedDestination {
            destination: "127.0.0.1:2525".into(),
            since_ms: 1_700_000_000_000,
            probe_at_ms: 1_700_000_060_000,
            failures: 1,
            last_reply: "451 4.4.1 connection refused".into(),
        }],
        cluster: cluster.then(|| floodgate::admin_api::ClusterStatus {
            node: "mx1".into(),
            connected: true,
            fallback_divisor: 2,
            nodes: vec![floodgate::admin_api::ClusterNode {
                node: "mx1".into(),
                alive: true,
                last_heartbeat_ms: 1_700_000_000_000,
                accepted_per_sec: 12.5,
                delivered_per_sec: 10.0,
                queued: 30,
                accepted_total: 1000,
                delivered_total: 970,
            }],
            accepted_per_sec: 12.5,
            delivered_per_sec: 10.0,
            queued: 30,
        }),
    };
    type_is_documented(
        &doc,
        "StatusResponse",
        &[status(faillog(true), true), status(faillog(false), false)],
    );
}

#[test]
fn trace_queue_operation_and_backup_types_match_their_schemas() {
    let doc = document();
    let reply = LastReply {
        code: Some(550),
        enhanced: Some("5.1.1".into()),
        text: "no such user".into(),
    };
    type_is_documented(
        &doc,
        "LastReply",
        &[
            reply.clone(),
            LastReply {
                code: None,
                enhanced: None,
                text: "purged by an operator".into(),
            },
        ],
    );
    let rcpt = RecipientTrace {
        address: "u@mx.test".into(),
        state: "failed".into(),
        attempts: 1,
        last_reply: Some(reply),
        class: Some("invalid_recipient".into()),
        reason: Some("rejected".into()),
        next_attempt_ms: None,
        delivered_at_ms: None,
        failed_at_ms: Some(2),
    };
    type_is_documented(&doc, "RecipientTrace", std::slice::from_ref(&rcpt));
    type_is_documented(
        &doc,
        "MessageTrace",
        &[MessageTrace {
            queue_id: "Q".into(),
            sender: "a@b.test".into(),
            campaign: None,
            source: "smtp".into(),
            client: "127.0.0.1".into(),
            identity: Some("user".into()),
            size: 10,
            received_at_ms: 1,
            body_stored: false,
            recipients: vec![rcpt],
        }],
    );
    let found = FoundRecipient {
        queue_id: "Q".into(),
        sender: "a@b.test".into(),
        campaign: Some("c".into()),
        received_at_ms: 1,
        address: "u@mx.test".into(),
        state: "scheduled".into(),
        attempts: 0,
        last_reply: None,
        next_attempt_ms: Some(3),
    };
    type_is_documented(&doc, "FoundRecipient", std::slice::from_ref(&found));
    type_is_documented(
        &doc,
        "FindResponse",
        &[FindResponse {
            recipients: vec![found],
            next_cursor: Some("1.2".into()),
        }],
    );
    type_is_documented(
        &doc,
        "Selector",
        &[
            Selector::default(),
            Selector {
                message: Some("Q".into()),
                recipient: Some("u@mx.test".into()),
                domain: Some("mx.test".into()),
                campaign: Some("c".into()),
            },
        ],
    );
    type_is_documented(&doc, "QueueOpResponse", &[QueueOpResponse::default()]);
    type_is_documented(
        &doc,
        "DomainHold",
        &[DomainHold {
            domain: "mx.test".into(),
            since_ms: 1,
        }],
    );
    type_is_documented(
        &doc,
        "DomainActionResponse",
        &[DomainActionResponse {
            domain: "mx.test".into(),
            held: true,
            recipients: 4,
        }],
    );
    let saved_rcpt = SavedRecipient {
        address: "u@mx.test".into(),
        domain: "mx.test".into(),
        attempts: 0,
    };
    type_is_documented(&doc, "SavedRecipient", std::slice::from_ref(&saved_rcpt));
    let saved = SavedMessage {
        queue_id: "Q".into(),
        sender: "a@b.test".into(),
        campaign: Some("c".into()),
        source: "smtp".into(),
        client: "127.0.0.1".into(),
        identity: None,
        received_at_ms: 1,
        smtputf8: false,
        body_base64: "eA==".into(),
        recipients: vec![saved_rcpt],
    };
    type_is_documented(&doc, "SavedMessage", std::slice::from_ref(&saved));
    type_is_documented(
        &doc,
        "ExportPage",
        &[ExportPage {
            messages: vec![saved.clone()],
            next_cursor: None,
            through: 9,
        }],
    );
    type_is_documented(
        &doc,
        "RequeueRequest",
        &[RequeueRequest {
            messages: vec![saved],
        }],
    );
    type_is_documented(&doc, "RequeueResponse", &[RequeueResponse::default()]);
    type_is_documented(
        &doc,
        "BackupRequest",
        &[BackupRequest {
            name: "nightly".into(),
            failures: true,
        }],
    );
    let file = BackupFile {
        path: "/var/lib/floodgate/backups/nightly/queue.db".into(),
        bytes: 4096,
        integrity: "ok".into(),
    };
    type_is_documented(&doc, "BackupFile", std::slice::from_ref(&file));
    type_is_documented(
        &doc,
        "BackupResponse",
        &[BackupResponse {
            dir: "/var/lib/floodgate/backups/nightly".into(),
            queue: file,
            failures: None,
            messages: 1,
            queued_recipients: 1,
            took_ms: 3,
        }],
    );
}

#[test]
fn enums_match_their_schemas() {
    let doc = document();
    use CampaignState::*;
    enum_is_documented(&doc, "CampaignState", &[Active, Paused, Blocked]);
    use FailLogMode::*;
    enum_is_documented(&doc, "FailLogMode", &[Full, Sampled, Aggregate, Off]);
    use CircuitState::*;
    enum_is_documented(&doc, "CircuitState", &[Closed, Open, HalfOpen]);
}

/// The admin operations the document names, as (path, method).
fn documented_admin_routes(doc: &Value) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let admin = op["tags"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t == "admin"));
            if admin {
                routes.insert((path.clone(), method.to_uppercase()));
            }
        }
    }
    routes
}

/// Decodes `body` into `T` and checks that encoding it again gives the same JSON: the type
/// holds every field the daemon serves.
fn round_trips<T: Serialize + DeserializeOwned>(body: &Value) {
    let typed: T = serde_json::from_value(body.clone()).unwrap_or_else(|e| {
        panic!(
            "{body} does not decode into {}: {e}",
            std::any::type_name::<T>()
        )
    });
    assert_eq!(
        &serde_json::to_value(typed).unwrap(),
        body,
        "{}",
        std::any::type_name::<T>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_route_is_served_documented_and_typed() {
    let dns = TestDns::start(Zone::new().a("mx.test", Ipv4Addr::LOCALHOST)).await;
    let api_key = format!(
        "[[http.api_keys]]\nname = \"openapi\"\nkey_sha256 = \"{}\"\n",
        floodgate::http::api::key_hash(API_KEY)
    );
    let t = TestApp::start("", &api_key, dns.addr).await;
    let addr = t.app.admin_addr.unwrap();
    let doc = document();
    // A batch, so that the batch routes have one to show.
    let bearer = format!("Bearer {API_KEY}");
    let (status, _, created) = common::http::request(
        t.app.http_addr.unwrap(),
        "POST",
        "/v1/batches",
        &[("Authorization", &bearer)],
        br#"{"from": "a@client.test", "subject": "Hi {{ name }}"}"#,
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let batch_id = serde_json::from_str::<Value>(&created).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (p.to_string(), m.to_string()))
        .collect();
    assert_eq!(
        served,
        documented_admin_routes(&doc),
        "routes served and documented"
    );

    // A campaign with a purge block, so that the lists below are not empty.
    let purge = r#"{"block_for": "1m"}"#;
    let (status, body) = http(
        addr,
        "POST",
        "/admin/v1/campaigns/openapi/purge",
        Some(TOKEN),
        Some(purge),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // A queued message (of a campaign the purge leaves alone), for the trace, the search
    // and the export.
    let queue_id = floodgate::queue::QueueId::generate(1);
    t.app
        .queue()
        .enqueue(floodgate::queue::NewMessage {
            queue_id: queue_id.clone(),
            sender: "app@client.test".into(),
            campaign: Some("traced".into()),
            source: floodgate::queue::Source::Http,
            client: "key".into(),
            identity: Some("key".into()),
            body: b"Subject: x\r\n\r\nx\r\n".to_vec(),
            recipients: vec![floodgate::queue::NewRecipient {
                address: "u@mx.test".into(),
                domain: "mx.test".into(),
            }],
            smtputf8: false,
        })
        .await
        .unwrap();
    for (method, pattern) in ROUTES {
        let (path, body) = match (*method, *pattern) {
            ("GET", "/admin/v1/messages") => ("/admin/v1/messages?campaign=traced".into(), None),
            ("GET", "/admin/v1/messages/{id}") => (format!("/admin/v1/messages/{queue_id}"), None),
            ("POST", "/admin/v1/queue/{action}") => (
                "/admin/v1/queue/retry".into(),
                Some(r#"{"campaign": "openapi"}"#),
            ),
            ("POST", "/admin/v1/domains/{name}/{action}") => {
                ("/admin/v1/domains/held.test/hold".into(), None)
            }
            ("GET", "/admin/v1/batches/{id}") => (format!("/admin/v1/batches/{batch_id}"), None),
            ("GET", "/admin/v1/export") => ("/admin/v1/export?campaign=traced".into(), None),
            ("POST", "/admin/v1/requeue") => {
                ("/admin/v1/requeue".into(), Some(r#"{"messages": []}"#))
            }
            ("POST", "/admin/v1/backup") => (
                "/admin/v1/backup".into(),
                Some(r#"{"name": "openapi", "failures": true}"#),
            ),
            ("POST", "/admin/v1/suppressions") => (
                "/admin/v1/suppressions".into(),
                Some(r#"{"address": "openapi@example.com"}"#),
            ),
            ("POST", "/admin/v1/suppressions/import") => (
                "/admin/v1/suppressions/import".into(),
                Some("{\"address\": \"imported@example.com\"}\nnot json\n"),
            ),
            _ => {
                let path = pattern
                    .replace("{name}", "openapi")
                    .replace("/campaigns/openapi/{action}", "/campaigns/openapi/purge")
                    .replace("{action}", "resume")
                    .replace("{address}", "openapi@example.com");
                let body = (*method == "POST" && path.ends_with("/purge") || *method == "PUT")
                    .then_some("{}");
                (path, body)
            }
        };
        let (status, text) = http(addr, method, &path, Some(TOKEN), body).await;
        if path == "/admin/v1/probe" {
            // Delivery is off here: refused as documented (tests/canary.rs probes).
            assert_eq!(status, 409, "{text}");
            round_trips::<ErrorBody>(&serde_json::from_str(&text).unwrap());
            continue;
        }
        assert_eq!(status, 200, "{method} {path}: {text}");
        let op = &doc["paths"][*pattern][method.to_lowercase()];
        let content = &resolve(&doc, &op["responses"]["200"])["content"];
        let Some(schema) = content.get("application/json").map(|c| &c["schema"]) else {
            continue;
        };
        let value: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"));
        let mut errors = Vec::new();
        check(&doc, schema, &value, &path, &mut errors);
        assert!(errors.is_empty(), "{method} {path}: {errors:#?}\n{text}");
        match path.as_str() {
            "/admin/v1/suppressions/openapi@example.com" if *method == "DELETE" => {
                assert_eq!(value["removed"], true, "{value}");
                round_trips::<SuppressionRemoved>(&value)
            }
            "/admin/v1/suppressions" | "/admin/v1/suppressions/openapi@example.com" => {
                round_trips::<SuppressionsResponse>(&value)
            }
            "/admin/v1/suppressions/import" => {
                let report: ImportReport = serde_json::from_value(value.clone()).unwrap();
                assert_eq!((report.lines, report.accepted, report.invalid), (2, 1, 1));
                assert_eq!(report.errors[0].line, 2, "{value}");
                round_trips::<ImportReport>(&value)
            }
            "/admin/v1/status" => round_trips::<StatusResponse>(&value),
            "/admin/v1/campaigns" => {
                assert!(!value.as_array().unwrap().is_empty());
                round_trips::<Vec<CampaignView>>(&value)
            }
            "/admin/v1/campaigns/openapi/purge" => {
                assert!(value.get("purged").is_some(), "{value}");
                round_trips::<CampaignActionResponse>(&value)
            }
            "/admin/v1/intake/resume" => round_trips::<IntakeResponse>(&value),
            "/admin/v1/faillog" => round_trips::<FailLogView>(&value),
            "/admin/v1/failures" => round_trips::<FailuresResponse>(&value),
            "/admin/v1/queue" => round_trips::<QueueResponse>(&value),
            "/admin/v1/alerts" => round_trips::<Vec<Alert>>(&value),
            "/admin/v1/webhooks" => round_trips::<WebhooksResponse>(&value),
            "/admin/v1/tls-report" => round_trips::<TlsReportResponse>(&value),
            "/admin/v1/tls-report/send" => round_trips::<TlsReportSendResponse>(&value),
            "/admin/v1/messages?campaign=traced" => {
                assert_eq!(value["recipients"].as_array().unwrap().len(), 1);
                round_trips::<FindResponse>(&value)
            }
            p if p.starts_with("/admin/v1/messages/") => round_trips::<MessageTrace>(&value),
            "/admin/v1/queue/retry" => round_trips::<QueueOpResponse>(&value),
            "/admin/v1/domains" => round_trips::<Vec<DomainHold>>(&value),
            "/admin/v1/domains/held.test/hold" => round_trips::<DomainActionResponse>(&value),
            "/admin/v1/export?campaign=traced" => {
                assert_eq!(value["messages"].as_array().unwrap().len(), 1);
                round_trips::<ExportPage>(&value)
            }
            "/admin/v1/requeue" => round_trips::<RequeueResponse>(&value),
            "/admin/v1/backup" => round_trips::<BackupResponse>(&value),
            "/admin/v1/batches" => {
                assert_eq!(value.as_array().unwrap().len(), 1, "{value}");
                round_trips::<Vec<BatchView>>(&value)
            }
            p if p == format!("/admin/v1/batches/{batch_id}") => round_trips::<BatchView>(&value),
            other => panic!("{other}: a JSON route without its type here"),
        }
    }

    // Errors have the one documented shape.
    for (method, path, token, want) in [
        ("GET", "/admin/v1/status", None, 401),
        ("GET", "/admin/v1/nothing", Some(TOKEN), 404),
        ("POST", "/admin/v1/intake/sideways", Some(TOKEN), 404),
        ("GET", "/admin/v1/failures?limit=many", Some(TOKEN), 400),
    ] {
        let (status, text) = http(addr, method, path, token, None).await;
        assert_eq!(status, want, "{method} {path}: {text}");
        let value: Value = serde_json::from_str(&text).unwrap();
        round_trips::<ErrorBody>(&value);
    }
}
