//! Secure-aggregation session parameters on the wire: the one conversion both sides
//! use, so the session id a site recomputes is over exactly what the coordinator sent.

use medfl_shared::secagg::SessionParams;

use crate::v1 as pb;

/// The work item's session for `params` (its id included).
pub fn session_to_pb(params: &SessionParams) -> pb::SecAggSession {
    pb::SecAggSession {
        session_id: params.session_id().to_vec(),
        roster: params.roster.clone(),
        threshold: params.threshold,
        num_values: params.num_values,
        scale_log2: params.scale_log2,
        attempt: params.attempt,
        neighbours: params.neighbours,
    }
}

/// The parameters a work item's session names, for the work item's study and round.
/// The caller checks them and the id.
pub fn session_from_pb(work: &pb::WorkItem, s: &pb::SecAggSession) -> SessionParams {
    SessionParams {
        study_id: work.study_id.clone(),
        round: work.round,
        attempt: s.attempt,
        roster: s.roster.clone(),
        threshold: s.threshold,
        num_values: s.num_values,
        scale_log2: s.scale_log2,
        neighbours: s.neighbours,
    }
}
