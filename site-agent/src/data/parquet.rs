//! The Parquet connector: a research extract in a Parquet file, read with the `parquet`
//! crate's column readers (no Arrow). Only the columns a study asks for are read, by
//! name, one row group at a time, so memory holds one row group of those columns.
//!
//! Types: integers (INT32/INT64, any integer annotation), FLOAT and DOUBLE, DECIMAL (on
//! INT32, INT64 or fixed/variable byte arrays), BOOLEAN, DATE, TIMESTAMP (ms, µs, ns),
//! and strings (BYTE_ARRAY as UTF8 or ENUM, dictionary-encoded or plain). Nested columns
//! (lists, maps, groups) and INT96 are refused by name when a study asks for them.

use std::fs::File;
use std::path::{Path, PathBuf};

use parquet::basic::{ConvertedType, LogicalType, TimeUnit, Type as Physical};
use parquet::column::reader::ColumnReader;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::schema::types::ColumnDescriptor;

use super::{Cell, ColumnType, Connector, DataError, RowRef, RowSink};

/// A Parquet dataset.
pub struct ParquetConnector {
    origin: String,
    path: PathBuf,
}

/// One column of one row group: its values (non-null only) and, for an optional
/// column, whether each row has one.
enum Values {
    Numbers(Vec<f64>),
    Bools(Vec<bool>),
    Texts(Vec<parquet::data_type::ByteArray>),
}

struct Read {
    values: Values,
    /// Per row: whether it has a value (None: every row does).
    present: Option<Vec<bool>>,
    /// How numbers map to medfl's: a date or timestamp in days.
    kind: ColumnType,
}

impl ParquetConnector {
    pub fn new(dataset: &str, path: &Path) -> Self {
        ParquetConnector {
            origin: format!("dataset {dataset:?} ({})", path.display()),
            path: path.to_path_buf(),
        }
    }

    fn open(&self) -> Result<SerializedFileReader<File>, DataError> {
        let file = File::open(&self.path).map_err(|e| DataError::Read {
            origin: self.origin.clone(),
            reason: e.to_string(),
        })?;
        SerializedFileReader::new(file).map_err(|e| self.corrupt(e))
    }

    fn corrupt(&self, e: parquet::errors::ParquetError) -> DataError {
        DataError::Read {
            origin: self.origin.clone(),
            reason: format!("not a readable Parquet file ({e}); is it truncated or damaged?"),
        }
    }

    /// A top-level column's type, or why medfl does not read it.
    fn column_type(column: &ColumnDescriptor) -> Result<ColumnType, String> {
        if column.path().parts().len() != 1 || column.max_rep_level() > 0 {
            return Err("a nested column (list, map or group)".into());
        }
        let converted = column.converted_type();
        let nanos = matches!(column.logical_type_ref(), Some(LogicalType::Timestamp(t)) if t.unit == TimeUnit::NANOS);
        Ok(match (column.physical_type(), converted) {
            (_, ConvertedType::DECIMAL) => ColumnType::Decimal,
            (Physical::INT32, ConvertedType::DATE) => ColumnType::Date,
            (Physical::INT64, ConvertedType::TIMESTAMP_MILLIS | ConvertedType::TIMESTAMP_MICROS) => {
                ColumnType::Timestamp
            }
            (Physical::INT64, ConvertedType::NONE) if nanos => ColumnType::Timestamp,
            (Physical::INT32 | Physical::INT64, _) => ColumnType::Integer,
            (Physical::FLOAT | Physical::DOUBLE, _) => ColumnType::Float,
            (Physical::BOOLEAN, _) => ColumnType::Boolean,
            (Physical::BYTE_ARRAY, ConvertedType::UTF8 | ConvertedType::ENUM) => ColumnType::Text,
            (physical, converted) => return Err(format!("physical type {physical} ({converted})")),
        })
    }

