//! The PostgreSQL connector: a table, or one query hospital IT wrote in `agent.toml`.
//!
//! - Every statement runs in a `READ ONLY` transaction with a `statement_timeout`.
//! - Rows stream through a portal (a server-side cursor) in batches, ordered by the
//!   person id (else by the first column), so the same seed gives the same split.
//! - SQL never comes from the coordinator. The agent writes its `SELECT` itself from
//!   identifiers it validates and quotes (`"…"`, with `"` doubled); it binds no values
//!   it did not write. Each column is converted on the server to what medfl reads:
//!   numbers to `float8`, dates and timestamps to days since 1970-01-01 (`float8`).
//! - The password comes from a file or an environment variable named in `agent.toml`,
//!   never from the file itself; a connection string that carries one is refused, and
//!   messages name the database by user, host, port and name only.
//!
//! - TLS to the database with `[datasets.postgres.tls]` (`pg_tls`): the server's
//!   certificate checked against the hospital's CA and the host (verify-full), and an
//!   optional client certificate; without it the connection is plain (the Unix socket,
//!   or a trusted network), and a connection string asking for TLS is refused.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, NoTls};

use super::{Cell, ColumnType, Connector, DataError, RowRef, RowSink};

/// `[datasets.postgres]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSource {
    /// A libpq connection string, as a URL (`postgresql://medfl@/cdm?host=/run/postgresql`)
    /// or `key=value` pairs (`host=/run/postgresql dbname=cdm user=medfl`), with no password.
    pub connection: String,
    /// A file holding the password (its first line).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// A table, optionally schema-qualified (`cdm.person`).
    #[serde(default)]
    pub table: Option<String>,
    /// Or one SELECT statement written by hospital IT.
    #[serde(default)]
    pub query: Option<String>,
    /// Seconds any one statement may run; default 300.
    #[serde(default = "default_timeout")]
    pub statement_timeout_secs: u64,
    /// Rows fetched per round trip from the cursor; default 10000.
    #[serde(default = "default_fetch")]
    pub fetch_rows: u32,
    /// TLS to the database, verify-full (and a client certificate if given).
    #[serde(default)]
    pub tls: Option<super::pg_tls::DatabaseTls>,
}

fn default_timeout() -> u64 {
    300
}

fn default_fetch() -> u32 {
    10_000
}

/// Whether `name` is a plain SQL identifier medfl will quote: 1 to 63 bytes of
/// letters, digits, `_` and `$`, not starting with a digit or `$`.
pub fn valid_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        && !name.starts_with(|c: char| c.is_ascii_digit() || c == '$')
}

/// A column name as a quoted identifier: any text but NUL, `"` doubled.
pub fn quote_identifier(name: &str) -> Option<String> {
    (!name.is_empty() && name.len() <= 63 && !name.contains('\0')).then(|| format!("\"{}\"", name.replace('"', "\"\"")))
}

impl PostgresSource {
    pub fn validate(&self, dataset: &str) -> Result<(), String> {
        let config = tokio_postgres::Config::from_str(&self.connection)
            .map_err(|e| format!("dataset {dataset:?}: the postgres connection string does not parse: {e}"))?;
        if config.get_password().is_some() {
            return Err(format!(
                "dataset {dataset:?}: the connection string carries a password; put it in password_file or password_env instead"
            ));
        }
        if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require && self.tls.is_none() {
            return Err(format!(
                "dataset {dataset:?}: sslmode=require without [datasets.postgres.tls]: give the CA that issued the database's certificate (ca = \"…\") so the agent can check it"
            ));
        }
        if self.password_file.is_some() && self.password_env.is_some() {
            return Err(format!(
                "dataset {dataset:?}: give password_file or password_env, not both"
            ));
        }
        match (&self.table, &self.query) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(format!(
                    "dataset {dataset:?}: give the postgres `table` or a `query`, one of them"
                ));
            }
            (Some(table), None) => {
                let parts: Vec<&str> = table.split('.').collect();
                if parts.len() > 2 || !parts.iter().all(|p| valid_identifier(p)) {
                    return Err(format!(
                        "dataset {dataset:?}: table {table:?} is not `name` or `schema.name` of letters, digits and _"
                    ));
                }
            }
            (None, Some(query)) => {
                if query.trim().is_empty() {
                    return Err(format!("dataset {dataset:?}: the postgres query is empty"));
                }
            }
        }
        if self.statement_timeout_secs == 0 || self.statement_timeout_secs > 24 * 3600 {
            return Err(format!(
                "dataset {dataset:?}: statement_timeout_secs must be 1 to 86400"
            ));
        }
        if self.fetch_rows == 0 {
            return Err(format!("dataset {dataset:?}: fetch_rows must be at least 1"));
        }
        Ok(())
    }
}

