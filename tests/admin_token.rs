//! The admin token is never a string anyone can read in the repository: with none in the
//! config the real daemon generates one into its state directory (mode 0600), which the
//! admin API accepts and `floodgate ctl` finds on its own; a short token or the old
//! placeholder is refused by check-config.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::dns::{TestDns, Zone};
use common::floodgate::{Daemon, TOKEN, binary, check_config, config_text, http};

#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_state_dir_gets_a_private_token_that_the_api_and_ctl_use() {
    let dns = TestDns::start(Zone::new().a("mx.test", Ipv4Addr::LOCALHOST)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("floodgate.toml");
    let text =
        config_text(dir.path(), dns.addr, "", "").replace(&format!("token = \"{TOKEN}\"\n"), "");
    assert!(!text.contains("token"), "{text}");
    std::fs::write(&path, &text).unwrap();

    let daemon = Daemon::start(&path);
    let line = daemon.wait_log("admin listening", Duration::from_secs(10));
    let admin: SocketAddr = line.split("addr=").nth(1).unwrap().trim().parse().unwrap();
    let token_file = dir.path().join("queue/admin.token");
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "token file mode {mode:o}");
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_owned();
    assert!(token.len() >= 24, "{token}");
    // The log says where the token is, never what it is.
    let said = daemon.wait_log("generated an admin token", Duration::from_secs(1));
    assert!(said.contains(&token_file.display().to_string()), "{said}");
    assert!(!daemon.log.lock().iter().any(|l| l.contains(&token)));

    assert_eq!(
        http(admin, "GET", "/admin/v1/status", Some(&token), None)
            .await
            .0,
        200
    );
    assert_eq!(
        http(admin, "GET", "/admin/v1/status", Some(TOKEN), None)
            .await
            .0,
        401
    );

    // ctl with neither --token nor the environment reads the file the config points at.
    let out = tokio::process::Command::new(binary())
        .args(["ctl", "--json", "--config"])
        .arg(&path)
        .args(["--admin", &admin.to_string(), "status"])
        .env_remove("FLOODGATE_ADMIN_TOKEN")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["intake_paused"], false, "{status}");
    drop(daemon);

    // A second start keeps the same token.
    let daemon = Daemon::start(&path);
    daemon.wait_log(
        "admin token read from the state directory",
        Duration::from_secs(10),
    );
    let again = std::fs::read_to_string(&token_file).unwrap();
    assert_eq!(again.trim(), token);
}

#[test]
fn check_config_refuses_the_placeholder_and_short_tokens() {
    for bad in ["change-me-to-a-long-random-string", "0123456789abcdef"] {
        let (code, out) = check_config(&format!("[admin]\ntoken = \"{bad}\"\n"));
        assert_eq!(code, 2, "{bad}: {out}");
        assert!(out.contains("admin.token"), "{out}");
    }
    let (code, out) = check_config("[admin]\ntoken = \"a-token-of-twenty-four-ch\"\n");
    assert_eq!(code, 0, "{out}");
    // The shipped config carries no token at all.
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/floodgate.toml"))
            .unwrap();
    assert!(
        !shipped.lines().any(|l| l.trim_start().starts_with("token")),
        "conf/floodgate.toml must not set a token"
    );
    let (code, out) = check_config(&shipped);
    assert_eq!(code, 0, "{out}");
}
