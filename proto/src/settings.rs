//! The one wire conversion of a round's settings.

use medfl_shared::manifest::RoundSettings;

use crate::v1 as pb;

pub fn settings_to_pb(s: &RoundSettings) -> pb::RoundSettings {
    pb::RoundSettings {
        local_epochs: s.local_epochs,
        batch_size: s.batch_size,
        learning_rate: s.learning_rate,
        optimizer: s.optimizer.clone(),
        clip_norm: s.clip_norm,
        sample_rate: s.sample_rate,
        steps_per_round: s.steps_per_round,
        proximal_mu: s.proximal_mu,
    }
}

pub fn settings_from_pb(s: &pb::RoundSettings) -> RoundSettings {
    RoundSettings {
        local_epochs: s.local_epochs,
        batch_size: s.batch_size,
        learning_rate: s.learning_rate,
        optimizer: s.optimizer.clone(),
        clip_norm: s.clip_norm,
        sample_rate: s.sample_rate,
        steps_per_round: s.steps_per_round,
        proximal_mu: s.proximal_mu,
    }
}
