//! The OMOP CDM v5.4 feature builder, over PostgreSQL: a study's `[data.omop]` (concept
//! ids and day windows, public) becomes one row per person, built by SQL the agent
//! writes itself against the CDM schema its own config names.
//!
//! - The index date is the first `condition_occurrence` of the index concept or any of
//!   its descendants (`concept_ancestor`), or a fixed date.
//! - A person is excluded, and counted by reason, without an index event, without
//!   `prior_observation_days` of observation before the index date, or without
//!   observation through the end of the outcome window (one `observation_period` must
//!   cover each span).
//! - The label is 1 when an event of the outcome concept (or a descendant) falls in the
//!   outcome window after the index date.
//! - Features: an event of a concept (or a descendant) present in a window; the latest
//!   `value_as_number` of a measurement concept in a unit within a window (missing when
//!   none: the dataset's `missing` policy applies); age at index; a gender concept.
//! - A concept id absent from the site's vocabulary (`concept`) is a warning, and its
//!   feature is all zero (not missing); `datasets check --manifest` shows the count.
//!
//! Every concept id, window and date is a bound parameter; only the schema names, which
//! are validated and quoted, are written into the statement.

use std::path::Path;

use medfl_shared::manifest::{OmopCohort, OmopDomain, OmopFeatureKind};
use serde::Deserialize;
use tokio_postgres::types::ToSql;

use super::postgres::{PostgresConnector, PostgresSource, block_on, valid_identifier};
use super::{Cell, DataError, RowRef, RowSink};

/// `[datasets.omop]`: the database and the CDM's schemas.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OmopSource {
    /// As for `[datasets.postgres]`, with no password in it.
    pub connection: String,
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
    /// The schema holding the CDM's clinical tables (`person`, `observation_period`,
    /// `condition_occurrence`, …).
    #[serde(default = "default_cdm")]
    pub cdm_schema: String,
    /// The schema holding `concept` and `concept_ancestor`; default `cdm_schema`.
    #[serde(default)]
    pub vocabulary_schema: Option<String>,
    #[serde(default = "default_timeout")]
    pub statement_timeout_secs: u64,
    #[serde(default = "default_fetch")]
    pub fetch_rows: u32,
    /// TLS to the database, as for `[datasets.postgres.tls]`.
    #[serde(default)]
    pub tls: Option<super::pg_tls::DatabaseTls>,
}

fn default_cdm() -> String {
    "cdm".into()
}

fn default_timeout() -> u64 {
    300
}

fn default_fetch() -> u32 {
    10_000
}

impl OmopSource {
    fn vocabulary(&self) -> &str {
        self.vocabulary_schema.as_deref().unwrap_or(&self.cdm_schema)
    }

    /// The connection as a PostgreSQL source (its `table` the CDM's `person`).
    pub(super) fn as_postgres(&self) -> PostgresSource {
        PostgresSource {
            connection: self.connection.clone(),
            password_file: self.password_file.clone(),
            password_env: self.password_env.clone(),
            table: Some(format!("{}.person", self.cdm_schema)),
            query: None,
            statement_timeout_secs: self.statement_timeout_secs,
            fetch_rows: self.fetch_rows,
            tls: self.tls.clone(),
        }
    }

    pub fn validate(&self, dataset: &str) -> Result<(), String> {
        for schema in [self.cdm_schema.as_str(), self.vocabulary()] {
            if !valid_identifier(schema) {
                return Err(format!(
                    "dataset {dataset:?}: schema {schema:?} is not a name of letters, digits and _"
                ));
            }
        }
        self.as_postgres().validate(dataset)
    }
}

/// What building a cohort found beside its rows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CohortReport {
    /// Persons left out, by reason.
    pub excluded: Vec<(String, usize)>,
    /// The study's concept ids this site's vocabulary does not have.
    pub absent_concepts: Vec<i64>,
}

/// An OMOP CDM in PostgreSQL.
pub struct OmopConnector {
    db: PostgresConnector,
    cdm: String,
    vocabulary: String,
}

impl OmopConnector {
    pub fn new(dataset: &str, source: &OmopSource, base: &Path) -> Result<Self, DataError> {
        source.validate(dataset).map_err(|reason| DataError::Unsupported {
            origin: format!("dataset {dataset:?}"),
            reason,
        })?;
        let db = PostgresConnector::new(dataset, &source.as_postgres(), base)?;
        let origin = format!("dataset {dataset:?} ({} OMOP CDM {})", db.database(), source.cdm_schema);
        Ok(OmopConnector {
            db: db.named(origin),
            cdm: format!("\"{}\"", source.cdm_schema),
            vocabulary: format!("\"{}\"", source.vocabulary()),
        })
    }

    pub fn origin(&self) -> &str {
        super::Connector::source(&self.db)
    }

