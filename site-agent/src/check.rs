//! `medfl-agent datasets check`: hospital IT's dry run. Without training and without
//! the agent's store (it runs beside a running agent), it shows each dataset as the
//! agent sees it: its source, the columns and their types and roles, the rows it can
//! use, the rows it leaves out and why, and warnings (no person id, a database role
//! that could write).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use medfl_shared::manifest::StudyManifest;

use crate::data::{DataError, Dataset, Encoded, FeatureSelection};
use crate::settings::ConfigFile;

/// What the check found: the report to print, and whether every dataset read.
#[derive(Debug, Clone)]
pub struct CheckReport {
    pub text: String,
    pub ok: bool,
}

/// Checks every dataset of `config` (or only `only`); with a study's `manifest`, the
/// dataset it names is read through the study's schema (its classes, categories, or
/// OMOP cohort), as a round would.
pub fn datasets_check(config: &Path, only: Option<&str>, manifest: Option<&StudyManifest>) -> Result<CheckReport> {
    let text = std::fs::read_to_string(config).with_context(|| format!("read {}", config.display()))?;
    let file: ConfigFile = toml::from_str(&text).with_context(|| format!("parse {}", config.display()))?;
    let base = config.parent().unwrap_or(Path::new("."));
    let mut report = CheckReport {
        text: String::new(),
        ok: true,
    };
    let mut found = false;
    for cfg in file.datasets {
        if only.is_some_and(|name| name != cfg.name) {
            continue;
        }
        found = true;
        let name = cfg.name.clone();
        match Dataset::open(cfg, base) {
            Ok(dataset) => match manifest.filter(|m| m.data.dataset == dataset.config.name) {
                Some(m) => check_study(&dataset, m, &mut report),
                None => check_one(&dataset, &mut report),
            },
            Err(e) => {
                report.ok = false;
                let _ = writeln!(report.text, "dataset {name:?}: ERROR {e}\n");
            }
        }
    }
    if !found {
        anyhow::bail!(
            "{} has no dataset{}",
            config.display(),
            only.map(|n| format!(" named {n:?}")).unwrap_or_default()
        );
    }
    Ok(report)
}

/// A dataset read through a study's schema.
fn check_study(dataset: &Dataset, manifest: &StudyManifest, report: &mut CheckReport) {
    let out = &mut report.text;
    let _ = writeln!(
        out,
        "{}\n  as study {:?} reads it (manifest {}):",
        dataset.connector.source(),
        manifest.name,
        &manifest.hash()[..12]
    );
    match dataset.encode(&manifest.data) {
        Ok(e) => {
            let _ = writeln!(out, "  model inputs ({}): {}", e.inputs.len(), e.inputs.join(", "));
            rows_section(out, &e);
            for w in &e.warnings {
                let _ = writeln!(out, "  warning: {w}");
            }
            let _ = writeln!(out);
        }
        Err(e) => {
            let _ = writeln!(out, "  ERROR {e}\n");
            report.ok = false;
        }
    }
}

fn rows_section(out: &mut String, e: &Encoded) {
    let dropped: usize = e.dropped.iter().map(|(_, n)| n).sum();
    let _ = writeln!(
        out,
        "  rows: {} read, {} usable, {dropped} left out; {} model inputs",
        e.read,
        e.rows(),
        e.inputs.len()
    );
    for (why, n) in &e.dropped {
        let _ = writeln!(out, "    {n} left out: {why}");
    }
}

