//! A synthetic OMOP CDM v5.4 for the tests, generated with a fixed seed: persons with
//! type 2 diabetes (the index), hypertension, metformin, HbA1c measurements, and a
//! myocardial infarction within a year of the index whose probability follows a known
//! logistic model of them. Real OMOP concept ids; descendants recorded through
//! `concept_ancestor`; events outside the study's windows and measurements in another
//! unit on purpose, so the builder's windows, hierarchy and unit filter are exercised.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::pg::PgCluster;

pub const T2DM: i64 = 201826;
pub const T2DM_NO_COMPLICATION: i64 = 4193704;
pub const HYPERTENSIVE_DISORDER: i64 = 316866;
pub const ESSENTIAL_HYPERTENSION: i64 = 320128;
pub const METFORMIN: i64 = 1503297;
pub const METFORMIN_500_TABLET: i64 = 40163924;
pub const HBA1C: i64 = 3004410;
pub const PERCENT: i64 = 8554;
pub const GRAM_PER_DECILITER: i64 = 8713;
pub const MYOCARDIAL_INFARCTION: i64 = 4329847;
pub const ACUTE_MI: i64 = 312327;
pub const FEMALE: i64 = 8532;
pub const MALE: i64 = 8507;
pub const EHR: i64 = 32817;

/// The generating model's logit, from what the study's features see.
pub fn true_logit(age: f64, hypertension: bool, hba1c: Option<f64>, metformin: bool, female: bool) -> f64 {
    -2.2 + 0.05 * (age - 60.0) + 1.2 * f64::from(u8::from(hypertension)) + 0.6 * (hba1c.unwrap_or(7.5) - 7.5)
        - 0.9 * f64::from(u8::from(metformin))
        - 0.4 * f64::from(u8::from(female))
}

/// One generated person as the study sees them (for the generating model's AUC).
#[derive(Debug, Clone)]
pub struct Truth {
    pub person_id: i64,
    /// Whether the study includes the person (index event, observation windows).
    pub included: bool,
    pub logit: f64,
    pub outcome: bool,
}

/// `YYYY-MM-DD` of days since 1970-01-01 (Hinnant's `civil_from_days`).
pub fn date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    format!("{:04}-{:02}-{:02}", if m <= 2 { y + 1 } else { y }, m, d)
}

fn year_of(days: i64) -> i64 {
    date(days)[..4].parse().unwrap_or(1970)
}

const TABLES: &str = "
CREATE TABLE {s}.concept (concept_id integer PRIMARY KEY, concept_name varchar(255) NOT NULL,
  domain_id varchar(20) NOT NULL, vocabulary_id varchar(20) NOT NULL, concept_class_id varchar(20) NOT NULL,
  standard_concept varchar(1), concept_code varchar(50) NOT NULL, valid_start_date date NOT NULL,
  valid_end_date date NOT NULL, invalid_reason varchar(1));
CREATE TABLE {s}.concept_ancestor (ancestor_concept_id integer NOT NULL, descendant_concept_id integer NOT NULL,
  min_levels_of_separation integer NOT NULL, max_levels_of_separation integer NOT NULL);
CREATE TABLE {s}.person (person_id integer PRIMARY KEY, gender_concept_id integer NOT NULL,
  year_of_birth integer NOT NULL, month_of_birth integer, day_of_birth integer,
  race_concept_id integer NOT NULL, ethnicity_concept_id integer NOT NULL);
CREATE TABLE {s}.observation_period (observation_period_id integer PRIMARY KEY, person_id integer NOT NULL,
  observation_period_start_date date NOT NULL, observation_period_end_date date NOT NULL,
  period_type_concept_id integer NOT NULL);
CREATE TABLE {s}.condition_occurrence (condition_occurrence_id bigint PRIMARY KEY, person_id integer NOT NULL,
  condition_concept_id integer NOT NULL, condition_start_date date NOT NULL, condition_type_concept_id integer NOT NULL);
CREATE TABLE {s}.drug_exposure (drug_exposure_id bigint PRIMARY KEY, person_id integer NOT NULL,
  drug_concept_id integer NOT NULL, drug_exposure_start_date date NOT NULL, drug_exposure_end_date date NOT NULL,
  drug_type_concept_id integer NOT NULL);
CREATE TABLE {s}.measurement (measurement_id bigint PRIMARY KEY, person_id integer NOT NULL,
  measurement_concept_id integer NOT NULL, measurement_date date NOT NULL, measurement_type_concept_id integer NOT NULL,
  value_as_number numeric, unit_concept_id integer);
CREATE TABLE {s}.procedure_occurrence (procedure_occurrence_id bigint PRIMARY KEY, person_id integer NOT NULL,
  procedure_concept_id integer NOT NULL, procedure_date date NOT NULL, procedure_type_concept_id integer NOT NULL);