    /// Reads a row group's column `i` whole.
    fn read_column(&self, reader: ColumnReader, column: &ColumnDescriptor, rows: usize) -> Result<Read, DataError> {
        let kind = Self::column_type(column).map_err(|why| DataError::Unsupported {
            origin: self.origin.clone(),
            reason: format!("column {:?} is {why}, which medfl does not read", column.name()),
        })?;
        let optional = column.max_def_level() > 0;
        let mut defs: Vec<i16> = Vec::with_capacity(if optional { rows } else { 0 });
        let err = |e| self.corrupt(e);
        let scale = 10f64.powi(column.type_scale().max(0));
        let divisor = match (kind, column.converted_type(), column.logical_type_ref()) {
            (ColumnType::Date, _, _) => 1.0,
            (ColumnType::Timestamp, ConvertedType::TIMESTAMP_MILLIS, _) => 86_400_000.0,
            (ColumnType::Timestamp, ConvertedType::TIMESTAMP_MICROS, _) => 86_400_000_000.0,
            (ColumnType::Timestamp, _, _) => 86_400_000_000_000.0,
            (ColumnType::Decimal, _, _) => scale,
            _ => 1.0,
        };
        macro_rules! numbers {
            ($reader:expr, $t:ty, $to:expr) => {{
                let mut reader = $reader;
                let mut values: Vec<$t> = Vec::with_capacity(rows);
                let mut read = 0;
                while read < rows {
                    let (records, _, _) = reader
                        .read_records(rows - read, optional.then_some(&mut defs), None, &mut values)
                        .map_err(err)?;
                    if records == 0 {
                        break;
                    }
                    read += records;
                }
                Values::Numbers(values.into_iter().map(|v| $to(v) / divisor).collect())
            }};
        }
        let values = match reader {
            ColumnReader::Int32ColumnReader(r) => numbers!(r, i32, |v: i32| v as f64),
            ColumnReader::Int64ColumnReader(r) => numbers!(r, i64, |v: i64| v as f64),
            ColumnReader::FloatColumnReader(r) => numbers!(r, f32, |v: f32| v as f64),
            ColumnReader::DoubleColumnReader(r) => numbers!(r, f64, |v: f64| v),
            ColumnReader::BoolColumnReader(mut r) => {
                let mut values: Vec<bool> = Vec::with_capacity(rows);
                let mut read = 0;
                while read < rows {
                    let (records, _, _) = r
                        .read_records(rows - read, optional.then_some(&mut defs), None, &mut values)
                        .map_err(err)?;
                    if records == 0 {
                        break;
                    }
                    read += records;
                }
                Values::Bools(values)
            }
            ColumnReader::ByteArrayColumnReader(mut r) => {
                let mut values = Vec::with_capacity(rows);
                let mut read = 0;
                while read < rows {
                    let (records, _, _) = r
                        .read_records(rows - read, optional.then_some(&mut defs), None, &mut values)
                        .map_err(err)?;
                    if records == 0 {
                        break;
                    }
                    read += records;
                }
                if kind == ColumnType::Decimal {
                    Values::Numbers(values.iter().map(|b| be_signed(b.data()) / divisor).collect())
                } else {
                    Values::Texts(values)
                }
            }
            ColumnReader::FixedLenByteArrayColumnReader(mut r) => {
                let mut values = Vec::with_capacity(rows);
                let mut read = 0;
                while read < rows {
                    let (records, _, _) = r
                        .read_records(rows - read, optional.then_some(&mut defs), None, &mut values)
                        .map_err(err)?;
                    if records == 0 {
                        break;
                    }
                    read += records;
                }
                Values::Numbers(values.iter().map(|b| be_signed(b.data()) / divisor).collect())
            }
            ColumnReader::Int96ColumnReader(_) => {
                return Err(DataError::Unsupported {
                    origin: self.origin.clone(),
                    reason: format!(
                        "column {:?} is an INT96 timestamp, which medfl does not read: write it as TIMESTAMP",
                        column.name()
                    ),
                });
            }
        };
        let max = column.max_def_level();
        Ok(Read {
            values,
            present: optional.then(|| defs.iter().map(|d| *d == max).collect()),
            kind,
        })
    }
}

/// A big-endian two's-complement integer (a decimal's unscaled value), as f64.
fn be_signed(bytes: &[u8]) -> f64 {
    let mut v: i128 = if bytes.first().is_some_and(|b| b & 0x80 != 0) {
        -1
    } else {
        0
    };
    for b in bytes.iter().take(16) {
        v = (v << 8) | i128::from(*b);
    }
    v as f64
}

impl Connector for ParquetConnector {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn source(&self) -> &str {
        &self.origin
    }

    fn rows_hint(&self) -> Option<usize> {
        let file = self.open().ok()?;
        usize::try_from(file.metadata().file_metadata().num_rows()).ok()
    }

    fn columns(&self) -> Result<Vec<(String, ColumnType)>, DataError> {
        let file = self.open()?;
        let schema = file.metadata().file_metadata().schema_descr_ptr();
        let mut out: Vec<(String, ColumnType)> = Vec::new();
        for field in schema.root_schema().get_fields() {
            if field.is_group() {
                out.push((field.name().to_string(), ColumnType::Unsupported));
            }
        }
        for column in schema.columns() {
            if column.path().parts().len() == 1 {
                let ty = Self::column_type(column).unwrap_or(ColumnType::Unsupported);
                out.push((column.name().to_string(), ty));
            }
        }
        // In the file's order.
        let order: Vec<&str> = schema.root_schema().get_fields().iter().map(|f| f.name()).collect();
        out.sort_by_key(|(name, _)| order.iter().position(|o| o == name));
        Ok(out)
    }

