//! A query's exact answer at this site, before any noise: the integer vector laid out
//! by [`QueryPlan`]. On a PostgreSQL dataset the agent pushes the work down to the
//! database as aggregate SQL it writes itself (identifiers validated and quoted,
//! every value a bound parameter, in the connector's READ ONLY transaction with its
//! timeout), so millions of rows never stream through the agent. CSV and Parquet
//! datasets are scanned. Both give the same integers: the filter's three-valued logic
//! is SQL's, sums are `floor(clamp(v)/quantum + 0.5)` in float8 on both sides, and
//! histogram bins are `width_bucket` clamped to the first and last bin.

use medfl_shared::query::{Expr, Literal, Part, QueryManifest, QueryPlan, Value, bin_of, quantize};
use tokio_postgres::types::ToSql;

use super::postgres::{PostgresConnector, quote_identifier};
use super::{Cell, ColumnType, DataError, Dataset, RowRef};

/// Where an answer was computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Aggregate SQL in the database.
    Pushdown,
    /// Rows scanned by the agent.
    Scan,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::Pushdown => "pushdown",
            Path::Scan => "scan",
        }
    }
}

/// The query's columns with their types, checked against what the query does with
/// them: statistics read numbers or booleans; a filter compares text only with text
/// (and only for equality and lists: orderings of text differ between databases),
/// booleans with true/false (or 0/1), numbers with numbers. Dates are not queryable
/// yet, and are refused by name.
pub fn check_columns(
    origin: &str,
    manifest: &QueryManifest,
    filter: &Expr,
    columns: &[(String, ColumnType)],
) -> Result<Vec<(String, ColumnType)>, DataError> {
    let wrong = |column: &str, kind: ColumnType, hint: String| DataError::WrongType {
        origin: origin.to_string(),
        column: column.to_string(),
        kind: kind.name().to_string(),
        hint,
    };
    let stat_columns: Vec<String> = manifest.statistics.iter().flat_map(|s| s.columns()).collect();
    let mut out = Vec::new();
    for c in manifest.columns() {
        let kind = columns
            .iter()
            .find(|(n, _)| *n == c)
            .map(|(_, t)| *t)
            .ok_or_else(|| DataError::MissingColumn {
                origin: origin.to_string(),
                column: c.clone(),
                columns: columns.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", "),
            })?;
        match kind {
            ColumnType::Date | ColumnType::Timestamp | ColumnType::Unsupported => {
                return Err(wrong(
                    &c,
                    kind,
                    "queries read numbers, booleans and text; dates are not queryable yet".into(),
                ));
            }
            ColumnType::Text if stat_columns.contains(&c) => {
                return Err(wrong(
                    &c,
                    kind,
                    "a statistic reads numbers or booleans; filter on a text column instead".into(),
                ));
            }
            _ => {}
        }
        for literal in filter.literals_of(&c) {
            let fits = match (kind, literal) {
                (ColumnType::Text, Literal::Text(_)) => true,
                (ColumnType::Boolean, Literal::Bool(_)) => true,
                (ColumnType::Boolean, Literal::Number(v)) => *v == 0.0 || *v == 1.0,
                (ColumnType::Integer | ColumnType::Float | ColumnType::Decimal, Literal::Number(_)) => true,
                _ => false,
            };
            if !fits {
                return Err(wrong(
                    &c,
                    kind,
                    format!("the filter compares it with {literal}, which is not a {}", kind.name()),
                ));
            }
        }
        if kind == ColumnType::Text && filter.orders(&c) {
            return Err(wrong(
                &c,
                kind,
                "text compares only with =, != and in lists in a filter".into(),
            ));
        }
        out.push((c, kind));
    }
    Ok(out)
}

/// The exact answer: pushed down to PostgreSQL, or scanned. OMOP datasets are built
/// per study and are refused for queries, by name.
pub fn exact_answer(
    dataset: &Dataset,
    manifest: &QueryManifest,
    plan: &QueryPlan,
) -> Result<(Vec<i64>, Path), DataError> {
    if dataset.omop.is_some() {
        return Err(DataError::Unsupported {
            origin: dataset.connector.source().to_string(),
            reason: "queries over an OMOP dataset are not supported yet: query a table or a PostgreSQL query dataset of the same database".into(),
        });
    }
    match dataset.postgres_connector() {
        Some(pg) => Ok((
            pushdown_answer(pg, dataset.config.person_id.as_deref(), manifest, plan)?,
            Path::Pushdown,
        )),
        None => Ok((scan_answer(dataset, manifest, plan)?, Path::Scan)),
    }
}

