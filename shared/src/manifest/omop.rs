//! `[data.omop]`: a study's features and label over an OMOP Common Data Model (v5.4),
//! named by public concept ids and day windows relative to each person's index date.
//! The manifest carries only these ids and windows; each site's agent writes the SQL
//! itself against the CDM schema its own config names.

use serde::{Deserialize, Serialize};

use super::{ManifestError, invalid};

/// The CDM tables a concept is looked for in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OmopDomain {
    /// `condition_occurrence` by `condition_start_date`.
    Condition,
    /// `drug_exposure` by `drug_exposure_start_date`.
    Drug,
    /// `procedure_occurrence` by `procedure_date`.
    Procedure,
    /// `measurement` by `measurement_date`.
    Measurement,
    /// `observation` by `observation_date`.
    Observation,
}

impl OmopDomain {
    /// (table, concept column, date column).
    pub fn table(self) -> (&'static str, &'static str, &'static str) {
        match self {
            OmopDomain::Condition => ("condition_occurrence", "condition_concept_id", "condition_start_date"),
            OmopDomain::Drug => ("drug_exposure", "drug_concept_id", "drug_exposure_start_date"),
            OmopDomain::Procedure => ("procedure_occurrence", "procedure_concept_id", "procedure_date"),
            OmopDomain::Measurement => ("measurement", "measurement_concept_id", "measurement_date"),
            OmopDomain::Observation => ("observation", "observation_concept_id", "observation_date"),
        }
    }
}

/// Days relative to the index date, both ends included (`[-365, -1]`: the year before).
pub type Window = [i32; 2];

/// How one feature is built, as [`OmopFeature::kind`] resolves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OmopFeatureKind {
    /// 1 if the person has an event of the concept (or a descendant) in the window.
    Present {
        domain: OmopDomain,
        concept_id: i64,
        window: Window,
    },
    /// The latest `value_as_number` of a measurement concept (or a descendant) in the
    /// given unit within the window; missing when there is none.
    LatestValue {
        concept_id: i64,
        unit_concept_id: i64,
        window: Window,
    },
    /// Age in years at the index date (index year − year of birth).
    Age,
    /// 1 if the person's `gender_concept_id` is this concept.
    Gender { concept_id: i64 },
}

/// The kinds of [`OmopFeature`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OmopFeatureTag {
    Present,
    LatestValue,
    Age,
    Gender,
}

/// `[[data.omop.features]]`: a named feature (its name is listed in `data.features`):
/// `kind = "present"` (`domain`, `concept_id`, `window`), `"latest_value"`
/// (`concept_id`, `unit_concept_id`, `window`), `"age"`, or `"gender"` (`concept_id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OmopFeature {
    pub name: String,
    #[serde(rename = "kind")]
    pub tag: OmopFeatureTag,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<OmopDomain>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concept_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_concept_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
}

impl OmopFeature {
    /// The feature's definition, or what it lacks or has too many of.
    pub fn kind(&self) -> Result<OmopFeatureKind, String> {
        let need = |field: &str| format!("data.omop feature {:?} ({:?}) needs `{field}`", self.name, self.tag);
        let extra = |field: &str| format!("data.omop feature {:?} ({:?}) takes no `{field}`", self.name, self.tag);
        let concept = self.concept_id.ok_or_else(|| need("concept_id"));
        let window = self.window.ok_or_else(|| need("window"));
        let kind = match self.tag {
            OmopFeatureTag::Present => OmopFeatureKind::Present {
                domain: self.domain.ok_or_else(|| need("domain"))?,
                concept_id: concept?,
                window: window?,
            },
            OmopFeatureTag::LatestValue => OmopFeatureKind::LatestValue {
                concept_id: concept?,
                unit_concept_id: self.unit_concept_id.ok_or_else(|| need("unit_concept_id"))?,
                window: window?,
            },
            OmopFeatureTag::Age => OmopFeatureKind::Age,
            OmopFeatureTag::Gender => OmopFeatureKind::Gender { concept_id: concept? },
        };
        let uses = |field: &str| match self.tag {
            OmopFeatureTag::Present => matches!(field, "domain" | "concept_id" | "window"),
            OmopFeatureTag::LatestValue => matches!(field, "concept_id" | "unit_concept_id" | "window"),
            OmopFeatureTag::Age => false,
            OmopFeatureTag::Gender => field == "concept_id",
        };
        for (field, given) in [
            ("domain", self.domain.is_some()),
            ("concept_id", self.concept_id.is_some()),
            ("unit_concept_id", self.unit_concept_id.is_some()),
            ("window", self.window.is_some()),
        ] {
            if given && !uses(field) {
                return Err(extra(field));
            }
        }
        Ok(kind)
    }
}

