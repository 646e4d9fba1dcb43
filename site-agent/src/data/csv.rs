//! The CSV connector: a file with a header line, read as a stream of records (RFC 4180:
//! quoted fields, doubled quotes, CRLF, quoted line breaks), never held whole.
//!
//! Column types are inferred over the whole file, missing cells aside: integer, float,
//! boolean (`true`/`false`), date (`YYYY-MM-DD`), timestamp (`YYYY-MM-DD HH:MM:SS`),
//! otherwise text.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use super::{Cell, ColumnType, Connector, DataError, RowRef, RowSink, parse_days};

/// Whether a CSV cell is missing: empty, `NA`, `NaN` or `?` (any case).
pub fn is_missing(cell: &str) -> bool {
    let c = cell.trim();
    c.is_empty() || c.eq_ignore_ascii_case("na") || c.eq_ignore_ascii_case("nan") || c == "?"
}

/// Reads CSV records one at a time; each comes with its 1-based starting line.
pub struct Records<R> {
    input: R,
    line: usize,
    buf: String,
    origin: String,
}

impl<R: BufRead> Records<R> {
    pub fn new(input: R, origin: &str) -> Self {
        Records {
            input,
            line: 0,
            buf: String::new(),
            origin: origin.to_string(),
        }
    }

    /// The next non-blank record into `fields` (its strings reused from record to
    /// record, so a steady file allocates nothing per row); `Ok(None)` at the end.
    pub fn next_into(&mut self, fields: &mut Vec<String>) -> Result<Option<usize>, DataError> {
        loop {
            // `n` fields filled so far; `fields[n]` is the one being written.
            let mut n = 0;
            let slot = |fields: &mut Vec<String>, n: usize| {
                if n == fields.len() {
                    fields.push(String::new());
                }
                fields[n].clear();
            };
            slot(fields, 0);
            let mut in_quotes = false;
            let mut start = None;
            loop {
                self.buf.clear();
                let read = self.input.read_line(&mut self.buf).map_err(|e| DataError::Read {
                    origin: self.origin.clone(),
                    reason: e.to_string(),
                })?;
                if read == 0 {
                    if in_quotes {
                        return Err(DataError::Quote {
                            origin: self.origin.clone(),
                            row: RowRef::Line(start.unwrap_or(self.line)),
                        });
                    }
                    if start.is_none() {
                        fields.clear();
                        return Ok(None);
                    }
                    break;
                }
                self.line += 1;
                start.get_or_insert(self.line);
                let mut chars = self.buf.chars().peekable();
                let mut ended = false;
                while let Some(c) = chars.next() {
                    if in_quotes {
                        match c {
                            '"' if chars.peek() == Some(&'"') => {
                                chars.next();
                                fields[n].push('"');
                            }
                            '"' => in_quotes = false,
                            _ => fields[n].push(c),
                        }
                        continue;
                    }
                    match c {
                        '"' => in_quotes = true,
                        ',' => {
                            n += 1;
                            slot(fields, n);
                        }
                        '\r' => {}
                        '\n' => {
                            ended = true;
                            break;
                        }
                        _ => fields[n].push(c),
                    }
                }
                if !in_quotes && (ended || !self.buf.ends_with('\n')) {
                    break;
                }
            }
            fields.truncate(n + 1);
            if n == 0 && fields[0].trim().is_empty() {
                continue;
            }
            return Ok(start);
        }
    }
}

/// Splits CSV text into records of fields; returns each record with its starting line.
pub fn parse_csv(text: &str, file: &str) -> Result<Vec<(usize, Vec<String>)>, DataError> {
    let mut records = Records::new(text.as_bytes(), file);
    let mut out = Vec::new();
    let mut fields = Vec::new();
    while let Some(line) = records.next_into(&mut fields)? {
        out.push((line, fields.clone()));
    }
    Ok(out)
}

enum Body {
    File(PathBuf),
    Text(String),
}

/// A CSV dataset: a file (or text, for the demo and tests).
pub struct CsvConnector {
    origin: String,
    body: Body,
}

impl CsvConnector {
    pub fn new(dataset: &str, path: &Path) -> Self {
        CsvConnector {
            origin: format!("dataset {dataset:?} ({})", path.display()),
            body: Body::File(path.to_path_buf()),
        }
    }