    fn scan(&self, wanted: &[String], row: &mut RowSink<'_>) -> Result<(), DataError> {
        let file = self.open()?;
        let schema = file.metadata().file_metadata().schema_descr_ptr();
        let top: Vec<String> = schema
            .root_schema()
            .get_fields()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        let mut leaves = Vec::with_capacity(wanted.len());
        for w in wanted {
            let leaf = schema
                .columns()
                .iter()
                .position(|c| c.path().parts().len() == 1 && c.name() == w);
            match leaf {
                Some(i) => leaves.push(i),
                None if top.contains(w) => {
                    return Err(DataError::Unsupported {
                        origin: self.origin.clone(),
                        reason: format!(
                            "column {w:?} is a nested column (list, map or group), which medfl does not read"
                        ),
                    });
                }
                None => {
                    return Err(DataError::MissingColumn {
                        origin: self.origin.clone(),
                        column: w.clone(),
                        columns: top.join(", "),
                    });
                }
            }
        }
        let mut at = 0usize;
        for g in 0..file.num_row_groups() {
            let group = file.get_row_group(g).map_err(|e| self.corrupt(e))?;
            let rows = usize::try_from(group.metadata().num_rows()).unwrap_or(0);
            let columns: Vec<Read> = leaves
                .iter()
                .map(|&i| {
                    let reader = group.get_column_reader(i).map_err(|e| self.corrupt(e))?;
                    self.read_column(reader, &schema.columns()[i], rows)
                })
                .collect::<Result<_, _>>()?;
            let mut next = vec![0usize; columns.len()];
            let mut cells = Vec::with_capacity(columns.len());
            for r in 0..rows {
                at += 1;
                cells.clear();
                for (c, read) in columns.iter().enumerate() {
                    if read
                        .present
                        .as_ref()
                        .is_some_and(|p| !p.get(r).copied().unwrap_or(false))
                    {
                        cells.push(Cell::Missing);
                        continue;
                    }
                    let i = next[c];
                    next[c] += 1;
                    let truncated = || DataError::Read {
                        origin: self.origin.clone(),
                        reason: format!("row group {g} holds fewer values than its {rows} rows"),
                    };
                    cells.push(match &read.values {
                        Values::Numbers(v) => {
                            let v = *v.get(i).ok_or_else(truncated)?;
                            if matches!(read.kind, ColumnType::Date | ColumnType::Timestamp) {
                                Cell::Days(v)
                            } else {
                                Cell::Number(v)
                            }
                        }
                        Values::Bools(v) => Cell::Bool(*v.get(i).ok_or_else(truncated)?),
                        Values::Texts(v) => Cell::Text(
                            std::str::from_utf8(v.get(i).ok_or_else(truncated)?.data()).map_err(|_| {
                                DataError::Read {
                                    origin: self.origin.clone(),
                                    reason: format!("row {at}: a string column holds bytes that are not UTF-8"),
                                }
                            })?,
                        ),
                    });
                }
                row(RowRef::Row(at), &cells)?;
            }
        }
        Ok(())
    }
}

/// One column to write: its Parquet declaration (`OPTIONAL DOUBLE a`, …) and values.
#[derive(Debug, Clone)]
pub enum WriteColumn {
    /// `INT32` or `INT64` (with any annotation: DATE, DECIMAL on INT64, …).
    Int32(String, Vec<Option<i32>>),
    Int64(String, Vec<Option<i64>>),
    Double(String, Vec<Option<f64>>),
    Bool(String, Vec<Option<bool>>),
    /// `BYTE_ARRAY … (STRING)`, dictionary-encoded as writers do by default.
    Text(String, Vec<Option<String>>),
    /// A top-level `REPEATED INT32` column (a list in Parquet's legacy form).
    RepeatedInt32(String, Vec<Vec<i32>>),
}

