//! Datasets: where a hospital's rows live (a [`Connector`] per kind of source) and how
//! a study's schema turns them into model inputs (the [`Encoder`]).
//!
//! A connector only reads: it names its columns with their types and streams the
//! columns a study asks for, row by row, as [`Cell`]s. The encoder is the same for
//! every connector: it maps the label to a class, each feature to its inputs (a number,
//! a date as days since an origin, a category one-hot in the manifest's order), applies
//! the dataset's policies for missing values and unknown categories, checks that no
//! person appears twice, and counts every row it leaves out by reason. Rows stream into
//! the training matrix: no connector holds a second copy of the table.
//!
//! Missing values are SQL NULLs and, in text sources, empty cells and `NA`, `NaN`, `?`
//! (any case). A row whose label is missing is always dropped (a label cannot be
//! imputed). For features, the dataset's `missing` setting decides: `drop` (the default)
//! drops the row, `impute_mean` fills a numeric input with the mean of the rows that
//! have a value (a categorical feature's inputs stay all zero).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use medfl_shared::manifest::{DataSchema, FeatureKind};
use serde::Deserialize;
use thiserror::Error;

pub mod csv;
pub mod dicom;
pub mod images;
pub mod omop;
pub mod parquet;
pub mod pg_tls;
pub mod postgres;
pub mod query;

pub use csv::parse_csv;

/// Which columns a dataset exposes as features when a study does not say (the
/// `datasets check` view and the demo).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum FeatureSelection {
    /// `"all_numeric"`: every column except the label and the person id whose type is
    /// numeric or boolean; `datasets check` names each column it leaves out and why.
    Keyword(AllNumeric),
    /// An explicit list.
    Columns(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AllNumeric {
    AllNumeric,
}

impl Default for FeatureSelection {
    fn default() -> Self {
        FeatureSelection::Keyword(AllNumeric::AllNumeric)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingPolicy {
    #[default]
    Drop,
    ImputeMean,
}

/// What to do with a category (or a label) that the study's manifest does not list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownCategory {
    /// Stop with an error naming the column and the row.
    #[default]
    Error,
    /// Leave the row out (counted in `datasets check` and the agent's log).
    Drop,
}

/// One `[[datasets]]` entry of the agent's config: its source (`path` to a CSV file, or
/// `[datasets.postgres]`), its label and person id, and its policies.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// Name under which the dataset is offered to studies.
    pub name: String,
    /// A CSV file, or a Parquet file (`.parquet`), relative to agent.toml.
    #[serde(default)]
    pub path: PathBuf,
    /// A PostgreSQL table or query instead of a file.
    #[serde(default)]
    pub postgres: Option<postgres::PostgresSource>,
    /// An OMOP CDM in PostgreSQL, read through a study's `[data.omop]`.
    #[serde(default)]
    pub omop: Option<omop::OmopSource>,
    /// A folder of images with a labels CSV, read through a study's `[data.image]`.
    #[serde(default)]
    pub images: Option<images::ImagesSource>,
    /// The label column (an OMOP dataset has none: its study defines the label).
    #[serde(default)]
    pub label: String,
    /// The person id column: the privacy unit. Never a feature; a person with several
    /// rows is refused (aggregate the rows per person first). Without it every row is
    /// taken to be a different person, which `datasets check` warns about.
    #[serde(default, alias = "id_column")]
    pub person_id: Option<String>,
    #[serde(default)]
    pub features: FeatureSelection,
    #[serde(default)]
    pub missing: MissingPolicy,
    #[serde(default)]
    pub unknown_category: UnknownCategory,
    /// This dataset's ε cap across all studies; defaults to `policy.max_epsilon`.
    #[serde(default)]
    pub max_epsilon: Option<f64>,
    /// The privacy ledger this dataset spends: datasets that hold the same patients
    /// must share one, so that together they cannot spend more than one budget. By
    /// default a file is its own ledger (its dataset's name) and every table, query and
    /// OMOP builder over one database share the database's (`postgresql://host:port/db`).
    #[serde(default)]
    pub ledger: Option<String>,
}

impl DatasetConfig {
    /// A CSV dataset with the defaults (all numeric features, rows with holes dropped).
    pub fn csv(name: &str, path: impl Into<PathBuf>, label: &str, person_id: Option<&str>) -> Self {
        DatasetConfig {
            name: name.into(),
            path: path.into(),
            postgres: None,
            omop: None,
            images: None,
            label: label.into(),
            person_id: person_id.map(Into::into),
            features: FeatureSelection::default(),
            missing: MissingPolicy::Drop,
            unknown_category: UnknownCategory::Error,
            max_epsilon: None,
            ledger: None,
        }
    }

    /// The ledger this dataset's charges go to (see [`DatasetConfig::ledger`]).
    pub fn ledger_name(&self) -> String {
        if let Some(ledger) = &self.ledger {
            return ledger.clone();
        }
        let connection = match (&self.postgres, &self.omop) {
            (Some(pg), _) => &pg.connection,
            (_, Some(omop)) => &omop.connection,
            _ => return self.name.clone(),
        };
        match <tokio_postgres::Config as std::str::FromStr>::from_str(connection) {
            Ok(config) => postgres::ledger_name(&config),
            Err(_) => self.name.clone(),
        }
    }

    /// Whether the dataset is a file (a trainer can be given its path).
    pub fn is_file(&self) -> bool {
        self.postgres.is_none() && self.omop.is_none() && self.images.is_none()
    }

    /// Checks the entry itself (one source, names present); reading comes later.
    pub fn validate(&self) -> Result<(), String> {
        let has_path = !self.path.as_os_str().is_empty();
        let sources = usize::from(has_path)
            + usize::from(self.postgres.is_some())
            + usize::from(self.omop.is_some())
            + usize::from(self.images.is_some());
        if sources != 1 {
            return Err(format!(
                "dataset {:?}: give one source: `path` (a CSV or Parquet file), [datasets.postgres], [datasets.omop] or [datasets.images]",
                self.name
            ));
        }
        if self.omop.is_none() && self.label.is_empty() {
            return Err(format!("dataset {:?}: name its `label` column", self.name));
        }
        match (&self.postgres, &self.omop, &self.images) {
            (Some(pg), _, _) => pg.validate(&self.name),
            (_, Some(omop), _) => omop.validate(&self.name),
            (_, _, Some(images)) => images.validate(&self.name),
            _ => Ok(()),
        }
    }
}

/// A column's type as its source declares it (PostgreSQL) or as it reads (CSV).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    Integer,
    Float,
    /// PostgreSQL `numeric` (read as a float).
    Decimal,
    Boolean,
    Text,
    Date,
    Timestamp,
    /// A type medfl does not read (arrays, JSON, …): refused by name when a study or
    /// the dataset's features ask for it.
    Unsupported,
}

