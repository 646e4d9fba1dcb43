//! `medfl query`: federated analytics. An admin signs a query manifest, the
//! coordinator asks the sites, and the released totals come back with the standard
//! deviation of the noise in each number and the ε each site was charged.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use medfl_proto::transport::Profile;
use medfl_proto::v1 as pb;
use medfl_proto::v1::admin_client::AdminClient;
use medfl_shared::query::{QueryResult, result_csv};
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::conn::Conn;

#[derive(Debug, Clone, Subcommand)]
pub enum QueryCommand {
    /// Signs and runs a query manifest (TOML); waits for its result unless --no-wait.
    Create {
        #[arg(long)]
        manifest: PathBuf,
        #[arg(long)]
        no_wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// Lists queries.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Shows a query's state: who was asked, who answered, who refused and why not.
    Status {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Prints a released query's numbers with ± std; --csv or --json writes them.
    Results {
        id: String,
        #[arg(long)]
        json: bool,
        /// Writes the result as CSV to this file.
        #[arg(long)]
        csv: Option<PathBuf>,
    },
}

pub fn status_json(q: &pb::QueryStatus) -> Value {
    json!({
        "query_id": q.query_id,
        "name": q.name,
        "dataset": q.dataset,
        "manifest_hash": q.manifest_hash,
        "state": q.state,
        "reason": q.reason,
        "selected": q.selected,
        "answered": q.answered,
        "refused": q.refused,
        "epsilon": q.epsilon,
        "created_by": q.created_by,
        "created_unix_ms": q.created_ms,
        "finished_unix_ms": q.finished_ms,
        "result": serde_json::from_str::<Value>(&q.result_json).ok(),
    })
}

/// The released totals of a query status, if any.
pub fn total(q: &pb::QueryStatus) -> Option<QueryResult> {
    let v: Value = serde_json::from_str(&q.result_json).ok()?;
    serde_json::from_value(v.get("total")?.clone()).ok()
}

/// A result as a table: each number ± the std of its noise.
pub fn table(result: &QueryResult) -> String {
    let mut out = format!(
        "{} sites; ε = {:.4} charged to each site's ledger (δ = {:e})\n",
        result.sites.len(),
        result.epsilon,
        result.delta
    );
    for (i, s) in result.statistics.iter().enumerate() {
        let cols = if s.columns.is_empty() {
            String::new()
        } else {
            format!(" of {}", s.columns.join(" × "))
        };
        out.push_str(&format!("{}. {}{cols} (share {:.2} of ε)\n", i + 1, s.kind, s.share));
        for (j, v) in s.values.iter().enumerate() {
            let label = s.labels.get(j).map(String::as_str).unwrap_or("");
            let value = match (v.value, v.suppressed) {
                (_, true) | (None, _) => "suppressed".to_string(),
                (Some(x), _) if v.std.is_finite() => format!("{x:.3} ± {:.3}", v.std),
                (Some(x), _) => format!("{x:.3}"),
            };
            out.push_str(&format!("   {label:<28} {value}\n"));
        }
        if !s.note.is_empty() {
            out.push_str(&format!("   ({})\n", s.note));
        }
    }
    out
}

fn client(conn: &Conn) -> Result<(Profile, AdminClient<Channel>)> {
    let profile = Profile::load(&conn.profile).with_context(|| format!("load profile {}", conn.profile.display()))?;
    let channel = profile.channel(conn.coordinator.as_deref())?;
    Ok((profile, AdminClient::new(channel)))
}

/// Waits until the query is released or failed.
pub async fn wait(admin: &mut AdminClient<Channel>, id: &str) -> Result<pb::QueryStatus> {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} query {msg}").expect("template"));
    bar.enable_steady_tick(Duration::from_millis(120));
    loop {
        let q = admin
            .get_query(pb::QueryRef {
                query_id: id.to_string(),
            })
            .await?
            .into_inner();
        bar.set_message(format!("{id}: {} ({} answered)", q.state, q.answered.len()));
        if q.state != "running" {
            bar.finish_and_clear();
            return Ok(q);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn print_status(q: &pb::QueryStatus) {
    println!(
        "query {} ({:?}) on dataset {:?}: {}",
        q.query_id, q.name, q.dataset, q.state
    );
    if !q.reason.is_empty() {
        println!("  reason: {}", q.reason);
    }
    println!("  asked: {}", q.selected.join(", "));
    println!(
        "  answered (each charged ε = {:.4}): {}",
        q.epsilon,
        q.answered.join(", ")
    );
    if !q.refused.is_empty() {
        println!("  refused: {}", q.refused.join(", "));
    }
}

pub async fn run(conn: &Conn, command: QueryCommand) -> Result<()> {
    let (profile, mut admin) = client(conn)?;
    match command {
        QueryCommand::Create {
            manifest,
            no_wait,
            json,
        } => {
            let text = std::fs::read_to_string(&manifest).with_context(|| format!("read {}", manifest.display()))?;
            let request = profile.signed_query(&text)?;
            let q = admin.create_query(request).await?.into_inner();
            if no_wait {
                println!("created query {} (manifest {})", q.query_id, q.manifest_hash);
                return Ok(());
            }
            let q = wait(&mut admin, &q.query_id).await?;
            if json {
                println!("{}", status_json(&q));
            } else {
                print_status(&q);
                if let Some(r) = total(&q) {
                    print!("{}", table(&r));
                }
            }
            if q.state != "released" {
                bail!("query {} {}: {}", q.query_id, q.state, q.reason);
            }
        }
        QueryCommand::List { json } => {
            let list = admin.list_queries(pb::Empty {}).await?.into_inner();
            if json {
                println!("{}", Value::Array(list.queries.iter().map(status_json).collect()));
            } else {
                for q in &list.queries {
                    println!(
                        "{}  {:<9} ε {:.3}  {} of {} answered  {}",
                        q.query_id,
                        q.state,
                        q.epsilon,
                        q.answered.len(),
                        q.selected.len(),
                        q.name
                    );
                }
            }
        }
        QueryCommand::Status { id, json } => {
            let q = admin.get_query(pb::QueryRef { query_id: id }).await?.into_inner();
            if json {
                println!("{}", status_json(&q));
            } else {
                print_status(&q);
            }
        }
        QueryCommand::Results { id, json, csv } => {
            let q = admin
                .get_query(pb::QueryRef { query_id: id.clone() })
                .await?
                .into_inner();
            let Some(result) = total(&q) else {
                bail!("query {id} has no released result ({}: {})", q.state, q.reason);
            };
            if let Some(path) = csv {
                std::fs::write(&path, result_csv(&result)).with_context(|| format!("write {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
            if json {
                println!("{}", q.result_json);
            } else {
                print!("{}", table(&result));
            }
        }
    }
    Ok(())
}
