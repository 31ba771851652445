//! The small maths of repeated runs: median, spread, ratios.

use serde::{Deserialize, Serialize};

/// Median of `xs` (mean of the middle two for an even count); `None` when empty or when a
/// value is NaN.
pub fn median(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() || xs.iter().any(|x| x.is_nan()) {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// `num / den`, or `None` when the denominator is zero or either is not finite.
pub fn ratio(num: f64, den: f64) -> Option<f64> {
    (den != 0.0 && num.is_finite() && den.is_finite()).then(|| num / den)
}

/// Median and range of repeated measurements of one quantity.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// (max - min) / median, in percent.
    pub spread_pct: f64,
    pub n: usize,
}

impl Spread {
    pub fn of(xs: &[f64]) -> Option<Spread> {
        let median = median(xs)?;
        let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
        let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Spread {
            median,
            min,
            max,
            spread_pct: ratio(max - min, median).map_or(0.0, |r| r * 100.0),
            n: xs.len(),
        })
    }
}

/// Ratios of paired measurements (`num[i] / den[i]`, same repeat), skipping unusable pairs.
pub fn paired_ratios(num: &[f64], den: &[f64]) -> Vec<f64> {
    num.iter()
        .zip(den)
        .filter_map(|(n, d)| ratio(*n, *d))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn spread_reports_range_relative_to_median() {
        let s = Spread::of(&[100.0, 90.0, 110.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (100.0, 90.0, 110.0, 3));
        assert!((s.spread_pct - 20.0).abs() < 1e-12);
        let one = Spread::of(&[7.0]).unwrap();
        assert_eq!((one.min, one.max, one.spread_pct), (7.0, 7.0, 0.0));
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(Spread::of(&[0.0, 0.0]).unwrap().spread_pct, 0.0);
    }

    #[test]
    fn ratios_refuse_zero_denominators() {
        assert_eq!(ratio(95.0, 100.0), Some(0.95));
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(ratio(f64::INFINITY, 1.0), None);
        assert_eq!(
            paired_ratios(&[50.0, 60.0, 70.0], &[100.0, 0.0, 70.0]),
            vec![0.5, 1.0]
        );
        // Extra elements on either side are ignored.
        assert_eq!(paired_ratios(&[1.0, 2.0], &[2.0]), vec![0.5]);
    }
}
