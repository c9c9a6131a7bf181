use super::*;
use crate::config::Dur;

/// A throwaway 512-bit RSA key, far below what DKIM verifiers accept.
const WEAK_RSA_512: &str = "-----BEGIN PRIVATE KEY-----
MIIBVAIBADANBgkqhkiG9w0BAQEFAASCAT4wggE6AgEAAkEA3FSCXseX98meIzYN
76wL0r8S3/a8B0fy1EFm4biS7NtqXSF2FSoqMcm+P55DCak9dm0O7Fyzx4yQQUKe
qNvxPwIDAQABAkAK+SqFDevDq4b0ufx3s1njZSDLhr5Wnn65k4hMNaUbpro9JMsJ
T0zee3//M9VsFoo5qhcw5HxsGZ6RwXd6SUQBAiEA7u+U0XqWxjd5x2C30GNUIEN7
WAQbZugiSCUFd22W8MkCIQDsEMM3k32SlUOI2tXFerpEFb4yR/d4v5GaCqrcRUAd
xwIhAOj06/rFdCV0RyZuFSl2/rmqMaMh9fmCUJJYjhjf32+JAiAd8npxgHp7sAfj
Qq+/37Plk0SPqGWSoercueG3E+nwXQIgJ8YtM/bgj1nUxv9kNqyO0zsEUFp/kpGd
9UIOsTYjDbI=
-----END PRIVATE KEY-----
";

const MESSAGE: &str = "From: App <app@example.com>\r\nTo: bob@example.net\r\nSubject: Hello\r\nDate: Tue, 1 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n\r\nHello Bob.\r\n";

struct Key {
    dir: tempfile::TempDir,
    table: DkimConfig,
    record: String,
}

fn key(domain: &str, selector: &str, algorithm: DkimAlgorithm) -> Key {
    let dir = tempfile::tempdir().unwrap();
    let (path, record) = keygen(domain, selector, algorithm, dir.path()).unwrap();
    Key {
        table: DkimConfig {
            domain: domain.into(),
            selector: selector.into(),
            key: path,
            algorithm,
            headers: None,
            expire: None,
        },
        dir,
        record,
    }
}

include!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/tools/dkimpy.rs"
));

/// dkimpy, an independent implementation, against the given TXT records.
fn verify(message: &[u8], records: &[(&str, &str)]) -> (bool, String) {
    dkimpy(message, records.iter().copied())
}

fn signed(signers: &Signers, message: &str) -> Vec<u8> {
    let Signed::Headers(headers) = signers.sign(message.as_bytes()).unwrap() else {
        panic!("no signature for {message}");
    };
    let mut out = headers.into_bytes();
    out.extend_from_slice(message.as_bytes());
    out
}

#[test]
#[ignore = "needs python3 with dkimpy and pynacl (the independent verifier); .ci/run installs them"]
fn rsa_and_ed25519_signatures_verify_independently_and_tampering_fails() {
    let rsa = key("example.com", "rsa2026", DkimAlgorithm::RsaSha256);
    let ed = key("example.com", "ed2026", DkimAlgorithm::Ed25519Sha256);
    assert!(
        rsa.record.starts_with("v=DKIM1; k=rsa; p=MIIBIjAN"),
        "{}",
        rsa.record
    );
    assert!(
        ed.record.starts_with("v=DKIM1; k=ed25519; p="),
        "{}",
        ed.record
    );
    let signers = Signers::load(&[rsa.table.clone(), ed.table.clone()]).unwrap();
    let message = signed(&signers, MESSAGE);
    let records = [
        ("rsa2026._domainkey.example.com", rsa.record.as_str()),
        ("ed2026._domainkey.example.com", ed.record.as_str()),
    ];
    let (ok, out) = verify(&message, &records);
    assert!(ok, "{out}");
    assert_eq!(out.matches("pass").count(), 2, "{out}");
    assert!(
        out.contains("a=ed25519-sha256") && out.contains("a=rsa-sha256"),
        "{out}"
    );

    let tampered = String::from_utf8(message)
        .unwrap()
        .replace("Subject: Hello", "Subject: Hellp");
    let (ok, out) = verify(tampered.as_bytes(), &records);
    assert!(!ok, "a changed Subject still verified: {out}");

    // Oversigning: a second From added after signing breaks the signature.
    let added = String::from_utf8(signed(&signers, MESSAGE))
        .unwrap()
        .replace("To: bob", "From: evil@attacker.test\r\nTo: bob");
    let (ok, out) = verify(added.as_bytes(), &records);
    assert!(!ok, "an added From still verified: {out}");
    drop((rsa.dir, ed.dir));
}

