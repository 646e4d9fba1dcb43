//! Revoked identities, and the connections to close when one is revoked. The TLS
//! accept loop and the `RoleGate` consult it on every connection and call; governance
//! (`governance.rs`) revokes through it.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};

use medfl_shared::identity::{Identity, Role};
use tokio_util::sync::CancellationToken;

/// The seconds since the epoch at which `cert_der` was issued (`not_before` plus the
/// PKI's backdating), or `None` if it does not parse.
pub fn issued_secs(cert_der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(cert.validity().not_before.timestamp() + crate::pki::BACKDATE.whole_seconds())
}

fn key(identity: &Identity) -> (Role, String) {
    (identity.role, identity.name.as_str().to_string())
}

/// Revoked identities (by issue time) and each identity's open connections.
#[derive(Debug, Default)]
pub struct Revocations {
    /// Identity → the second of its revocation.
    revoked: RwLock<HashMap<(Role, String), i64>>,
    /// Identity → a token per open connection; cancelling one closes it.
    connections: Mutex<HashMap<(Role, String), Vec<CancellationToken>>>,
}

impl Revocations {
    pub fn new(revoked: impl IntoIterator<Item = (Identity, i64)>) -> Self {
        let r = Revocations::default();
        {
            let mut map = r.revoked.write().unwrap_or_else(|p| p.into_inner());
            for (identity, at) in revoked {
                map.insert(key(&identity), at);
            }
        }
        r
    }

    /// Whether a certificate of `identity` issued at `issued_secs` is revoked.
    pub fn is_revoked(&self, identity: &Identity, issued_secs: i64) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key(identity))
            .is_some_and(|&at| issued_secs <= at)
    }

    /// When `identity` was revoked, if it was.
    pub fn revoked_at(&self, identity: &Identity) -> Option<i64> {
        self.revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key(identity))
            .copied()
    }

    /// Revokes `identity` as of second `at` and closes its open connections.
    pub fn revoke(&self, identity: &Identity, at: i64) {
        self.revoked
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key(identity), at);
        if let Some(tokens) = self
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key(identity))
        {
            for t in tokens {
                t.cancel();
            }
        }
    }

    /// A token that is cancelled when `identity` is revoked; its connection closes then.
    pub fn track(&self, identity: &Identity) -> CancellationToken {
        let token = CancellationToken::new();
        let mut conns = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        let list = conns.entry(key(identity)).or_default();
        list.retain(|t| !t.is_cancelled());
        list.push(token.clone());
        token
    }
}