/// The filter's value of one cell of a column of type `kind`.
fn value<'a>(origin: &str, at: RowRef, column: &str, kind: ColumnType, cell: Cell<'a>) -> Result<Value<'a>, DataError> {
    let bad = |v: String| DataError::NotNumeric {
        origin: origin.to_string(),
        row: at,
        column: column.to_string(),
        value: v,
    };
    Ok(match (cell, kind) {
        (Cell::Missing, _) => Value::Missing,
        (Cell::Bool(b), _) => Value::Bool(b),
        (Cell::Number(v), ColumnType::Boolean) => Value::Bool(v != 0.0),
        (Cell::Number(v), _) if v.is_finite() => Value::Number(v),
        (Cell::Number(v), _) => return Err(bad(v.to_string())),
        (Cell::Days(d), _) => Value::Number(d),
        (Cell::Text(t), ColumnType::Text) => Value::Text(t),
        (Cell::Text(t), ColumnType::Boolean) => match t.trim().to_ascii_lowercase().as_str() {
            "true" | "t" | "1" => Value::Bool(true),
            "false" | "f" | "0" => Value::Bool(false),
            _ => return Err(bad(t.to_string())),
        },
        (Cell::Text(t), _) => match t.trim().parse::<f64>() {
            Ok(v) if v.is_finite() => Value::Number(v),
            _ => return Err(bad(t.to_string())),
        },
    })
}

fn number(v: Value<'_>) -> Option<f64> {
    match v {
        Value::Number(x) => Some(x),
        Value::Bool(b) => Some(f64::from(u8::from(b))),
        _ => None,
    }
}

/// The answer by scanning the dataset's rows (CSV, Parquet).
pub fn scan_answer(dataset: &Dataset, manifest: &QueryManifest, plan: &QueryPlan) -> Result<Vec<i64>, DataError> {
    let origin = dataset.connector.source().to_string();
    let filter = manifest.filter_expr().map_err(|e| DataError::Unsupported {
        origin: origin.clone(),
        reason: e.to_string(),
    })?;
    let columns = check_columns(&origin, manifest, &filter, &dataset.connector.columns()?)?;
    let mut names: Vec<String> = columns.iter().map(|(n, _)| n.clone()).collect();
    // The privacy unit is the person: the person id is read too, and repeated ids
    // refuse the query (a person's several rows would exceed the sensitivity).
    let person = dataset.config.person_id.clone();
    if let Some(p) = &person {
        names.push(p.clone());
    }
    let mut persons: std::collections::HashSet<u128> = Default::default();
    let mut repeated: std::collections::HashMap<u128, usize> = Default::default();
    let index = |c: &str| names.iter().position(|n| n == c).unwrap_or(usize::MAX);
    // Each part's columns as indices into the scanned row.
    let parts: Vec<(usize, &Part, Vec<usize>)> = plan
        .parts
        .iter()
        .map(|p| {
            let cols = match &p.part {
                Part::Count { column } => column.iter().map(|c| index(c)).collect(),
                Part::Sum { column, .. } => vec![index(column)],
                Part::Bins { columns, .. } => columns.iter().map(|c| index(c)).collect(),
            };
            (p.offset, &p.part, cols)
        })
        .collect();
    let mut answer = vec![0i64; plan.len()];
    dataset.connector.scan(&names, &mut |at, cells| {
        let mut row: Vec<Value<'_>> = Vec::with_capacity(cells.len());
        for (i, cell) in cells.iter().take(columns.len()).enumerate() {
            row.push(value(&origin, at, &names[i], columns[i].1, *cell)?);
        }
        if person.is_some() {
            let id = super::fingerprint(cells.get(columns.len()).copied().unwrap_or(Cell::Missing));
            if !persons.insert(id) {
                *repeated.entry(id).or_insert(1) += 1;
            }
        }
        let keeps = filter.keeps(&|c: &str| row.get(index(c)).copied().unwrap_or(Value::Missing));
        if !keeps {
            return Ok(());
        }
        for (offset, part, cols) in &parts {
            match part {
                Part::Count { .. } => {
                    if cols.iter().all(|&i| row[i] != Value::Missing) {
                        answer[*offset] += 1;
                    }
                }
                Part::Sum {
                    lower, upper, quantum, ..
                } => {
                    if let Some(v) = number(row[cols[0]]) {
                        answer[*offset] += quantize(v.clamp(*lower, *upper), *quantum);
                    }
                }
                Part::Bins { edges, .. } => {
                    let mut cell = 0usize;
                    let mut present = true;
                    for (k, &i) in cols.iter().enumerate() {
                        match number(row[i]) {
                            Some(v) => cell = cell * (edges[k].len() - 1) + bin_of(v, &edges[k]),
                            None => present = false,
                        }
                    }
                    if present {
                        answer[offset + cell] += 1;
                    }
                }
            }
        }
        Ok(())
    })?;
    if let Some(column) = person
        && !repeated.is_empty()
    {
        return Err(DataError::RepeatedPersons {
            origin,
            column,
            persons: repeated.len(),
            rows: repeated.values().sum(),
        });
    }
    Ok(answer)
}

