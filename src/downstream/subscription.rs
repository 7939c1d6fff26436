//! The state-of-the-world subscription rules of one stream and one type, as pure functions.
//!
//! - A request answers the last response of its type only if it carries that response's
//!   nonce; a request with an older nonce is stale and ignored (the client will send a fresh
//!   one after reading the newest response).
//! - `error_detail` marks a NACK; otherwise a request carrying the last nonce is an ACK.
//! - An empty name list means "wildcard" only while the stream has never named a resource of
//!   the type (legacy wildcard); afterwards it means "nothing". `*` asks for wildcard
//!   explicitly, alongside any names.
//! - A request's name list is compared with the interest as a set (order and repeats do not
//!   matter), so an ACK repeating the list allocates nothing and the stream keeps one copy
//!   of its names: the interest, whose names it shares with its watcher.
//! - Resource locators (xDS-TP2) subscribe to their names like `resource_names`; the
//!   subscription's dynamic parameters are the locators' (one set per request), else the
//!   node's for the type; a change of parameters is a change of interest.
//! - `xdstp://` names are kept in their canonical spelling (context parameters sorted, see
//!   [`crate::xdstp`]): two spellings of one name are one name, asked upstream once.

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;

use std::borrow::Cow;

use crate::cache::{Interest, Name, Names};
use crate::{constraints, xdstp};

/// Where a stream stands for one type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriptionState {
    /// What the client wants now.
    pub interest: Interest,
    /// True once a request of the type was processed.
    pub started: bool,
    /// The nonce of the last response sent for the type.
    pub last_nonce: Option<String>,
    /// True once the client named a resource (or `*`): legacy wildcard is over.
    pub explicit: bool,
}

/// What a request means for its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classified {
    /// Answers an older response: ignore it entirely.
    Stale,
    /// The first request of the type on this stream, or a request sent before any response
    /// of the type (both carry no nonce to check).
    Initial,
    /// Accepts the last response.
    Ack {
        /// The accepted version.
        version: String,
    },
    /// Rejects the last response.
    Nack {
        /// The last version the client accepted.
        version: String,
        /// The client's error message.
        message: String,
    },
}

/// Classifies `request` against the state of its type.
pub fn classify(state: &SubscriptionState, request: &DiscoveryRequest) -> Classified {
    let Some(last_nonce) = &state.last_nonce else {
        return Classified::Initial;
    };
    if &request.response_nonce != last_nonce {
        return Classified::Stale;
    }
    match &request.error_detail {
        Some(error) => Classified::Nack {
            version: request.version_info.clone(),
            message: crate::telemetry::truncate_message(&error.message).into_owned(),
        },
        None => Classified::Ack { version: request.version_info.clone() },
    }
}

/// Applies a request: its names and the names of its resource locators, and its dynamic
/// parameters (xDS-TP2: the locators', else `node.dynamic_parameters[type_url]`). Returns
/// true when the interest changed (or this is the first request), as [`apply_names`].
///
/// # Errors
/// A message for the client when the request's locators carry different parameters; the
/// state is unchanged.
pub fn apply_request(
    state: &mut SubscriptionState,
    request: &DiscoveryRequest,
    node: Option<&Node>,
    type_url: &str,
) -> Result<bool, String> {
    let params = constraints::of_request(&request.resource_locators, node, type_url)?;
    let params = if params.is_empty() { Vec::new() } else { vec![params] };
    let params_changed = state.interest.params != params;
    state.interest.params = params;
    let names_changed = if request.resource_locators.is_empty() {
        apply_names(state, &request.resource_names)
    } else {
        let mut names = request.resource_names.clone();
        names.extend(request.resource_locators.iter().map(|l| l.name.clone()));
        apply_names(state, &names)
    };
    Ok(names_changed || params_changed)
}

