//! Entry points for fuzzing and property tests: every decoder of bytes that come from outside
//! the relay (downstream requests, peer messages, origin resources, configuration files),
//! driven with arbitrary input and checked against the invariants the rest of the relay
//! relies on.
//!
//! The fuzz targets (`fuzz/fuzz_targets/`) and the property tests (`tests/properties.rs`)
//! call the same functions, so a corpus found by the fuzzer is replayed by `cargo test`.
//!
//! Invariants: each function takes any byte string; it returns normally when every
//! invariant holds and panics (with a message naming the invariant) when one does not.
//! Nothing here is used by the relay itself.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::{Any, ListValue, Struct, Value};
use prost::Message;

use crate::cache::{Interest, KeyState, Resource};
use crate::config::{self, KeyerConfiguration};
use crate::downstream::delta_subscription::{self, DeltaChange, DeltaSubscription};
use crate::downstream::subscription::{self, Classified, SubscriptionState};
use crate::keyer::{KeyRequest, Keyer};
use crate::peer::proto;
use crate::{wire, xds};

/// The type URLs the inputs choose from (by index): every v3 type, the `Resource` wrapper,
/// a v2 type and one the relay does not know.
pub const TYPE_URLS: [&str; 14] = [
    xds::CLUSTER,
    xds::ENDPOINT,
    xds::LISTENER,
    xds::ROUTE,
    xds::SCOPED_ROUTE,
    xds::VIRTUAL_HOST,
    xds::LB_ENDPOINT,
    xds::SECRET,
    xds::RUNTIME,
    xds::EXTENSION_CONFIG,
    wire::RESOURCE_WRAPPER,
    "type.googleapis.com/envoy.api.v2.Cluster",
    "type.googleapis.com/acme.Thing",
    "",
];

/// Aggregation rules that use every kind of match and result, so that arbitrary nodes reach
/// every path of the keyer.
pub const RICH_RULES: &str = r#"
fragments:
  - rules:
      - match:
          and_match:
            rules:
              - request_node_match: {id_match: {regex_match: "^envoy-[a-z]+-\\d+$"}}
              - not_match: {request_type_match: {types: ["type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"]}}
        result:
          and_result:
            result_predicates:
              - request_node_fragment: {id_action: {regex_action: {pattern: "^envoy-([a-z]+)-.*$", replace: "$1"}}}
              - string_fragment: "x"
      - match:
          or_match:
            rules:
              - request_node_match: {cluster_match: {exact_match: "prod"}}
              - request_node_match: {locality_match: {region: {exact_match: "us-east-1"}, zone: {regex_match: "^us-east-1[a-c]$"}}}
        result:
          request_node_fragment:
            locality_action:
              region_action: {exact: true}
              zone_action: {regex_action: {pattern: "^.*([a-c])$", replace: "$1"}}
  - rules:
      - match:
          request_node_match:
            node_metadata_match:
              path: [{key: team}]
              match: {string_match: {regex_match: "^[a-z]+$"}}
        result:
          request_node_fragment:
            node_metadata_action: {path: [{key: team}], action: {exact: true}}
      - match:
          request_node_match:
            node_metadata_match:
              path: [{key: flags}, {key: canary}]
              match: {bool_match: {value_match: true}}
        result: {string_fragment: canary}
      - match:
          request_node_match:
            node_metadata_match:
              path: [{key: flags}, {key: shard}]
              match: {string_match: {exact_match: "a"}}
        result:
          request_node_fragment:
            node_metadata_action: {path: [{key: flags}, {key: shard}], action: {regex_action: {pattern: "(.)", replace: "s$1"}}}
      - match: {any_match: true}
        result:
          resource_names_fragment: {element: 1, action: {regex_action: {pattern: "^(.{1,8}).*$", replace: "$1"}}}
  - rules:
      - match: {request_type_match: {types: ["type.googleapis.com/envoy.config.route.v3.RouteConfiguration"]}}
        result: {resource_names_fragment: {element: 0, action: {exact: true}}}
      - match: {not_match: {any_match: true}}
        result: {request_node_fragment: {cluster_action: {exact: true}}}
"#;

