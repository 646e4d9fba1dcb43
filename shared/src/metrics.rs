//! Evaluation metrics for binary classifiers.

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
    fn accuracy_counts_threshold_hits() {
        assert_eq!(accuracy(&[0.2, 0.7, 0.4, 0.5], &[0.0, 1.0, 1.0, 1.0]), 0.75);
    }
}