impl ColumnType {
    pub fn name(self) -> &'static str {
        match self {
            ColumnType::Integer => "integer",
            ColumnType::Float => "float",
            ColumnType::Decimal => "numeric",
            ColumnType::Boolean => "boolean",
            ColumnType::Text => "text",
            ColumnType::Date => "date",
            ColumnType::Timestamp => "timestamp",
            ColumnType::Unsupported => "unsupported",
        }
    }

    /// Whether `all_numeric` takes it as a feature.
    pub fn is_numeric(self) -> bool {
        matches!(
            self,
            ColumnType::Integer | ColumnType::Float | ColumnType::Decimal | ColumnType::Boolean
        )
    }
}

/// One cell as a connector hands it over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cell<'a> {
    Missing,
    Number(f64),
    Bool(bool),
    Text(&'a str),
    /// A date or timestamp: days (fractional for a time of day) since 1970-01-01.
    Days(f64),
}

/// Where a row is, for error messages: a CSV line or a database row (1-based, in the
/// person-id order it was read in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowRef {
    Line(usize),
    Row(usize),
}

impl std::fmt::Display for RowRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RowRef::Line(n) => write!(f, "line {n}"),
            RowRef::Row(n) => write!(f, "row {n}"),
        }
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DataError {
    #[error("{origin}: cannot read: {reason}")]
    Read { origin: String, reason: String },
    #[error("{origin}: cannot connect: {reason}")]
    Connect { origin: String, reason: String },
    #[error("{origin}: the statement ran past its timeout of {secs} s")]
    Timeout { origin: String, secs: u64 },
    #[error("{origin}: the file is empty (no header line)")]
    Empty { origin: String },
    #[error("{origin}: the header names no columns")]
    NoColumns { origin: String },
    #[error("{origin}: column {column:?} is missing (columns: {columns})")]
    MissingColumn {
        origin: String,
        column: String,
        columns: String,
    },
    #[error("{origin}: {row} has {got} fields, the header has {want}")]
    RowLength {
        origin: String,
        row: RowRef,
        got: usize,
        want: usize,
    },
    #[error("{origin}: {row}, column {column:?}: {value:?} is not a number")]
    NotNumeric {
        origin: String,
        row: RowRef,
        column: String,
        value: String,
    },
    #[error("{origin}: {row}, column {column:?}: {value:?} is not a date (YYYY-MM-DD)")]
    NotDate {
        origin: String,
        row: RowRef,
        column: String,
        value: String,
    },
    #[error("{origin}: column {column:?} is {kind}; {hint}")]
    WrongType {
        origin: String,
        column: String,
        kind: String,
        hint: String,
    },
    #[error("{origin}: {row}, label column {column:?}: {value:?} is not 0 or 1")]
    BadLabel {
        origin: String,
        row: RowRef,
        column: String,
        value: String,
    },
    /// `what` is the manifest's list: `categories (I, II, III)` or `classes (…)`.
    #[error("{origin}: {row}, column {column:?}: {value:?} is not one of the manifest's {what}")]
    UnknownCategory {
        origin: String,
        row: RowRef,
        column: String,
        value: String,
        what: String,
    },
    #[error("{origin}: {row}: unterminated quoted field")]
    Quote { origin: String, row: RowRef },
    #[error(
        "{origin}: {persons} {} more than one row ({rows} rows in all) in person id column {column:?}; medfl's privacy unit is the person: give one row per person",
        if *.persons == 1 { "person has" } else { "persons have" }
    )]
    RepeatedPersons {
        origin: String,
        column: String,
        persons: usize,
        rows: usize,
    },
    #[error("{origin}: no usable rows ({})", dropped_text(.dropped))]
    NoRows {
        origin: String,
        dropped: Vec<(String, usize)>,
    },
    #[error("{origin}: {reason}")]
    Unsupported { origin: String, reason: String },
    #[error("{origin}: {file} {reason}")]
    Image {
        origin: String,
        file: String,
        reason: String,
    },
}

