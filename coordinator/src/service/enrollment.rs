//! The Enrollment service: a site with a one-time token and a CSR gets its certificate.

use super::*;

#[derive(Debug, Clone)]
pub struct EnrollmentService {
    pub engine: Arc<Engine>,
}

#[tonic::async_trait]
impl pb::enrollment_server::Enrollment for EnrollmentService {
    async fn enroll(&self, request: Request<pb::EnrollRequest>) -> Result<Response<pb::CertificateResponse>, Status> {
        let req = request.into_inner();
        if req.csr_der.len() > MAX_CSR {
            return Err(Status::invalid_argument(format!(
                "the CSR is larger than {MAX_CSR} bytes"
            )));
        }
        let engine = self.engine.clone();
        let issued = tokio::task::spawn_blocking(move || engine.enroll(&req.token, &req.csr_der))
            .await
            .map_err(|e| Status::internal(format!("enrolment task failed: {e}")))??;
        Ok(Response::new(certificate_pb(&self.engine, issued)))
    }
}