/// The keyers requests are mapped with: the example rules, the deployment's rules and
/// [`RICH_RULES`].
pub fn keyers() -> &'static [Keyer] {
    static KEYERS: OnceLock<Vec<Keyer>> = OnceLock::new();
    KEYERS.get_or_init(|| {
        [config::DEFAULT_RULES, include_str!("../deploy/config/aggregation-rules.yaml"), RICH_RULES]
            .iter()
            .map(|text| {
                let rules = config::parse_rules(text, "rules").expect("the built-in rules parse");
                Keyer::new(&rules).expect("the built-in rules compile")
            })
            .collect()
    })
}

/// Keys `request` with every keyer: the key is a pure function of the request (same answer
/// twice) and never empty.
fn check_key(request: &KeyRequest<'_>) {
    for keyer in keyers() {
        let first = keyer.key(request);
        assert_eq!(first, keyer.key(request), "keying is deterministic");
        if let Ok(key) = first {
            assert!(!key.is_empty(), "a key is never empty");
        }
    }
}

/// A message decoded from arbitrary bytes encodes to bytes that decode to the same message
/// (when the message equals itself: a NaN in a `Struct` does not).
fn check_round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(message: &M) {
    #[allow(clippy::eq_op)]
    if message != message {
        return;
    }
    let again = M::decode(message.encode_to_vec().as_slice()).expect("a re-encoded message decodes");
    assert_eq!(&again, message, "decode(encode(m)) == m");
}

/// The frames of a fuzz input: length-delimited messages, up to the first that does not
/// decode.
fn frames<M: Message + Default>(mut data: &[u8]) -> Vec<M> {
    let mut out = Vec::new();
    while !data.is_empty() && out.len() < 64 {
        match M::decode_length_delimited(&mut data) {
            Ok(message) => out.push(message),
            Err(_) => break,
        }
    }
    out
}

/// A message with only a string field at tag 1, as protobuf decodes it.
#[derive(Clone, PartialEq, Message)]
struct NameAt1 {
    #[prost(string, tag = "1")]
    name: String,
}

/// A message with only a string field at tag 3 (the `Resource` wrapper's name).
#[derive(Clone, PartialEq, Message)]
struct NameAt3 {
    #[prost(string, tag = "3")]
    name: String,
}

// === wire ===

/// The wire skimmer over an arbitrary resource: byte 0 picks the type URL from
/// [`TYPE_URLS`], the rest is the encoded resource.
///
/// Invariants: the name read without decoding is the one a protobuf decoder sees (the last
/// occurrence of the field wins); a cached resource's delta form and state-of-the-world field
/// decode to the same name, version and body.
pub fn wire_skim(data: &[u8]) {
    let Some((&selector, value)) = data.split_first() else { return };
    let type_url = TYPE_URLS[usize::from(selector) % TYPE_URLS.len()];
    let any = Any { type_url: type_url.to_owned(), value: value.to_vec() };
    let name = wire::resource_name(&any);
    let decoded = match type_url {
        wire::RESOURCE_WRAPPER => Some(NameAt3::decode(value).map(|m| m.name)),
        t if xds::is_known(t) && t != xds::LB_ENDPOINT => Some(NameAt1::decode(value).map(|m| m.name)),
        _ => None,
    };
    match decoded {
        None => assert_eq!(name, None, "types without a known name field have no name"),
        Some(Ok(decoded)) => {
            assert_eq!(name.unwrap_or_default(), decoded, "the skimmed name is the decoded name")
        }
        Some(Err(_)) => {}
    }
    let resource = Resource::new(any.clone());
    let field = DiscoveryResponse::decode(resource.field.clone()).expect("a resource field decodes");
    assert_eq!(field.resources, std::slice::from_ref(&any), "the resource field carries the resource");
    let delta = DeltaDiscoveryResponse::decode(resource.delta_field().clone()).expect("a delta field decodes");
    let [wrapped] = delta.resources.as_slice() else { panic!("a delta field carries one resource") };
    assert_eq!(wrapped.name, resource.name.clone().unwrap_or_default(), "the delta resource keeps the name");
    assert_eq!(wrapped.version, resource.version, "the delta resource carries the content-hash version");
    if type_url != wire::RESOURCE_WRAPPER {
        assert_eq!(wrapped.resource.as_ref(), Some(&any), "the delta resource carries the body");
    }
}

