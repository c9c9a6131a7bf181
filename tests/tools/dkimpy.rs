// The independent DKIM verifier (dkimpy, through tests/tools/dkim_verify.py), shared by the
// unit tests in src/dkim/tests.rs and the integration tests in tests/dkim.rs (both
// `include!` this file). `records` are (name, TXT value) pairs served instead of DNS.
// Returns whether every signature passed, and the verifier's report.
fn dkimpy<N: std::fmt::Display, R: std::fmt::Display>(
    message: &[u8],
    records: impl IntoIterator<Item = (N, R)>,
) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("message.eml");
    std::fs::write(&file, message).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/dkim_verify.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(&file)
        .args(records.into_iter().map(|(n, r)| format!("{n}={r}")))
        .output()
        .expect("python3 runs (CI installs dkimpy and pynacl)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.contains("ModuleNotFoundError"),
        "the verifier needs `pip install dkimpy pynacl`: {text}"
    );
    (out.status.success(), text)
}
