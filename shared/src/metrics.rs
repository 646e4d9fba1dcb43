//! Evaluation metrics for binary and multi-class classifiers.
//!
//! Binary models give one probability per row (P(label = 1)); multi-class models give
//! `k` per row (row-major), labels being class indices `0..k` as `f32`.

/// Fraction of rows where `p ≥ 0.5` agrees with the label.
pub fn accuracy(probs: &[f32], labels: &[f32]) -> f64 {
    if probs.is_empty() {
        return 0.0;
    }
    let hits = probs
        .iter()
        .zip(labels)
        .filter(|(p, y)| (**p >= 0.5) == (**y >= 0.5))
        .count();
    hits as f64 / probs.len() as f64
}

/// Area under the ROC curve by the Mann–Whitney U statistic, ties counted as half
/// (Hanley and McNeil 1982, eq. 2). Returns 0.5 when one class is absent.
pub fn roc_auc(scores: &[f32], labels: &[f32]) -> f64 {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Average ranks (1-based) over runs of equal scores.
    let mut ranks = vec![0f64; scores.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = avg;
        }
        i = j + 1;
    }
    let n_pos = labels.iter().filter(|y| **y >= 0.5).count() as f64;
    let n_neg = labels.len() as f64 - n_pos;
    if n_pos == 0.0 || n_neg == 0.0 {
        return 0.5;
    }
    let rank_sum: f64 = ranks
        .iter()
        .zip(labels)
        .filter(|(_, y)| **y >= 0.5)
        .map(|(r, _)| r)
        .sum();
    (rank_sum - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg)
}

/// The predicted class of each row: `p ≥ 0.5` for a binary model (`k ≤ 1` outputs),
/// otherwise the arg-max (first of ties).
pub fn predicted_classes(probs: &[f32], k: usize) -> Vec<usize> {
    if k <= 1 {
        return probs.iter().map(|p| usize::from(*p >= 0.5)).collect();
    }
    probs
        .chunks_exact(k)
        .map(|row| {
            row.iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |best, (i, p)| if *p > best.1 { (i, *p) } else { best },
                )
                .0
        })
        .collect()
}

/// Accuracy of a model with `k` outputs per row (1: binary at 0.5; else arg-max).
pub fn accuracy_k(probs: &[f32], labels: &[f32], k: usize) -> f64 {
    if labels.is_empty() {
        return 0.0;
    }
    let hits = predicted_classes(probs, k)
        .iter()
        .zip(labels)
        .filter(|(c, y)| **c == **y as usize)
        .count();
    hits as f64 / labels.len() as f64
}

/// ROC AUC of a model with `k` outputs per row: the binary AUC for `k ≤ 1`, otherwise
/// the macro average over classes of one-vs-rest AUCs (each class's probability as the
/// score, that class as positive; Hand and Till 2001 discuss it, scikit-learn's
/// `roc_auc_score(multi_class="ovr", average="macro")` computes the same). Classes
/// absent from `labels` are left out of the average.
pub fn roc_auc_k(probs: &[f32], labels: &[f32], k: usize) -> f64 {
    if k <= 1 {
        return roc_auc(probs, labels);
    }
    let mut aucs = Vec::new();
    for class in 0..k {
        let scores: Vec<f32> = probs.chunks_exact(k).map(|row| row[class]).collect();
        let positive: Vec<f32> = labels.iter().map(|y| f32::from(*y as usize == class)).collect();
        let n_pos = positive.iter().filter(|p| **p > 0.5).count();
        if n_pos == 0 || n_pos == positive.len() {
            continue;
        }
        aucs.push(roc_auc(&scores, &positive));
    }
    if aucs.is_empty() {
        return 0.5;
    }
    aucs.iter().sum::<f64>() / aucs.len() as f64
}

/// Bins per class of [`score_bins`]: equal slices of [0, 1].
pub const SCORE_BINS: usize = 50;

/// Counts of rows by predicted probability, for a ROC AUC summed across sites without
/// any row's score: per class k (one for a binary model), `SCORE_BINS` bins of
/// P(class k) for the rows of class k, then for the others (see the proto's
/// `Evaluation.score_bins`).
pub fn score_bins(probs: &[f32], labels: &[f32], k: usize) -> Vec<u64> {
    let classes = k.max(1);
    let mut bins = vec![0u64; classes * 2 * SCORE_BINS];
    let bin = |p: f32| ((p.clamp(0.0, 1.0) * SCORE_BINS as f32) as usize).min(SCORE_BINS - 1);
    for (r, y) in labels.iter().enumerate() {
        for class in 0..classes {
            let (p, positive) = if k <= 1 {
                (probs[r], *y >= 0.5)
            } else {
                (probs[r * k + class], *y as usize == class)
            };
            let side = usize::from(!positive);
            bins[(class * 2 + side) * SCORE_BINS + bin(p)] += 1;
        }
    }
    bins
}