// === state-of-the-world requests ===

/// A state-of-the-world stream fed with arbitrary requests: `data` is the whole input as one
/// request, and also a sequence of length-delimited requests.
///
/// Invariants: requests round-trip; nonces classify as the protocol says; the interest after
/// a request is the set its names say (legacy wildcard only before the first name); a
/// repeated name list changes nothing; every interest maps to a key or a key error.
pub fn discovery_request(data: &[u8]) {
    if let Ok(request) = DiscoveryRequest::decode(data) {
        check_round_trip(&request);
    }
    let mut node: Option<Node> = None;
    let mut types: HashMap<String, SubscriptionState> = HashMap::new();
    let mut nonce = 0u64;
    for request in frames::<DiscoveryRequest>(data) {
        check_round_trip(&request);
        let node = node.get_or_insert_with(|| request.node.clone().unwrap_or_default());
        let type_url = request.type_url.clone();
        if type_url.is_empty() || xds::is_v2(&type_url) {
            // Refused on an aggregated stream: the stream ends.
            return;
        }
        let state = types.entry(type_url.clone()).or_default();
        let before = state.clone();
        let classified = subscription::classify(state, &request);
        match &before.last_nonce {
            None => assert_eq!(classified, Classified::Initial),
            Some(last) if *last != request.response_nonce => assert_eq!(classified, Classified::Stale),
            Some(_) => match (&request.error_detail, &classified) {
                (None, Classified::Ack { version }) | (Some(_), Classified::Nack { version, .. }) => {
                    assert_eq!(*version, request.version_info)
                }
                other => panic!("request with the last nonce classified as {other:?}"),
            },
        }
        if classified == Classified::Stale {
            continue;
        }
        let changed = subscription::apply_names(state, &request.resource_names);
        check_sotw_interest(&before, state, &request.resource_names);
        assert_eq!(changed, !before.started || state.interest != before.interest, "apply_names answers a change");
        assert!(!subscription::apply_names(&mut state.clone(), &request.resource_names), "repeating changes nothing");
        if changed && !state.interest.is_empty() {
            let names: Vec<String> = state.interest.names.iter().cloned().collect();
            check_key(&KeyRequest { type_url: &type_url, node: Some(node), resource_names: &names });
            nonce += 1;
            state.last_nonce = Some(nonce.to_string());
        }
    }
}

