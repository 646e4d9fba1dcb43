//! Who may still connect: revoked identities, the connections each identity holds
//! open (closed within moments of a revocation), and the issue time of a
//! certificate, which revocation compares against.
//!
//! Revocation is by identity and time: revoking `site/hospital-a` at second T refuses
//! every certificate naming it that was issued at or before T, including ones issued
//! offline by `medfl pki issue` that the coordinator never saw; a certificate enrolled
//! afterwards is issued after T and works. The list lives in the store
//! (`revoked/<role>/<name>`) and in memory here for the handshake path.

use std::time::Duration;

use medfl_shared::identity::{Identity, Role};
use medfl_shared::sha256_hex;
use time::OffsetDateTime;

use crate::engine::{Engine, now_ms};
use crate::error::ServiceError;
use crate::pki::Issued;
use crate::store::{InviteRecord, Redeem, RevokedRecord};

pub use crate::revocation::{Revocations, issued_secs};

// ---------------------------------------------------------------- engine side

/// Prefix of enrolment tokens, so one pasted in the wrong place is recognisable.
pub const TOKEN_PREFIX: &str = "medfl-enroll-";

impl Engine {
    fn ca(&self) -> Result<&crate::pki::Ca, ServiceError> {
        self.ca.as_ref().ok_or_else(|| {
            ServiceError::FailedPrecondition(
                "this coordinator enrols no sites: set `ca` in coordinator.toml to the consortium CA directory".into(),
            )
        })
    }

    /// Makes a one-time token that enrols `name` as a site; only its hash is stored.
    pub fn invite(
        &self,
        name: &str,
        ttl: Duration,
        certificate_days: u32,
        by: &str,
    ) -> Result<(String, u64), ServiceError> {
        self.ca()?;
        let name: medfl_shared::identity::Name = name
            .parse()
            .map_err(|e| ServiceError::InvalidArgument(format!("site name {name:?}: {e}")))?;
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| ServiceError::Internal("no system randomness for the token".into()))?;
        let token = format!("{TOKEN_PREFIX}{}", medfl_shared::chainlog::to_hex(&secret));
        let expires_ms = now_ms() + ttl.as_millis() as u64;
        self.store.put_invite(
            &sha256_hex(token.as_bytes()),
            &InviteRecord {
                name: name.to_string(),
                expires_ms,
                certificate_days,
                created_by: by.to_string(),
                used_ms: None,
            },
        )?;
        Ok((token, expires_ms))
    }

    /// The issue time of a new certificate for `identity`: now, or just after its
    /// revocation if that was this very second (so the new certificate is not revoked).
    fn issue_time(&self, identity: &Identity) -> OffsetDateTime {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let at = match self.revocations.revoked_at(identity) {
            Some(revoked) if revoked >= now => revoked + 1,
            _ => now,
        };
        OffsetDateTime::from_unix_timestamp(at).unwrap_or_else(|_| OffsetDateTime::now_utc())
    }

    /// Redeems an enrolment token for a certificate over `csr_der`.
    pub fn enroll(&self, token: &str, csr_der: &[u8]) -> Result<Issued, ServiceError> {
        let ca = self.ca()?;
        if !token.starts_with(TOKEN_PREFIX) || token.len() > 200 {
            return Err(ServiceError::InvalidArgument(format!(
                "this is not an enrolment token (they start with {TOKEN_PREFIX}); ask the admin for `medfl site invite`"
            )));
        }
        let invite = match self.store.redeem_invite(&sha256_hex(token.as_bytes()), now_ms())? {
            Ok(invite) => invite,
            Err(Redeem::Unknown) => {
                return Err(ServiceError::PermissionDenied("unknown enrolment token".into()));
            }
            Err(Redeem::Used) => {
                return Err(ServiceError::PermissionDenied(
                    "this enrolment token was already used; ask the admin for a new one".into(),
                ));
            }
            Err(Redeem::Expired) => {
                return Err(ServiceError::PermissionDenied(
                    "this enrolment token has expired; ask the admin for a new one".into(),
                ));
            }
        };
        let name = invite
            .name
            .parse()
            .map_err(|e| ServiceError::Internal(format!("stored invitation names {:?}: {e}", invite.name)))?;
        let identity = Identity::new(Role::Site, name);
        let issued = ca
            .sign_csr(
                csr_der,
                &identity,
                self.issue_time(&identity),
                i64::from(invite.certificate_days),
            )
            .map_err(ServiceError::InvalidArgument)?;
        self.store.audit(&[crate::store::AuditEvent::new(
            identity.to_string(),
            "site.enroll",
            "",
            serde_json::json!({"invited_by": invite.created_by, "not_after_ms": issued.not_after.unix_timestamp() * 1000}),
        )])?;
        tracing::info!(%identity, "site enrolled");
        Ok(issued)
    }

    /// Issues `identity` a fresh certificate over a CSR made with a new key.
    pub fn renew(&self, identity: &Identity, csr_der: &[u8], days: i64) -> Result<Issued, ServiceError> {
        let issued = self
            .ca()?
            .sign_csr(csr_der, identity, self.issue_time(identity), days)
            .map_err(ServiceError::InvalidArgument)?;
        self.store.audit(&[crate::store::AuditEvent::new(
            identity.to_string(),
            "site.renew",
            "",
            serde_json::json!({"not_after_ms": issued.not_after.unix_timestamp() * 1000}),
        )])?;
        Ok(issued)
    }

    /// Revokes every certificate issued to `role/name` so far and closes its connections.
    pub fn revoke(&self, role: &str, name: &str, by: &str) -> Result<RevokedRecord, ServiceError> {
        let role: Role = role
            .parse()
            .map_err(|e| ServiceError::InvalidArgument(format!("role {role:?}: {e}")))?;
        if role == Role::Coordinator {
            return Err(ServiceError::InvalidArgument(
                "the coordinator's own certificate is replaced, not revoked".into(),
            ));
        }
        let name = name
            .parse()
            .map_err(|e| ServiceError::InvalidArgument(format!("name {name:?}: {e}")))?;
        let identity = Identity::new(role, name);
        if identity.to_string() == by {
            return Err(ServiceError::InvalidArgument("an admin cannot revoke itself".into()));
        }
        let at_ms = now_ms();
        let record = RevokedRecord {
            role: role.to_string(),
            name: identity.name.to_string(),
            at_ms,
            by: by.to_string(),
        };
        self.store.put_revocation(&record)?;
        self.revocations.revoke(&identity, (at_ms / 1000) as i64);
        tracing::warn!(%identity, %by, "identity revoked");
        Ok(record)
    }
}

