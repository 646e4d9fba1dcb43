//! Deterministic splits of a labelled table across sites, for the demo and the tests.
//!
//! A stratified test fraction is held out first; the rest is dealt to sites either
//! IID or label-skewed (site k of n gets a share of the positives proportional to
//! k + 1 and of the negatives proportional to n − k, so the first site is mostly
//! negative and the last mostly positive).

use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SplitKind {
    Iid,
    LabelSkew,
}

impl std::str::FromStr for SplitKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "iid" => Ok(SplitKind::Iid),
            "label-skew" => Ok(SplitKind::LabelSkew),
            other => Err(format!("unknown split {other:?}: use iid or label-skew")),
        }
    }
}

/// Row indices: a held-out test set and one training set per site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub test: Vec<usize>,
    pub sites: Vec<Vec<usize>>,
}

/// Splits rows by their binary `labels`.
pub fn split_rows(labels: &[f32], n_sites: usize, test_fraction: f64, kind: SplitKind, seed: u64) -> Split {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pos: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] >= 0.5).collect();
    let mut neg: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] < 0.5).collect();
    pos.shuffle(&mut rng);
    neg.shuffle(&mut rng);
    let n_test_pos = (pos.len() as f64 * test_fraction).round() as usize;
    let n_test_neg = (neg.len() as f64 * test_fraction).round() as usize;
    let mut test: Vec<usize> = pos.drain(..n_test_pos).chain(neg.drain(..n_test_neg)).collect();
    test.sort_unstable();

    let n_sites = n_sites.max(1);
    let mut sites = vec![Vec::new(); n_sites];
    match kind {
        SplitKind::Iid => {
            let mut rest: Vec<usize> = pos.into_iter().chain(neg).collect();
            rest.shuffle(&mut rng);
            for (i, row) in rest.into_iter().enumerate() {
                sites[i % n_sites].push(row);
            }
        }
        SplitKind::LabelSkew => {
            let deal = |rows: Vec<usize>, weight: &dyn Fn(usize) -> usize, sites: &mut Vec<Vec<usize>>| {
                let total: usize = (0..n_sites).map(weight).sum();
                let mut start = 0;
                for (k, site) in sites.iter_mut().enumerate() {
                    let cum: usize = (0..=k).map(weight).sum();
                    let end = if k + 1 == n_sites {
                        rows.len()
                    } else {
                        rows.len() * cum / total
                    };
                    site.extend_from_slice(&rows[start..end]);
                    start = end;
                }
            };
            deal(pos, &|k| k + 1, &mut sites);
            deal(neg, &|k| n_sites - k, &mut sites);
        }
    }
    for site in &mut sites {
        site.sort_unstable();
    }
    Split { test, sites }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<f32> {
        (0..569).map(|i| if i % 8 < 3 { 1.0 } else { 0.0 }).collect()
    }

    #[test]
    fn every_row_lands_exactly_once() {
        for kind in [SplitKind::Iid, SplitKind::LabelSkew] {
            let split = split_rows(&labels(), 3, 0.2, kind, 7);
            let mut all: Vec<usize> = split.test.iter().chain(split.sites.iter().flatten()).copied().collect();
            all.sort_unstable();
            assert_eq!(all, (0..569).collect::<Vec<_>>());
            assert!((split.test.len() as f64 - 569.0 * 0.2).abs() < 2.0);
        }
    }

    #[test]
    fn label_skew_skews_and_is_deterministic() {
        let l = labels();
        let split = split_rows(&l, 3, 0.2, SplitKind::LabelSkew, 7);
        let rate = |rows: &[usize]| rows.iter().filter(|&&r| l[r] >= 0.5).count() as f64 / rows.len() as f64;
        assert!(rate(&split.sites[0]) < rate(&split.sites[1]));
        assert!(rate(&split.sites[1]) < rate(&split.sites[2]));
        assert_eq!(split, split_rows(&l, 3, 0.2, SplitKind::LabelSkew, 7));
    }
}