fn check_sotw_interest(before: &SubscriptionState, after: &SubscriptionState, names: &[String]) {
    assert!(after.started);
    if names.is_empty() {
        assert_eq!(after.explicit, before.explicit);
        let want = if before.explicit { Interest::default() } else { Interest::wildcard() };
        assert_eq!(after.interest, want, "an empty list is wildcard only before the first name");
        return;
    }
    assert!(after.explicit);
    assert_eq!(after.interest.wildcard, names.iter().any(|n| n == "*"));
    let want: Vec<&str> = {
        let mut v: Vec<&str> = names.iter().map(String::as_str).filter(|n| *n != "*").collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let got: Vec<&str> = after.interest.names.iter().map(String::as_str).collect();
    assert_eq!(got, want, "the interest is the set of names");
}

// === delta requests ===

/// A delta stream fed with arbitrary requests: `data` is the whole input as one request, and
/// also a sequence of length-delimited requests. After each request the subscription is
/// diffed against a cache state holding some of the names it wants.
///
/// Invariants: requests round-trip; subscribe and unsubscribe lists change exactly the
/// names they list; names to answer are wanted; the incremental diff equals the full diff;
/// nothing is left to send right after an update.
pub fn delta_discovery_request(data: &[u8]) {
    if let Ok(request) = DeltaDiscoveryRequest::decode(data) {
        check_round_trip(&request);
    }
    let mut node: Option<Node> = None;
    let mut types: HashMap<String, (DeltaSubscription, KeyState)> = HashMap::new();
    for (round, request) in frames::<DeltaDiscoveryRequest>(data).into_iter().enumerate() {
        check_round_trip(&request);
        let node = node.get_or_insert_with(|| request.node.clone().unwrap_or_default());
        let type_url = request.type_url.clone();
        if type_url.is_empty() || xds::is_v2(&type_url) {
            return;
        }
        let (sub, state) =
            types.entry(type_url.clone()).or_insert_with(|| (Default::default(), KeyState::empty(xds::CLUSTER)));
        let before = sub.clone();
        let change = DeltaChange {
            subscribe: &request.resource_names_subscribe,
            unsubscribe: &request.resource_names_unsubscribe,
            initial_versions: &request.initial_resource_versions,
        };
        let changed = delta_subscription::apply_change(sub, change);
        check_delta_interest(&before, sub, &change);
        if !changed {
            continue;
        }
        if !sub.interest.is_empty() {
            let names: Vec<String> = sub.interest.names.iter().cloned().collect();
            check_key(&KeyRequest { type_url: &type_url, node: Some(node), resource_names: &names });
        }
        // The origin answers with the names of odd length (and "extra" for a wildcard), some
        // of them changed since the previous round.
        let coverage = sub.interest.clone();
        let mut present: Vec<String> = coverage.names.iter().filter(|n| n.len() % 2 == 1).cloned().collect();
        if coverage.wildcard {
            present.push("extra".to_owned());
        }
        let resources = present
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let cluster = Cluster {
                    name: name.clone(),
                    alt_stat_name: if (i + round) % 3 == 0 { round.to_string() } else { String::new() },
                    ..Default::default()
                };
                Any { type_url: xds::CLUSTER.to_owned(), value: cluster.encode_to_vec() }
            })
            .collect();
        let response = DiscoveryResponse {
            type_url: xds::CLUSTER.to_owned(),
            version_info: round.to_string(),
            resources,
            ..Default::default()
        };
        match state.apply(response, &coverage) {
            Ok(Some(next)) => *state = next,
            Ok(None) => {}
            Err(rejection) => panic!("a well-formed response is rejected: {rejection}"),
        }
        let mut full = sub.clone();
        full.synced = None;
        let incremental = delta_subscription::compute(sub, state);
        let complete = delta_subscription::compute(&mut full, state);
        let names = |u: &delta_subscription::DeltaUpdate| -> Vec<String> {
            u.resources.iter().map(|r| r.name.clone().unwrap_or_default()).collect()
        };
        assert_eq!(names(&incremental), names(&complete), "incremental and full diffs send the same resources");
        assert_eq!(incremental.removed, complete.removed, "incremental and full diffs remove the same names");
        assert_eq!(sub.known, full.known);
        assert_eq!(sub.must_answer, full.must_answer);
        assert!(incremental.removed.windows(2).all(|w| w[0] < w[1]), "removals are sorted and unique");
        for resource in &incremental.resources {
            assert!(sub.interest.wants(resource.name.as_deref().unwrap_or_default()), "only wanted resources are sent");
        }
        assert!(delta_subscription::compute(sub, state).is_empty(), "nothing is left to send after an update");
    }
}

fn check_delta_interest(before: &DeltaSubscription, after: &DeltaSubscription, change: &DeltaChange<'_>) {
    let subscribed: HashSet<&str> = change.subscribe.iter().map(String::as_str).collect();
    let unsubscribed: HashSet<&str> = change.unsubscribe.iter().map(String::as_str).collect();
    let first = !before.started;
    let wildcard = if unsubscribed.contains("*") {
        false
    } else if subscribed.contains("*") || (first && subscribed.is_empty() && unsubscribed.is_empty()) {
        true
    } else {
        before.interest.wildcard
    };
    assert_eq!(after.interest.wildcard, wildcard, "wildcard follows `*` in the lists");
    let mut want: Vec<&str> = before
        .interest
        .names
        .iter()
        .map(String::as_str)
        .chain(subscribed.iter().copied().filter(|n| *n != "*"))
        .filter(|n| !unsubscribed.contains(n))
        .collect();
    want.sort_unstable();
    want.dedup();
    let got: Vec<&str> = after.interest.names.iter().map(String::as_str).collect();
    assert_eq!(got, want, "the lists change exactly the names they list");
    for name in &after.must_answer {
        assert!(after.interest.wants(name), "a name to answer ({name:?}) is wanted");
    }
}

