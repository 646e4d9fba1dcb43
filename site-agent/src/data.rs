//! The CSV connector: reads a hospital's table into numeric features and a binary
//! label, with a documented policy for missing values and errors that name the file,
//! the line and the column.
//!
//! Missing values are empty cells and `NA`, `NaN`, `?` (any case). A row whose label
//! is missing is always dropped (a label cannot be imputed). For features, the
//! dataset's `missing` setting decides: `drop` (the default) drops the row,
//! `impute_mean` fills the column's mean over the rows that have a value.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

/// Which columns a dataset exposes as features.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum FeatureSelection {
    /// `"all_numeric"`: every column except the label and the id whose values are all
    /// numbers (or missing).
    Keyword(AllNumeric),
    /// An explicit list; a non-numeric cell in one of them is an error.
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

/// One `[[datasets]]` entry of the agent's config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// Name under which the dataset is offered to studies.
    pub name: String,
    pub path: PathBuf,
    /// Binary label column (0/1).
    pub label: String,
    /// Row identifier column, never used as a feature.
    #[serde(default)]
    pub id_column: Option<String>,
    #[serde(default)]
    pub features: FeatureSelection,
    #[serde(default)]
    pub missing: MissingPolicy,
    /// This dataset's ε cap across all studies; defaults to `policy.max_epsilon`.
    #[serde(default)]
    pub max_epsilon: Option<f64>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DataError {
    #[error("{file}: cannot read: {reason}")]
    Read { file: String, reason: String },
    #[error("{file}: the file is empty (no header line)")]
    Empty { file: String },
    #[error("{file}: the header names no columns")]
    NoColumns { file: String },
    #[error("{file}: label column {label:?} is missing from the header (columns: {columns})")]
    MissingLabel {
        file: String,
        label: String,
        columns: String,
    },
    #[error("{file}: column {column:?} is missing from the header")]
    MissingColumn { file: String, column: String },
    #[error("{file}: line {line} has {got} fields, the header has {want}")]
    RowLength {
        file: String,
        line: usize,
        got: usize,
        want: usize,
    },
    #[error("{file}: line {line}, column {column:?}: {value:?} is not a number")]
    NotNumeric {
        file: String,
        line: usize,
        column: String,
        value: String,
    },
    #[error("{file}: line {line}, label column {column:?}: {value:?} is not 0 or 1")]
    BadLabel {
        file: String,
        line: usize,
        column: String,
        value: String,
    },
    #[error("{file}: line {line}: unterminated quoted field")]
    Quote { file: String, line: usize },
    #[error("{file}: no usable rows (after dropping {dropped} rows with missing values)")]
    NoRows { file: String, dropped: usize },
    #[error("dataset {dataset:?} lacks the columns the study needs: {missing}")]
    Schema { dataset: String, missing: String },
}

/// A loaded dataset: features row-major, labels in {0, 1}.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub name: String,
    pub columns: Vec<String>,
    pub x: Vec<f32>,
    pub y: Vec<f32>,
    /// Rows dropped for missing values.
    pub dropped: usize,
}

fn is_missing(cell: &str) -> bool {
    let c = cell.trim();
    c.is_empty() || c.eq_ignore_ascii_case("na") || c.eq_ignore_ascii_case("nan") || c == "?"
}

/// Splits CSV text into records of fields (RFC 4180: quoted fields, doubled quotes,
/// CRLF); returns each record with its 1-based starting line.
pub fn parse_csv(text: &str, file: &str) -> Result<Vec<(usize, Vec<String>)>, DataError> {
    let mut records = Vec::new();
    let mut field = String::new();
    let mut record = Vec::new();
    let mut in_quotes = false;
    let mut line = 1;
    let mut start_line = 1;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' => in_quotes = true,
            ',' => record.push(std::mem::take(&mut field)),
            '\r' => {}
            '\n' => {
                record.push(std::mem::take(&mut field));
                if !(record.len() == 1 && record[0].trim().is_empty()) {
                    records.push((start_line, std::mem::take(&mut record)));
                }
                record.clear();
                line += 1;
                start_line = line;
            }
            _ => field.push(c),
        }
    }
    if in_quotes {
        return Err(DataError::Quote {
            file: file.to_string(),
            line: start_line,
        });
    }
    if !field.is_empty() || !record.is_empty() {
        record.push(field);
        records.push((start_line, record));
    }
    Ok(records)
}

