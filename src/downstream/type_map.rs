//! Per-type state of one stream, looked up by type URL.
//!
//! A stream carries a handful of types (one on a per-type stream, up to ten on ADS) and looks
//! one up on every request and every push. A vector searched by string comparison does that
//! without hashing: with SipHash over ~50-byte type URLs, a `HashMap` cost about 1,200
//! instructions per client per update (callgrind, 300 one-connection CDS clients), a third of
//! the stream's own work outside HTTP/2. Hand-written because it is eight lines of `Vec`.

/// Values keyed by type URL; at most one per type, in insertion order.
#[derive(Debug)]
pub(super) struct TypeMap<T> {
    entries: Vec<(String, T)>,
}

impl<T> Default for TypeMap<T> {
    fn default() -> Self {
        Self { entries: Vec::new() }
    }
}

impl<T: Default> TypeMap<T> {
    /// The value of `type_url`, inserted (as `T::default()`) if the type is new.
    pub(super) fn get_or_default(&mut self, type_url: &str) -> &mut T {
        let index = match self.entries.iter().position(|(t, _)| t == type_url) {
            Some(index) => index,
            None => {
                self.entries.push((type_url.to_owned(), T::default()));
                self.entries.len() - 1
            }
        };
        &mut self.entries[index].1
    }
}

impl<T> TypeMap<T> {
    /// The value of `type_url`, if the type was seen.
    pub(super) fn get_mut(&mut self, type_url: &str) -> Option<&mut T> {
        self.entries.iter_mut().find(|(t, _)| t == type_url).map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_value_per_type_inserted_on_first_use() {
        let mut map: TypeMap<u32> = TypeMap::default();
        assert!(map.get_mut("a").is_none());
        *map.get_or_default("a") += 1;
        *map.get_or_default("b") += 5;
        *map.get_or_default("a") += 1;
        assert_eq!(map.get_mut("a"), Some(&mut 2));
        assert_eq!(map.get_mut("b"), Some(&mut 5));
        assert_eq!(map.entries.len(), 2);
    }
}