    pub fn from_text(dataset: &str, file: &str, text: String) -> Self {
        CsvConnector {
            origin: format!("dataset {dataset:?} ({file})"),
            body: Body::Text(text),
        }
    }

    fn records(&self) -> Result<Records<Box<dyn BufRead + '_>>, DataError> {
        let input: Box<dyn BufRead> = match &self.body {
            Body::File(path) => {
                let file = std::fs::File::open(path).map_err(|e| DataError::Read {
                    origin: self.origin.clone(),
                    reason: e.to_string(),
                })?;
                Box::new(BufReader::with_capacity(1 << 16, file))
            }
            Body::Text(text) => Box::new(text.as_bytes()),
        };
        Ok(Records::new(input, &self.origin))
    }

    fn header(&self, records: &mut Records<Box<dyn BufRead + '_>>) -> Result<Vec<String>, DataError> {
        let mut header = Vec::new();
        if records.next_into(&mut header)?.is_none() {
            return Err(DataError::Empty {
                origin: self.origin.clone(),
            });
        }
        let header: Vec<String> = header.into_iter().map(|h| h.trim().to_string()).collect();
        if header.iter().all(String::is_empty) {
            return Err(DataError::NoColumns {
                origin: self.origin.clone(),
            });
        }
        Ok(header)
    }

    /// Each row's fields, checked for length, to `row`.
    fn rows(
        &self,
        header_len: usize,
        records: &mut Records<Box<dyn BufRead + '_>>,
        mut row: impl FnMut(usize, &[String]) -> Result<(), DataError>,
    ) -> Result<(), DataError> {
        let mut fields = Vec::new();
        while let Some(line) = records.next_into(&mut fields)? {
            if fields.len() != header_len {
                return Err(DataError::RowLength {
                    origin: self.origin.clone(),
                    row: RowRef::Line(line),
                    got: fields.len(),
                    want: header_len,
                });
            }
            row(line, &fields)?;
        }
        Ok(())
    }
}

/// What the cells of a column have held so far.
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    float: bool,
    non_integer: bool,
    boolean: bool,
    date: bool,
    timestamp: bool,
    other: bool,
}

impl Seen {
    fn add(&mut self, cell: &str) {
        let c = cell.trim();
        if is_missing(c) {
            return;
        }
        if let Ok(v) = c.parse::<f64>() {
            self.float = true;
            if v.fract() != 0.0 || !v.is_finite() || c.contains(['.', 'e', 'E']) {
                self.non_integer = true;
            }
        } else if c.eq_ignore_ascii_case("true") || c.eq_ignore_ascii_case("false") {
            self.boolean = true;
        } else if parse_days(c).is_some() {
            if c.len() > 10 {
                self.timestamp = true;
            } else {
                self.date = true;
            }
        } else {
            self.other = true;
        }
    }

    fn column_type(self) -> ColumnType {
        let kinds = [self.float, self.boolean, self.date || self.timestamp, self.other];
        if self.other || kinds.iter().filter(|k| **k).count() > 1 {
            return ColumnType::Text;
        }
        if self.boolean {
            ColumnType::Boolean
        } else if self.timestamp {
            ColumnType::Timestamp
        } else if self.date {
            ColumnType::Date
        } else if self.float && !self.non_integer {
            ColumnType::Integer
        } else {
            ColumnType::Float
        }
    }
}

impl Connector for CsvConnector {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn source(&self) -> &str {
        &self.origin
    }

    fn columns(&self) -> Result<Vec<(String, ColumnType)>, DataError> {
        let mut records = self.records()?;
        let header = self.header(&mut records)?;
        let mut seen = vec![Seen::default(); header.len()];
        self.rows(header.len(), &mut records, |_, fields| {
            seen.iter_mut().zip(fields).for_each(|(s, f)| s.add(f));
            Ok(())
        })?;
        Ok(header
            .into_iter()
            .zip(seen)
            .map(|(h, s)| (h, s.column_type()))
            .collect())
    }

