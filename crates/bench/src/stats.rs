//! Percentiles of one run's samples, and the median with its min–max spread of one figure
//! over several runs.

use std::collections::BTreeMap;

/// Returns the `p`-th percentile (0–100) of `samples` by the nearest-rank method, or NaN
/// when there are none.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn median(samples: &[f64]) -> f64 {
    percentile(samples, 50.0)
}

/// One value per run for each named figure, printed as median and min–max.
#[derive(Default)]
pub struct Table {
    title: String,
    rows: Vec<String>,
    values: BTreeMap<String, Vec<f64>>,
}

impl Table {
    pub fn new(title: &str) -> Table {
        Table {
            title: title.to_string(),
            ..Table::default()
        }
    }

    /// Records one run's value of the figure `name`; rows print in first-recorded order.
    pub fn record(&mut self, name: &str, value: f64) {
        if !self.values.contains_key(name) {
            self.rows.push(name.to_string());
        }
        self.values.entry(name.to_string()).or_default().push(value);
    }

    /// Records the p50, p95 and p99 of one run's samples under `name`.
    pub fn record_percentiles(&mut self, name: &str, samples: &[f64]) {
        for p in [50.0, 95.0, 99.0] {
            self.record(&format!("{name} p{p}"), percentile(samples, p));
        }
    }

    /// Prints the table in Markdown: figure, median over runs, min–max, number of runs.
    pub fn print(&self) {
        println!("\n### {}\n", self.title);
        println!("| figure | median | min–max | runs |");
        println!("|---|---:|---:|---:|");
        for name in &self.rows {
            let values = &self.values[name];
            let min = values.iter().copied().fold(f64::INFINITY, f64::min);
            let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            println!(
                "| {name} | {} | {}–{} | {} |",
                format_value(median(values)),
                format_value(min),
                format_value(max),
                values.len()
            );
        }
    }
}

fn format_value(value: f64) -> String {
    if value.abs() >= 100.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_nearest_rank() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&samples, 50.0), 50.0);
        assert_eq!(percentile(&samples, 95.0), 95.0);
        assert_eq!(percentile(&samples, 99.0), 99.0);
        assert_eq!(percentile(&samples, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn median_of_unsorted_runs() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    }
}
