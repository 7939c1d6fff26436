//! Resource names as the cache shares them, and what a subscription wants ([`Interest`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::constraints::Params;
use crate::xdstp;

/// streams subscribed to the same names cost a pointer per name each.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(Arc<String>);

impl Name {
    /// A new (not yet interned) name.
    pub fn new(name: impl Into<String>) -> Self {
        Self(Arc::new(name.into()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when both are the same allocation.
    pub fn ptr_eq(a: &Self, b: &Self) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }
}

impl std::ops::Deref for Name {
    type Target = String;

    fn deref(&self) -> &String {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Names ===

/// A sorted set of names, immutable and cheap to clone: clones share one allocation, so a
/// stream's subscription, its watcher and its admin status hold one copy between them.
#[derive(Clone, Default)]
pub struct Names(Option<Arc<[Name]>>);

impl Names {
    /// The set of `names`, which must be sorted and free of duplicates.
    pub fn from_sorted(names: Vec<Name>) -> Self {
        debug_assert!(names.windows(2).all(|w| w[0] < w[1]), "names are sorted and unique");
        if names.is_empty() { Self(None) } else { Self(Some(names.into())) }
    }

    /// The set of `names`, in any order and possibly repeated.
    pub fn from_names(names: impl IntoIterator<Item = Name>) -> Self {
        let mut names: Vec<Name> = names.into_iter().collect();
        names.sort_unstable();
        names.dedup();
        Self::from_sorted(names)
    }

    /// The names, sorted.
    pub fn as_slice(&self) -> &[Name] {
        self.0.as_deref().unwrap_or_default()
    }

    /// The names, sorted.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &String> + ExactSizeIterator + Clone + '_ {
        self.as_slice().iter().map(|name| &**name)
    }

    /// Number of names.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// True when there are no names.
    pub fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    /// The shared name equal to `name`, if in the set.
    pub fn get(&self, name: &str) -> Option<&Name> {
        let names = self.as_slice();
        names.binary_search_by(|n| n.as_str().cmp(name)).ok().map(|i| &names[i])
    }

    /// True when `name` is in the set.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// True when every name of `self` is in `other`.
    pub fn is_subset(&self, other: &Names) -> bool {
        let mut theirs = other.as_slice().iter();
        self.as_slice().iter().all(|name| theirs.any(|n| n == name))
    }

    /// The names of `self` that are not in `other`, sorted.
    pub fn difference<'a>(&'a self, other: &'a Names) -> impl Iterator<Item = &'a String> + 'a {
        self.iter().filter(move |name| !other.contains(name))
    }

    /// True when both share one allocation (so they are equal without comparing names).
    fn same(&self, other: &Names) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

impl PartialEq for Names {
    fn eq(&self, other: &Self) -> bool {
        self.same(other) || self.as_slice() == other.as_slice()
    }
}

impl Eq for Names {}

impl std::fmt::Debug for Names {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl<S: Into<String>> FromIterator<S> for Names {
    fn from_iter<I: IntoIterator<Item = S>>(names: I) -> Self {
        Self::from_names(names.into_iter().map(Name::new))
    }
}

impl<'a> IntoIterator for &'a Names {
    type Item = &'a String;
    type IntoIter = std::iter::Map<std::slice::Iter<'a, Name>, fn(&'a Name) -> &'a String>;

    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter().map(|name| &name.0)
    }
}

// === impl Interest ===

/// Which resources a subscription wants: all of them (wildcard), and/or these names; and,
/// when resources come in xDS-TP2 variants, for which dynamic parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interest {
    /// Every resource of the type.
    pub wildcard: bool,
    /// Resources named explicitly.
    pub names: Names,
    /// The dynamic parameters variants are chosen by: one set for a client's subscription
    /// (none: the empty set); for a key's union, every distinct non-empty set of its
    /// watchers, sorted.
    pub params: Vec<Params>,
}

impl Interest {
    /// Interest in every resource.
    pub fn wildcard() -> Self {
        Self { wildcard: true, ..Self::default() }
    }

    /// Interest in these names.
    pub fn names<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> Self {
        Self { names: names.into_iter().collect(), ..Self::default() }
    }

    /// The same interest for a client with dynamic parameters `params` (an empty set is
    /// no parameters).
    pub fn with_params(mut self, params: Params) -> Self {
        self.params = if params.is_empty() { Vec::new() } else { vec![params] };
        self
    }

    /// The parameters a client's variants are chosen by (its only set, or the empty set).
    pub fn client_params(&self) -> &BTreeMap<String, String> {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        self.params.first().map_or(&EMPTY, |p| p)
    }

    /// True when nothing is wanted.
    pub fn is_empty(&self) -> bool {
        !self.wildcard && self.names.is_empty()
    }

    /// True when a response to `self` answers everything `other` wants: `self` is wildcard,
    /// or every name of `other` is one of `self` or a member of one of its glob collections.
    /// With dynamic parameters, every set of `other` must be one of `self`'s too.
    pub fn covers(&self, other: &Interest) -> bool {
        let names = self.wildcard
            || (!other.wildcard
                && (other.names.is_subset(&self.names) || other.names.iter().all(|name| self.wants(name))));
        names && other.params.iter().all(|p| self.params.contains(p))
    }

    /// True when the resource named `name` is wanted: by the wildcard, by name (`xdstp://`
    /// names compared by their canonical spelling, see [`crate::xdstp`]) or as a member of
    /// a glob collection of `self`.
    pub fn wants(&self, name: &str) -> bool {
        if self.wildcard || self.names.contains(name) {
            return true;
        }
        if !xdstp::is_xdstp(name) {
            return false;
        }
        let canonical = xdstp::canonical(name);
        (canonical != name && self.names.contains(&canonical))
            || xdstp::collection_of(&canonical).is_some_and(|glob| self.names.contains(&glob))
    }

    /// True when some of the names are TP1 glob collections (`xdstp://.../*`).
    pub fn has_globs(&self) -> bool {
        self.names.iter().any(|name| xdstp::is_glob(name))
    }
}