fn dropped_text(dropped: &[(String, usize)]) -> String {
    if dropped.is_empty() {
        return "the source has none".into();
    }
    let parts: Vec<String> = dropped.iter().map(|(why, n)| format!("{n} dropped: {why}")).collect();
    parts.join(", ")
}

impl DataError {
    /// The kind of fault alone, for a refusal the coordinator sees: no value, row,
    /// path or count (DESIGN: what a refusal may say). Column names are the study's.
    pub fn kind(&self) -> String {
        match self {
            DataError::Read { .. } => "the data source cannot be read".into(),
            DataError::Connect { .. } => "the database cannot be reached or refused the site's login".into(),
            DataError::Timeout { .. } => "the database statement ran past its timeout".into(),
            DataError::Empty { .. } | DataError::NoColumns { .. } => "the data source is empty".into(),
            DataError::MissingColumn { column, .. } => format!("the dataset has no column {column:?}"),
            DataError::RowLength { .. } | DataError::Quote { .. } => "the data file is malformed".into(),
            DataError::NotNumeric { column, .. } => format!("column {column:?} holds a value that is not a number"),
            DataError::NotDate { column, .. } => format!("column {column:?} holds a value that is not a date"),
            DataError::WrongType { column, .. } => format!("column {column:?} does not have the type the study needs"),
            DataError::BadLabel { column, .. } => format!("label column {column:?} holds a value that is not 0 or 1"),
            DataError::UnknownCategory { column, what, .. } => {
                let list = what.split(' ').next().unwrap_or("categories");
                format!("column {column:?} holds a value that is not one of the manifest's {list}")
            }
            DataError::RepeatedPersons { .. } => "a person has more than one row".into(),
            DataError::NoRows { .. } => "no usable rows".into(),
            DataError::Unsupported { .. } => "the data source has a column type medfl cannot read".into(),
            DataError::Image { .. } => "an image of the dataset cannot be used".into(),
        }
    }
}

/// Where a connector sends each row: its place and its cells, in the order asked for.
pub type RowSink<'a> = dyn FnMut(RowRef, &[Cell<'_>]) -> Result<(), DataError> + Send + 'a;

/// A source of rows: a CSV file, a PostgreSQL table or query.
pub trait Connector: Send + Sync + std::any::Any {
    /// The connector as `Any`, to reach a kind's own checks (`datasets check`).
    fn as_any(&self) -> &dyn std::any::Any;
    /// How the source is named in messages (the dataset and its file or database,
    /// with no password).
    fn source(&self) -> &str;
    /// The columns the source offers, with their types.
    fn columns(&self) -> Result<Vec<(String, ColumnType)>, DataError>;
    /// Streams the `wanted` columns of every row, in order (by person id where the
    /// source can sort), to `row`; stops at the first error either side returns.
    fn scan(&self, wanted: &[String], row: &mut RowSink<'_>) -> Result<(), DataError>;
    /// How many rows a scan will send, when the source knows it cheaply (Parquet's
    /// footer): the matrix is then allocated once, at its size.
    fn rows_hint(&self) -> Option<usize> {
        None
    }
}

/// A configured dataset: its entry and its connector.
pub struct Dataset {
    pub config: DatasetConfig,
    /// The source's rows (for an OMOP dataset, its `person` table).
    pub connector: Box<dyn Connector>,
    /// The OMOP builder, for an OMOP dataset.
    pub omop: Option<omop::OmopConnector>,
    /// The source's columns as last read (empty until then, or when the source could
    /// not be reached).
    pub columns: Vec<(String, ColumnType)>,
    /// An image dataset's folder (resolved), whose labels CSV is the connector.
    pub images: Option<PathBuf>,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("name", &self.config.name)
            .field("source", &self.connector.source())
            .finish()
    }
}

/// What a study's schema made of a dataset: inputs row-major, labels (0/1 or class
/// indices), and the rows left out by reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub inputs: Vec<String>,
    pub x: Vec<f32>,
    pub y: Vec<f32>,
    /// Each row's person (an index), where a person may have several rows (an image
    /// dataset's patients); empty when every row is its own person.
    pub persons: Vec<u32>,
    pub dropped: Vec<(String, usize)>,
    /// Rows read from the source.
    pub read: usize,
    /// What the agent's log and `datasets check` should say (e.g. concepts absent from
    /// an OMOP site's vocabulary).
    pub warnings: Vec<String>,
}

impl Encoded {
    pub fn rows(&self) -> usize {
        self.y.len()
    }

    /// The encoded rows as a [`Table`] named `name`.
    pub fn into_table(self, name: &str) -> Table {
        Table {
            name: name.into(),
            dropped: self.dropped.iter().map(|(_, n)| n).sum(),
            columns: self.inputs,
            x: self.x,
            y: self.y,
        }
    }
}

