//! A fixed-size log-linear histogram of microsecond values, so that per-receipt latencies of
//! 10k streams over a long run cost constant memory.
//!
//! Values below 64 have their own bucket; above that, each power of two is split into 32
//! buckets, so a quantile is off by at most about 3%. The exact minimum and maximum are kept.

/// Exact buckets below this value.
const LINEAR: u64 = 64;
/// Sub-buckets per power of two (as a bit count).
const SUB_BITS: u32 = 5;
/// Number of buckets: the linear ones, then 32 for each exponent from 6 to 63.
const BUCKETS: usize = LINEAR as usize + (64 - 6) * (1 << SUB_BITS);

/// Counts of values by bucket.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    count: u64,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self { counts: vec![0; BUCKETS], count: 0, min: u64::MAX, max: 0 }
    }
}

// === impl Histogram ===

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one value.
    pub fn record(&mut self, value: u64) {
        self.counts[bucket(value)] += 1;
        self.count += 1;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    /// Number of values recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The largest value recorded (0 when empty).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at quantile `q` (0..=1, nearest rank), within the bucket precision and clamped
    /// to the exact minimum and maximum; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = rank(q, self.count);
        let mut seen = 0;
        for (index, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(midpoint(index).clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }
}

/// The 1-based nearest rank of quantile `q` among `n` values.
pub fn rank(q: f64, n: u64) -> u64 {
    // The product is within 0..=n, so the conversions are exact enough.
    ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).clamp(1, n.max(1))
}

/// The bucket of `value`.
fn bucket(value: u64) -> usize {
    if value < LINEAR {
        return value as usize;
    }
    let exponent = 63 - value.leading_zeros();
    let sub = (value >> (exponent - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    LINEAR as usize + (exponent as usize - 6) * (1 << SUB_BITS) + sub as usize
}

/// A representative value of bucket `index`: its middle.
fn midpoint(index: usize) -> u64 {
    if index < LINEAR as usize {
        return index as u64;
    }
    let offset = index - LINEAR as usize;
    let exponent = (offset >> SUB_BITS) as u32 + 6;
    let sub = (offset & ((1 << SUB_BITS) - 1)) as u64;
    let width = 1u64 << (exponent - SUB_BITS);
    let low = (1u64 << exponent) + sub * width;
    low.saturating_add(width / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_bounded() {
        let mut last = 0;
        for v in (0..100_000u64).chain([u64::MAX / 2, u64::MAX]) {
            let b = bucket(v);
            assert!(b >= last && b < BUCKETS, "{v}");
            last = b;
        }
        for v in [100u64, 1_000, 12_345, 1_000_000, 987_654_321] {
            let m = midpoint(bucket(v));
            assert!(m.abs_diff(v) * 100 <= v * 4, "{v} -> {m}");
        }
    }

    #[test]
    fn quantiles() {
        let mut h = Histogram::new();
        assert_eq!(h.quantile(0.5), None);
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        assert_eq!(h.count(), 1000);
        let p50 = h.quantile(0.5).unwrap();
        assert!((485_000..=515_000).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99).unwrap();
        assert!((960_000..=1_000_000).contains(&p99), "{p99}");
        assert_eq!(h.quantile(1.0), Some(1_000_000));
        assert_eq!(h.max(), 1_000_000);
        let mut one = Histogram::new();
        one.record(7);
        assert_eq!((one.quantile(0.0), one.quantile(0.99)), (Some(7), Some(7)));
    }

    #[test]
    fn ranks() {
        assert_eq!(rank(0.5, 10), 5);
        assert_eq!(rank(0.99, 10), 10);
        assert_eq!(rank(0.0, 10), 1);
        assert_eq!(rank(1.0, 1), 1);
    }
}