/// Applies the request's name list. Returns true when the interest changed (or this is the
/// first list seen), i.e. when the client must be answered even at an unchanged version.
pub fn apply_names(state: &mut SubscriptionState, names: &[String]) -> bool {
    let first = !state.started;
    state.started = true;
    if names.is_empty() {
        let interest = if state.explicit { Interest::default() } else { Interest::wildcard() };
        let interest = Interest { params: state.interest.params.clone(), ..interest };
        if interest == state.interest {
            return first;
        }
        state.interest = interest;
        return true;
    }
    state.explicit = true;
    let wildcard = names.iter().any(|name| name == "*");
    let mut listed: Vec<Cow<'_, str>> =
        names.iter().filter(|name| *name != "*").map(|name| xdstp::canonical(name)).collect();
    listed.sort_unstable();
    listed.dedup();
    let current = &state.interest;
    let unchanged = current.wildcard == wildcard
        && current.names.len() == listed.len()
        && current.names.iter().zip(&listed).all(|(held, name)| held.as_str() == name);
    if unchanged {
        return first;
    }
    let names = Names::from_sorted(listed.into_iter().map(Name::new).collect());
    state.interest = Interest { wildcard, names, params: state.interest.params.clone() };
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::rpc::Status;

    fn request(names: &[&str], version: &str, nonce: &str, nack: Option<&str>) -> DiscoveryRequest {
        DiscoveryRequest {
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            version_info: version.into(),
            response_nonce: nonce.into(),
            error_detail: nack.map(|m| Status { code: 3, message: m.into(), details: vec![] }),
            ..Default::default()
        }
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn nonces_classify_requests() {
        let mut state = SubscriptionState::default();
        assert_eq!(classify(&state, &request(&[], "", "", None)), Classified::Initial);
        state.last_nonce = Some("2".into());
        assert_eq!(classify(&state, &request(&[], "v1", "1", None)), Classified::Stale, "older nonce");
        assert_eq!(classify(&state, &request(&[], "v1", "", None)), Classified::Stale, "no nonce after a response");
        assert_eq!(classify(&state, &request(&[], "v2", "2", None)), Classified::Ack { version: "v2".into() });
        assert_eq!(
            classify(&state, &request(&[], "v1", "2", Some("bad cluster"))),
            Classified::Nack { version: "v1".into(), message: "bad cluster".into() }
        );
    }

    /// The protocol's worked example for state-of-the-world legacy wildcard.
    #[test]
    fn legacy_wildcard_ends_with_the_first_explicit_name() {
        let mut state = SubscriptionState::default();
        assert!(apply_names(&mut state, &[]), "first request is answered");
        assert_eq!(state.interest, Interest::wildcard());
        assert!(!apply_names(&mut state, &[]), "an ACK with the same empty list changes nothing");
        assert!(apply_names(&mut state, &names(&["a", "b"])));
        assert_eq!(state.interest, Interest::names(["a", "b"]));
        assert!(apply_names(&mut state, &[]));
        assert!(state.interest.is_empty(), "after explicit names an empty list unsubscribes all");
    }

    #[test]
    fn explicit_star_mixes_with_names() {
        let mut state = SubscriptionState::default();
        assert!(apply_names(&mut state, &names(&["*", "x"])));
        assert!(state.interest.wildcard && state.interest.names.contains("x"));
        assert!(apply_names(&mut state, &names(&["*"])));
        assert_eq!(state.interest, Interest::wildcard());
        assert!(apply_names(&mut state, &[]));
        assert!(state.interest.is_empty());
    }

    #[test]
    fn reordered_names_are_not_a_change_of_interest() {
        let mut state = SubscriptionState::default();
        apply_names(&mut state, &names(&["a", "b"]));
        assert!(!apply_names(&mut state, &names(&["b", "a"])));
        assert!(!apply_names(&mut state, &names(&["b", "a", "b"])), "repeats are not a change");
        assert!(apply_names(&mut state, &names(&["b", "c"])));
        assert!(apply_names(&mut state, &names(&["b", "c", "*"])));
        assert!(!apply_names(&mut state, &names(&["*", "c", "b"])));
        assert!(apply_names(&mut state, &names(&["b", "c"])), "dropping * is a change");
    }

    /// The first list is always answered, even when it means what the default state means.
    #[test]
    fn the_first_list_is_answered_whatever_it_holds() {
        for list in [&[][..], &["a"][..], &["*"][..]] {
            let mut state = SubscriptionState::default();
            assert!(apply_names(&mut state, &names(list)), "{list:?}");
            assert!(!apply_names(&mut state, &names(list)), "{list:?} again");
        }
    }

    /// xDS-TP1: the order of context parameters is not a change of interest.
    #[test]
    fn xdstp_names_are_kept_canonical() {
        let mut state = SubscriptionState::default();
        assert!(apply_names(&mut state, &names(&["xdstp://a/T/x?b=2&a=1", "xdstp://a/T/f/*"])));
        assert_eq!(state.interest, Interest::names(["xdstp://a/T/x?a=1&b=2", "xdstp://a/T/f/*"]));
        assert!(!apply_names(&mut state, &names(&["xdstp://a/T/x?a=1&b=2", "xdstp://a/T/f/*"])));
        assert!(!apply_names(
            &mut state,
            &names(&["xdstp://a/T/f/*", "xdstp://a/T/x?b=2&a=1", "xdstp://a/T/x?a=1&b=2"])
        ));
    }

    /// An unchanged list keeps the interest's names (which the watcher shares) untouched.
    #[test]
    fn an_unchanged_list_keeps_the_shared_names() {
        let mut state = SubscriptionState::default();
        apply_names(&mut state, &names(&["a", "b"]));
        let before = state.interest.names.as_slice().as_ptr();
        assert!(!apply_names(&mut state, &names(&["b", "a"])));
        assert_eq!(state.interest.names.as_slice().as_ptr(), before);
    }
}
