//! The settings every node shares (campaign pause, resume and purge block, the intake
//! switch, the failure log's mode) and their wire form: one JSON `Change` per setting,
//! stored in a Redis hash by field and published on a channel. The newest change of a
//! field wins, by the time the operator (or the guard) made it.

use serde::{Deserialize, Serialize};

use crate::admin_api::FailLogSettings;

/// Longest payload read from the channel or the hash; anything larger is not ours.
pub const MAX_PAYLOAD: usize = 16 * 1024;
/// Longest campaign name a change may carry (intake bounds names tighter still).
const MAX_NAME: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Setting {
    Campaign {
        name: String,
        paused: bool,
        /// Until when (ms since the epoch) new mail is refused after a purge; 0 for none.
        blocked_until: i64,
    },
    Intake {
        paused: bool,
    },
    FailLog {
        settings: FailLogSettings,
    },
}

impl Setting {
    /// The hash field this setting lives under: one per campaign, one each for the rest.
    pub fn field(&self) -> String {
        match self {
            Setting::Campaign { name, .. } => format!("campaign:{name}"),
            Setting::Intake { .. } => "intake".to_owned(),
            Setting::FailLog { .. } => "faillog".to_owned(),
        }
    }
}

/// One setting as a node made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    /// When it was made (ms since the epoch, the making node's clock).
    pub at_ms: i64,
    pub node: String,
    pub setting: Setting,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("payload of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("not a change: {0}")]
    Json(String),
    #[error("campaign name empty, too long or with control characters")]
    BadName,
}

impl Change {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("a change always serialises")
    }

    /// Reads a change from the channel or the hash; whatever another program (or a
    /// damaged value) put there is refused, never applied.
    pub fn decode(payload: &[u8]) -> Result<Change, DecodeError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(DecodeError::TooLarge(payload.len()));
        }
        let change: Change =
            serde_json::from_slice(payload).map_err(|e| DecodeError::Json(e.to_string()))?;
        if let Setting::Campaign { name, .. } = &change.setting
            && (name.is_empty() || name.len() > MAX_NAME || name.contains(char::is_control))
        {
            return Err(DecodeError::BadName);
        }
        Ok(change)
    }

    /// Whether this change supersedes one made at `known_ms`: strictly newer, so that a
    /// node's own change echoed back by the channel changes nothing.
    pub fn newer_than(&self, known_ms: Option<i64>) -> bool {
        known_ms.is_none_or(|k| self.at_ms > k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin_api::FailLogMode;
    use proptest::prelude::*;

    fn setting() -> impl Strategy<Value = Setting> {
        prop_oneof![
            ("[a-z0-9._-]{1,40}", any::<bool>(), 0i64..i64::MAX).prop_map(
                |(name, paused, blocked_until)| Setting::Campaign {
                    name,
                    paused,
                    blocked_until
                }
            ),
            any::<bool>().prop_map(|paused| Setting::Intake { paused }),
            (0u8..4, any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(m, s, r, b)| {
                Setting::FailLog {
                    settings: FailLogSettings {
                        mode: [
                            FailLogMode::Full,
                            FailLogMode::Sampled,
                            FailLogMode::Aggregate,
                            FailLogMode::Off,
                        ][m as usize],
                        sample_rate: s,
                        rows_per_sec: r,
                        burst: b,
                    },
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn round_trips(at_ms in any::<i64>(), node in "[a-z0-9.-]{1,30}", setting in setting()) {
            let c = Change { at_ms, node, setting };
            prop_assert_eq!(Change::decode(c.encode().as_bytes()), Ok(c));
        }

        #[test]
        fn garbage_is_refused_not_applied(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            // Anything decoded from noise must at least be a well-formed change.
            if let Ok(c) = Change::decode(&bytes) {
                prop_assert_eq!(Change::decode(c.encode().as_bytes()), Ok(c));
            }
        }
    }

    #[test]
    fn fields_and_limits() {
        let pause = Setting::Campaign {
            name: "spring".into(),
            paused: true,
            blocked_until: 0,
        };
        assert_eq!(pause.field(), "campaign:spring");
        assert_eq!(Setting::Intake { paused: true }.field(), "intake");
        let big = vec![b' '; MAX_PAYLOAD + 1];
        assert_eq!(
            Change::decode(&big),
            Err(DecodeError::TooLarge(MAX_PAYLOAD + 1))
        );
        let bad = r#"{"at_ms":1,"node":"a","setting":{"kind":"campaign","name":"a\nb","paused":true,"blocked_until":0}}"#;
        assert_eq!(Change::decode(bad.as_bytes()), Err(DecodeError::BadName));
        let c = Change {
            at_ms: 10,
            node: "a".into(),
            setting: pause,
        };
        assert!(c.newer_than(None));
        assert!(c.newer_than(Some(9)));
        assert!(!c.newer_than(Some(10)));
    }
}