// === peer messages ===

/// Peer streams fed with arbitrary messages: byte 0 picks the stream (0: an owner reading
/// `WatchRequest`s, 1: a follower reading `KeyUpdate`s, 2: the admin API reading a
/// `StatusReply`); the rest is a sequence of length-delimited messages.
///
/// Invariants: messages round-trip; interests convert to sorted sets and back; a forwarded
/// state the cache accepts has unique names and encodes to responses that decode to it.
pub fn peer_messages(data: &[u8]) {
    let Some((&selector, data)) = data.split_first() else { return };
    match selector % 3 {
        0 => {
            for (i, request) in frames::<proto::WatchRequest>(data).into_iter().enumerate() {
                check_round_trip(&request);
                if i == 0 {
                    if request.key.is_empty() || request.type_url.is_empty() {
                        return;
                    }
                    let Ok(node) = Node::decode(request.node.as_slice()) else { return };
                    check_round_trip(&node);
                }
                check_interest(request.interest);
                if let Some(report) = request.canary_report {
                    // The owner's check: a report passes whole and bounded, or is refused.
                    if let Ok(tally) = crate::peer::server::checked_tally(report) {
                        assert!(tally.answers.len() <= crate::peer::server::MAX_REPORTED_ANSWERS);
                        assert!(u64::from(tally.acked) + u64::from(tally.nacked) <= u64::from(tally.canaries));
                        let report = proto::CanaryReport::from(&tally);
                        assert_eq!(report.answers.len(), tally.answers.len(), "a checked tally goes out whole");
                    }
                }
            }
        }
        1 => {
            let mut state: Option<KeyState> = None;
            for update in frames::<proto::KeyUpdate>(data) {
                check_round_trip(&update);
                let coverage = check_interest(update.coverage);
                let Ok(response) = DiscoveryResponse::decode(update.response) else { return };
                check_round_trip(&response);
                let base = state.get_or_insert_with(|| KeyState::empty(&response.type_url));
                // The same bytes from an origin merge into the state instead.
                if let Ok(Some(merged)) = base.apply(response.clone(), &coverage) {
                    check_state(&merged);
                }
                if let Ok(Some(next)) = base.replace(response, &coverage) {
                    check_state(&next);
                    state = Some(next);
                }
                // A candidate is applied as a forwarded state is, over the latest state.
                if let Some(candidate) = update.candidate {
                    let coverage = check_interest(candidate.coverage);
                    let Ok(response) = DiscoveryResponse::decode(candidate.response) else { return };
                    if let Some(base) = &state
                        && let Ok(Some(next)) = base.replace(response, &coverage)
                    {
                        check_state(&next);
                    }
                }
            }
        }
        _ => {
            let Ok(reply) = proto::StatusReply::decode(data) else { return };
            check_round_trip(&reply);
            for key in &reply.keys {
                let json =
                    serde_json::json!({ "key": key.key, "age_seconds": key.age_seconds, "followers": key.followers });
                assert!(serde_json::to_string(&json).is_ok(), "a status renders as JSON");
            }
        }
    }
}

// === origin responses ===

/// The cache fed with arbitrary origin responses: byte 0 picks the protocol (even:
/// state-of-the-world `DiscoveryResponse`s, odd: delta `DeltaDiscoveryResponse`s), byte 1
/// the subscription (wildcard or the names of the first response), the rest is a sequence of
/// length-delimited responses applied in order to one key's state.
///
/// Invariants: a response is accepted or rejected, never a panic; an accepted state has
/// unique names and encodes to responses that decode to it.
pub fn origin_response(data: &[u8]) {
    let [protocol, subscription, data @ ..] = data else { return };
    let mut state: Option<KeyState> = None;
    let mut coverage: Option<Interest> = None;
    let mut apply = |type_url: &str, names: Vec<String>, step: &dyn Fn(&KeyState, &Interest) -> Option<KeyState>| {
        let coverage = coverage
            .get_or_insert_with(|| if subscription % 2 == 0 { Interest::wildcard() } else { Interest::names(names) })
            .clone();
        let base = state.get_or_insert_with(|| KeyState::empty(type_url));
        if let Some(next) = step(base, &coverage) {
            check_state(&next);
            state = Some(next);
        }
    };
    if protocol % 2 == 0 {
        for response in frames::<DiscoveryResponse>(data) {
            check_round_trip(&response);
            let names = response.resources.iter().filter_map(wire::resource_name).collect();
            let type_url = response.type_url.clone();
            apply(&type_url, names, &|base, coverage| base.apply(response.clone(), coverage).ok().flatten());
        }
    } else {
        for response in frames::<DeltaDiscoveryResponse>(data) {
            check_round_trip(&response);
            let names = response.resources.iter().map(|r| r.name.clone()).collect();
            let type_url = response.type_url.clone();
            apply(&type_url, names, &|base, coverage| base.apply_delta(response.clone(), coverage).ok().flatten());
        }
    }
}