impl Engine {
    /// The CA certificate sites verify the coordinator with, when it enrols.
    pub fn ca_pem(&self) -> Option<String> {
        self.ca.as_ref().map(|ca| ca.ca_pem.clone())
    }

    pub fn certificate_days(&self) -> u32 {
        self.config().certificate_days
    }

    /// Admins may read every study but control (start, pause, resume, abort, export)
    /// only the studies they created or whose manifest lists them under `admins`.
    pub fn authorize_control(&self, study_id: &str, admin: &Identity) -> Result<(), ServiceError> {
        may_control(&self.study(study_id)?, admin)
    }
}

/// [`Engine::authorize_control`] on a study record already read.
pub fn may_control(study: &crate::store::StudyRecord, admin: &Identity) -> Result<(), ServiceError> {
    if study.created_by == admin.to_string() {
        return Ok(());
    }
    let listed = medfl_shared::manifest::StudyManifest::from_toml(&study.manifest_toml)
        .map(|m| m.admins.iter().any(|a| a.as_str() == admin.name.as_str()))
        .unwrap_or(false);
    if listed {
        Ok(())
    } else {
        Err(ServiceError::PermissionDenied(format!(
            "{admin} may not control study {}: it was created by {} and its manifest does not list {} under admins",
            study.id, study.created_by, admin.name
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocation_covers_certificates_issued_up_to_it() {
        let id = Identity::new(Role::Site, "a".parse().expect("name"));
        let other = Identity::new(Role::Admin, "a".parse().expect("name"));
        let r = Revocations::default();
        let conn = r.track(&id);
        r.revoke(&id, 100);
        assert!(conn.is_cancelled());
        assert!(r.is_revoked(&id, 100));
        assert!(r.is_revoked(&id, 50));
        assert!(
            !r.is_revoked(&id, 101),
            "a certificate issued after the revocation works"
        );
        assert!(!r.is_revoked(&other, 50), "revocation is per role and name");
    }
}
