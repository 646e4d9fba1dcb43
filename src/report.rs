//! `medfl study report ID --out report.html`: one self-contained HTML file (inline CSS
//! and SVG, no script, no network) with the study's manifest, its rounds, its curves
//! (training loss, federated evaluation, adaptive clip norm) and its privacy ledger with
//! the ε spent against the budget round by round.

use std::fmt::Write as _;

use medfl_proto::v1 as pb;
use medfl_shared::chart::{RoundPoint, epsilon_chart, esc, training_charts};

/// The model section: the tensors the study trains and, for a fine-tuning study, its
/// checkpoint and adapters.
fn trained_section(manifest_toml: &str) -> String {
    let Ok(manifest) = medfl_shared::manifest::StudyManifest::from_toml(manifest_toml) else {
        return String::new();
    };
    let names: Vec<String> = manifest.layout().into_iter().map(|t| esc(&t.name)).collect();
    let mut html = format!(
        "<h2>Model</h2><p>Trained tensors ({}, {} values; what travels and what the ledger's noise covers): <code>{}</code></p>",
        names.len(),
        manifest.num_params(),
        names.join(", ")
    );
    if let Some(ckpt) = &manifest.model.checkpoint {
        let method = match &manifest.model.lora {
            Some(l) => format!(
                "LoRA adapters of rank {} (FFA-LoRA: A frozen from seed {}, B trained) on {}{}",
                l.rank,
                l.seed,
                esc(&l.targets.join(", ")),
                if l.head { ", and the head in full" } else { "" }
            ),
            None => "full fine-tuning (every tensor, as an offset)".into(),
        };
        let _ = write!(
            html,
            "<p>Fine-tuned from checkpoint <code>{}</code> (SHA-256 <code>{}</code>) by {method}. The checkpoint's own weights are not covered by this study's ledger.</p>",
            esc(&ckpt.file),
            esc(&ckpt.sha256)
        );
    }
    html
}

/// The report for `status` (with its manifest) and, for a `[privacy]` study, its ledger.
pub fn study_report(status: &pb::StudyStatus, ledger: Option<&pb::LedgerReport>) -> String {
    let info = status.info.clone().unwrap_or_default();
    let committed: Vec<&pb::RoundRecord> = status.rounds.iter().filter(|r| r.committed).collect();
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>medfl study {id}</title><style>\
         body{{font-family:system-ui,sans-serif;margin:2em;max-width:1000px;color:#222}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}}\
         th{{background:#f2f2f2}}td.l{{text-align:left}}pre{{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}}\
         .title{{font-weight:600;font-size:14px}}.tick,.legend{{font-size:11px;fill:#444}}.axis{{stroke:#888}}\
         .limit{{stroke:#d62728;stroke-dasharray:6 4}}.empty{{color:#888}}</style></head><body>\
         <h1>Study {name} <small>({id})</small></h1>\
         <p>State <b>{state}</b>, {done} of {total} rounds committed. Manifest SHA-256 <code>{hash}</code>.{reason}</p>",
        id = esc(&info.study_id),
        name = esc(&info.name),
        state = esc(state_label(info.state)),
        done = info.rounds_completed,
        total = info.rounds_total,
        hash = esc(&info.manifest_hash),
        reason = if info.reason.is_empty() {
            String::new()
        } else {
            format!(" Reason: {}.", esc(&info.reason))
        },
    );

    // Curves.
    html.push_str("<h2>Training</h2>");
    let points: Vec<RoundPoint> = committed
        .iter()
        .map(|r| RoundPoint {
            round: r.round,
            train_loss: Some(r.mean_train_loss),
            eval: (r.eval_sites > 0).then_some((r.eval_accuracy, r.eval_loss)),
            clip_norm: (r.clip_norm > 0.0).then_some(r.clip_norm),
        })
        .collect();
    for chart in training_charts(&points) {
        html.push_str(&chart);
    }

    // What was trained: a fine-tuned study trains offsets and adapters over a checkpoint
    // the ledger does not cover.
    html.push_str(&trained_section(&status.manifest_toml));

    // Privacy.
    html.push_str("<h2>Privacy ledger</h2>");
    match ledger {
        None => html.push_str("<p>This study runs without <code>[privacy]</code>: it has no ledger.</p>"),
        Some(l) => {
            let charges = l
                .charges
                .iter()
                .map(|c| (c.site.as_str(), c.dataset.as_str(), c.round, c.epsilon_after));
            html.push_str(&epsilon_chart(charges, l.delta, l.budget_epsilon));
            html.push_str(
                "<table><tr><th>round</th><th class=\"l\">site</th><th class=\"l\">dataset</th><th>σ</th><th>q</th><th>steps</th><th>clip</th><th>ε before</th><th>ε after</th></tr>",
            );
            for c in &l.charges {
                let _ = write!(
                    html,
                    "<tr><td>{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{:.4}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.4}</td><td>{:.4}</td></tr>",
                    c.round,
                    esc(&c.site),
                    esc(&c.dataset),
                    c.noise_multiplier,
                    c.sample_rate,
                    c.steps,
                    c.clip_norm,
                    c.epsilon_before,
                    c.epsilon_after
                );
            }
            html.push_str("</table>");
        }
    }

    // Rounds.
    html.push_str(
        "<h2>Rounds</h2><table><tr><th>round</th><th>attempt</th><th class=\"l\">state</th><th>examples</th><th>train loss</th><th>held-out acc.</th><th>held-out ROC AUC</th><th class=\"l\">contributors / reason</th></tr>",
    );
    for r in &status.rounds {
        let fmt = |v: f64, ok: bool| if ok { format!("{v:.4}") } else { "–".into() };
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"l\">{}</td></tr>",
            r.round,
            r.attempt,
            if r.committed { "committed" } else { "failed" },
            r.num_examples,
            fmt(r.mean_train_loss, r.mean_train_loss.is_finite()),
            match r.eval_noised {
                true => format!("{} (DP)", fmt(r.eval_accuracy, r.eval_sites > 0)),
                false => fmt(r.eval_accuracy, r.eval_sites > 0),
            },
            fmt(r.eval_auc, r.eval_sites > 0 && r.eval_auc.is_finite()),
            esc(&if r.committed {
                r.contributors.join(", ")
            } else {
                r.reason.clone()
            })
        );
    }
    html.push_str("</table>");
    if !status.refusals.is_empty() {
        html.push_str("<h2>Refusals</h2><ul>");
        for r in &status.refusals {
            let _ = write!(
                html,
                "<li>{} (round {}): {}</li>",
                esc(&r.site),
                r.round,
                esc(&r.reason)
            );
        }
        html.push_str("</ul>");
    }
    let _ = writeln!(
        html,
        "<h2>Manifest</h2><pre>{}</pre><p><small>medfl {}, generated {} ms since the epoch.</small></p></body></html>",
        esc(&status.manifest_toml),
        env!("CARGO_PKG_VERSION"),
        medfl_shared::unix_ms(std::time::SystemTime::now())
    );
    html
}

/// A study state's name, as the CLI and reports print it.
pub fn state_label(state: i32) -> &'static str {
    match pb::StudyState::try_from(state).unwrap_or(pb::StudyState::Unspecified) {
        pb::StudyState::Unspecified => "unknown",
        pb::StudyState::Created => "created",
        pb::StudyState::Running => "running",
        pb::StudyState::Paused => "paused",
        pb::StudyState::Completed => "completed",
        pb::StudyState::Aborted => "aborted",
        pb::StudyState::Failed => "failed",
        pb::StudyState::BudgetExhausted => "budget_exhausted",
    }
}