/// `[data.omop]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OmopCohort {
    /// The index date: the first occurrence of this condition concept (or a descendant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_concept_id: Option<i64>,
    /// Or a fixed index date for everyone, `YYYY-MM-DD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_date: Option<String>,
    /// Days of observation a person needs before the index date.
    pub prior_observation_days: u32,
    /// The label: an event of this concept (or a descendant) within `outcome_window`
    /// after the index date. A person must be observed through the window's end.
    pub outcome_domain: OmopDomain,
    pub outcome_concept_id: i64,
    pub outcome_window: Window,
    pub features: Vec<OmopFeature>,
}

impl OmopCohort {
    pub(super) fn validate(&self, features: &[String], label: &str) -> Result<(), ManifestError> {
        match (&self.index_concept_id, &self.index_date) {
            (Some(_), None) => {}
            (None, Some(d)) if super::days_from_civil(d).is_some() => {}
            (None, Some(d)) => return Err(invalid(format!("data.omop.index_date {d:?} is not YYYY-MM-DD"))),
            _ => {
                return Err(invalid(
                    "data.omop needs index_concept_id (the first occurrence) or index_date, one of them",
                ));
            }
        }
        let window_ok = |w: &Window| w[0] <= w[1] && w[0].abs() <= 36_500 && w[1].abs() <= 36_500;
        if !window_ok(&self.outcome_window) || self.outcome_window[0] < 1 {
            return Err(invalid(format!(
                "data.omop.outcome_window {:?} must be days after the index date, first ≤ last, first ≥ 1",
                self.outcome_window
            )));
        }
        if self.prior_observation_days > 36_500 {
            return Err(invalid("data.omop.prior_observation_days is over 100 years"));
        }
        let mut names = std::collections::HashSet::new();
        for f in &self.features {
            if !names.insert(f.name.as_str()) {
                return Err(invalid(format!("data.omop.features names {:?} twice", f.name)));
            }
            if f.name == label {
                return Err(invalid(format!("data.omop feature {:?} has the label's name", f.name)));
            }
            let window = match f.kind().map_err(invalid)? {
                OmopFeatureKind::Present { window, .. } | OmopFeatureKind::LatestValue { window, .. } => Some(window),
                _ => None,
            };
            if let Some(w) = window
                && (!window_ok(&w) || w[1] > 0)
            {
                return Err(invalid(format!(
                    "data.omop feature {:?}: window {w:?} must end on or before the index date (day 0), first ≤ last",
                    f.name
                )));
            }
        }
        for f in features {
            if !names.contains(f.as_str()) {
                return Err(invalid(format!(
                    "data.features lists {f:?}, which no [[data.omop.features]] defines"
                )));
            }
        }
        Ok(())
    }

    /// Every concept id the study names, for the site's vocabulary check.
    pub fn concept_ids(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self.index_concept_id.into_iter().collect();
        ids.push(self.outcome_concept_id);
        for f in &self.features {
            let Ok(kind) = f.kind() else { continue };
            match kind {
                OmopFeatureKind::Present { concept_id, .. } | OmopFeatureKind::Gender { concept_id } => {
                    ids.push(concept_id)
                }
                OmopFeatureKind::LatestValue {
                    concept_id,
                    unit_concept_id,
                    ..
                } => ids.extend([concept_id, unit_concept_id]),
                OmopFeatureKind::Age => {}
            }
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}
