//! Standard Webhooks signing: the `whsec_` secret, the `webhook-signature` of one
//! request, its check, and the headers that carry them. A leaf: config validates secrets
//! with it, and every signed POST (courier, events, alerts) signs with it.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("must start with `whsec_`")]
    Prefix,
    #[error("the part after `whsec_` is not base64")]
    Base64,
    #[error("must hold at least 16 bytes once decoded")]
    Short,
}

/// A Standard Webhooks signing secret (`whsec_` + base64 key).
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    pub fn parse(text: &str) -> Result<Secret, SecretError> {
        let encoded = text.strip_prefix("whsec_").ok_or(SecretError::Prefix)?;
        let key = B64.decode(encoded).map_err(|_| SecretError::Base64)?;
        if key.len() < 16 {
            return Err(SecretError::Short);
        }
        Ok(Secret(key))
    }

    /// The key's bytes, for another HMAC keyed the same way (unsubscribe tokens).
    pub fn key(&self) -> &[u8] {
        &self.0
    }

    fn mac(&self, id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key size");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `webhook-signature` value: `v1,` + base64 HMAC-SHA256 of `id.timestamp.body`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self.mac(id, timestamp, body).finalize().into_bytes();
        format!("v1,{}", B64.encode(tag))
    }

    /// Whether a `webhook-signature` header (space-separated `v1,<base64>` entries, as
    /// during a key rotation) holds a valid signature of `id.timestamp.body`. The tags
    /// are compared in constant time.
    pub fn verify(&self, id: &str, timestamp: i64, body: &[u8], signatures: &str) -> bool {
        signatures
            .split(' ')
            .filter_map(|entry| entry.strip_prefix("v1,"))
            .filter_map(|tag| B64.decode(tag).ok())
            .any(|tag| self.mac(id, timestamp, body).verify_slice(&tag).is_ok())
    }

    /// The three Standard Webhooks headers for one attempt, after the content type.
    pub fn headers(&self, id: &str, timestamp: i64, body: &[u8]) -> Vec<(&'static str, String)> {
        vec![
            ("content-type", "application/json".to_owned()),
            ("webhook-id", id.to_owned()),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", self.sign(id, timestamp, body)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_signatures() {
        assert!(matches!(Secret::parse("abc"), Err(SecretError::Prefix)));
        assert!(matches!(
            Secret::parse("whsec_!!"),
            Err(SecretError::Base64)
        ));
        assert!(matches!(
            Secret::parse("whsec_YWJj"),
            Err(SecretError::Short)
        ));
        // The example of the Standard Webhooks reference libraries.
        let s = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            s.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn verification_accepts_any_listed_signature_and_nothing_tampered() {
        let s = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let (id, ts, body) = ("msg_1", 1614265330, br#"{"a":1}"#.as_slice());
        let good = s.sign(id, ts, body);
        assert!(s.verify(id, ts, body, &good));
        assert!(s.verify(id, ts, body, &format!("v1,AAAA {good}")));
        assert!(!s.verify(id, ts + 1, body, &good));
        assert!(!s.verify(id, ts, br#"{"a":2}"#, &good));
        assert!(!s.verify(id, ts, body, good.trim_start_matches("v1,")));
        let other = Secret::parse("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").unwrap();
        assert!(!other.verify(id, ts, body, &good));
    }
}