    /// The number of persons and of observation periods, for `datasets check`.
    pub fn summary(&self) -> Result<(i64, i64), DataError> {
        let sql = format!(
            "SELECT (SELECT count(*) FROM {cdm}.person), (SELECT count(*) FROM {cdm}.observation_period)",
            cdm = self.cdm
        );
        block_on(async {
            let mut client = self.db.connect().await?;
            let tx = self.db.begin(&mut client).await?;
            let row = tx.query_one(&sql, &[]).await.map_err(|e| self.db.error(e))?;
            let counts = (
                row.try_get::<_, i64>(0).map_err(|e| self.db.error(e))?,
                row.try_get::<_, i64>(1).map_err(|e| self.db.error(e))?,
            );
            tx.commit().await.map_err(|e| self.db.error(e))?;
            Ok(counts)
        })
    }

    /// The cohort's column names as the encoder reads them: the label, `person_id`,
    /// then each feature.
    pub fn columns(cohort: &OmopCohort, label: &str) -> Vec<String> {
        let mut out = vec![label.to_string(), "person_id".to_string()];
        out.extend(cohort.features.iter().map(|f| f.name.clone()));
        out
    }

    /// Builds the cohort and streams one row per included person (label, person id,
    /// then `features` in their order) to `row`.
    pub fn scan_cohort(
        &self,
        cohort: &OmopCohort,
        features: &[String],
        row: &mut RowSink<'_>,
    ) -> Result<CohortReport, DataError> {
        block_on(self.scan_async(cohort, features, row))
    }

    async fn scan_async(
        &self,
        cohort: &OmopCohort,
        features: &[String],
        row: &mut RowSink<'_>,
    ) -> Result<CohortReport, DataError> {
        let mut client = self.db.connect().await?;
        let tx = self.db.begin(&mut client).await?;
        // Which of the study's concepts this site's vocabulary has.
        let ids = cohort.concept_ids();
        let present: Vec<i64> = tx
            .query(
                &format!(
                    "SELECT concept_id::bigint FROM {}.concept WHERE concept_id = ANY($1::bigint[])",
                    self.vocabulary
                ),
                &[&ids],
            )
            .await
            .map_err(|e| self.db.error(e))?
            .iter()
            .map(|r| r.try_get::<_, i64>(0))
            .collect::<Result<_, _>>()
            .map_err(|e| self.db.error(e))?;
        let absent: Vec<i64> = ids.iter().copied().filter(|id| !present.contains(id)).collect();
        for id in &absent {
            tracing::warn!(origin = %self.origin(), concept_id = id, "a study's concept is not in this site's vocabulary: its feature is all zero");
        }
        let mut sql = SqlBuilder::default();
        let statement = self.cohort_sql(cohort, features, &absent, &mut sql)?;
        let params: Vec<&(dyn ToSql + Sync)> = sql.params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
        let prepared = tx.prepare(&statement).await.map_err(|e| self.db.error(e))?;
        let portal = tx.bind(&prepared, &params).await.map_err(|e| self.db.error(e))?;
        let mut excluded: std::collections::BTreeMap<String, usize> = Default::default();
        let (mut at, fetch) = (0usize, self.db.fetch_rows());
        loop {
            let rows = tx.query_portal(&portal, fetch).await.map_err(|e| self.db.error(e))?;
            for r in &rows {
                let why: Option<&str> = r.try_get(0).map_err(|e| self.db.error(e))?;
                if let Some(why) = why {
                    *excluded.entry(why.to_string()).or_default() += 1;
                    continue;
                }
                at += 1;
                let mut cells = Vec::with_capacity(features.len() + 2);
                for i in 1..r.len() {
                    let v: Option<f64> = r.try_get(i).map_err(|e| self.db.error(e))?;
                    cells.push(v.map_or(Cell::Missing, Cell::Number));
                }
                row(RowRef::Row(at), &cells)?;
            }
            if rows.len() < fetch as usize {
                break;
            }
        }
        tx.commit().await.map_err(|e| self.db.error(e))?;
        Ok(CohortReport {
            excluded: excluded.into_iter().collect(),
            absent_concepts: absent,
        })
    }