impl Dataset {
    /// Opens a dataset's source; `base` resolves a relative path. Nothing is read yet
    /// but what the source needs to name its columns (a CSV header; a database is
    /// reached at the first read).
    pub fn open(config: DatasetConfig, base: &Path) -> Result<Dataset, DataError> {
        if let Err(reason) = config.validate() {
            return Err(DataError::Unsupported {
                origin: format!("dataset {:?}", config.name),
                reason,
            });
        }
        let mut omop = None;
        let images = config.images.as_ref().map(|i| base.join(&i.folder));
        let connector: Box<dyn Connector> = match (&config.postgres, &config.omop) {
            (None, None) if let (Some(folder), Some(source)) = (&images, &config.images) => {
                Box::new(csv::CsvConnector::new(&config.name, &folder.join(&source.labels)))
            }
            (Some(pg), _) => Box::new(postgres::PostgresConnector::new(&config.name, pg, base)?),
            (None, Some(source)) => {
                let builder = omop::OmopConnector::new(&config.name, source, base)?;
                let person = postgres::PostgresConnector::new(&config.name, &source.as_postgres(), base)?
                    .named(builder.origin().to_string());
                omop = Some(builder);
                Box::new(person)
            }
            (None, None)
                if config
                    .path
                    .extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("parquet")) =>
            {
                Box::new(parquet::ParquetConnector::new(&config.name, &base.join(&config.path)))
            }
            (None, None) => Box::new(csv::CsvConnector::new(&config.name, &base.join(&config.path))),
        };
        Ok(Dataset {
            config,
            connector,
            omop,
            columns: Vec::new(),
            images,
        })
    }

    /// The PostgreSQL connector, for checks only it can make.
    pub fn postgres_connector(&self) -> Option<&postgres::PostgresConnector> {
        self.connector.as_any().downcast_ref()
    }

    /// Reads the source's columns and checks that the label and the person id are
    /// among them.
    pub fn read_columns(&self) -> Result<Vec<(String, ColumnType)>, DataError> {
        let columns = self.connector.columns()?;
        if self.omop.is_some() {
            return Ok(columns);
        }
        let names = || columns.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>().join(", ");
        for needed in std::iter::once(&self.config.label).chain(self.config.person_id.as_ref()) {
            if !columns.iter().any(|(c, _)| c == needed) {
                return Err(DataError::MissingColumn {
                    origin: self.connector.source().to_string(),
                    column: needed.clone(),
                    columns: names(),
                });
            }
        }
        Ok(columns)
    }

    /// The schema `datasets check` and the demo use when no study names one: the
    /// configured label (0/1), the `features` selection (for `all_numeric`, every
    /// numeric or boolean column but the label and person id), and the columns left
    /// out with the reason.
    pub fn default_schema(&self) -> Result<(DataSchema, Vec<(String, String)>), DataError> {
        let cfg = &self.config;
        let columns = self.connector.columns()?;
        let mut left_out = Vec::new();
        let features = match &cfg.features {
            FeatureSelection::Columns(names) => names.clone(),
            FeatureSelection::Keyword(_) => {
                let mut features = Vec::new();
                for (name, ty) in &columns {
                    if name == &cfg.label {
                        continue;
                    }
                    if Some(name) == cfg.person_id.as_ref() {
                        left_out.push((name.clone(), "the person id".to_string()));
                    } else if ty.is_numeric() {
                        features.push(name.clone());
                    } else if *ty == ColumnType::Unsupported {
                        left_out.push((name.clone(), "a type medfl does not read".to_string()));
                    } else {
                        let how = if matches!(ty, ColumnType::Date | ColumnType::Timestamp) {
                            "data.dates (with an origin)"
                        } else {
                            "data.categorical (with its categories)"
                        };
                        left_out.push((
                            name.clone(),
                            format!("{} values: a study uses it by listing it in {how}", ty.name()),
                        ));
                    }
                }
                features
            }
        };
        let schema = DataSchema {
            dataset: cfg.name.clone(),
            label: cfg.label.clone(),
            classes: Vec::new(),
            features,
            categorical: Vec::new(),
            dates: Vec::new(),
            omop: None,
            scaling: None,
            image: None,
        };
        Ok((schema, left_out))
    }

    /// Reads the rows a study's schema needs and encodes them.
    pub fn encode(&self, schema: &DataSchema) -> Result<Encoded, DataError> {
        match (&schema.image, &self.images, &self.config.images) {
            (Some(spec), Some(folder), Some(source)) => {
                return images::encode(self, source, folder, schema, spec);
            }
            (Some(_), _, _) => {
                return Err(DataError::Unsupported {
                    origin: self.connector.source().to_string(),
                    reason:
                        "the study reads images ([data.image]); this dataset is not an image folder ([datasets.images])"
                            .into(),
                });
            }
            (None, Some(_), _) => {
                return Err(DataError::Unsupported {
                    origin: self.connector.source().to_string(),
                    reason: "an image folder is read through a study's [data.image] (size, channels, normalisation)"
                        .into(),
                });
            }
            _ => {}
        }
        match (&schema.omop, &self.omop) {
            (Some(cohort), Some(builder)) => return self.encode_omop(cohort, builder, schema),
            (Some(_), None) => {
                return Err(DataError::Unsupported {
                    origin: self.connector.source().to_string(),
                    reason: "the study builds its rows from an OMOP CDM ([data.omop]); this dataset is not one".into(),
                });
            }
            (None, Some(_)) => {
                return Err(DataError::Unsupported {
                    origin: self.connector.source().to_string(),
                    reason: "an OMOP CDM is read through a study's [data.omop] (concept ids and windows)".into(),
                });
            }
            (None, None) => {}
        }
        let columns = self.connector.columns()?;
        let mut encoder = Encoder::new(&self.config, self.connector.source(), schema, &columns)?;
        if let Some(rows) = self.connector.rows_hint() {
            encoder.reserve(rows);
        }
        let wanted = encoder.wanted.clone();
        self.connector.scan(&wanted, &mut |at, cells| encoder.push(at, cells))?;
        encoder.finish()
    }

    /// An OMOP study's cohort: one row per included person, the exclusions counted by
    /// reason among the dropped rows.
    fn encode_omop(
        &self,
        cohort: &medfl_shared::manifest::OmopCohort,
        builder: &omop::OmopConnector,
        schema: &DataSchema,
    ) -> Result<Encoded, DataError> {
        let names = omop::OmopConnector::columns(cohort, &schema.label);
        let columns: Vec<(String, ColumnType)> = names.iter().map(|n| (n.clone(), ColumnType::Float)).collect();
        let mut config = self.config.clone();
        config.person_id = Some("person_id".into());
        let mut encoder = Encoder::new(&config, builder.origin(), schema, &columns)?;
        let report = builder.scan_cohort(cohort, &schema.features, &mut |at, cells| encoder.push(at, cells))?;
        let excluded: usize = report.excluded.iter().map(|(_, n)| n).sum();
        let mut encoded = match encoder.finish() {
            Err(DataError::NoRows { origin, mut dropped }) => {
                dropped.extend(report.excluded.iter().map(|(why, n)| (format!("excluded: {why}"), *n)));
                return Err(DataError::NoRows { origin, dropped });
            }
            other => other?,
        };
        encoded.read += excluded;
        encoded.dropped.extend(
            report
                .excluded
                .into_iter()
                .map(|(why, n)| (format!("excluded: {why}"), n)),
        );
        encoded.warnings.extend(
            report
                .absent_concepts
                .iter()
                .map(|id| format!("concept {id} is not in this site's vocabulary: its feature is all zero")),
        );
        Ok(encoded)
    }

    /// The all-numeric view ([`Dataset::default_schema`]) as a [`Table`].
    pub fn load_default(&self) -> Result<Table, DataError> {
        let (schema, _) = self.default_schema()?;
        Ok(self.encode(&schema)?.into_table(&self.config.name))
    }
}

