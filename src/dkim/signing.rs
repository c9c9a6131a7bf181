//! Signing on the message path: every message Floodgate queues (SMTP and HTTP submissions,
//! and the DSNs it writes itself) passes through [`Signing::sign`] before its commit, so
//! what is stored, and relayed on every attempt, is what was signed. Keys are swapped
//! whole on SIGHUP.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;

use super::{Signed, Signers};

/// What signing did, since start: the `/metrics` counters.
#[derive(Debug, Default)]
pub struct SigningStats {
    /// Messages given at least one signature.
    pub signed: AtomicU64,
    /// Messages sent unsigned because no key covers their `From:` domain (or they have
    /// no `From:`).
    pub unsigned: AtomicU64,
    /// Messages a key covered but signing failed: sent unsigned, and logged.
    pub failed: AtomicU64,
}

/// The live keys and their counters.
#[derive(Debug, Default)]
pub struct Signing {
    signers: ArcSwap<Signers>,
    stats: SigningStats,
}

impl Signing {
    pub fn new(signers: Signers) -> Signing {
        Signing {
            signers: ArcSwap::from_pointee(signers),
            stats: SigningStats::default(),
        }
    }

    /// Puts reloaded keys in force for every message signed from now on.
    pub fn replace(&self, signers: Signers) {
        self.signers.store(Arc::new(signers));
    }

    pub fn stats(&self) -> &SigningStats {
        &self.stats
    }

    /// `message` with a `DKIM-Signature:` header in front for every key that covers its
    /// `From:` domain; unchanged when none does.
    ///
    /// RSA signatures are computed on tokio's blocking pool: an RSA-2048 signature costs
    /// about two milliseconds, which must not hold an async worker (and every session on
    /// it). Ed25519-only keys sign in place: tens of microseconds, less than the handoff.
    /// Never loses the message: if signing fails, it goes out unsigned and is counted.
    pub async fn sign(&self, message: Vec<u8>) -> Vec<u8> {
        let signers = self.signers.load_full();
        if signers.is_empty() {
            self.stats.unsigned.fetch_add(1, Ordering::Relaxed);
            return message;
        }
        let (message, outcome) = if signers.cheap() {
            let outcome = signers.sign(&message);
            (message, Ok(outcome))
        } else {
            let message = Arc::new(message);
            let input = message.clone();
            let outcome = tokio::task::spawn_blocking(move || signers.sign(&input)).await;
            (
                Arc::try_unwrap(message).unwrap_or_else(|shared| (*shared).clone()),
                outcome,
            )
        };
        match outcome {
            Ok(Ok(Signed::Headers(headers))) => {
                self.stats.signed.fetch_add(1, Ordering::Relaxed);
                let mut signed = Vec::with_capacity(headers.len() + message.len());
                signed.extend_from_slice(headers.as_bytes());
                signed.extend_from_slice(&message);
                signed
            }
            Ok(Ok(Signed::NoKey)) => {
                self.stats.unsigned.fetch_add(1, Ordering::Relaxed);
                message
            }
            Ok(Err(e)) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "DKIM signing failed; the message goes out unsigned");
                message
            }
            Err(e) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "DKIM signing task died; the message goes out unsigned");
                message
            }
        }
    }
}