    /// The cohort statement: `excluded` (a reason, or NULL), the label, the person id,
    /// then the features asked for.
    fn cohort_sql(
        &self,
        cohort: &OmopCohort,
        features: &[String],
        absent: &[i64],
        sql: &mut SqlBuilder,
    ) -> Result<String, DataError> {
        let (cdm, vocab) = (&self.cdm, &self.vocabulary);
        let index = match (&cohort.index_concept_id, &cohort.index_date) {
            (Some(concept), _) => {
                let concept = sql.bigint(*concept);
                format!(
                    "(SELECT min(co.condition_start_date) FROM {cdm}.condition_occurrence co
                       JOIN {vocab}.concept_ancestor ca ON ca.descendant_concept_id = co.condition_concept_id
                      WHERE ca.ancestor_concept_id = {concept} AND co.person_id = p.person_id)"
                )
            }
            (None, Some(date)) => format!("{}::date", sql.text(date)),
            (None, None) => unreachable!("validated: an index concept or date"),
        };
        let prior = sql.int(cohort.prior_observation_days as i32);
        let end = sql.int(cohort.outcome_window[1]);
        let exclusion = format!(
            "CASE
               WHEN c.index_date IS NULL THEN 'no index event'
               WHEN NOT EXISTS (SELECT 1 FROM {cdm}.observation_period op WHERE op.person_id = c.person_id
                      AND op.observation_period_start_date <= c.index_date - {prior}
                      AND op.observation_period_end_date >= c.index_date)
                 THEN 'under {days} days of observation before the index date'
               WHEN NOT EXISTS (SELECT 1 FROM {cdm}.observation_period op WHERE op.person_id = c.person_id
                      AND op.observation_period_start_date <= c.index_date
                      AND op.observation_period_end_date >= c.index_date + {end})
                 THEN 'not observed through the outcome window'
             END",
            days = cohort.prior_observation_days
        );
        let outcome = if absent.contains(&cohort.outcome_concept_id) {
            "0::float8".to_string()
        } else {
            format!(
                "(EXISTS {})::int::float8",
                self.event(
                    sql,
                    cohort.outcome_domain,
                    cohort.outcome_concept_id,
                    cohort.outcome_window
                )
            )
        };
        let mut columns = vec![exclusion, outcome, "c.person_id::float8".to_string()];
        for name in features {
            let feature = cohort
                .features
                .iter()
                .find(|f| &f.name == name)
                .ok_or_else(|| DataError::MissingColumn {
                    origin: self.origin().to_string(),
                    column: name.clone(),
                    columns: cohort
                        .features
                        .iter()
                        .map(|f| f.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
            let kind = feature.kind().map_err(|reason| DataError::Unsupported {
                origin: self.origin().to_string(),
                reason,
            })?;
            columns.push(match &kind {
                OmopFeatureKind::Present {
                    domain,
                    concept_id,
                    window,
                } if !absent.contains(concept_id) => {
                    format!(
                        "(EXISTS {})::int::float8",
                        self.event(sql, *domain, *concept_id, *window)
                    )
                }
                OmopFeatureKind::LatestValue {
                    concept_id,
                    unit_concept_id,
                    window,
                } if !absent.contains(concept_id) && !absent.contains(unit_concept_id) => {
                    let (concept, unit) = (sql.bigint(*concept_id), sql.bigint(*unit_concept_id));
                    let (lo, hi) = (sql.int(window[0]), sql.int(window[1]));
                    format!(
                        "(SELECT m.value_as_number::float8 FROM {cdm}.measurement m
                           JOIN {vocab}.concept_ancestor ca ON ca.descendant_concept_id = m.measurement_concept_id
                          WHERE ca.ancestor_concept_id = {concept} AND m.person_id = c.person_id
                            AND m.unit_concept_id = {unit} AND m.value_as_number IS NOT NULL
                            AND m.measurement_date BETWEEN c.index_date + {lo} AND c.index_date + {hi}
                          ORDER BY m.measurement_date DESC, m.measurement_id DESC LIMIT 1)"
                    )
                }
                OmopFeatureKind::Age => "(EXTRACT(YEAR FROM c.index_date) - c.year_of_birth)::float8".to_string(),
                OmopFeatureKind::Gender { concept_id } if !absent.contains(concept_id) => {
                    format!("(c.gender_concept_id = {})::int::float8", sql.bigint(*concept_id))
                }
                // A concept this site's vocabulary lacks: all zero, with a warning.
                _ => "0::float8".to_string(),
            });
        }
        Ok(format!(
            "WITH c AS (SELECT p.person_id, p.year_of_birth, p.gender_concept_id, {index} AS index_date
                          FROM {cdm}.person p)
             SELECT {} FROM c ORDER BY c.person_id",
            columns.join(",\n       ")
        ))
    }

    /// `(SELECT 1 …)`: an event of `concept` (or a descendant) in `domain` within
    /// `window` days of the person's index date.
    fn event(&self, sql: &mut SqlBuilder, domain: OmopDomain, concept: i64, window: [i32; 2]) -> String {
        let (table, concept_column, date_column) = domain.table();
        let (cdm, vocab) = (&self.cdm, &self.vocabulary);
        let (concept, lo, hi) = (sql.bigint(concept), sql.int(window[0]), sql.int(window[1]));
        format!(
            "(SELECT 1 FROM {cdm}.{table} e
                JOIN {vocab}.concept_ancestor ca ON ca.descendant_concept_id = e.{concept_column}
               WHERE ca.ancestor_concept_id = {concept} AND e.person_id = c.person_id
                 AND e.{date_column} BETWEEN c.index_date + {lo} AND c.index_date + {hi})"
        )
    }
}

/// Bound parameters of a statement being written: each call returns its placeholder.
#[derive(Default)]
struct SqlBuilder {
    params: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl SqlBuilder {
    fn bigint(&mut self, v: i64) -> String {
        self.params.push(Box::new(v));
        format!("${}::bigint", self.params.len())
    }

    fn int(&mut self, v: i32) -> String {
        self.params.push(Box::new(v));
        format!("${}::integer", self.params.len())
    }

    fn text(&mut self, v: &str) -> String {
        self.params.push(Box::new(v.to_string()));
        format!("${}::text", self.params.len())
    }
}
