//! `medfl study report ID --out report.html`: one self-contained HTML file (inline CSS
//! and SVG, no script, no network) with the study's manifest, its rounds, its curves
//! (training loss, federated evaluation, adaptive clip norm) and its privacy ledger with
//! the ε spent against the budget round by round.

use std::fmt::Write as _;

use medfl_proto::v1 as pb;

/// Escapes text for HTML.
fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One line of a chart: its name, colour and (x, y) points.
pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
}

const PALETTE: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
];

/// An SVG line chart (760 × 280) of `series` over rounds, with an optional dashed
/// horizontal line (a budget), axis ticks at the ends and a legend.
pub fn line_chart(title: &str, y_label: &str, series: &[Series], limit: Option<(&str, f64)>) -> String {
    let (w, h, left, right, top, bottom) = (760.0, 280.0, 64.0, 220.0, 30.0, 40.0);
    let points = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64, f64::NEG_INFINITY);
    for (x, y) in points {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y0 = y0.min(*y);
        y1 = y1.max(*y);
    }
    if let Some((_, l)) = limit {
        y1 = y1.max(l);
    }
    if !x0.is_finite() {
        return format!("<p class=\"empty\">{}: no data</p>", esc(title));
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    y1 *= 1.05;
    let px = |x: f64| left + (x - x0) / (x1 - x0) * (w - left - right);
    let py = |y: f64| top + (1.0 - (y - y0) / (y1 - y0)) * (h - top - bottom);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"{}\">",
        esc(title)
    );
    let _ = write!(
        svg,
        "<text x=\"{left}\" y=\"18\" class=\"title\">{}</text>\
         <line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#888\"/>\
         <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"#888\"/>",
        esc(title),
        h - bottom,
        w - right,
        h - bottom,
        h - bottom
    );
    for (x, anchor) in [(x0, "start"), (x1, "end")] {
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"{anchor}\" class=\"tick\">{}</text>",
            px(x),
            h - bottom + 16.0,
            x
        );
    }
    for y in [y0, y1 / 1.05] {
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" class=\"tick\">{:.4}</text>",
            left - 6.0,
            py(y) + 4.0,
            y
        );
    }
    let _ = write!(
        svg,
        "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" class=\"tick\">round</text>\
         <text x=\"14\" y=\"{:.1}\" transform=\"rotate(-90 14 {:.1})\" text-anchor=\"middle\" class=\"tick\">{}</text>",
        (left + w - right) / 2.0,
        h - 6.0,
        (top + h - bottom) / 2.0,
        (top + h - bottom) / 2.0,
        esc(y_label)
    );
    if let Some((name, l)) = limit {
        let _ = write!(
            svg,
            "<line x1=\"{left}\" y1=\"{:.1}\" x2=\"{}\" y2=\"{:.1}\" class=\"limit\" stroke=\"#d62728\" stroke-dasharray=\"6 4\"/>\
             <text x=\"{}\" y=\"{:.1}\" class=\"legend\">{} {l:.4}</text>",
            py(l),
            w - right,
            py(l),
            w - right + 8.0,
            py(l) + 4.0,
            esc(name)
        );
    }
    for (i, s) in series.iter().enumerate() {
        let path: Vec<String> = s
            .points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = write!(
            svg,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"><title>{}</title></polyline>",
            s.color,
            path.join(" "),
            esc(&s.name)
        );
        for (x, y) in &s.points {
            let _ = write!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{}\"><title>{} round {x}: {y:.4}</title></circle>",
                px(*x),
                py(*y),
                s.color,
                esc(&s.name)
            );
        }
        let ly = top + 14.0 + 16.0 * i as f64 + if limit.is_some() { 16.0 } else { 0.0 };
        let _ = write!(
            svg,
            "<rect x=\"{}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"{:.1}\" class=\"legend\">{}</text>",
            w - right + 8.0,
            ly - 9.0,
            s.color,
            w - right + 22.0,
            ly,
            esc(&s.name)
        );
    }
    svg.push_str("</svg>");
    svg
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
        state = esc(crate::admin::state_label(info.state)),
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
    let loss: Vec<(f64, f64)> = committed
        .iter()
        .filter(|r| r.mean_train_loss.is_finite())
        .map(|r| (r.round as f64, r.mean_train_loss))
        .collect();
    let eval_acc: Vec<(f64, f64)> = committed
        .iter()
        .filter(|r| r.eval_sites > 0)
        .map(|r| (r.round as f64 - 1.0, r.eval_accuracy))
        .collect();
    let eval_loss: Vec<(f64, f64)> = committed
        .iter()
        .filter(|r| r.eval_sites > 0)
        .map(|r| (r.round as f64 - 1.0, r.eval_loss))
        .collect();
    html.push_str(&line_chart(
        "Loss (training: during the round; held-out: model after it)",
        "loss",
        &[
            Series {
                name: "mean training loss".into(),
                color: PALETTE[0],
                points: loss,
            },
            Series {
                name: "held-out loss".into(),
                color: PALETTE[1],
                points: eval_loss,
            },
        ],
        None,
    ));
    if !eval_acc.is_empty() {
        html.push_str(&line_chart(
            "Held-out accuracy (federated evaluation, model after each round)",
            "accuracy",
            &[Series {
                name: "held-out accuracy".into(),
                color: PALETTE[2],
                points: eval_acc,
            }],
            None,
        ));
    }
    let clips: Vec<(f64, f64)> = committed
        .iter()
        .filter(|r| r.clip_norm > 0.0)
        .map(|r| (r.round as f64, r.clip_norm))
        .collect();
    if !clips.is_empty() {
        html.push_str(&line_chart(
            "Adaptive clip norm",
            "C",
            &[Series {
                name: "clip norm".into(),
                color: PALETTE[3],
                points: clips,
            }],
            None,
        ));
    }

    // Privacy.
    html.push_str("<h2>Privacy ledger</h2>");
    match ledger {
        None => html.push_str("<p>This study runs without <code>[privacy]</code>: it has no ledger.</p>"),
        Some(l) => {
            let mut by_ledger: std::collections::BTreeMap<String, Vec<(f64, f64)>> = Default::default();
            for c in &l.charges {
                let key = if c.site == "*" {
                    "study-wide (site level)".to_string()
                } else {
                    format!("{} / {}", c.site, c.dataset)
                };
                by_ledger
                    .entry(key)
                    .or_default()
                    .push((c.round as f64, c.epsilon_after));
            }
            let series: Vec<Series> = by_ledger
                .into_iter()
                .enumerate()
                .map(|(i, (name, points))| Series {
                    name,
                    color: PALETTE[i % PALETTE.len()],
                    points,
                })
                .collect();
            html.push_str(&line_chart(
                &format!("ε spent by round (δ = {:e})", l.delta),
                "ε",
                &series,
                Some(("budget", l.budget_epsilon)),
            ));
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
        "<h2>Rounds</h2><table><tr><th>round</th><th>attempt</th><th class=\"l\">state</th><th>examples</th><th>train loss</th><th>held-out acc.</th><th class=\"l\">contributors / reason</th></tr>",
    );
    for r in &status.rounds {
        let fmt = |v: f64, ok: bool| if ok { format!("{v:.4}") } else { "–".into() };
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"l\">{}</td></tr>",
            r.round,
            r.attempt,
            if r.committed { "committed" } else { "failed" },
            r.num_examples,
            fmt(r.mean_train_loss, r.mean_train_loss.is_finite()),
            fmt(r.eval_accuracy, r.eval_sites > 0),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_scale_their_points_and_escape_names() {
        let svg = line_chart(
            "ε <spent>",
            "ε",
            &[Series {
                name: "a & b".into(),
                color: PALETTE[0],
                points: vec![(1.0, 0.5), (2.0, 1.0)],
            }],
            Some(("budget", 2.0)),
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("ε &lt;spent&gt;") && svg.contains("a &amp; b"));
        assert!(svg.contains("class=\"limit\""));
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(line_chart("none", "y", &[], None).contains("no data"));
    }
}