/// How one feature column becomes inputs.
#[derive(Debug)]
enum Input {
    Numeric,
    Date(f64),
    Categorical(HashMap<String, usize>, usize, String),
}

/// What one cell did to its row.
enum CellOutcome {
    Value,
    /// Missing: the input's index in the row (a number), or none (a categorical's
    /// inputs stay zero).
    Missing(Option<usize>),
    /// A category the manifest does not list, under `unknown_category = "drop"`.
    Unknown,
}

/// Maps rows to the inputs and labels of a study's schema; see the module docs.
#[derive(Debug)]
pub struct Encoder {
    origin: String,
    /// The columns to read, in the order `push` receives them: label, person id (if
    /// any), then the features.
    pub wanted: Vec<String>,
    label: String,
    classes: Option<(HashMap<String, usize>, String)>,
    person: bool,
    person_column: String,
    features: Vec<(String, Input)>,
    width: usize,
    missing: MissingPolicy,
    unknown: UnknownCategory,
    x: Vec<f32>,
    y: Vec<f32>,
    /// One row's inputs while it is encoded (reused).
    scratch: Vec<f32>,
    holes: Vec<(usize, usize)>,
    /// Each person id seen, as a 128-bit fingerprint (two keyed SipHash-1-3 halves):
    /// 16 bytes a person, not a string; two different ids collide with probability
    /// about n²/2¹²⁹, far below anything a dataset meets.
    persons: HashSet<u128>,
    repeated: HashMap<u128, usize>,
    /// An image dataset's patients may have several images: set, repeated person ids
    /// are allowed and each kept row's person index is recorded instead (DP-SGD then
    /// samples and clips per person).
    allow_repeated: bool,
    person_index: HashMap<u128, u32>,
    row_persons: Vec<u32>,
    dropped: BTreeMap<&'static str, usize>,
    read: usize,
}

/// A person id's fingerprint: its canonical text (numbers as [`number_text`] would
/// write them, without building the string) hashed twice with fixed, distinct keys.
fn fingerprint(cell: Cell<'_>) -> u128 {
    use std::hash::{Hash, Hasher};
    let half = |key: u8| {
        let mut h = std::hash::DefaultHasher::new();
        key.hash(&mut h);
        match cell {
            Cell::Number(v) | Cell::Days(v) if v.fract() == 0.0 && v.abs() < 1e15 => (v as i64).hash(&mut h),
            Cell::Number(v) | Cell::Days(v) => v.to_bits().hash(&mut h),
            Cell::Text(t) => t.trim().hash(&mut h),
            Cell::Bool(b) => b.hash(&mut h),
            Cell::Missing => 0u8.hash(&mut h),
        }
        h.finish()
    };
    (u128::from(half(1)) << 64) | u128::from(half(2))
}

