//! `xdstp://` resource names (xDS-TP1): parsing, the canonical spelling used for matching,
//! and glob collections.
//!
//! A TP1 name is `xdstp://{authority}/{type}/{id}?{context params}#{directives}`. Two names
//! are the same resource when they are equal component by component, the context parameters
//! compared as a set (`?b=2&a=1` is `?a=1&b=2`). The relay matches and interns names by
//! their [`canonical`] spelling: the same text with the context parameters sorted by key
//! (then value) and empty parameters dropped; nothing else is rewritten (no case folding, no
//! percent-decoding), so a name that is already canonical is used as the client sent it.
//! Subscriptions are kept (and asked upstream) in that spelling, so two spellings share one
//! upstream name; a resource reaches a client under the name the origin gave it, which a TP1
//! client matches to its subscription component by component, as it must.
//!
//! A glob collection is a name whose id ends in the segment `*`: it stands for every
//! resource with the same authority, type and context parameters whose id is the glob's
//! prefix plus exactly one more segment ([`collection_of`]).
//!
//! Invariants: every function here is total (no panic on any input), runs in time linear in
//! the name's length, and allocates only when the canonical spelling differs from the input
//! or a collection name is built. Names that do not start with `xdstp://` are left alone.

use std::borrow::Cow;

/// The scheme prefix of TP1 names.
pub const SCHEME: &str = "xdstp://";

/// The parts of a TP1 name, borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XdstpName<'a> {
    /// The authority (may be empty).
    pub authority: &'a str,
    /// The resource type, e.g. `envoy.config.cluster.v3.Cluster`.
    pub resource_type: &'a str,
    /// The id: every path segment after the type (may be empty or contain `/`).
    pub id: &'a str,
    /// The context parameters as written, without the `?` (`None` when absent).
    pub query: Option<&'a str>,
    /// The directives as written, without the `#` (`None` when absent).
    pub fragment: Option<&'a str>,
}

impl<'a> XdstpName<'a> {
    /// Parses `name`; `None` when it is not an `xdstp://` name with a type.
    pub fn parse(name: &'a str) -> Option<Self> {
        let rest = name.strip_prefix(SCHEME)?;
        let (rest, fragment) = match rest.split_once('#') {
            Some((rest, fragment)) => (rest, Some(fragment)),
            None => (rest, None),
        };
        let (path, query) = match rest.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (rest, None),
        };
        let (authority, path) = path.split_once('/')?;
        let (resource_type, id) = path.split_once('/').unwrap_or((path, ""));
        if resource_type.is_empty() {
            return None;
        }
        Some(Self { authority, resource_type, id, query, fragment })
    }

    /// True when the name is a glob collection (its id's last segment is `*`).
    pub fn is_glob(&self) -> bool {
        self.id == "*" || self.id.ends_with("/*")
    }

    /// The context parameters as (key, value, as written), sorted, empty ones dropped.
    fn sorted_params(&self) -> Vec<(&'a str, &'a str, &'a str)> {
        let mut params: Vec<(&str, &str, &str)> =
            self.query.unwrap_or_default().split('&').filter(|p| !p.is_empty()).map(param).collect();
        params.sort_unstable();
        params
    }

    /// True when the query is written the canonical way already.
    fn query_is_canonical(&self) -> bool {
        match self.query {
            None => true,
            Some(query) => {
                let mut previous: Option<(&str, &str, &str)> = None;
                for raw in query.split('&') {
                    if raw.is_empty() {
                        return false;
                    }
                    let pair = param(raw);
                    if previous.is_some_and(|p| p > pair) {
                        return false;
                    }
                    previous = Some(pair);
                }
                true
            }
        }
    }

    /// Writes the name with its parts, the id replaced by `id` and the query canonical.
    fn write(&self, id: &str) -> String {
        let mut out = String::with_capacity(
            SCHEME.len()
                + self.authority.len()
                + self.resource_type.len()
                + id.len()
                + 3
                + self.query.map_or(0, str::len)
                + self.fragment.map_or(0, |f| f.len() + 1),
        );
        out.push_str(SCHEME);
        out.push_str(self.authority);
        out.push('/');
        out.push_str(self.resource_type);
        if !id.is_empty() {
            out.push('/');
            out.push_str(id);
        }
        let params = self.sorted_params();
        for (i, (_, _, raw)) in params.iter().enumerate() {
            out.push(if i == 0 { '?' } else { '&' });
            out.push_str(raw);
        }
        if let Some(fragment) = self.fragment {
            out.push('#');
            out.push_str(fragment);
        }
        out
    }
}

/// A context parameter as (key, value, as written).
fn param(raw: &str) -> (&str, &str, &str) {
    let (key, value) = raw.split_once('=').unwrap_or((raw, ""));
    (key, value, raw)
}

/// True when `name` is an `xdstp://` name.
pub fn is_xdstp(name: &str) -> bool {
    name.starts_with(SCHEME)
}

/// The spelling of `name` the relay matches and interns by: an `xdstp://` name with its
/// context parameters sorted by key then value (and empty ones dropped); any other name,
/// and a TP1 name already in that form, unchanged and borrowed.
pub fn canonical(name: &str) -> Cow<'_, str> {
    match XdstpName::parse(name) {
        Some(parsed) if !parsed.query_is_canonical() => Cow::Owned(parsed.write(parsed.id)),
        _ => Cow::Borrowed(name),
    }
}

