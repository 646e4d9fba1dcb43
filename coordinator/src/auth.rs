//! The one place where RPCs check who calls them: a tonic interceptor per service
//! that reads the caller's identity from its verified certificate, refuses roles the
//! service does not serve, and hands the [`Identity`] to the handler.

use std::sync::Arc;

use medfl_shared::identity::{Identity, Role};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::revocation::{Revocations, issued_secs};

/// Which callers a service serves.
#[derive(Debug, Clone, Copy)]
pub struct Access {
    service: &'static str,
    allowed: &'static [Role],
    /// Callers without a certificate too (enrolment only).
    anonymous: bool,
}

impl Access {
    pub const SITE: Access = Access {
        service: "site",
        allowed: &[Role::Site],
        anonymous: false,
    };
    pub const ADMIN: Access = Access {
        service: "admin",
        allowed: &[Role::Admin],
        anonymous: false,
    };
    pub const AUDIT: Access = Access {
        service: "audit",
        allowed: &[Role::Auditor, Role::Admin],
        anonymous: false,
    };
    /// Anyone: the token in the request is the credential.
    pub const ENROLLMENT: Access = Access {
        service: "enrollment",
        allowed: &[Role::Site, Role::Admin, Role::Auditor, Role::Coordinator],
        anonymous: true,
    };
}

/// Admits the roles a service serves, and no revoked certificate.
#[derive(Debug, Clone)]
pub struct RoleGate {
    access: Access,
    revocations: Arc<Revocations>,
}

impl RoleGate {
    pub fn new(access: Access, revocations: Arc<Revocations>) -> Self {
        RoleGate { access, revocations }
    }
}

impl Interceptor for RoleGate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let access = self.access;
        if access.anonymous && request.peer_certs().is_none_or(|c| c.is_empty()) {
            return Ok(request);
        }
        let certs = request
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("a client certificate from the consortium CA is required"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("a client certificate from the consortium CA is required"))?;
        let identity = Identity::from_cert_der(leaf.as_ref())
            .map_err(|e| Status::unauthenticated(format!("client certificate refused: {e}")))?;
        // Connections are closed on revocation; this covers a request already in flight.
        if issued_secs(leaf.as_ref()).is_none_or(|at| self.revocations.is_revoked(&identity, at)) {
            return Err(Status::unauthenticated(format!(
                "the certificate of {identity} was revoked; ask the consortium admin for a new enrolment"
            )));
        }
        if !access.allowed.contains(&identity.role) {
            let roles: Vec<&str> = access.allowed.iter().map(|r| r.as_str()).collect();
            return Err(Status::permission_denied(format!(
                "{identity} may not call the {} service: it needs the role {}",
                access.service,
                roles.join(" or ")
            )));
        }
        let der = CallerCertificate(leaf.as_ref().to_vec());
        request.extensions_mut().insert(identity);
        request.extensions_mut().insert(der);
        Ok(request)
    }
}

/// Returns the identity the gate attached to a request.
pub fn caller<T>(request: &Request<T>) -> Result<&Identity, Status> {
    request
        .extensions()
        .get::<Identity>()
        .ok_or_else(|| Status::unauthenticated("request reached a handler without passing the role gate"))
}

/// The caller's verified certificate (DER), for signatures made with its key.
#[derive(Debug, Clone)]
pub struct CallerCertificate(pub Vec<u8>);

/// Returns the certificate the gate attached to a request.
pub fn caller_certificate<T>(request: &Request<T>) -> Result<&[u8], Status> {
    request
        .extensions()
        .get::<CallerCertificate>()
        .map(|c| c.0.as_slice())
        .ok_or_else(|| Status::unauthenticated("request reached a handler without passing the role gate"))
}