/// The ROC AUC of binned scores ([`score_bins`]): per class, pairs of a positive and a
/// negative ordered by bin, pairs in one bin counted as ties (½), as the Mann–Whitney
/// statistic counts them (Hanley and McNeil 1982); macro-averaged over the classes
/// with both kinds of rows. The binning can only move a pair into a tie, so the
/// figure is within the share of same-bin pairs of the exact AUC. None without any.
pub fn auc_from_bins(bins: &[u64]) -> Option<f64> {
    if bins.is_empty() || !bins.len().is_multiple_of(2 * SCORE_BINS) {
        return None;
    }
    let mut aucs = Vec::new();
    for class in bins.chunks_exact(2 * SCORE_BINS) {
        let (pos, neg) = class.split_at(SCORE_BINS);
        let (n_pos, n_neg): (u64, u64) = (pos.iter().sum(), neg.iter().sum());
        if n_pos == 0 || n_neg == 0 {
            continue;
        }
        let (mut below, mut pairs) = (0f64, 0f64);
        for b in 0..SCORE_BINS {
            pairs += pos[b] as f64 * (below + neg[b] as f64 / 2.0);
            below += neg[b] as f64;
        }
        aucs.push(pairs / (n_pos as f64 * n_neg as f64));
    }
    (!aucs.is_empty()).then(|| aucs.iter().sum::<f64>() / aucs.len() as f64)
}

/// Summed cross-entropy of a model with `k` outputs per row: binary cross-entropy for
/// `k ≤ 1`, else `−ln p_y`; probabilities clamped to [1e-7, 1 − 1e-7].
pub fn cross_entropy_sum(probs: &[f32], labels: &[f32], k: usize) -> f64 {
    let eps = 1e-7f64;
    if k <= 1 {
        return log_loss(probs, labels) * probs.len() as f64;
    }
    probs
        .chunks_exact(k)
        .zip(labels)
        .map(|(row, y)| -(row[(*y as usize).min(k - 1)] as f64).clamp(eps, 1.0 - eps).ln())
        .sum()
}

/// Mean binary cross-entropy of probabilities against labels.
pub fn log_loss(probs: &[f32], labels: &[f32]) -> f64 {
    let eps = 1e-7f64;
    let total: f64 = probs
        .iter()
        .zip(labels)
        .map(|(p, y)| {
            let p = (*p as f64).clamp(eps, 1.0 - eps);
            -(*y as f64 * p.ln() + (1.0 - *y as f64) * (1.0 - p).ln())
        })
        .sum();
    total / probs.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_of_perfect_random_and_inverted_rankings() {
        let labels = [0.0, 0.0, 1.0, 1.0];
        assert_eq!(roc_auc(&[0.1, 0.2, 0.8, 0.9], &labels), 1.0);
        assert_eq!(roc_auc(&[0.9, 0.8, 0.2, 0.1], &labels), 0.0);
        assert_eq!(roc_auc(&[0.5; 4], &labels), 0.5);
        // One positive ranked below one negative: 3 of 4 pairs ordered.
        assert_eq!(roc_auc(&[0.1, 0.6, 0.5, 0.9], &labels), 0.75);
    }

    #[test]
    fn multi_class_accuracy_and_macro_auc() {
        // Three classes; rows' probabilities row-major.
        let probs = [0.7, 0.2, 0.1, 0.1, 0.8, 0.1, 0.2, 0.3, 0.5, 0.6, 0.3, 0.1];
        let labels = [0.0, 1.0, 2.0, 1.0];
        assert_eq!(predicted_classes(&probs, 3), vec![0, 1, 2, 0]);
        assert_eq!(accuracy_k(&probs, &labels, 3), 0.75);
        // Class 0 vs rest: scores .7,.1,.2,.6 with positive row 0 only → 1.0.
        // Class 1: scores .2,.8,.3,.3, positives rows 1 and 3: pairs (0.8 > .2, .3) and
        // (0.3 > 0.2, 0.3 = 0.3 → ½) → 3.5/4. Class 2: .1,.1,.5,.1, positive row 2 → 1.0.
        let want = (1.0 + 3.5 / 4.0 + 1.0) / 3.0;
        assert!((roc_auc_k(&probs, &labels, 3) - want).abs() < 1e-12);
        let ce = cross_entropy_sum(&probs, &labels, 3);
        let want_ce = -(0.7f64.ln() + 0.8f64.ln() + 0.5f64.ln() + 0.3f64.ln());
        assert!((ce - want_ce).abs() < 1e-6, "{ce} vs {want_ce}");
    }

    #[test]
    fn binned_auc_is_within_the_ties_of_the_exact_one() {
        // Scores far apart: the binned AUC equals the exact one.
        let probs = [0.05, 0.3, 0.62, 0.9, 0.45, 0.97];
        let labels = [0.0, 0.0, 1.0, 1.0, 0.0, 1.0];
        let exact = roc_auc(&probs, &labels);
        let binned = auc_from_bins(&score_bins(&probs, &labels, 1)).expect("both classes");
        assert!((exact - binned).abs() < 1e-12, "{exact} vs {binned}");
        // Multi-class: the macro one-vs-rest, summed over two "sites".
        let p3 = [0.7, 0.2, 0.1, 0.1, 0.8, 0.1, 0.2, 0.3, 0.5, 0.6, 0.3, 0.1];
        let y3 = [0.0, 1.0, 2.0, 1.0];
        let mut sum = score_bins(&p3[..6], &y3[..2], 3);
        sum.iter_mut()
            .zip(score_bins(&p3[6..], &y3[2..], 3))
            .for_each(|(a, b)| *a += b);
        let binned = auc_from_bins(&sum).expect("classes");
        assert!((binned - roc_auc_k(&p3, &y3, 3)).abs() < 1e-12);
        assert_eq!(auc_from_bins(&[]), None);
    }

    #[test]
    fn accuracy_counts_threshold_hits() {
        assert_eq!(accuracy(&[0.2, 0.7, 0.4, 0.5], &[0.0, 1.0, 1.0, 1.0]), 0.75);
    }
}