#[test]
#[ignore = "needs python3 with dkimpy and pynacl (the independent verifier); .ci/run installs them"]
fn keys_are_chosen_by_the_from_domain_and_wildcards_cover_subdomains() {
    let exact = key("example.com", "s1", DkimAlgorithm::Ed25519Sha256);
    let wild = key("*.example.org", "s2", DkimAlgorithm::Ed25519Sha256);
    let signers = Signers::load(&[exact.table.clone(), wild.table.clone()]).unwrap();
    let other = MESSAGE.replace("app@example.com", "app@mail.example.org");
    let message = signed(&signers, &other);
    let (ok, out) = verify(&message, &[("s2._domainkey.example.org", &wild.record)]);
    assert!(ok, "{out}");
    assert!(out.contains("d=example.org"), "{out}");
    let unknown = MESSAGE.replace("app@example.com", "app@elsewhere.test");
    assert_eq!(signers.sign(unknown.as_bytes()).unwrap(), Signed::NoKey);
    let bare = MESSAGE.replace("app@example.com", "app@example.org");
    assert_eq!(
        signers.sign(bare.as_bytes()).unwrap(),
        Signed::NoKey,
        "*.example.org is for subdomains only"
    );
    assert_eq!(
        signers.sign(b"Subject: no from\r\n\r\nx").unwrap(),
        Signed::NoKey
    );
}

#[test]
fn exposed_unreadable_and_weak_keys_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let k = key("example.com", "s", DkimAlgorithm::RsaSha256);
    std::fs::set_permissions(&k.table.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Signers::load(std::slice::from_ref(&k.table)).unwrap_err();
    assert!(
        matches!(err, DkimError::Exposed { mode: 0o644, .. }),
        "{err}"
    );

    let missing = DkimConfig {
        key: k.dir.path().join("absent.key"),
        ..k.table.clone()
    };
    assert!(matches!(
        Signers::load(&[missing]),
        Err(DkimError::Key { .. })
    ));

    let weak = k.dir.path().join("weak.key");
    std::fs::write(&weak, WEAK_RSA_512).unwrap();
    std::fs::set_permissions(&weak, std::fs::Permissions::from_mode(0o600)).unwrap();
    let weak_table = DkimConfig {
        key: weak,
        ..k.table.clone()
    };
    match Signers::load(&[weak_table]) {
        Err(DkimError::Weak { bits: 512, .. }) => {}
        // aws-lc may refuse to parse a 512-bit key at all: refused either way.
        Err(DkimError::Key { .. }) => {}
        other => panic!("a 512-bit key was not refused: {other:?}"),
    }

    let wrong = DkimConfig {
        algorithm: DkimAlgorithm::Ed25519Sha256,
        ..k.table.clone()
    };
    std::fs::set_permissions(&k.table.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(
        Signers::load(&[wrong]).is_err(),
        "an RSA key loaded as Ed25519"
    );
}

#[test]
fn keygen_writes_a_private_file_once() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = keygen("example.com", "s", DkimAlgorithm::Ed25519Sha256, dir.path()).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(
        keygen("example.com", "s", DkimAlgorithm::Ed25519Sha256, dir.path()).is_err(),
        "an existing key was overwritten"
    );
}

#[test]
fn expiry_and_from_domain() {
    let mut k = key("example.com", "s", DkimAlgorithm::Ed25519Sha256);
    k.table.expire = Some(Dur::secs(3600));
    let signers = Signers::load(std::slice::from_ref(&k.table)).unwrap();
    let Signed::Headers(h) = signers.sign(MESSAGE.as_bytes()).unwrap() else {
        panic!()
    };
    assert!(h.contains("x="), "{h}");
    assert_eq!(
        from_domain(b"From: \"A, B\" <a@Sub.Example.COM>\r\n\r\n").as_deref(),
        Some("sub.example.com")
    );
    assert_eq!(from_domain(b"From: a@b\r\n\r\n"), None);
}
