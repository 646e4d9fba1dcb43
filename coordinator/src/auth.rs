//! The one place where RPCs check who calls them: a tonic interceptor per service
//! that reads the caller's identity from its verified certificate, refuses roles the
//! service does not serve, and hands the [`Identity`] to the handler.

use medfl_shared::identity::{Identity, Role};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Admits the roles a service serves.
#[derive(Debug, Clone, Copy)]
pub struct RoleGate {
    service: &'static str,
    allowed: &'static [Role],
}

impl RoleGate {
    pub const SITE: RoleGate = RoleGate {
        service: "site",
        allowed: &[Role::Site],
    };
    pub const ADMIN: RoleGate = RoleGate {
        service: "admin",
        allowed: &[Role::Admin],
    };
    pub const AUDIT: RoleGate = RoleGate {
        service: "audit",
        allowed: &[Role::Auditor, Role::Admin],
    };
}

impl Interceptor for RoleGate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let certs = request
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("a client certificate from the consortium CA is required"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("a client certificate from the consortium CA is required"))?;
        let identity = Identity::from_cert_der(leaf.as_ref())
            .map_err(|e| Status::unauthenticated(format!("client certificate refused: {e}")))?;
        if !self.allowed.contains(&identity.role) {
            let roles: Vec<&str> = self.allowed.iter().map(|r| r.as_str()).collect();
            return Err(Status::permission_denied(format!(
                "{identity} may not call the {} service: it needs the role {}",
                self.service,
                roles.join(" or ")
            )));
        }
        request.extensions_mut().insert(identity);
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