/// An interest received from a peer is a sorted set, and converts back to the same set.
fn check_interest(interest: Option<proto::Interest>) -> Interest {
    let sent = interest.clone().unwrap_or_default();
    let converted = Interest::from(interest);
    assert_eq!(converted.wildcard, sent.wildcard);
    let mut want = sent.names;
    want.sort_unstable();
    want.dedup();
    let back = proto::Interest::from(&converted);
    assert_eq!(back.names, want, "an interest is the set of its names");
    converted
}

/// A cache state: unique names, and its encoded forms decode to its content.
fn check_state(state: &KeyState) {
    // Variants (xDS-TP2) share their name; other resources never do.
    let names: Vec<&str> =
        state.resources.iter().filter(|r| r.constraints.is_none()).filter_map(|r| r.name.as_deref()).collect();
    assert_eq!(names.len(), names.iter().collect::<HashSet<_>>().len(), "names are unique in a state");
    let full = DiscoveryResponse::decode(state.full_body().clone()).expect("the full body decodes");
    assert_eq!(full.type_url, state.type_url);
    assert_eq!(full.version_info, state.version_info);
    let anys: Vec<&Any> = state.resources.iter().map(|r| &r.any).collect();
    assert_eq!(full.resources.iter().collect::<Vec<_>>(), anys, "the full body carries every resource");
    let (body, count) = state.body_for(&state.coverage);
    let selected = DiscoveryResponse::decode(body).expect("a selected body decodes");
    assert_eq!(selected.resources.len(), count);
    let delta = DeltaDiscoveryResponse::decode(state.delta_body(
        &state.resources,
        &[],
        &names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        &[],
    ))
    .expect("a delta body decodes");
    assert_eq!(delta.resources.len(), state.resources.len());
    for (sent, resource) in delta.resources.iter().zip(&state.resources) {
        assert_eq!(sent.version, resource.version);
    }
}

// === configuration ===

/// The bootstrap loader over arbitrary text.
///
/// Invariants: no panic; a bootstrap that parses validates, and its JSON form (as the admin
/// API shows it) reads back to the same bootstrap.
pub fn bootstrap(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(bootstrap) = config::parse_bootstrap(text, "fuzz.yaml") else { return };
    bootstrap.validate().expect("a parsed bootstrap validates");
    // Read back as JSON: YAML folds some characters JSON keeps (NEL, U+0085, is a line break
    // in YAML), so the YAML loader is not the judge of the JSON form.
    let json = serde_json::to_string(&bootstrap).expect("a bootstrap serializes");
    let again: config::Bootstrap = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}\n{json}"));
    again.validate().expect("a bootstrap read back validates");
    assert_eq!(again, bootstrap, "a bootstrap survives serialization");
}

/// The rules loader over arbitrary text.
///
/// Invariants: no panic; rules that parse validate, compile into a keyer, key requests
/// without panicking, and their JSON form reads back to the same rules.
pub fn rules(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(rules) = config::parse_rules(text, "fuzz.yaml") else { return };
    rules.validate().expect("parsed rules validate");
    let keyer = Keyer::new(&rules).expect("parsed rules compile");
    let json = serde_json::to_string(&rules).expect("rules serialize");
    let again: KeyerConfiguration = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}\n{json}"));
    again.validate().expect("rules read back validate");
    assert_eq!(again, rules, "rules survive serialization");
    let node = sample_node();
    let names = ["a".to_owned(), "b".to_owned()];
    for type_url in [xds::CLUSTER, xds::ENDPOINT, xds::ROUTE, ""] {
        for names in [&names[..], &[]] {
            for node in [Some(&node), None] {
                let request = KeyRequest { type_url, node, resource_names: names };
                let key = keyer.key(&request);
                assert_eq!(key, keyer.key(&request), "keying is deterministic");
            }
        }
    }
}

