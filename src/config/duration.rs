//! [`GoDuration`]: the type of every duration in the configuration files, read and written in
//! Go's syntax (`"300ms"`, `"1h30m"`, `"5m0s"`) as the Go relay's protojson did.
//!
//! Invariant: a `GoDuration` is a non-negative [`Duration`] within Go's range (about 292
//! years), so what it prints parses back to the same value.

use std::fmt;
use std::ops::Deref;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

use super::gocompat::{format_duration, parse_duration};

/// A configuration duration. Deserializes from a Go duration string, or the integer 0 for
/// `"0s"` (any other number is refused for its missing unit); serializes and displays as Go's
/// `Duration.String` does. Dereferences to, and converts into, a [`Duration`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GoDuration(Duration);

impl GoDuration {
    /// No time at all (`"0s"`).
    pub const ZERO: Self = Self(Duration::ZERO);

    /// The duration of `duration`.
    pub const fn new(duration: Duration) -> Self {
        Self(duration)
    }

    /// `secs` seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    /// `millis` milliseconds.
    pub const fn from_millis(millis: u64) -> Self {
        Self(Duration::from_millis(millis))
    }

    /// The standard library duration.
    pub const fn get(self) -> Duration {
        self.0
    }

    /// For `deserialize_with` on an `Option<GoDuration>` field: absent (with `default`), null
    /// and a zero duration all read as `None`.
    ///
    /// # Errors
    /// The error of an invalid duration, as [`GoDuration`]'s `Deserialize` reports it.
    pub fn nonzero<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Self>, D::Error> {
        Ok(Option::<Self>::deserialize(deserializer)?.filter(|d| !d.0.is_zero()))
    }
}

impl Deref for GoDuration {
    type Target = Duration;

    fn deref(&self) -> &Duration {
        &self.0
    }
}

impl From<Duration> for GoDuration {
    fn from(duration: Duration) -> Self {
        Self(duration)
    }
}

impl From<GoDuration> for Duration {
    fn from(duration: GoDuration) -> Self {
        duration.0
    }
}

impl PartialEq<Duration> for GoDuration {
    fn eq(&self, other: &Duration) -> bool {
        self.0 == *other
    }
}

impl PartialEq<GoDuration> for Duration {
    fn eq(&self, other: &GoDuration) -> bool {
        *self == other.0
    }
}

impl fmt::Display for GoDuration {
    /// Go's `Duration.String`: `"0s"`, `"300ms"`, `"1h30m0s"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

impl fmt::Debug for GoDuration {
    /// As the [`Duration`] it holds.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl FromStr for GoDuration {
    type Err = String;

    /// Go's `time.ParseDuration`, refusing negative durations (see [`parse_duration`]).
    fn from_str(text: &str) -> Result<Self, String> {
        parse_duration(text).map(Self)
    }
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(GoDurationVisitor)
    }
}

/// Reads a Go duration string; of the numbers only 0, which needs no unit.
struct GoDurationVisitor;

impl GoDurationVisitor {
    fn missing_unit<E: de::Error>(value: impl fmt::Display) -> E {
        E::custom(format!("invalid duration {value}: missing unit (for example \"{value}s\")"))
    }

    /// An integer: 0 is `"0s"`, any other lacks its unit.
    fn integer<E: de::Error, N: fmt::Display + Default + PartialEq>(value: N) -> Result<GoDuration, E> {
        if value == N::default() { Ok(GoDuration::ZERO) } else { Err(Self::missing_unit(value)) }
    }
}

impl de::Visitor<'_> for GoDurationVisitor {
    type Value = GoDuration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as \"300ms\", \"30s\" or \"1h30m\"")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<GoDuration, E> {
        v.parse().map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<GoDuration, E> {
        Self::integer(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<GoDuration, E> {
        Self::integer(v)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<GoDuration, E> {
        Err(Self::missing_unit(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Holder {
        every: GoDuration,
        #[serde(default, deserialize_with = "GoDuration::nonzero")]
        timeout: Option<GoDuration>,
    }

    fn read(yaml: &str) -> Result<Holder, String> {
        serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn reads_go_syntax_and_zero() {
        assert_eq!(read("every: 1h30m").unwrap().every, Duration::from_secs(5400));
        assert_eq!(read("every: 1.5s").unwrap().every, Duration::from_millis(1500));
        assert_eq!(read("every: 0").unwrap().every, GoDuration::ZERO);
        assert_eq!(read("every: \"0\"").unwrap().every, GoDuration::ZERO);
    }

    #[test]
    fn refuses_numbers_without_unit_negatives_and_other_types() {
        for (yaml, needle) in [
            ("every: 60", "invalid duration 60: missing unit (for example \"60s\")"),
            ("every: -3", "invalid duration -3: missing unit"),
            ("every: 1.5", "invalid duration 1.5: missing unit"),
            ("every: -1s", "must not be negative"),
            ("every: 5 minutes", "unknown unit"),
            ("every: [1s]", "expected a duration such as \"300ms\""),
        ] {
            let err = read(yaml).unwrap_err();
            assert!(err.contains(needle), "{yaml}: {err}");
        }
    }

    #[test]
    fn optional_zero_and_null_read_as_none() {
        assert_eq!(read("every: 1s").unwrap().timeout, None);
        assert_eq!(read("every: 1s\ntimeout: 0s").unwrap().timeout, None);
        assert_eq!(read("every: 1s\ntimeout: null").unwrap().timeout, None);
        assert_eq!(read("every: 1s\ntimeout: 2m").unwrap().timeout, Some(GoDuration::from_secs(120)));
        assert!(read("every: 1s\ntimeout: soon").unwrap_err().contains("invalid duration \"soon\""));
    }

    #[test]
    fn writes_and_displays_go_syntax_that_reads_back() {
        let holder = Holder { every: GoDuration::from_secs(300), timeout: Some(GoDuration::from_millis(1500)) };
        let json = serde_json::to_value(&holder).unwrap();
        assert_eq!(json, serde_json::json!({"every": "5m0s", "timeout": "1.5s"}));
        assert_eq!(GoDuration::from_millis(300).to_string(), "300ms");
        assert_eq!(format!("{:?}", GoDuration::from_millis(300)), "300ms");
        assert_eq!(serde_json::from_value::<Holder>(json).unwrap(), holder);
    }

    #[test]
    fn derefs_and_converts_to_std() {
        let d = GoDuration::from_secs(2);
        assert_eq!(d.as_millis(), 2000);
        assert_eq!(Duration::from(d), Duration::from_secs(2));
        assert_eq!(*d + Duration::from_secs(1), Duration::from_secs(3));
        assert_eq!(GoDuration::from(Duration::from_secs(2)), d);
    }
}
