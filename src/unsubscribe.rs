//! One-click unsubscribe (RFC 8058, RFC 2369): the token in a message's
//! `List-Unsubscribe` URL names its recipient and campaign and carries an HMAC, so that a
//! `POST /u/TOKEN` is verified without a database lookup and nobody can forge one for
//! somebody else's address, or enumerate them.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

const VERSION: u8 = 1;
/// Bytes of the MAC kept in a token: 128 bits is beyond guessing, and URLs stay short.
const MAC_LEN: usize = 16;
/// Longest token read; anything longer is refused before decoding.
pub const MAX_TOKEN: usize = 1024;
/// Domain separation: the same key can never sign something else that verifies here.
const CONTEXT: &[u8] = b"floodgate-unsubscribe\0";

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not an unsubscribe token")]
    Malformed,
    #[error("the token's signature does not match")]
    BadSignature,
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub recipient: String,
    pub campaign: String,
}

pub struct Signer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

impl Signer {
    pub fn new(key: &[u8]) -> Signer {
        Signer { key: key.to_vec() }
    }

    fn mac(&self, payload: &[u8]) -> [u8; MAC_LEN] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key size");
        mac.update(CONTEXT);
        mac.update(payload);
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(&full[..MAC_LEN]);
        out
    }

    /// The token for `recipient` of `campaign`: URL-safe, no padding.
    pub fn token(&self, recipient: &str, campaign: &str) -> String {
        let mut payload = Vec::with_capacity(2 + campaign.len() + recipient.len());
        payload.push(VERSION);
        payload.extend_from_slice(campaign.as_bytes());
        payload.push(0);
        payload.extend_from_slice(recipient.as_bytes());
        format!(
            "{}.{}",
            B64.encode(&payload),
            B64.encode(self.mac(&payload))
        )
    }

    pub fn verify(&self, token: &str) -> Result<Request, TokenError> {
        if token.len() > MAX_TOKEN {
            return Err(TokenError::Malformed);
        }
        let (payload, mac) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let payload = B64.decode(payload).map_err(|_| TokenError::Malformed)?;
        let mac = B64.decode(mac).map_err(|_| TokenError::Malformed)?;
        if mac.len() != MAC_LEN || !bool::from(self.mac(&payload).ct_eq(&mac[..])) {
            return Err(TokenError::BadSignature);
        }
        let (&version, rest) = payload.split_first().ok_or(TokenError::Malformed)?;
        if version != VERSION {
            return Err(TokenError::Malformed);
        }
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(TokenError::Malformed)?;
        let campaign = std::str::from_utf8(&rest[..nul]).map_err(|_| TokenError::Malformed)?;
        let recipient = std::str::from_utf8(&rest[nul + 1..]).map_err(|_| TokenError::Malformed)?;
        if recipient.is_empty() {
            return Err(TokenError::Malformed);
        }
        Ok(Request {
            recipient: recipient.to_owned(),
            campaign: campaign.to_owned(),
        })
    }

    /// The two headers of RFC 8058 §3.1, for `recipient` of `campaign`: the HTTPS URL
    /// under `base_url` (e.g. `https://mail.example.com/u/`), and a `mailto:` when given.
    pub fn headers(
        &self,
        base_url: &str,
        mailto: Option<&str>,
        recipient: &str,
        campaign: &str,
    ) -> [(&'static str, String); 2] {
        let token = self.token(recipient, campaign);
        let mut value = format!("<{base_url}{token}>");
        if let Some(address) = mailto {
            value.push_str(&format!(
                ", <mailto:{address}?subject=unsubscribe%20{token}>"
            ));
        }
        [
            ("List-Unsubscribe", value),
            (
                "List-Unsubscribe-Post",
                "List-Unsubscribe=One-Click".to_owned(),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_forgeries_fail() {
        let signer = Signer::new(b"0123456789abcdef0123456789abcdef");
        let token = signer.token("bob@example.com", "spring");
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        );
        assert_eq!(
            signer.verify(&token),
            Ok(Request {
                recipient: "bob@example.com".into(),
                campaign: "spring".into()
            })
        );
        // Another key, another recipient under the same MAC, a cut MAC: all refused.
        let other = Signer::new(b"another key, another key, anoth");
        assert_eq!(other.verify(&token), Err(TokenError::BadSignature));
        let (_, mac) = token.split_once('.').unwrap();
        let forged = format!("{}.{mac}", B64.encode(b"\x01spring\0alice@example.com"));
        assert_eq!(signer.verify(&forged), Err(TokenError::BadSignature));
        assert_eq!(
            signer.verify(&token[..token.len() - 2]),
            Err(TokenError::BadSignature)
        );
        assert_eq!(signer.verify("nodot"), Err(TokenError::Malformed));
        assert_eq!(
            signer.verify(&"a".repeat(MAX_TOKEN + 1)),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn headers_follow_rfc_8058() {
        let signer = Signer::new(b"k");
        let [(name, value), (post, one_click)] = signer.headers(
            "https://mail.example.com/u/",
            Some("unsubscribe@mail.example.com"),
            "bob@example.com",
            "spring",
        );
        assert_eq!(name, "List-Unsubscribe");
        assert!(value.starts_with("<https://mail.example.com/u/"), "{value}");
        assert!(value.contains(", <mailto:unsubscribe@mail.example.com?subject=unsubscribe%20"));
        assert_eq!(post, "List-Unsubscribe-Post");
        assert_eq!(one_click, "List-Unsubscribe=One-Click");
        assert!(!value.contains(['\r', '\n']));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_tokens_never_verify_or_panic(token in "\\PC{0,200}") {
            let signer = Signer::new(b"secret key for the property test");
            proptest::prop_assert!(signer.verify(&token).is_err());
        }

        #[test]
        fn any_recipient_and_campaign_round_trip(recipient in "[^\\x00]{1,80}", campaign in "[^\\x00]{0,40}") {
            let signer = Signer::new(b"k2");
            let got = signer.verify(&signer.token(&recipient, &campaign)).unwrap();
            proptest::prop_assert_eq!(got, Request { recipient, campaign });
        }
    }
}