/// A PostgreSQL dataset, connected to per read.
pub struct PostgresConnector {
    origin: String,
    config: tokio_postgres::Config,
    from: String,
    /// Where the password comes from, read at each connection (it may rotate).
    password: Option<PasswordFrom>,
    timeout: Duration,
    fetch: i32,
    /// TLS to the database (verify-full), when configured.
    tls: Option<super::pg_tls::RustlsConnect>,
}

#[derive(Debug, Clone)]
enum PasswordFrom {
    File(PathBuf),
    Env(String),
}

/// The database as messages may name it: user, host, port and database, no password.
pub fn describe(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgresql://{}@{}:{}/{}",
        config.get_user().unwrap_or(""),
        hosts.join(","),
        port,
        config.get_dbname().unwrap_or("")
    )
}

/// The default ledger of every dataset over one database: `postgresql://host:port/db`
/// (whoever logs in, the patients are the same).
pub fn ledger_name(config: &tokio_postgres::Config) -> String {
    let described = describe(config);
    match described.split_once('@') {
        Some((_, rest)) => format!("postgresql://{rest}"),
        None => described,
    }
}

impl PostgresConnector {
    pub fn new(dataset: &str, pg: &PostgresSource, base: &Path) -> Result<Self, DataError> {
        let unsupported = |reason: String| DataError::Unsupported {
            origin: format!("dataset {dataset:?}"),
            reason,
        };
        pg.validate(dataset).map_err(unsupported)?;
        let mut config = tokio_postgres::Config::from_str(&pg.connection).map_err(|e| unsupported(e.to_string()))?;
        config.connect_timeout(Duration::from_secs(10));
        config.application_name("medfl-agent");
        let from = match (&pg.table, &pg.query) {
            (Some(table), _) => table
                .split('.')
                .map(|p| format!("\"{p}\""))
                .collect::<Vec<_>>()
                .join("."),
            (None, Some(query)) => format!("({}) AS medfl_query", query.trim().trim_end_matches(';')),
            (None, None) => unreachable!("validated: a table or a query"),
        };
        let what = match &pg.table {
            Some(t) => format!("table {t}"),
            None => "its query".to_string(),
        };
        let tls = match &pg.tls {
            Some(tls) => {
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                Some(super::pg_tls::RustlsConnect(std::sync::Arc::new(
                    tls.client_config(base).map_err(|reason| DataError::Unsupported {
                        origin: format!("dataset {dataset:?} TLS"),
                        reason,
                    })?,
                )))
            }
            None => None,
        };
        Ok(PostgresConnector {
            origin: format!("dataset {dataset:?} ({} {what})", describe(&config)),
            config,
            from,
            password: match (&pg.password_file, &pg.password_env) {
                (Some(f), _) => Some(PasswordFrom::File(base.join(f))),
                (None, Some(v)) => Some(PasswordFrom::Env(v.clone())),
                (None, None) => None,
            },
            timeout: Duration::from_secs(pg.statement_timeout_secs),
            fetch: pg.fetch_rows.min(i32::MAX as u32) as i32,
            tls,
        })
    }

    /// What a statement reads from: the quoted table, or hospital IT's query as a
    /// subquery.
    pub(super) fn relation(&self) -> &str {
        &self.from
    }

    /// The same database under another name in messages (the OMOP builder's).
    pub(super) fn named(mut self, origin: String) -> Self {
        self.origin = origin;
        self
    }

    /// The database as messages name it, without the dataset.
    pub(super) fn database(&self) -> String {
        describe(&self.config)
    }

    /// Rows per round trip from a cursor.
    pub(super) fn fetch_rows(&self) -> i32 {
        self.fetch
    }

