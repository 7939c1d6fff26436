//! xDS-TP1 resource names: `xdstp://<authority>/<type>/<id>[?k=v&...]`.
//!
//! Rules: context parameters are compared ignoring their order ([`canonical`] sorts them); a
//! glob collection `xdstp://<authority>/<type>/<path>/*[?params]` covers every name directly
//! under `<path>` (not in deeper paths) whose context parameters equal the glob's. Names that
//! do not start with `xdstp://` are returned unchanged and are never globs. Pure.

/// The scheme prefix of xDS-TP1 names.
pub const SCHEME: &str = "xdstp://";

/// Whether `name` is an xDS-TP1 name.
pub fn is_xdstp(name: &str) -> bool {
    name.starts_with(SCHEME)
}

/// Whether `name` is an xDS-TP1 glob collection (its path ends in `/*`).
pub fn is_glob(name: &str) -> bool {
    is_xdstp(name) && split(name).0.ends_with("/*")
}

/// `name` with its context parameters sorted by key then value; other names unchanged.
pub fn canonical(name: &str) -> String {
    if !is_xdstp(name) {
        return name.to_owned();
    }
    let (path, params) = split(name);
    if params.is_empty() {
        return path.to_owned();
    }
    format!("{path}?{}", params.join("&"))
}

/// The path of `name` (without its context parameters).
pub fn path(name: &str) -> &str {
    split(name).0
}

/// The sorted context parameters of `name`, joined with `&` ("" when it has none).
pub fn query(name: &str) -> String {
    split(name).1.join("&")
}

/// `path` with the context parameters `query` (as returned by [`query`]).
pub fn with_query(path: &str, query: &str) -> String {
    if query.is_empty() { path.to_owned() } else { format!("{path}?{query}") }
}

/// Whether the glob collection `glob` covers the resource `name`.
pub fn glob_matches(glob: &str, name: &str) -> bool {
    if !is_glob(glob) || !is_xdstp(name) {
        return false;
    }
    let (glob_path, glob_params) = split(glob);
    let (path, params) = split(name);
    let prefix = &glob_path[..glob_path.len() - 1];
    match path.strip_prefix(prefix) {
        Some(rest) => !rest.is_empty() && !rest.contains('/') && glob_params == params,
        None => false,
    }
}

/// The path of `name` and its sorted, non-empty `k=v` context parameters.
fn split(name: &str) -> (&str, Vec<&str>) {
    match name.split_once('?') {
        Some((path, query)) => {
            let mut params: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
            params.sort_unstable();
            (path, params)
        }
        None => (name, Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CDS: &str = "xdstp://auth/envoy.config.cluster.v3.Cluster";

    #[test]
    fn canonical_sorts_context_parameters() {
        assert_eq!(canonical(&format!("{CDS}/fleet/c?b=2&a=1")), format!("{CDS}/fleet/c?a=1&b=2"));
        assert_eq!(canonical(&format!("{CDS}/fleet/c")), format!("{CDS}/fleet/c"));
        assert_eq!(canonical("cluster_0?b&a"), "cluster_0?b&a", "old-style names are untouched");
    }

    #[test]
    fn path_and_query_split_and_join() {
        let name = format!("{CDS}/fleet/c?z=1&a=2");
        assert_eq!(path(&name), format!("{CDS}/fleet/c"));
        assert_eq!(query(&name), "a=2&z=1");
        assert_eq!(with_query(path(&name), &query(&name)), canonical(&name));
        assert_eq!(with_query("p", ""), "p");
    }

    #[test]
    fn glob_covers_direct_members_with_equal_parameters() {
        let glob = format!("{CDS}/fleet/*");
        assert!(is_glob(&glob));
        assert!(!is_glob(&format!("{CDS}/fleet/c")));
        assert!(!is_glob("*"));
        assert!(glob_matches(&glob, &format!("{CDS}/fleet/cluster_0")));
        assert!(!glob_matches(&glob, &format!("{CDS}/fleet/deeper/cluster_0")));
        assert!(!glob_matches(&glob, &format!("{CDS}/other/cluster_0")));
        assert!(!glob_matches(&glob, &format!("{CDS}/fleet/cluster_0?a=1")));
        assert!(!glob_matches(&glob, "cluster_0"));
        let with_params = format!("{CDS}/fleet/*?b=2&a=1");
        assert!(glob_matches(&with_params, &format!("{CDS}/fleet/x?a=1&b=2")));
        assert!(!glob_matches(&with_params, &format!("{CDS}/fleet/x?a=1")));
    }
}
