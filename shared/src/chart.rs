//! SVG line charts for people to look at: the study report (`medfl study report`) and
//! the coordinator's dashboard draw the same charts from the same records. Text goes
//! through [`esc`]; the output is inert markup (no script, no external reference).

use std::fmt::Write as _;

/// Escapes text for HTML.
pub fn esc(text: &str) -> String {
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

pub const PALETTE: [&str; 8] = [
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

/// A ledger's name in charts and tables.
pub fn ledger_name(site: &str, dataset: &str) -> String {
    if site == "*" {
        "study-wide (site level)".to_string()
    } else {
        format!("{site} / {dataset}")
    }
}

/// The ε each ledger (site and dataset, or the study-wide one, site `*`) has spent
/// after each round, against the budget, from charges `(site, dataset, round, ε after)`.
pub fn epsilon_chart<'a>(
    charges: impl IntoIterator<Item = (&'a str, &'a str, u32, f64)>,
    delta: f64,
    budget: f64,
) -> String {
    let mut by_ledger: std::collections::BTreeMap<String, Vec<(f64, f64)>> = Default::default();
    for (site, dataset, round, epsilon_after) in charges {
        by_ledger
            .entry(ledger_name(site, dataset))
            .or_default()
            .push((round as f64, epsilon_after));
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
    line_chart(
        &format!("ε spent by round (δ = {delta:e})"),
        "ε",
        &series,
        Some(("budget", budget)),
    )
}

/// One committed round, as the training charts read it.
pub struct RoundPoint {
    pub round: u32,
    pub train_loss: Option<f64>,
    /// Federated evaluation of the model the round started from (round − 1's).
    pub eval: Option<(f64, f64)>,
    pub clip_norm: Option<f64>,
}

/// The training charts of committed rounds: the loss (training, held-out), then, when
/// there are any, the held-out accuracy and the adaptive clip norm.
pub fn training_charts(rounds: &[RoundPoint]) -> Vec<String> {
    let loss = rounds
        .iter()
        .filter_map(|r| r.train_loss.filter(|l| l.is_finite()).map(|l| (r.round as f64, l)))
        .collect();
    let eval_loss = rounds
        .iter()
        .filter_map(|r| r.eval.map(|(_, l)| (r.round as f64 - 1.0, l)))
        .collect();
    let eval_acc: Vec<(f64, f64)> = rounds
        .iter()
        .filter_map(|r| r.eval.map(|(a, _)| (r.round as f64 - 1.0, a)))
        .collect();
    let clips: Vec<(f64, f64)> = rounds
        .iter()
        .filter_map(|r| r.clip_norm.map(|c| (r.round as f64, c)))
        .collect();
    let mut charts = vec![line_chart(
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
    )];
    if !eval_acc.is_empty() {
        charts.push(line_chart(
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
    if !clips.is_empty() {
        charts.push(line_chart(
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
    charts
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

/// An SVG bar chart (760 × 260) of released numbers with error bars of ±2 standard
/// deviations of their noise (about 95 % of the noise under a Gaussian); suppressed
/// values are drawn as an empty, dashed bar labelled "suppressed".
pub fn bar_chart(title: &str, labels: &[String], values: &[Option<f64>], stds: &[f64]) -> String {
    let (w, h, left, right, top, bottom) = (760.0, 260.0, 64.0, 20.0, 30.0, 70.0);
    let n = values.len();
    if n == 0 {
        return format!("<p class=\"empty\">{}: no data</p>", esc(title));
    }
    let hi = values
        .iter()
        .zip(stds)
        .filter_map(|(v, s)| v.map(|v| v + 2.0 * if s.is_finite() { *s } else { 0.0 }))
        .fold(1.0f64, f64::max)
        * 1.05;
    let lo = values
        .iter()
        .zip(stds)
        .filter_map(|(v, s)| v.map(|v| v - 2.0 * if s.is_finite() { *s } else { 0.0 }))
        .fold(0.0f64, f64::min);
    let py = |y: f64| top + (1.0 - (y - lo) / (hi - lo)) * (h - top - bottom);
    let slot = (w - left - right) / n as f64;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"{}\">\
         <text x=\"{left}\" y=\"18\" class=\"title\">{}</text>\
         <line x1=\"{left}\" y1=\"{:.1}\" x2=\"{}\" y2=\"{:.1}\" stroke=\"#888\"/>",
        esc(title),
        esc(title),
        py(0.0),
        w - right,
        py(0.0)
    );
    for y in [lo, hi / 1.05] {
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" class=\"tick\">{:.4}</text>",
            left - 6.0,
            py(y) + 4.0,
            y
        );
    }
    for (i, v) in values.iter().enumerate() {
        let x = left + slot * i as f64 + slot * 0.15;
        let bw = slot * 0.7;
        let label = labels.get(i).map(String::as_str).unwrap_or("");
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"end\" transform=\"rotate(-35 {:.1} {})\" class=\"tick\">{}</text>",
            x + bw / 2.0,
            h - bottom + 14.0,
            x + bw / 2.0,
            h - bottom + 14.0,
            esc(label)
        );
        match v {
            Some(v) => {
                let (y0, y1) = (py(v.max(0.0)), py(v.min(0.0)));
                let std = stds.get(i).copied().unwrap_or(f64::NAN);
                let _ = write!(
                    svg,
                    "<rect x=\"{x:.1}\" y=\"{y0:.1}\" width=\"{bw:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{}: {v:.3}{}</title></rect>",
                    (y1 - y0).max(0.5),
                    PALETTE[0],
                    esc(label),
                    if std.is_finite() {
                        format!(" ± {std:.3} (std of the noise)")
                    } else {
                        String::new()
                    }
                );
                if std.is_finite() {
                    let cx = x + bw / 2.0;
                    let (a, b) = (py(v + 2.0 * std), py(v - 2.0 * std));
                    let _ = write!(
                        svg,
                        "<line x1=\"{cx:.1}\" y1=\"{a:.1}\" x2=\"{cx:.1}\" y2=\"{b:.1}\" stroke=\"#333\" class=\"error-bar\"/>\
                         <line x1=\"{:.1}\" y1=\"{a:.1}\" x2=\"{:.1}\" y2=\"{a:.1}\" stroke=\"#333\"/>\
                         <line x1=\"{:.1}\" y1=\"{b:.1}\" x2=\"{:.1}\" y2=\"{b:.1}\" stroke=\"#333\"/>",
                        cx - 4.0,
                        cx + 4.0,
                        cx - 4.0,
                        cx + 4.0
                    );
                }
            }
            None => {
                let _ = write!(
                    svg,
                    "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{bw:.1}\" height=\"20\" fill=\"none\" stroke=\"#888\" stroke-dasharray=\"4 3\"><title>{}: suppressed</title></rect>\
                     <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" class=\"tick\">suppressed</text>",
                    py(0.0) - 20.0,
                    esc(label),
                    x + bw / 2.0,
                    py(0.0) - 24.0
                );
            }
        }
    }
    let _ = write!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" class=\"legend\">error bars: ±2 std of the noise</text></svg>",
        w - right,
        h - 4.0
    );
    svg
}

#[cfg(test)]
mod bar_tests {
    use super::*;

    #[test]
    fn bars_carry_error_bars_and_mark_suppressed_cells() {
        let svg = bar_chart(
            "counts <by bin>",
            &["[0, 1)".into(), "[1, 2]".into()],
            &[Some(10.0), None],
            &[2.0, 2.0],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert_eq!(svg.matches("class=\"error-bar\"").count(), 1);
        assert!(svg.contains("suppressed") && svg.contains("&lt;by bin&gt;"));
        assert!(svg.contains("10.000 ± 2.000"));
    }
}