/// A bound parameter of the pushed-down SQL.
enum Param {
    Number(f64),
    Bool(bool),
    Text(String),
    Numbers(Vec<f64>),
}

impl Param {
    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Param::Number(v) => v,
            Param::Bool(b) => b,
            Param::Text(s) => s,
            Param::Numbers(v) => v,
        }
    }
}

/// Writes SQL with numbered, typed placeholders.
struct Sql<'c> {
    params: Vec<Param>,
    columns: &'c [(String, ColumnType)],
    origin: &'c str,
}

impl Sql<'_> {
    fn bind(&mut self, p: Param, cast: &str) -> String {
        self.params.push(p);
        format!("${}::{cast}", self.params.len())
    }

    fn kind(&self, column: &str) -> ColumnType {
        self.columns
            .iter()
            .find(|(c, _)| c == column)
            .map_or(ColumnType::Unsupported, |(_, t)| *t)
    }

    fn quoted(&self, column: &str) -> Result<String, DataError> {
        quote_identifier(column).ok_or_else(|| DataError::Unsupported {
            origin: self.origin.to_string(),
            reason: format!("column name {column:?} is not a plain identifier"),
        })
    }

    /// A column as a number: float8, booleans as 0/1.
    fn number(&self, column: &str) -> Result<String, DataError> {
        let q = self.quoted(column)?;
        Ok(match self.kind(column) {
            ColumnType::Boolean => format!("({q})::int::float8"),
            _ => format!("({q})::float8"),
        })
    }

    /// A filter literal as a parameter of the column's type, with the column's SQL.
    fn operand(&mut self, column: &str, literal: &Literal) -> Result<(String, String), DataError> {
        let q = self.quoted(column)?;
        Ok(match (self.kind(column), literal) {
            (ColumnType::Text, Literal::Text(s)) => (format!("{q}::text"), self.bind(Param::Text(s.clone()), "text")),
            (ColumnType::Boolean, Literal::Bool(b)) => (q, self.bind(Param::Bool(*b), "bool")),
            (ColumnType::Boolean, Literal::Number(v)) => (q, self.bind(Param::Bool(*v != 0.0), "bool")),
            (_, Literal::Number(v)) => (format!("{q}::float8"), self.bind(Param::Number(*v), "float8")),
            (kind, literal) => {
                return Err(DataError::WrongType {
                    origin: self.origin.to_string(),
                    column: column.to_string(),
                    kind: kind.name().into(),
                    hint: format!("the filter compares it with {literal}"),
                });
            }
        })
    }

    /// The filter as a SQL boolean expression (SQL's own three-valued logic).
    fn filter(&mut self, e: &Expr) -> Result<String, DataError> {
        Ok(match e {
            Expr::All => "TRUE".into(),
            Expr::Compare { column, op, value } => {
                let (c, v) = self.operand(column, value)?;
                format!("({c} {} {v})", op.sql())
            }
            Expr::In {
                column,
                values,
                negated,
            } => {
                let mut c = String::new();
                let mut list = Vec::new();
                for v in values {
                    let (col, p) = self.operand(column, v)?;
                    c = col;
                    list.push(p);
                }
                format!("({c} {}IN ({}))", if *negated { "NOT " } else { "" }, list.join(", "))
            }
            Expr::IsNull { column, negated } => {
                format!(
                    "({} IS {}NULL)",
                    self.quoted(column)?,
                    if *negated { "NOT " } else { "" }
                )
            }
            Expr::Not(inner) => format!("(NOT {})", self.filter(inner)?),
            Expr::And(a, b) => format!("({} AND {})", self.filter(a)?, self.filter(b)?),
            Expr::Or(a, b) => format!("({} OR {})", self.filter(a)?, self.filter(b)?),
        })
    }
}

/// The dataset's person id column, quoted, when it names one.
fn pg_person(pg: &PostgresConnector, person: Option<&str>) -> Result<Option<(String, String)>, DataError> {
    let Some(column) = person else { return Ok(None) };
    let quoted = quote_identifier(column).ok_or_else(|| DataError::Unsupported {
        origin: super::Connector::source(pg).to_string(),
        reason: format!("person id column {column:?} is not a plain identifier"),
    })?;
    Ok(Some((column.to_string(), quoted)))
}