    fn scan(&self, wanted: &[String], row: &mut RowSink<'_>) -> Result<(), DataError> {
        let mut records = self.records()?;
        let header = self.header(&mut records)?;
        let idx: Vec<usize> = wanted
            .iter()
            .map(|w| {
                header
                    .iter()
                    .position(|h| h == w)
                    .ok_or_else(|| DataError::MissingColumn {
                        origin: self.origin.clone(),
                        column: w.clone(),
                        columns: header.join(", "),
                    })
            })
            .collect::<Result<_, _>>()?;
        self.rows(header.len(), &mut records, |line, fields| {
            let cells: Vec<Cell<'_>> = idx
                .iter()
                .map(|&i| {
                    let f = fields[i].as_str();
                    if is_missing(f) { Cell::Missing } else { Cell::Text(f) }
                })
                .collect();
            row(RowRef::Line(line), &cells)
        })
    }
}

/// Reads a whole source into memory (for small inputs such as the demo's CSV).
pub fn read_to_string(mut input: impl Read) -> std::io::Result<String> {
    let mut s = String::new();
    input.read_to_string(&mut s)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use medfl_shared::manifest::{Categorical, DataSchema};

    fn cfg() -> DatasetConfig {
        DatasetConfig::csv("t", "t.csv", "y", Some("id"))
    }

    fn dataset(text: &str, cfg: DatasetConfig) -> Dataset {
        Dataset {
            connector: Box::new(super::CsvConnector::from_text(&cfg.name, "t.csv", text.to_string())),
            config: cfg,
            omop: None,
            columns: Vec::new(),
            images: None,
        }
    }

    fn schema(features: &[&str]) -> DataSchema {
        DataSchema {
            dataset: "t".into(),
            label: "y".into(),
            classes: vec![],
            features: features.iter().map(|f| f.to_string()).collect(),
            categorical: vec![],
            dates: vec![],
            omop: None,
            scaling: None,
            image: None,
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
    fn records_stream_quotes_line_breaks_and_crlf() {
        let text = "a,b\r\n\"x\ny\",\"say \"\"hi\"\"\"\r\n\n3,4";
        let records = parse_csv(text, "t.csv").expect("valid");
        assert_eq!(
            records,
            vec![
                (1, vec!["a".to_string(), "b".into()]),
                (2, vec!["x\ny".to_string(), "say \"hi\"".into()]),
                (5, vec!["3".to_string(), "4".into()]),
            ]
        );
        assert!(matches!(parse_csv("a\n\"open", "t.csv"), Err(DataError::Quote { .. })));
    }

    #[test]
    fn all_numeric_names_every_column_it_leaves_out_and_why() {
        let text = "id,a,grade,seen,when,y\np1,1,II,true,2020-01-02,0\np2,2,I,false,2021-03-04,1\n";
        let d = dataset(text, cfg());
        let columns = d.connector.columns().expect("types");
        let types: Vec<&str> = columns.iter().map(|(_, t)| t.name()).collect();
        assert_eq!(types, vec!["text", "integer", "text", "boolean", "date", "integer"]);
        let (schema, left_out) = d.default_schema().expect("schema");
        assert_eq!(schema.features, vec!["a", "seen"]);
        let names: Vec<&str> = left_out.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(names, vec!["id", "grade", "when"]);
        assert!(left_out[1].1.contains("data.categorical"), "{left_out:?}");
        assert!(left_out[2].1.contains("data.dates"), "{left_out:?}");
    }

    #[test]
    fn categories_one_hot_in_the_manifests_order_whatever_order_rows_come_in() {
        let mut s = schema(&["a", "grade"]);
        s.categorical = vec![Categorical {
            column: "grade".into(),
            categories: vec!["I".into(), "II".into(), "III".into()],
        }];
        let one = dataset("id,a,grade,y\np1,1,III,0\np2,2,I,1\n", cfg())
            .encode(&s)
            .expect("encodes");
        let two = dataset("id,a,grade,y\np2,2,I,1\np1,1,III,0\n", cfg())
            .encode(&s)
            .expect("encodes");
        assert_eq!(one.inputs, vec!["a", "grade=I", "grade=II", "grade=III"]);
        assert_eq!(one.x, vec![1.0, 0.0, 0.0, 1.0, 2.0, 1.0, 0.0, 0.0]);
        assert_eq!(two.x, vec![2.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]);
        // A category the manifest does not list: an error naming line and column, or a
        // dropped row, as the dataset's policy says.
        let text = "id,a,grade,y\np1,1,IV,0\np2,2,I,1\n";
        let err = dataset(text, cfg()).encode(&s).expect_err("IV is not listed");
        assert!(
            err.to_string()
                .contains("line 2, column \"grade\": \"IV\" is not one of the manifest's categories"),
            "{err}"
        );
        assert_eq!(
            err.kind(),
            "column \"grade\" holds a value that is not one of the manifest's categories"
        );
        let mut c = cfg();
        c.unknown_category = UnknownCategory::Drop;
        let kept = dataset(text, c).encode(&s).expect("dropped");
        assert_eq!(
            (kept.rows(), kept.dropped.clone()),
            (1, vec![("a category not in the manifest".to_string(), 1)])
        );
    }

    #[test]
    fn classes_map_labels_to_indices() {
        let mut s = schema(&["a"]);
        s.classes = vec!["low".into(), "mid".into(), "high".into()];
        let e = dataset("id,a,y\np1,1,high\np2,2,low\np3,3,mid\n", cfg())
            .encode(&s)
            .expect("encodes");
        assert_eq!(e.y, vec![2.0, 0.0, 1.0]);
        let err = dataset("id,a,y\np1,1,top\n", cfg())
            .encode(&s)
            .expect_err("unknown class");
        assert!(err.to_string().contains("not one of the manifest's classes"), "{err}");
    }

    #[test]
    fn repeated_persons_are_refused_with_the_count() {
        let err = dataset("id,a,y\np1,1,0\np1,2,1\np2,3,0\np2,4,1\np2,5,1\n", cfg())
            .encode(&schema(&["a"]))
            .expect_err("repeated ids");
        assert!(
            err.to_string()
                .contains("2 persons have more than one row (5 rows in all)"),
            "{err}"
        );
        assert_eq!(err.kind(), "a person has more than one row");
    }

    #[test]
    fn dates_become_days_since_the_origin() {
        let mut s = schema(&["when"]);
        s.dates = vec![medfl_shared::manifest::DateFeature {
            column: "when".into(),
            origin: "2020-01-01".into(),
        }];
        let e = dataset("id,when,y\np1,2020-01-31,0\np2,2020-03-01 12:00:00,1\n", cfg())
            .encode(&s)
            .expect("encodes");
        assert_eq!(e.x, vec![30.0, 60.5]);
        let err = dataset("id,when,y\np1,2020-02-30,0\n", cfg())
            .encode(&s)
            .expect_err("no such day");
        assert!(err.to_string().contains("is not a date"), "{err}");
    }

    #[test]
    fn missing_label_column_names_it() {
        let err = Table::from_csv(&cfg(), "id,a,b\np1,1,2\n", "t.csv").expect_err("no label column");
        assert_eq!(
            err.to_string(),
            "dataset \"t\" (t.csv): column \"y\" is missing (columns: id, a, b)"
        );
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let mut c = cfg();
        c.features = FeatureSelection::Columns(vec!["a".into()]);
        let err = Table::from_csv(&c, "id,a,y\np1,1,0\np2,x,1\n", "t.csv").expect_err("non-numeric");
        assert_eq!(
            err.to_string(),
            "dataset \"t\" (t.csv): line 3, column \"a\": \"x\" is not a number"
        );
        let err = Table::from_csv(&cfg(), "id,a,y\np1,1\n", "t.csv").expect_err("short row");
        assert_eq!(
            err.to_string(),
            "dataset \"t\" (t.csv): line 2 has 2 fields, the header has 3"
        );
        assert!(matches!(
            Table::from_csv(&cfg(), "", "t.csv"),
            Err(DataError::Empty { .. })
        ));
        let err = Table::from_csv(&cfg(), "id,a,y\np1,1,2\n", "t.csv").expect_err("bad label");
        assert!(
            matches!(
                err,
                DataError::BadLabel {
                    row: RowRef::Line(2),
                    ..
                }
            ),
            "{err}"
        );
        let err = Table::from_csv(&cfg(), "id,a,y\np1,1,\n", "t.csv").expect_err("no rows");
        assert_eq!(
            err.to_string(),
            "dataset \"t\" (t.csv): no usable rows (1 dropped: missing label)"
        );
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
        assert!(err.to_string().contains("column \"c\" is missing"), "{err}");
    }
}