    pub(super) fn error(&self, e: tokio_postgres::Error) -> DataError {
        if e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) {
            return DataError::Timeout {
                origin: self.origin.clone(),
                secs: self.timeout.as_secs(),
            };
        }
        let reason = match e.as_db_error() {
            Some(db) => format!("{}: {}", db.severity(), db.message()),
            None => e.to_string(),
        };
        DataError::Read {
            origin: self.origin.clone(),
            reason,
        }
    }

    pub(super) async fn connect(&self) -> Result<Client, DataError> {
        let mut config = self.config.clone();
        match &self.password {
            Some(PasswordFrom::File(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| DataError::Connect {
                    origin: self.origin.clone(),
                    reason: format!("read the password file {}: {e}", path.display()),
                })?;
                config.password(text.lines().next().unwrap_or("").as_bytes());
            }
            Some(PasswordFrom::Env(var)) => {
                let value = std::env::var(var).map_err(|_| DataError::Connect {
                    origin: self.origin.clone(),
                    reason: format!("the password variable {var} is not set"),
                })?;
                config.password(value.as_bytes());
            }
            None => {}
        }
        let refused = |e: tokio_postgres::Error| DataError::Connect {
            origin: self.origin.clone(),
            reason: match e.as_db_error() {
                Some(db) => db.message().to_string(),
                None => {
                    // The cause (a certificate the CA did not issue, a name mismatch).
                    let mut text = e.to_string();
                    let mut source = std::error::Error::source(&e);
                    while let Some(cause) = source {
                        text = format!("{text}: {cause}");
                        source = cause.source();
                    }
                    text
                }
            },
        };
        let client = match &self.tls {
            Some(tls) => {
                let (client, connection) = config.connect(tls.clone()).await.map_err(refused)?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "database connection closed");
                    }
                });
                client
            }
            None => {
                let (client, connection) = config.connect(NoTls).await.map_err(refused)?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "database connection closed");
                    }
                });
                client
            }
        };
        Ok(client)
    }

    /// Opens the read-only transaction every statement runs in, with the timeout.
    pub(super) async fn begin<'c>(&self, client: &'c mut Client) -> Result<tokio_postgres::Transaction<'c>, DataError> {
        let tx = client
            .build_transaction()
            .read_only(true)
            .start()
            .await
            .map_err(|e| self.error(e))?;
        tx.batch_execute(&format!("SET LOCAL statement_timeout = {}", self.timeout.as_millis()))
            .await
            .map_err(|e| self.error(e))?;
        Ok(tx)
    }

    /// The source's columns with their PostgreSQL types, from the prepared statement
    /// (nothing is executed).
    async fn describe(&self) -> Result<Vec<(String, Type)>, DataError> {
        let mut client = self.connect().await?;
        let tx = self.begin(&mut client).await?;
        let statement = tx
            .prepare(&format!("SELECT * FROM {} LIMIT 0", self.from))
            .await
            .map_err(|e| self.error(e))?;
        Ok(statement
            .columns()
            .iter()
            .map(|c| (c.name().to_string(), c.type_().clone()))
            .collect())
    }

    fn column_type(ty: &Type) -> ColumnType {
        match *ty {
            Type::INT2 | Type::INT4 | Type::INT8 => ColumnType::Integer,
            Type::FLOAT4 | Type::FLOAT8 => ColumnType::Float,
            Type::NUMERIC => ColumnType::Decimal,
            Type::BOOL => ColumnType::Boolean,
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => ColumnType::Text,
            Type::DATE => ColumnType::Date,
            Type::TIMESTAMP | Type::TIMESTAMPTZ => ColumnType::Timestamp,
            _ => ColumnType::Unsupported,
        }
    }

    async fn scan_async(&self, wanted: &[String], row: &mut RowSink<'_>) -> Result<(), DataError> {
        let described = self.describe().await?;
        let types: Vec<(String, ColumnType)> = described
            .iter()
            .map(|(name, ty)| (name.clone(), Self::column_type(ty)))
            .collect();
        let mut exprs = Vec::with_capacity(wanted.len());
        for w in wanted {
            let quoted = quote_identifier(w).ok_or_else(|| DataError::MissingColumn {
                origin: self.origin.clone(),
                column: w.clone(),
                columns: String::new(),
            })?;
            let ty = types
                .iter()
                .find(|(c, _)| c == w)
                .map(|(_, t)| *t)
                .ok_or_else(|| DataError::MissingColumn {
                    origin: self.origin.clone(),
                    column: w.clone(),
                    columns: types.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>().join(", "),
                })?;
            exprs.push(match ty {
                ColumnType::Integer | ColumnType::Float | ColumnType::Decimal => format!("{quoted}::float8"),
                ColumnType::Boolean => quoted,
                ColumnType::Text => format!("{quoted}::text"),
                ColumnType::Date => format!("({quoted} - DATE '1970-01-01')::float8"),
                ColumnType::Timestamp => format!("(EXTRACT(EPOCH FROM {quoted}) / 86400.0)::float8"),
                ColumnType::Unsupported => {
                    let pg_type = described.iter().find(|(c, _)| c == w).map_or("?", |(_, t)| t.name());
                    return Err(DataError::Unsupported {
                        origin: self.origin.clone(),
                        reason: format!(
                            "column {w:?} has type {pg_type}, which medfl does not read (integer, float, numeric, boolean, text, date, timestamp; no arrays, composites or JSON): cast it in the dataset's query"
                        ),
                    });
                }
            });
        }
        // Person id first in `wanted` after the label when configured; order by it
        // (then by everything read) so the same rows come in the same order every time.
        let order: Vec<String> = (1..=exprs.len()).map(|i| i.to_string()).collect();
        let order = if wanted.len() > 1 {
            let mut o = vec!["2".to_string()];
            o.extend(order.into_iter().filter(|i| i != "2"));
            o
        } else {
            order
        };
        let sql = format!(
            "SELECT {} FROM {} ORDER BY {}",
            exprs.join(", "),
            self.from,
            order.join(", ")
        );
        let mut client = self.connect().await?;
        let tx = self.begin(&mut client).await?;
        let statement = tx.prepare(&sql).await.map_err(|e| self.error(e))?;
        let portal = tx.bind(&statement, &[]).await.map_err(|e| self.error(e))?;
        let kinds: Vec<ColumnType> = wanted
            .iter()
            .map(|w| {
                types
                    .iter()
                    .find(|(c, _)| c == w)
                    .map(|(_, t)| *t)
                    .unwrap_or(ColumnType::Text)
            })
            .collect();
        let mut at = 0usize;
        loop {
            let rows = tx.query_portal(&portal, self.fetch).await.map_err(|e| self.error(e))?;
            if rows.is_empty() {
                break;
            }
            let mut cells: Vec<Cell<'_>> = Vec::with_capacity(kinds.len());
            for r in &rows {
                at += 1;
                cells.clear();
                for (i, kind) in kinds.iter().enumerate() {
                    let cell = match kind {
                        ColumnType::Boolean => r
                            .try_get::<_, Option<bool>>(i)
                            .map(|v| v.map_or(Cell::Missing, Cell::Bool)),
                        ColumnType::Text => r
                            .try_get::<_, Option<&str>>(i)
                            .map(|v| v.map_or(Cell::Missing, Cell::Text)),
                        ColumnType::Date | ColumnType::Timestamp => r
                            .try_get::<_, Option<f64>>(i)
                            .map(|v| v.map_or(Cell::Missing, Cell::Days)),
                        _ => r
                            .try_get::<_, Option<f64>>(i)
                            .map(|v| v.map_or(Cell::Missing, Cell::Number)),
                    }
                    .map_err(|e| self.error(e))?;
                    cells.push(cell);
                }
                row(RowRef::Row(at), &cells)?;
            }
            if rows.len() < self.fetch as usize {
                break;
            }
        }
        tx.commit().await.map_err(|e| self.error(e))?;
        Ok(())
    }

    /// Whether the login role could change data: a superuser, or a role with INSERT,
    /// UPDATE, DELETE or TRUNCATE on any table outside the system schemas. For
    /// `datasets check`'s warning: the read-only transaction stops writes anyway.
    pub fn role_can_write(&self) -> Result<bool, DataError> {
        block_on(async {
            let mut client = self.connect().await?;
            let tx = self.begin(&mut client).await?;
            let row = tx
                .query_one(
                    "SELECT r.rolsuper OR EXISTS (
                        SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                        WHERE c.relkind IN ('r', 'p')
                          AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                          AND n.nspname NOT LIKE 'pg_toast%'
                          AND has_table_privilege(c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE'))
                     FROM pg_roles r WHERE r.rolname = current_user",
                    &[],
                )
                .await
                .map_err(|e| self.error(e))?;
            row.try_get::<_, bool>(0).map_err(|e| self.error(e))
        })
    }
}

/// Runs a database future to completion on a runtime of its own, in a thread of its
/// own: the connectors are called from blocking code, inside the agent's runtime or not.
pub(super) fn block_on<T: Send>(
    future: impl std::future::Future<Output = Result<T, DataError>> + Send,
) -> Result<T, DataError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| DataError::Read {
                        origin: "the database client".into(),
                        reason: e.to_string(),
                    })?;
                runtime.block_on(future)
            })
            .join()
            .unwrap_or_else(|_| {
                Err(DataError::Read {
                    origin: "the database client".into(),
                    reason: "its thread panicked".into(),
                })
            })
    })
}

impl Connector for PostgresConnector {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn source(&self) -> &str {
        &self.origin
    }

    fn columns(&self) -> Result<Vec<(String, ColumnType)>, DataError> {
        let described = block_on(self.describe())?;
        Ok(described
            .into_iter()
            .map(|(name, ty)| {
                let column_type = Self::column_type(&ty);
                (name, column_type)
            })
            .collect())
    }

    fn scan(&self, wanted: &[String], row: &mut RowSink<'_>) -> Result<(), DataError> {
        block_on(self.scan_async(wanted, row))
    }
}