/// True when `name` is a TP1 glob collection (`xdstp://auth/type/path/*`).
pub fn is_glob(name: &str) -> bool {
    XdstpName::parse(name).is_some_and(|n| n.is_glob())
}

/// The canonical glob collection that `name` is a member of: the same authority, type and
/// context parameters, the id's last segment replaced by `*`. `None` for names that are not
/// TP1 names, for globs themselves, and for names with an empty id.
pub fn collection_of(name: &str) -> Option<String> {
    let parsed = XdstpName::parse(name)?;
    if parsed.is_glob() || parsed.id.is_empty() {
        return None;
    }
    let glob = match parsed.id.rsplit_once('/') {
        Some((prefix, _)) => format!("{prefix}/*"),
        None => "*".to_owned(),
    };
    Some(XdstpName { fragment: None, ..parsed }.write(&glob))
}

/// The authority of a TP1 name (`None` for other names).
pub fn authority(name: &str) -> Option<&str> {
    XdstpName::parse(name).map(|n| n.authority)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_into_their_parts() {
        let n =
            XdstpName::parse("xdstp://auth.example/envoy.config.cluster.v3.Cluster/fleet/c1?b=2&a=1#alt=x").unwrap();
        assert_eq!(n.authority, "auth.example");
        assert_eq!(n.resource_type, "envoy.config.cluster.v3.Cluster");
        assert_eq!(n.id, "fleet/c1");
        assert_eq!(n.query, Some("b=2&a=1"));
        assert_eq!(n.fragment, Some("alt=x"));
        let empty_authority = XdstpName::parse("xdstp:///T/x").unwrap();
        assert_eq!((empty_authority.authority, empty_authority.id), ("", "x"));
        assert_eq!(XdstpName::parse("xdstp://auth/T").unwrap().id, "");
        for not in ["cluster_1", "xdstp://auth", "xdstp://auth/", "XDSTP://a/T/x", "http://a/T/x", ""] {
            assert_eq!(XdstpName::parse(not), None, "{not}");
        }
    }

    #[test]
    fn context_parameter_order_does_not_matter() {
        let a = canonical("xdstp://auth/T/fleet/c1?b=2&a=1");
        let b = canonical("xdstp://auth/T/fleet/c1?a=1&b=2");
        assert_eq!(a, b);
        assert_eq!(a, "xdstp://auth/T/fleet/c1?a=1&b=2");
        assert!(matches!(b, Cow::Borrowed(_)), "a canonical name is not copied");
        assert!(matches!(canonical("cluster_1"), Cow::Borrowed(_)));
        assert_eq!(canonical("xdstp://auth/T/x?z&a=&&b=1"), "xdstp://auth/T/x?a=&b=1&z");
        assert_eq!(canonical("xdstp://auth/T/x?"), "xdstp://auth/T/x");
        assert_eq!(canonical("xdstp://auth/T/x?b=1&a=2#d"), "xdstp://auth/T/x?a=2&b=1#d");
        assert_eq!(canonical("xdstp://auth/T/x?k=2&k=1"), "xdstp://auth/T/x?k=1&k=2");
        assert_ne!(canonical("xdstp://Auth/T/x"), canonical("xdstp://auth/T/x"), "no case folding");
    }

    #[test]
    fn members_belong_to_the_glob_one_segment_up() {
        assert_eq!(collection_of("xdstp://auth/T/fleet/c1").as_deref(), Some("xdstp://auth/T/fleet/*"));
        assert_eq!(collection_of("xdstp://auth/T/fleet/c1?b=2&a=1").as_deref(), Some("xdstp://auth/T/fleet/*?a=1&b=2"));
        assert_eq!(collection_of("xdstp://auth/T/c1").as_deref(), Some("xdstp://auth/T/*"));
        assert_eq!(collection_of("xdstp://auth/T/a/b/c").as_deref(), Some("xdstp://auth/T/a/b/*"));
        assert_eq!(collection_of("xdstp://auth/T/fleet/*"), None, "a glob is no member");
        assert_eq!(collection_of("xdstp://auth/T"), None);
        assert_eq!(collection_of("c1"), None);
        assert!(is_glob("xdstp://auth/T/fleet/*"));
        assert!(is_glob("xdstp://auth/T/*?a=1"));
        assert!(!is_glob("xdstp://auth/T/fleet/x*"));
        assert_eq!(authority("xdstp://a.b/T/x"), Some("a.b"));
        assert_eq!(authority("x"), None);
    }

    /// Canonicalisation is idempotent and total on arbitrary bytes.
    #[test]
    fn canonical_is_idempotent_on_random_input() {
        let alphabet = ["xdstp://", "/", "?", "&", "=", "#", "*", "a", "b", "1", "é", ""];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..20_000 {
            let mut name = String::new();
            for _ in 0..(seed % 12) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                name.push_str(alphabet[(seed % alphabet.len() as u64) as usize]);
            }
            let once = canonical(&name).into_owned();
            assert_eq!(canonical(&once), once, "{name:?}");
            if let Some(glob) = collection_of(&name) {
                assert!(is_glob(&glob), "{name:?} -> {glob:?}");
                assert_eq!(canonical(&glob), glob);
            }
        }
    }
}