impl Table {
    /// Loads a dataset; `base` resolves a relative path.
    pub fn load(cfg: &DatasetConfig, base: &Path) -> Result<Table, DataError> {
        let path = base.join(&cfg.path);
        let file = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| DataError::Read {
            file: file.clone(),
            reason: e.to_string(),
        })?;
        Self::from_csv(cfg, &text, &file)
    }

    pub fn from_csv(cfg: &DatasetConfig, text: &str, file: &str) -> Result<Table, DataError> {
        let f = || file.to_string();
        let mut records = parse_csv(text, file)?.into_iter();
        let (_, header) = records.next().ok_or_else(|| DataError::Empty { file: f() })?;
        let header: Vec<String> = header.into_iter().map(|h| h.trim().to_string()).collect();
        if header.iter().all(String::is_empty) {
            return Err(DataError::NoColumns { file: f() });
        }
        let col = |name: &str| header.iter().position(|h| h == name);
        let label_idx = col(&cfg.label).ok_or_else(|| DataError::MissingLabel {
            file: f(),
            label: cfg.label.clone(),
            columns: header.join(", "),
        })?;
        let rows: Vec<(usize, Vec<String>)> = records.collect();
        for (line, row) in &rows {
            if row.len() != header.len() {
                return Err(DataError::RowLength {
                    file: f(),
                    line: *line,
                    got: row.len(),
                    want: header.len(),
                });
            }
        }
        let numeric = |cell: &str| is_missing(cell) || cell.trim().parse::<f64>().is_ok();
        let features: Vec<usize> = match &cfg.features {
            FeatureSelection::Columns(names) => names
                .iter()
                .map(|n| {
                    col(n).ok_or_else(|| DataError::MissingColumn {
                        file: f(),
                        column: n.clone(),
                    })
                })
                .collect::<Result<_, _>>()?,
            FeatureSelection::Keyword(_) => (0..header.len())
                .filter(|&i| i != label_idx && Some(header[i].as_str()) != cfg.id_column.as_deref())
                .filter(|&i| rows.iter().all(|(_, r)| numeric(&r[i])))
                .collect(),
        };

        let d = features.len();
        let mut x = Vec::with_capacity(rows.len() * d);
        let mut y = Vec::with_capacity(rows.len());
        let mut holes: Vec<(usize, usize)> = Vec::new();
        let mut dropped = 0;
        for (line, row) in &rows {
            let label_cell = row[label_idx].trim();
            if is_missing(label_cell) {
                dropped += 1;
                continue;
            }
            let label = match label_cell.parse::<f64>() {
                Ok(v) if v == 0.0 || v == 1.0 => v as f32,
                _ => {
                    return Err(DataError::BadLabel {
                        file: f(),
                        line: *line,
                        column: cfg.label.clone(),
                        value: label_cell.to_string(),
                    });
                }
            };
            let mut values = Vec::with_capacity(d);
            let mut missing_here = Vec::new();
            for (j, &i) in features.iter().enumerate() {
                let cell = row[i].trim();
                if is_missing(cell) {
                    missing_here.push(j);
                    values.push(0.0);
                    continue;
                }
                match cell.parse::<f64>() {
                    Ok(v) if v.is_finite() => values.push(v as f32),
                    _ => {
                        return Err(DataError::NotNumeric {
                            file: f(),
                            line: *line,
                            column: header[i].clone(),
                            value: cell.to_string(),
                        });
                    }
                }
            }
            if !missing_here.is_empty() && cfg.missing == MissingPolicy::Drop {
                dropped += 1;
                continue;
            }
            let r = y.len();
            holes.extend(missing_here.into_iter().map(|j| (r, j)));
            x.extend(values);
            y.push(label);
        }
        if y.is_empty() {
            return Err(DataError::NoRows { file: f(), dropped });
        }
        impute_means(&mut x, d, holes);
        Ok(Table {
            name: cfg.name.clone(),
            columns: features.iter().map(|&i| header[i].clone()).collect(),
            x,
            y,
            dropped,
        })
    }

    pub fn rows(&self) -> usize {
        self.y.len()
    }

    /// Returns the features a study asks for, in its order, or the schema error.
    pub fn select(&self, features: &[String]) -> Result<Vec<f32>, DataError> {
        let idx: Vec<Option<usize>> = features
            .iter()
            .map(|f| self.columns.iter().position(|c| c == f))
            .collect();
        let missing: Vec<&str> = features
            .iter()
            .zip(&idx)
            .filter(|(_, i)| i.is_none())
            .map(|(f, _)| f.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(DataError::Schema {
                dataset: self.name.clone(),
                missing: missing.join(", "),
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

/// `missing = "impute_mean"`: fills each hole (row, column) of `x` (row-major, `d`
/// columns) with the mean of the column's present values (0 when it has none).
fn impute_means(x: &mut [f32], d: usize, holes: Vec<(usize, usize)>) {
    if holes.is_empty() {
        return;
    }
    let mut sum = vec![0f64; d];
    let mut count = vec![0usize; d];
    let missing: std::collections::HashSet<(usize, usize)> = holes.iter().copied().collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DatasetConfig {
        DatasetConfig {
            name: "t".into(),
            path: "t.csv".into(),
            label: "y".into(),
            id_column: Some("id".into()),
            features: FeatureSelection::default(),
            missing: MissingPolicy::Drop,
            max_epsilon: None,
        }
    }

    #[test]
    fn loads_numeric_columns_and_skips_id() {
        let t = Table::from_csv(&cfg(), "id,a,\"b, quoted\",y\np1,1,2,0\np2,3,4,1\n", "t.csv").expect("valid csv");
        assert_eq!(t.columns, vec!["a", "b, quoted"]);
        assert_eq!(t.x, vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(t.y, vec![0.0, 1.0]);
    }

    #[test]
    fn missing_label_column_names_it() {
        let err = Table::from_csv(&cfg(), "id,a,b\np1,1,2\n", "t.csv").expect_err("no label column");
        assert_eq!(
            err,
            DataError::MissingLabel {
                file: "t.csv".into(),
                label: "y".into(),
                columns: "id, a, b".into()
            }
        );
        assert!(err.to_string().contains("label column \"y\" is missing"), "{err}");
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let mut c = cfg();
        c.features = FeatureSelection::Columns(vec!["a".into()]);
        let err = Table::from_csv(&c, "id,a,y\np1,1,0\np2,x,1\n", "t.csv").expect_err("non-numeric");
        assert_eq!(err.to_string(), "t.csv: line 3, column \"a\": \"x\" is not a number");
        let err = Table::from_csv(&cfg(), "id,a,y\np1,1\n", "t.csv").expect_err("short row");
        assert_eq!(err.to_string(), "t.csv: line 2 has 2 fields, the header has 3");
        assert!(matches!(
            Table::from_csv(&cfg(), "", "t.csv"),
            Err(DataError::Empty { .. })
        ));
        let err = Table::from_csv(&cfg(), "id,a,y\np1,1,2\n", "t.csv").expect_err("bad label");
        assert!(matches!(err, DataError::BadLabel { line: 2, .. }), "{err}");
    }

    #[test]
    fn missing_values_follow_the_policy() {
        let text = "id,a,b,y\np1,1,,0\np2,3,4,1\np3,5,6,NA\n";
        let dropped = Table::from_csv(&cfg(), text, "t.csv").expect("drop");
        assert_eq!((dropped.rows(), dropped.dropped), (1, 2));
        let mut c = cfg();
        c.missing = MissingPolicy::ImputeMean;
        let imputed = Table::from_csv(&c, text, "t.csv").expect("impute");
        assert_eq!(imputed.x, vec![1.0, 4.0, 3.0, 4.0]);
        assert_eq!(imputed.dropped, 1, "a missing label is always dropped");
    }

    #[test]
    fn select_reports_missing_schema_columns() {
        let t = Table::from_csv(&cfg(), "id,a,b,y\np1,1,2,0\n", "t.csv").expect("valid");
        assert_eq!(t.select(&["b".into(), "a".into()]).expect("present"), vec![2.0, 1.0]);
        let err = t.select(&["a".into(), "c".into()]).expect_err("c is absent");
        assert!(
            err.to_string().contains("lacks the columns the study needs: c"),
            "{err}"
        );
    }
}