/// A number's canonical text: integers without a fraction (`3`, not `3.0`), so a
/// numeric column can match a manifest's category or class names.
fn number_text(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

impl Encoder {
    pub fn new(
        cfg: &DatasetConfig,
        origin: &str,
        schema: &DataSchema,
        columns: &[(String, ColumnType)],
    ) -> Result<Encoder, DataError> {
        let type_of = |name: &str| -> Result<ColumnType, DataError> {
            columns
                .iter()
                .find(|(c, _)| c == name)
                .map(|(_, t)| *t)
                .ok_or_else(|| DataError::MissingColumn {
                    origin: origin.to_string(),
                    column: name.to_string(),
                    columns: columns.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>().join(", "),
                })
        };
        type_of(&schema.label)?;
        let mut wanted = vec![schema.label.clone()];
        if let Some(p) = &cfg.person_id {
            type_of(p)?;
            wanted.push(p.clone());
        }
        let mut features = Vec::new();
        let mut width = 0;
        for f in &schema.features {
            let ty = type_of(f)?;
            let wrong = |kind: &str, hint: &str| DataError::WrongType {
                origin: origin.to_string(),
                column: f.clone(),
                kind: kind.to_string(),
                hint: hint.to_string(),
            };
            let input = match schema.feature_kind(f) {
                FeatureKind::Numeric => {
                    match ty {
                        ColumnType::Date | ColumnType::Timestamp => {
                            return Err(wrong(
                                "a date",
                                "list it in the study's data.dates with an origin to use it as days",
                            ));
                        }
                        ColumnType::Text if cfg.postgres.is_some() => {
                            return Err(wrong(
                                "text",
                                "list it in the study's data.categorical with its categories",
                            ));
                        }
                        _ => {}
                    }
                    width += 1;
                    Input::Numeric
                }
                FeatureKind::Date(origin) => {
                    if ty.is_numeric() {
                        return Err(wrong(ty.name(), "data.dates needs a date or timestamp column"));
                    }
                    width += 1;
                    Input::Date(origin as f64)
                }
                FeatureKind::Categorical(cats) => {
                    width += cats.len();
                    Input::Categorical(
                        cats.iter().enumerate().map(|(i, c)| (c.clone(), i)).collect(),
                        cats.len(),
                        cats.join(", "),
                    )
                }
            };
            wanted.push(f.clone());
            features.push((f.clone(), input));
        }
        let classes = (!schema.classes.is_empty()).then(|| {
            (
                schema.classes.iter().enumerate().map(|(i, c)| (c.clone(), i)).collect(),
                schema.classes.join(", "),
            )
        });
        Ok(Encoder {
            origin: origin.to_string(),
            wanted,
            label: schema.label.clone(),
            classes,
            person: cfg.person_id.is_some(),
            person_column: cfg.person_id.clone().unwrap_or_default(),
            features,
            width,
            missing: cfg.missing,
            unknown: cfg.unknown_category,
            x: Vec::new(),
            y: Vec::new(),
            scratch: Vec::new(),
            holes: Vec::new(),
            persons: HashSet::new(),
            repeated: HashMap::new(),
            allow_repeated: false,
            person_index: HashMap::new(),
            row_persons: Vec::new(),
            dropped: BTreeMap::new(),
            read: 0,
        })
    }

    fn number(&self, at: RowRef, column: &str, cell: Cell<'_>) -> Result<f64, DataError> {
        let bad = |value: String| DataError::NotNumeric {
            origin: self.origin.clone(),
            row: at,
            column: column.to_string(),
            value,
        };
        match cell {
            Cell::Number(v) if v.is_finite() => Ok(v),
            Cell::Number(v) => Err(bad(v.to_string())),
            Cell::Bool(b) => Ok(f64::from(u8::from(b))),
            Cell::Text(t) => {
                let t = t.trim();
                match t.parse::<f64>() {
                    Ok(v) if v.is_finite() => Ok(v),
                    _ if t.eq_ignore_ascii_case("true") => Ok(1.0),
                    _ if t.eq_ignore_ascii_case("false") => Ok(0.0),
                    _ => Err(bad(t.to_string())),
                }
            }
            Cell::Days(d) => Ok(d),
            Cell::Missing => Ok(0.0),
        }
    }

    fn key(cell: Cell<'_>) -> String {
        match cell {
            Cell::Number(v) => number_text(v),
            Cell::Bool(b) => b.to_string(),
            Cell::Text(t) => t.trim().to_string(),
            Cell::Days(d) => number_text(d),
            Cell::Missing => String::new(),
        }
    }

    fn drop_row(&mut self, why: &'static str) {
        *self.dropped.entry(why).or_default() += 1;
    }

    /// Appends one feature's inputs for `cell` to `values`.
    fn encode_cell(
        &self,
        at: RowRef,
        column: &str,
        input: &Input,
        cell: Cell<'_>,
        values: &mut Vec<f32>,
    ) -> Result<CellOutcome, DataError> {
        let not_date = |value: String| DataError::NotDate {
            origin: self.origin.clone(),
            row: at,
            column: column.to_string(),
            value,
        };
        let value = match (input, cell) {
            (Input::Categorical(map, n, listed), cell) => {
                let offset = values.len();
                values.extend(std::iter::repeat_n(0.0, *n));
                if cell == Cell::Missing {
                    return Ok(CellOutcome::Missing(None));
                }
                return match map.get(&Self::key(cell)) {
                    Some(i) => {
                        values[offset + i] = 1.0;
                        Ok(CellOutcome::Value)
                    }
                    None if self.unknown == UnknownCategory::Drop => Ok(CellOutcome::Unknown),
                    None => Err(DataError::UnknownCategory {
                        origin: self.origin.clone(),
                        row: at,
                        column: column.to_string(),
                        value: Self::key(cell),
                        what: format!("categories ({listed})"),
                    }),
                };
            }
            (_, Cell::Missing) => {
                values.push(0.0);
                return Ok(CellOutcome::Missing(Some(values.len() - 1)));
            }
            (Input::Date(origin), Cell::Text(t)) => {
                parse_days(t).ok_or_else(|| not_date(t.trim().to_string()))? - origin
            }
            (Input::Date(origin), Cell::Days(d)) => d - origin,
            (Input::Date(_), cell) => return Err(not_date(Self::key(cell))),
            (Input::Numeric, cell) => self.number(at, column, cell)?,
        };
        values.push(value as f32);
        Ok(CellOutcome::Value)
    }

    /// Makes room for `rows` rows at once (no reallocation, no transient second copy).
    pub fn reserve(&mut self, rows: usize) {
        self.x.reserve_exact(rows.saturating_mul(self.width));
        self.y.reserve_exact(rows);
        if self.person {
            self.persons.reserve(rows);
        }
    }

    /// Takes one row: `cells` in the order of [`Encoder::wanted`].
    pub fn push(&mut self, at: RowRef, cells: &[Cell<'_>]) -> Result<(), DataError> {
        self.read += 1;
        let mut cells = cells.iter().copied();
        let label = cells.next().unwrap_or(Cell::Missing);
        let mut person = None;
        if self.person {
            let id = fingerprint(cells.next().unwrap_or(Cell::Missing));
            if self.allow_repeated {
                let next = self.person_index.len() as u32;
                person = Some(*self.person_index.entry(id).or_insert(next));
            } else if !self.persons.insert(id) {
                *self.repeated.entry(id).or_insert(1) += 1;
            }
        }
        if label == Cell::Missing {
            self.drop_row("missing label");
            for _ in cells {}
            return Ok(());
        }
        let class = match &self.classes {
            None => match self.number(at, &self.label, label) {
                Ok(v) if v == 0.0 || v == 1.0 => v as f32,
                _ => {
                    return Err(DataError::BadLabel {
                        origin: self.origin.clone(),
                        row: at,
                        column: self.label.clone(),
                        value: Self::key(label),
                    });
                }
            },
            Some((classes, listed)) => match classes.get(&Self::key(label)) {
                Some(i) => *i as f32,
                None if self.unknown == UnknownCategory::Drop => {
                    self.drop_row("label not in data.classes");
                    return Ok(());
                }
                None => {
                    return Err(DataError::UnknownCategory {
                        origin: self.origin.clone(),
                        row: at,
                        column: self.label.clone(),
                        value: Self::key(label),
                        what: format!("classes ({listed})"),
                    });
                }
            },
        };
        let row = self.y.len();
        let mut values = std::mem::take(&mut self.scratch);
        values.clear();
        let mut holes = Vec::new();
        let mut unknown = false;
        for ((column, input), cell) in self.features.iter().zip(cells) {
            match self.encode_cell(at, column, input, cell, &mut values)? {
                CellOutcome::Value => {}
                CellOutcome::Missing(Some(j)) => holes.push(j),
                CellOutcome::Missing(None) => holes.push(usize::MAX),
                CellOutcome::Unknown => unknown = true,
            }
        }
        if unknown {
            self.scratch = values;
            self.drop_row("a category not in the manifest");
            return Ok(());
        }
        if !holes.is_empty() && self.missing == MissingPolicy::Drop {
            self.scratch = values;
            self.drop_row("missing feature value");
            return Ok(());
        }
        self.x.extend_from_slice(&values);
        self.scratch = values;
        self.holes
            .extend(holes.into_iter().filter(|j| *j != usize::MAX).map(|j| (row, j)));
        self.y.push(class);
        if let Some(p) = person {
            self.row_persons.push(p);
        }
        Ok(())
    }

    /// The encoded rows, or the error for repeated persons or no rows.
    pub fn finish(mut self) -> Result<Encoded, DataError> {
        if !self.repeated.is_empty() {
            return Err(DataError::RepeatedPersons {
                origin: self.origin.clone(),
                column: self.person_column.clone(),
                persons: self.repeated.len(),
                rows: self.repeated.values().sum(),
            });
        }
        let dropped: Vec<(String, usize)> = self.dropped.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        if self.y.is_empty() {
            return Err(DataError::NoRows {
                origin: self.origin.clone(),
                dropped,
            });
        }
        impute_means(&mut self.x, self.width, std::mem::take(&mut self.holes));
        let schema_inputs = self.input_names();
        Ok(Encoded {
            inputs: schema_inputs,
            x: self.x,
            y: self.y,
            persons: self.row_persons,
            dropped,
            read: self.read,
            warnings: Vec::new(),
        })
    }

    fn input_names(&self) -> Vec<String> {
        let mut out = Vec::with_capacity(self.width);
        for (column, input) in &self.features {
            match input {
                Input::Categorical(map, _, _) => {
                    let mut cats: Vec<(&String, &usize)> = map.iter().collect();
                    cats.sort_by_key(|(_, i)| **i);
                    out.extend(cats.into_iter().map(|(c, _)| format!("{column}={c}")));
                }
                _ => out.push(column.clone()),
            }
        }
        out
    }
}

/// Days since 1970-01-01 of `YYYY-MM-DD`, optionally followed by ` HH:MM[:SS[.fff]]`
/// or `THH:MM...` (the time of day as a fraction; a zone suffix is refused).
pub fn parse_days(text: &str) -> Option<f64> {
    let t = text.trim();
    let (date, time) = match t.find(['T', ' ']) {
        Some(i) => (&t[..i], Some(&t[i + 1..])),
        None => (t, None),
    };
    let days = medfl_shared::manifest::days_from_civil(date)? as f64;
    let Some(time) = time else { return Some(days) };
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next().map_or(Some(0.0), |s| s.parse().ok())?;
    if parts.next().is_some() || !(0.0..24.0).contains(&h) || !(0.0..60.0).contains(&m) || !(0.0..61.0).contains(&s) {
        return None;
    }
    Some(days + (h * 3600.0 + m * 60.0 + s) / 86_400.0)
}

/// `missing = "impute_mean"`: fills each hole (row, input) of `x` (row-major, `d`
/// inputs) with the mean of the input's present values (0 when it has none).
fn impute_means(x: &mut [f32], d: usize, holes: Vec<(usize, usize)>) {
    if holes.is_empty() || d == 0 {
        return;
    }
    let mut sum = vec![0f64; d];
    let mut count = vec![0usize; d];
    let missing: HashSet<(usize, usize)> = holes.iter().copied().collect();
    for (r, row) in x.chunks_exact(d).enumerate() {
        for j in 0..d {
            if !missing.contains(&(r, j)) {
                sum[j] += row[j] as f64;
                count[j] += 1;
            }
        }
    }
    for (r, j) in holes {
        x[r * d + j] = if count[j] > 0 {
            (sum[j] / count[j] as f64) as f32
        } else {
            0.0
        };
    }
}

/// A dataset encoded for the model: features row-major, labels (0/1 or class indices).
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub name: String,
    /// The model's inputs by name (a categorical feature's as `column=category`).
    pub columns: Vec<String>,
    pub x: Vec<f32>,
    pub y: Vec<f32>,
    /// Rows left out (missing values, unknown categories).
    pub dropped: usize,
}

impl Table {
    /// Loads a CSV dataset's all-numeric view (see [`Dataset::default_schema`]); `base`
    /// resolves a relative path.
    pub fn load(cfg: &DatasetConfig, base: &Path) -> Result<Table, DataError> {
        Dataset::open(cfg.clone(), base)?.load_default()
    }

    /// The all-numeric view of CSV text (`file` names it in errors).
    pub fn from_csv(cfg: &DatasetConfig, text: &str, file: &str) -> Result<Table, DataError> {
        let connector = csv::CsvConnector::from_text(&cfg.name, file, text.to_string());
        Dataset {
            config: cfg.clone(),
            connector: Box::new(connector),
            omop: None,
            columns: Vec::new(),
            images: None,
        }
        .load_default()
    }

    pub fn rows(&self) -> usize {
        self.y.len()
    }

    /// Returns the inputs a study asks for, in its order, or the schema error.
    pub fn select(&self, features: &[String]) -> Result<Vec<f32>, DataError> {
        let idx: Vec<Option<usize>> = features
            .iter()
            .map(|f| self.columns.iter().position(|c| c == f))
            .collect();
        if let Some((f, _)) = features.iter().zip(&idx).find(|(_, i)| i.is_none()) {
            return Err(DataError::MissingColumn {
                origin: format!("dataset {:?}", self.name),
                column: f.clone(),
                columns: self.columns.join(", "),
            });
        }
        let idx: Vec<usize> = idx.into_iter().flatten().collect();
        let d = self.columns.len();
        Ok(self
            .x
            .chunks_exact(d)
            .flat_map(|row| idx.iter().map(move |&i| row[i]))
            .collect())
    }

    /// Returns a table holding only `rows` (indices into this one).
    pub fn subset(&self, rows: &[usize]) -> Table {
        let d = self.columns.len();
        Table {
            name: self.name.clone(),
            columns: self.columns.clone(),
            x: rows
                .iter()
                .flat_map(|&r| self.x[r * d..(r + 1) * d].iter().copied())
                .collect(),
            y: rows.iter().map(|&r| self.y[r]).collect(),
            dropped: 0,
        }
    }

    /// Writes the table as CSV (label last), for splitting bundled data across sites.
    pub fn to_csv(&self, label: &str) -> String {
        let mut out = self.columns.join(",");
        out.push(',');
        out.push_str(label);
        out.push('\n');
        for (row, y) in self.x.chunks_exact(self.columns.len()).zip(&self.y) {
            let cells: Vec<String> = row.iter().map(|v| v.to_string()).collect();
            out.push_str(&cells.join(","));
            out.push_str(&format!(",{y}\n"));
        }
        out
    }
}