/// Writes `columns` (each a full-schema line such as `OPTIONAL DOUBLE age;` and its
/// values, all the same length) as a Parquet file with row groups of `group_rows`,
/// snappy-compressed: exports and test fixtures.
pub fn write(path: &Path, columns: &[WriteColumn], group_rows: usize) -> Result<(), parquet::errors::ParquetError> {
    use parquet::column::writer::ColumnWriter;
    use parquet::data_type::ByteArray;
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;

    let declaration = |c: &WriteColumn| match c {
        WriteColumn::Int32(d, _)
        | WriteColumn::Int64(d, _)
        | WriteColumn::Double(d, _)
        | WriteColumn::Bool(d, _)
        | WriteColumn::Text(d, _)
        | WriteColumn::RepeatedInt32(d, _) => d.clone(),
    };
    let message = format!(
        "message medfl {{ {} }}",
        columns.iter().map(declaration).collect::<Vec<_>>().join(" ")
    );
    let schema = std::sync::Arc::new(parquet::schema::parser::parse_message_type(&message)?);
    let props = std::sync::Arc::new(
        WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build(),
    );
    let rows = match columns.first() {
        Some(WriteColumn::Int32(_, v)) => v.len(),
        Some(WriteColumn::Int64(_, v)) => v.len(),
        Some(WriteColumn::Double(_, v)) => v.len(),
        Some(WriteColumn::Bool(_, v)) => v.len(),
        Some(WriteColumn::Text(_, v)) => v.len(),
        Some(WriteColumn::RepeatedInt32(_, v)) => v.len(),
        None => 0,
    };
    let mut writer = SerializedFileWriter::new(File::create(path)?, schema, props)?;
    let mut start = 0;
    while start < rows {
        let end = (start + group_rows.max(1)).min(rows);
        let mut group = writer.next_row_group()?;
        let mut index = 0;
        while let Some(mut column) = group.next_column()? {
            let optional = column_is_optional(&columns[index]);
            macro_rules! batch {
                ($w:expr, $values:expr, $map:expr) => {{
                    let part = &$values[start..end];
                    let defs: Vec<i16> = part.iter().map(|v| i16::from(v.is_some())).collect();
                    let present: Vec<_> = part.iter().flatten().map($map).collect();
                    $w.write_batch(&present, optional.then_some(&defs[..]), None)?;
                }};
            }
            match (column.untyped(), &columns[index]) {
                (ColumnWriter::Int32ColumnWriter(w), WriteColumn::Int32(_, v)) => batch!(w, v, |x: &i32| *x),
                (ColumnWriter::Int64ColumnWriter(w), WriteColumn::Int64(_, v)) => batch!(w, v, |x: &i64| *x),
                (ColumnWriter::DoubleColumnWriter(w), WriteColumn::Double(_, v)) => batch!(w, v, |x: &f64| *x),
                (ColumnWriter::BoolColumnWriter(w), WriteColumn::Bool(_, v)) => batch!(w, v, |x: &bool| *x),
                (ColumnWriter::ByteArrayColumnWriter(w), WriteColumn::Text(_, v)) => {
                    batch!(w, v, |x: &String| ByteArray::from(x.as_str()))
                }
                (ColumnWriter::Int32ColumnWriter(w), WriteColumn::RepeatedInt32(_, v)) => {
                    let (mut values, mut defs, mut reps) = (Vec::new(), Vec::new(), Vec::new());
                    for list in &v[start..end] {
                        if list.is_empty() {
                            defs.push(0);
                            reps.push(0);
                        }
                        for (i, x) in list.iter().enumerate() {
                            values.push(*x);
                            defs.push(1);
                            reps.push(i16::from(i > 0));
                        }
                    }
                    w.write_batch(&values, Some(&defs), Some(&reps))?;
                }
                _ => {
                    return Err(parquet::errors::ParquetError::General(format!(
                        "column {index}: its values do not match its declaration"
                    )));
                }
            }
            column.close()?;
            index += 1;
        }
        group.close()?;
        start = end;
    }
    writer.close()?;
    Ok(())
}

fn column_is_optional(c: &WriteColumn) -> bool {
    let d = match c {
        WriteColumn::Int32(d, _)
        | WriteColumn::Int64(d, _)
        | WriteColumn::Double(d, _)
        | WriteColumn::Bool(d, _)
        | WriteColumn::Text(d, _)
        | WriteColumn::RepeatedInt32(d, _) => d,
    };
    d.trim_start().starts_with("OPTIONAL")
}

/// An encoded [`super::Table`] as Parquet: its inputs as `REQUIRED DOUBLE`, the label as
/// `REQUIRED INT64` (class indices or 0/1), an optional person id column first.
pub fn write_table(
    path: &Path,
    table: &super::Table,
    label: &str,
    person_id: Option<&str>,
    group_rows: usize,
) -> Result<(), parquet::errors::ParquetError> {
    let d = table.columns.len();
    let mut columns = Vec::with_capacity(d + 2);
    if let Some(id) = person_id {
        columns.push(WriteColumn::Int64(
            format!("REQUIRED INT64 {id};"),
            (0..table.rows() as i64).map(Some).collect(),
        ));
    }
    for (j, name) in table.columns.iter().enumerate() {
        columns.push(WriteColumn::Double(
            format!("REQUIRED DOUBLE {name};"),
            table.x.chunks_exact(d).map(|r| Some(r[j] as f64)).collect(),
        ));
    }
    columns.push(WriteColumn::Int64(
        format!("REQUIRED INT64 {label};"),
        table.y.iter().map(|y| Some(*y as i64)).collect(),
    ));
    write(path, &columns, group_rows)
}