CREATE TABLE {s}.observation (observation_id bigint PRIMARY KEY, person_id integer NOT NULL,
  observation_concept_id integer NOT NULL, observation_date date NOT NULL, observation_type_concept_id integer NOT NULL);
";

/// Generates a CDM of `persons` persons with `seed` into `schema` of the cluster's
/// `hospital` database (created here, readable by `medfl_reader`); returns the truth.
pub fn load_cdm(pg: &PgCluster, schema: &str, persons: usize, seed: u64, dir: &Path) -> Result<Vec<Truth>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut person = String::new();
    let mut periods = String::new();
    let mut conditions = String::new();
    let mut drugs = String::new();
    let mut measurements = String::new();
    let mut truth = Vec::with_capacity(persons);
    let (mut condition_id, mut drug_id, mut measurement_id) = (0u64, 0u64, 0u64);
    let day0 = 16_801; // 2016-01-01
    for p in 1..=persons as i64 {
        let female = rng.random_bool(0.5);
        let has_index = rng.random_bool(0.88);
        let index = day0 + rng.random_range(0..1461);
        let age = rng.random_range(35..86) as i64;
        let born = year_of(index) - age;
        let _ = writeln!(person, "{p},{},{born},,,0,0", if female { FEMALE } else { MALE });
        let start = index - rng.random_range(150..2600);
        let end = index + rng.random_range(150..2600);
        let _ = writeln!(periods, "{p},{p},{},{},{EHR}", date(start), date(end));
        let mut condition = |concept: i64, day: i64, out: &mut String| {
            condition_id += 1;
            let _ = writeln!(out, "{condition_id},{p},{concept},{},{EHR}", date(day));
        };
        if has_index {
            let concept = if rng.random_bool(0.5) {
                T2DM
            } else {
                T2DM_NO_COMPLICATION
            };
            condition(concept, index, &mut conditions);
            // A later T2DM record: the index is the first.
            condition(T2DM, index + rng.random_range(30..400), &mut conditions);
        }
        let hypertension = rng.random_bool(0.4);
        if hypertension {
            let concept = if rng.random_bool(0.5) {
                ESSENTIAL_HYPERTENSION
            } else {
                HYPERTENSIVE_DISORDER
            };
            condition(concept, index - rng.random_range(1..366), &mut conditions);
        } else if rng.random_bool(0.15) {
            // Hypertension long before the window: not the study's feature.
            condition(
                ESSENTIAL_HYPERTENSION,
                index - rng.random_range(400..1500),
                &mut conditions,
            );
        }
        let metformin = rng.random_bool(0.5);
        if metformin {
            drug_id += 1;
            let day = index - rng.random_range(0..366);
            let _ = writeln!(
                drugs,
                "{drug_id},{p},{METFORMIN_500_TABLET},{},{},{EHR}",
                date(day),
                date(day + 90)
            );
        }
        let mut hba1c = None;
        let roll: f64 = rng.random();
        let value = 7.5 + 1.2 * normal(&mut rng);
        if roll < 0.8 {
            measurement_id += 1;
            let day = index - rng.random_range(0..300);
            let _ = writeln!(
                measurements,
                "{measurement_id},{p},{HBA1C},{},{EHR},{value:.2},{PERCENT}",
                date(day)
            );
            hba1c = Some((value * 100.0).round() / 100.0);
            // An older value outside the window, and one earlier in it: the latest counts.
            measurement_id += 1;
            let _ = writeln!(
                measurements,
                "{measurement_id},{p},{HBA1C},{},{EHR},{:.2},{PERCENT}",
                date(index - 700),
                value + 2.0
            );
            measurement_id += 1;
            let _ = writeln!(
                measurements,
                "{measurement_id},{p},{HBA1C},{},{EHR},{:.2},{PERCENT}",
                date(day - 10),
                value - 1.5
            );
        } else if roll < 0.9 {
            // In another unit only: not the study's measurement.
            measurement_id += 1;
            let _ = writeln!(
                measurements,
                "{measurement_id},{p},{HBA1C},{},{EHR},{:.2},{GRAM_PER_DECILITER}",
                date(index - 20),
                value * 10.0
            );
        }
        let logit = true_logit(age as f64, hypertension, hba1c, metformin, female);
        let outcome = rng.random_bool(1.0 / (1.0 + (-logit).exp()));
        if outcome {
            let concept = if rng.random_bool(0.7) {
                ACUTE_MI
            } else {
                MYOCARDIAL_INFARCTION
            };
            condition(concept, index + rng.random_range(1..366), &mut conditions);
        }
        if rng.random_bool(0.1) {
            // An infarction before the index or after the window: not the label.
            let day = if rng.random_bool(0.5) {
                index - rng.random_range(30..1000)
            } else {
                index + rng.random_range(400..1200)
            };
            condition(ACUTE_MI, day, &mut conditions);
        }
        let included = has_index && start <= index - 365 && end >= index + 365;
        truth.push(Truth {
            person_id: p,
            included,
            logit,
            outcome,
        });
    }
    let concepts = [
        (T2DM, "Type 2 diabetes mellitus", "Condition"),
        (
            T2DM_NO_COMPLICATION,
            "Type 2 diabetes mellitus without complication",
            "Condition",
        ),
        (HYPERTENSIVE_DISORDER, "Hypertensive disorder", "Condition"),
        (ESSENTIAL_HYPERTENSION, "Essential hypertension", "Condition"),
        (METFORMIN, "metformin", "Drug"),
        (
            METFORMIN_500_TABLET,
            "metformin hydrochloride 500 MG Oral Tablet",
            "Drug",
        ),
        (HBA1C, "Hemoglobin A1c/Hemoglobin.total in Blood", "Measurement"),
        (PERCENT, "percent", "Unit"),
        (GRAM_PER_DECILITER, "gram per deciliter", "Unit"),
        (MYOCARDIAL_INFARCTION, "Myocardial infarction", "Condition"),
        (ACUTE_MI, "Acute myocardial infarction", "Condition"),
        (FEMALE, "FEMALE", "Gender"),
        (MALE, "MALE", "Gender"),
        (EHR, "EHR", "Type Concept"),
    ];
    let mut concept = String::new();
    for (id, name, domain) in concepts {
        let _ = writeln!(
            concept,
            "{id},\"{name}\",{domain},SNOMED,Clinical,S,{id},1970-01-01,2099-12-31,"
        );
    }
    let mut ancestor = String::new();
    for (id, _, _) in concepts {
        let _ = writeln!(ancestor, "{id},{id},0,0");
    }
    for (a, d) in [
        (T2DM, T2DM_NO_COMPLICATION),
        (HYPERTENSIVE_DISORDER, ESSENTIAL_HYPERTENSION),
        (METFORMIN, METFORMIN_500_TABLET),
        (MYOCARDIAL_INFARCTION, ACUTE_MI),
    ] {
        let _ = writeln!(ancestor, "{a},{d},1,1");
    }
    pg.psql(&format!("CREATE SCHEMA {schema}"))?;
    pg.psql(&TABLES.replace("{s}", schema))?;
    for (table, rows) in [
        ("concept", concept),
        ("concept_ancestor", ancestor),
        ("person", person),
        ("observation_period", periods),
        ("condition_occurrence", conditions),
        ("drug_exposure", drugs),
        ("measurement", measurements),
    ] {
        let file = dir.join(format!("{schema}-{table}.csv"));
        std::fs::write(&file, rows)?;
        pg.psql(&format!(
            "\\copy {schema}.{table} FROM '{}' WITH (FORMAT csv)",
            file.display()
        ))?;
    }
    pg.psql(&format!(
        "CREATE INDEX ON {schema}.condition_occurrence (person_id);
         CREATE INDEX ON {schema}.drug_exposure (person_id);
         CREATE INDEX ON {schema}.measurement (person_id);
         CREATE INDEX ON {schema}.observation_period (person_id);
         CREATE INDEX ON {schema}.concept_ancestor (ancestor_concept_id);
         ANALYZE;
         GRANT USAGE ON SCHEMA {schema} TO medfl_reader;
         GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO medfl_reader;"
    ))?;
    Ok(truth)
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut StdRng) -> f64 {
    let (u, v): (f64, f64) = (rng.random_range(f64::EPSILON..1.0), rng.random());
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
}

