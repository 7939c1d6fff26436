//! The union of what a key's watchers want: names counted per watcher, each name interned
//! once, and the distinct xDS-TP2 parameter sets; what the key asks upstream.

use std::collections::hash_map::Entry as Slot;
use std::collections::{BTreeMap, HashMap};

use super::{Interest, Name, Names};
use crate::constraints::Params;

/// How many watchers want each name (and wildcard); its keys are the entry's interned names.
#[derive(Default)]
pub(super) struct InterestCounts {
    wildcard: usize,
    pub(super) names: HashMap<Name, usize>,
    /// The names last added: a watcher adding the same set shares this allocation whole.
    last: Names,
    /// How many watchers have each set of dynamic parameters.
    pub(super) params: BTreeMap<Params, usize>,
}

impl InterestCounts {
    /// Counts `interest` in, and returns it with the entry's shared names (the same
    /// allocation as `interest` when its names already are the shared ones).
    pub(super) fn add(&mut self, interest: &Interest) -> Interest {
        self.wildcard += usize::from(interest.wildcard);
        if !self.last.is_empty() && self.last == interest.names {
            for name in self.last.as_slice() {
                *self.names.entry(name.clone()).or_default() += 1;
            }
            self.add_params(interest);
            return Interest { wildcard: interest.wildcard, names: self.last.clone(), params: interest.params.clone() };
        }
        let mut shared = true;
        let names: Vec<Name> = interest
            .names
            .as_slice()
            .iter()
            .map(|name| match self.names.entry(name.clone()) {
                Slot::Occupied(mut slot) => {
                    *slot.get_mut() += 1;
                    shared &= Name::ptr_eq(slot.key(), name);
                    slot.key().clone()
                }
                Slot::Vacant(slot) => {
                    slot.insert(1);
                    name.clone()
                }
            })
            .collect();
        self.add_params(interest);
        let interest = if shared {
            interest.clone()
        } else {
            Interest { wildcard: interest.wildcard, names: Names::from_sorted(names), params: interest.params.clone() }
        };
        self.last = interest.names.clone();
        interest
    }

    fn add_params(&mut self, interest: &Interest) {
        for params in &interest.params {
            *self.params.entry(params.clone()).or_default() += 1;
        }
    }

    pub(super) fn remove(&mut self, interest: &Interest) {
        for params in &interest.params {
            if let Some(count) = self.params.get_mut(params) {
                *count -= 1;
                if *count == 0 {
                    self.params.remove(params);
                }
            }
        }
        self.wildcard -= usize::from(interest.wildcard);
        for name in interest.names.as_slice() {
            if let Some(count) = self.names.get_mut(name) {
                *count -= 1;
                if *count == 0 {
                    self.names.remove(name);
                }
            }
        }
    }

    pub(super) fn union(&self) -> Interest {
        Interest {
            wildcard: self.wildcard > 0,
            names: Names::from_names(self.names.keys().cloned()),
            params: self.params.keys().cloned().collect(),
        }
    }
}

/// How many names a union counted by `held` holds once one watcher's interest `remove` is
/// replaced with `add`.
pub(super) fn union_size_after(held: &HashMap<Name, usize>, remove: Option<&Interest>, add: &Interest) -> usize {
    let joined = add.names.as_slice().iter().filter(|name| !held.contains_key(*name)).count();
    let left = remove.map_or(0, |old| {
        old.names.as_slice().iter().filter(|name| held.get(*name) == Some(&1) && !add.names.contains(name)).count()
    });
    held.len() + joined - left.min(held.len())
}

/// How many distinct parameter sets a union counted by `held` holds once one watcher's
/// interest `remove` is replaced with `add`.
pub(super) fn param_sets_after(held: &BTreeMap<Params, usize>, remove: Option<&Interest>, add: &Interest) -> usize {
    let joined = add.params.iter().filter(|p| !held.contains_key(*p)).count();
    let left = remove
        .map_or(0, |old| old.params.iter().filter(|p| held.get(*p) == Some(&1) && !add.params.contains(p)).count());
    held.len() + joined - left.min(held.len())
}