fn sample_node() -> Node {
    let mut fields = HashMap::new();
    fields.insert("team".to_owned(), Value { kind: Some(Kind::StringValue("edge".into())) });
    Node {
        id: "envoy-east-1".into(),
        cluster: "staging-east".into(),
        locality: Some(Locality { region: "us-east-1".into(), zone: "us-east-1a".into(), sub_zone: "r1".into() }),
        metadata: Some(Struct { fields }),
        ..Default::default()
    }
}

// === keyer ===

/// The keyer with an arbitrary node, type and resource names, under the example, deployment
/// and [`RICH_RULES`] rules.
///
/// Invariants: no panic; the key is deterministic and never empty.
pub fn keyer(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let _ = arbitrary_request(&mut u).map(|(type_url, node, names)| {
        check_key(&KeyRequest { type_url: &type_url, node: node.as_ref(), resource_names: &names })
    });
}

const WORDS: [&str; 12] = [
    "team",
    "flags",
    "canary",
    "shard",
    "a",
    "prod",
    "staging-east",
    "envoy-east-1",
    "us-east-1",
    "us-east-1b",
    "",
    "*",
];

fn word(u: &mut Unstructured<'_>) -> arbitrary::Result<String> {
    if bool::arbitrary(u)? { Ok((*u.choose(&WORDS)?).to_owned()) } else { String::arbitrary(u) }
}

fn arbitrary_value(u: &mut Unstructured<'_>, depth: u32) -> arbitrary::Result<Value> {
    let kind = match u.int_in_range(0..=6)? {
        0 => None,
        1 => Some(Kind::NullValue(i32::arbitrary(u)?)),
        2 => Some(Kind::NumberValue(f64::arbitrary(u)?)),
        3 => Some(Kind::StringValue(word(u)?)),
        4 => Some(Kind::BoolValue(bool::arbitrary(u)?)),
        5 if depth > 0 => Some(Kind::StructValue(arbitrary_struct(u, depth - 1)?)),
        6 if depth > 0 => {
            let len = u.int_in_range(0..=3)?;
            let values = (0..len).map(|_| arbitrary_value(u, depth - 1)).collect::<arbitrary::Result<_>>()?;
            Some(Kind::ListValue(ListValue { values }))
        }
        _ => None,
    };
    Ok(Value { kind })
}

fn arbitrary_struct(u: &mut Unstructured<'_>, depth: u32) -> arbitrary::Result<Struct> {
    let len = u.int_in_range(0..=4)?;
    let mut fields = HashMap::new();
    for _ in 0..len {
        fields.insert(word(u)?, arbitrary_value(u, depth)?);
    }
    Ok(Struct { fields })
}

/// An arbitrary request: type URL, node (or none) and resource names.
fn arbitrary_request(u: &mut Unstructured<'_>) -> arbitrary::Result<(String, Option<Node>, Vec<String>)> {
    let type_url = if u.ratio(7, 8)? { (*u.choose(&TYPE_URLS)?).to_owned() } else { String::arbitrary(u)? };
    let node = if u.ratio(1, 8)? {
        None
    } else {
        let locality = if bool::arbitrary(u)? {
            Some(Locality { region: word(u)?, zone: word(u)?, sub_zone: word(u)? })
        } else {
            None
        };
        let metadata = if u.ratio(3, 4)? { Some(arbitrary_struct(u, 3)?) } else { None };
        Some(Node { id: word(u)?, cluster: word(u)?, locality, metadata, ..Default::default() })
    };
    let len = u.int_in_range(0..=4)?;
    let names = (0..len).map(|_| word(u)).collect::<arbitrary::Result<_>>()?;
    Ok((type_url, node, names))
}