/// The study the OMOP tests run: MI within a year of the first T2DM diagnosis.
pub fn cohort_data_section(extra_feature: &str) -> String {
    format!(
        r#"[data]
dataset = "cdm"
label = "mi_within_a_year"
features = ["age", "female", "hypertension", "metformin", "hba1c"{extra_names}]

[data.omop]
index_concept_id = {T2DM}
prior_observation_days = 365
outcome_domain = "condition"
outcome_concept_id = {MYOCARDIAL_INFARCTION}
outcome_window = [1, 365]

[[data.omop.features]]
name = "age"
kind = "age"

[[data.omop.features]]
name = "female"
kind = "gender"
concept_id = {FEMALE}

[[data.omop.features]]
name = "hypertension"
kind = "present"
domain = "condition"
concept_id = {HYPERTENSIVE_DISORDER}
window = [-365, -1]

[[data.omop.features]]
name = "metformin"
kind = "present"
domain = "drug"
concept_id = {METFORMIN}
window = [-365, 0]

[[data.omop.features]]
name = "hba1c"
kind = "latest_value"
concept_id = {HBA1C}
unit_concept_id = {PERCENT}
window = [-365, 0]
{extra_feature}
"#,
        extra_names = if extra_feature.is_empty() {
            ""
        } else {
            ", \"unknown_marker\""
        },
    )
}