/// The answer computed by the database: one aggregate statement per part, all in one
/// READ ONLY transaction under the dataset's statement timeout.
pub fn pushdown_answer(
    pg: &PostgresConnector,
    person: Option<&str>,
    manifest: &QueryManifest,
    plan: &QueryPlan,
) -> Result<Vec<i64>, DataError> {
    let origin = super::Connector::source(pg);
    let filter = manifest.filter_expr().map_err(|e| DataError::Unsupported {
        origin: origin.to_string(),
        reason: e.to_string(),
    })?;
    let columns = check_columns(origin, manifest, &filter, &super::Connector::columns(pg)?)?;
    let mut statements = Vec::new();
    for p in &plan.parts {
        let mut sql = Sql {
            params: Vec::new(),
            columns: &columns,
            origin,
        };
        let mut filter_sql = sql.filter(&filter)?;
        let select = match &p.part {
            Part::Count { column: None } => "count(*)::int8".to_string(),
            Part::Count { column: Some(c) } => format!("count({})::int8", sql.quoted(c)?),
            Part::Sum {
                column,
                lower,
                upper,
                quantum,
            } => {
                let v = sql.number(column)?;
                // GREATEST and LEAST skip NULLs: keep missing values out explicitly.
                filter_sql = format!("({filter_sql} AND {} IS NOT NULL)", sql.quoted(column)?);
                let (lo, hi, q) = (
                    sql.bind(Param::Number(*lower), "float8"),
                    sql.bind(Param::Number(*upper), "float8"),
                    sql.bind(Param::Number(*quantum), "float8"),
                );
                format!("coalesce(sum(floor(least(greatest({v}, {lo}), {hi}) / {q} + 0.5)), 0)::float8")
            }
            Part::Bins { columns: cols, edges } => {
                let mut buckets = Vec::new();
                for (c, e) in cols.iter().zip(edges) {
                    let v = sql.number(c)?;
                    let arr = sql.bind(Param::Numbers(e.clone()), "float8[]");
                    buckets.push(format!(
                        "least(greatest(width_bucket({v}, {arr}), 1), {})::int4",
                        e.len() - 1
                    ));
                    filter_sql = format!("({filter_sql} AND {} IS NOT NULL)", sql.quoted(c)?);
                }
                let group: Vec<String> = (1..=buckets.len()).map(|i| i.to_string()).collect();
                statements.push((
                    p,
                    format!(
                        "SELECT {}, count(*)::int8 FROM {} WHERE {filter_sql} GROUP BY {}",
                        buckets.join(", "),
                        pg.relation(),
                        group.join(", ")
                    ),
                    sql.params,
                ));
                continue;
            }
        };
        statements.push((
            p,
            format!("SELECT {select} FROM {} WHERE {filter_sql}", pg.relation()),
            sql.params,
        ));
    }
    let mut answer = vec![0i64; plan.len()];
    let person = pg_person(pg, person)?;
    let origin_text = origin.to_string();
    super::postgres::block_on(async {
        let mut client = pg.connect().await?;
        let tx = pg.begin(&mut client).await?;
        // One row per person: repeated ids refuse the query, with the count.
        if let Some((column, quoted)) = &person {
            let repeats = format!(
                "SELECT count(*)::int8, coalesce(sum(n), 0)::int8 FROM (SELECT count(*) AS n FROM {} GROUP BY {quoted} HAVING count(*) > 1) AS repeated",
                pg.relation()
            );
            let row = tx.query_one(repeats.as_str(), &[]).await.map_err(|e| pg.error(e))?;
            let (persons, rows): (i64, i64) = (
                row.try_get(0).map_err(|e| pg.error(e))?,
                row.try_get(1).map_err(|e| pg.error(e))?,
            );
            if persons > 0 {
                return Err(DataError::RepeatedPersons {
                    origin: origin_text.clone(),
                    column: column.clone(),
                    persons: persons as usize,
                    rows: rows as usize,
                });
            }
        }
        for (p, text, params) in &statements {
            let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(Param::as_sql).collect();
            let rows = tx.query(text.as_str(), &refs).await.map_err(|e| pg.error(e))?;
            match &p.part {
                Part::Count { .. } => answer[p.offset] = rows[0].try_get::<_, i64>(0).map_err(|e| pg.error(e))?,
                Part::Sum { .. } => {
                    let v: f64 = rows[0].try_get(0).map_err(|e| pg.error(e))?;
                    answer[p.offset] = v as i64;
                }
                Part::Bins { edges, .. } => {
                    for r in &rows {
                        let mut cell = 0usize;
                        for (k, e) in edges.iter().enumerate() {
                            let b: i32 = r.try_get(k).map_err(|e| pg.error(e))?;
                            cell = cell * (e.len() - 1) + (b as usize - 1);
                        }
                        answer[p.offset + cell] = r.try_get::<_, i64>(edges.len()).map_err(|e| pg.error(e))?;
                    }
                }
            }
        }
        tx.commit().await.map_err(|e| pg.error(e))?;
        Ok(())
    })?;
    Ok(answer)
}