fn check_one(dataset: &Dataset, report: &mut CheckReport) {
    let cfg = &dataset.config;
    let out = &mut report.text;
    let _ = writeln!(out, "{}", dataset.connector.source());
    if let Some(omop) = &dataset.omop {
        match omop.summary() {
            Ok((persons, periods)) => {
                let _ = writeln!(
                    out,
                    "  OMOP CDM: {persons} persons, {periods} observation periods; a study's cohort is built from its [data.omop]: add --manifest study.toml to build it"
                );
            }
            Err(e) => {
                let _ = writeln!(out, "  ERROR {e}");
                report.ok = false;
            }
        }
        let _ = writeln!(out);
        return;
    }
    let fail = |out: &mut String, e: &DataError| {
        let _ = writeln!(out, "  ERROR {e}\n");
    };
    let columns = match dataset.read_columns() {
        Ok(c) => c,
        Err(e) => {
            fail(out, &e);
            report.ok = false;
            return;
        }
    };
    let (mut schema, left_out) = match dataset.default_schema() {
        Ok(s) => s,
        Err(e) => {
            fail(out, &e);
            report.ok = false;
            return;
        }
    };
    let _ = writeln!(out, "  columns ({}):", columns.len());
    let width = columns.iter().map(|(c, _)| c.len()).max().unwrap_or(0);
    for (column, ty) in &columns {
        let role = if column == &cfg.label {
            "label".to_string()
        } else if Some(column) == cfg.person_id.as_ref() {
            "person id".to_string()
        } else if schema.features.contains(column) {
            "feature".to_string()
        } else if let Some((_, why)) = left_out.iter().find(|(c, _)| c == column) {
            format!("left out: {why}")
        } else {
            "not listed in the dataset's features".to_string()
        };
        let _ = writeln!(out, "    {column:<width$}  {:<9}  {role}", ty.name());
    }
    if let FeatureSelection::Columns(list) = &cfg.features
        && let Some(absent) = list.iter().find(|f| !columns.iter().any(|(c, _)| c == *f))
    {
        let _ = writeln!(
            out,
            "  ERROR features lists {absent:?}, which the source does not have\n"
        );
        report.ok = false;
        return;
    }
    // The label read as 0/1; otherwise its distinct values are taken as classes, as a
    // study's data.classes would list them.
    let mut encoded = dataset.encode(&schema);
    if let Err(DataError::BadLabel { .. }) = &encoded {
        match label_values(dataset) {
            Ok(values) => {
                let _ = writeln!(
                    out,
                    "  label {:?}: {} classes ({})",
                    cfg.label,
                    values.len(),
                    values.join(", ")
                );
                schema.classes = values;
                encoded = dataset.encode(&schema);
            }
            Err(e) => encoded = Err(e),
        }
    }
    match encoded {
        Ok(e) => rows_section(out, &e),
        Err(e) => {
            fail(out, &e);
            report.ok = false;
            return;
        }
    }
    if cfg.person_id.is_none() {
        let _ = writeln!(
            out,
            "  warning: no person_id: every row is taken to be a different person; name the person id column so that a person with several rows is refused, not counted twice"
        );
    }
    if let Some(pg) = dataset.postgres_connector() {
        match pg.role_can_write() {
            Ok(true) => {
                let _ = writeln!(
                    out,
                    "  warning: the database role could write (a superuser, or INSERT, UPDATE, DELETE or TRUNCATE on a table); every statement runs READ ONLY, but give the agent a role that can only read"
                );
            }
            Ok(false) => {}
            Err(e) => {
                let _ = writeln!(out, "  warning: could not check the role's privileges: {e}");
            }
        }
    }
    let _ = writeln!(out);
}

/// The label column's distinct values (at most 1000), sorted as numbers where they all
/// are, else as text.
fn label_values(dataset: &Dataset) -> Result<Vec<String>, DataError> {
    let mut values = std::collections::BTreeSet::new();
    let label = [dataset.config.label.clone()];
    dataset.connector.scan(&label, &mut |_, cells| {
        let key = match cells.first() {
            Some(crate::data::Cell::Text(t)) => t.trim().to_string(),
            Some(crate::data::Cell::Number(v)) => format!("{v}"),
            Some(crate::data::Cell::Bool(b)) => b.to_string(),
            _ => return Ok(()),
        };
        if values.len() < 1000 {
            values.insert(key);
        }
        Ok(())
    })?;
    let mut values: Vec<String> = values.into_iter().collect();
    if values.iter().all(|v| v.parse::<f64>().is_ok()) {
        values.sort_by(|a, b| {
            a.parse::<f64>()
                .unwrap_or(0.0)
                .total_cmp(&b.parse::<f64>().unwrap_or(0.0))
        });
    }
    Ok(values)
}
