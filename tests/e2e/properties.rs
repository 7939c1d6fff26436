//! Property tests of every decoder of outside bytes, over the entry points the fuzz targets
//! use (`xds_relay::fuzzing`): structured inputs built by proptest, raw bytes, and a replay
//! of every file of the committed fuzz corpus (`fuzz/corpus/<target>/`).
//!
//! The seed corpus is written by this file too:
//! `XDS_RELAY_WRITE_CORPUS=1 cargo test --test e2e properties::seed_corpus` rewrites the
//! `seed-*` files from [`seeds`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::{Any, Struct, Value};
use envoy_types::pb::google::rpc::Status;
use proptest::prelude::*;
use prost::{Message, Name};
use xds_relay::fuzzing;
use xds_relay::peer::proto;
use xds_relay::xds;

/// A fuzz target's entry point.
type Target = fn(&[u8]);

/// Every fuzz target and its entry point.
const TARGETS: [(&str, Target); 8] = [
    ("wire_skim", fuzzing::wire_skim),
    ("discovery_request", fuzzing::discovery_request),
    ("delta_discovery_request", fuzzing::delta_discovery_request),
    ("peer_messages", fuzzing::peer_messages),
    ("origin_response", fuzzing::origin_response),
    ("bootstrap", fuzzing::bootstrap),
    ("rules", fuzzing::rules),
    ("keyer", fuzzing::keyer),
];

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

fn selector(type_url: &str) -> u8 {
    fuzzing::TYPE_URLS.iter().position(|t| *t == type_url).expect("a listed type") as u8
}

fn framed<M: Message>(messages: &[M]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        m.encode_length_delimited(&mut out).expect("a vector grows");
    }
    out
}

fn envoy_node(id: &str, cluster: &str) -> Node {
    let mut flags = HashMap::new();
    flags.insert("canary".to_owned(), Value { kind: Some(Kind::BoolValue(true)) });
    let mut fields = HashMap::new();
    fields.insert("flags".to_owned(), Value { kind: Some(Kind::StructValue(Struct { fields: flags })) });
    Node {
        id: id.into(),
        cluster: cluster.into(),
        locality: Some(Locality { region: "us-east-1".into(), zone: "us-east-1b".into(), sub_zone: String::new() }),
        metadata: Some(Struct { fields }),
        user_agent_name: "envoy".into(),
        client_features: vec!["envoy.lb.does_not_support_overprovisioning".into()],
        ..Default::default()
    }
}

fn packed<M: Message + Name>(m: &M) -> Any {
    Any { type_url: M::type_url(), value: m.encode_to_vec() }
}

fn request(type_url: &str, names: &[&str], version: &str, nonce: &str, nack: Option<&str>) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: type_url.into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        error_detail: nack.map(|m| Status { code: 3, message: m.into(), details: vec![] }),
        ..Default::default()
    }
}

fn delta(type_url: &str, subscribe: &[&str], unsubscribe: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.into(),
        resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        resource_names_unsubscribe: unsubscribe.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn clusters_response(version: &str, names: &[&str]) -> bytes::Bytes {
    DiscoveryResponse {
        type_url: xds::CLUSTER.into(),
        version_info: version.into(),
        resources: names.iter().map(|n| packed(&Cluster { name: n.to_string(), ..Default::default() })).collect(),
        ..Default::default()
    }
    .encode_to_vec()
    .into()
}

/// The seed corpus: real encoded requests, resources, peer messages and configuration files.
fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out: Vec<(&'static str, String, Vec<u8>)> = Vec::new();
    let mut add = |target: &'static str, name: &str, bytes: Vec<u8>| out.push((target, format!("seed-{name}"), bytes));

    // wire_skim: one byte of type, then the resource.
    let with = |type_url: &str, value: Vec<u8>| [vec![selector(type_url)], value].concat();
    let cluster = Cluster { name: "backend".into(), alt_stat_name: "b".into(), ..Default::default() };
    add("wire_skim", "cluster", with(xds::CLUSTER, cluster.encode_to_vec()));
    let cla = ClusterLoadAssignment { cluster_name: "backend".into(), ..Default::default() };
    add("wire_skim", "endpoints", with(xds::ENDPOINT, cla.encode_to_vec()));
    add(
        "wire_skim",
        "listener",
        with(xds::LISTENER, Listener { name: "http".into(), ..Default::default() }.encode_to_vec()),
    );
    let route = RouteConfiguration { name: "local_route".into(), ..Default::default() };
    add("wire_skim", "route", with(xds::ROUTE, route.encode_to_vec()));
    let wrapped =
        Resource { name: "wrapped".into(), version: "7".into(), resource: Some(packed(&cla)), ..Default::default() };
    add("wire_skim", "wrapper", with(xds_relay::wire::RESOURCE_WRAPPER, wrapped.encode_to_vec()));
    let merged =
        [cluster.encode_to_vec(), Cluster { name: "second".into(), ..Default::default() }.encode_to_vec()].concat();
    add("wire_skim", "cluster-merged", with(xds::CLUSTER, merged));
    add("wire_skim", "unknown-type", with("type.googleapis.com/acme.Thing", vec![10, 1, b'x']));

    // discovery_request: a state-of-the-world stream.
    let mut first = request(xds::CLUSTER, &[], "", "", None);
    first.node = Some(envoy_node("envoy-east-1", "staging-east"));
    let sotw = [
        first.clone(),
        request(xds::CLUSTER, &[], "v1", "1", None),
        request(xds::ENDPOINT, &["backend", "other"], "", "", None),
        request(xds::ENDPOINT, &["backend"], "", "2", Some("bad endpoint")),
        request(xds::ENDPOINT, &["backend"], "", "1", None),
        request(xds::LISTENER, &[], "", "", None),
        request(xds::ROUTE, &["local_route"], "", "", None),
        request(xds::ROUTE, &["local_route", "*"], "v2", "5", None),
    ];
    add("discovery_request", "stream", framed(&sotw));
    add("discovery_request", "single", first.encode_to_vec());
    let mut rds = request(xds::ROUTE, &["r1", "r2", "r1"], "", "", None);
    rds.node = Some(envoy_node("envoy-west-2", "prod"));
    add("discovery_request", "rds", framed(&[rds, request(xds::ROUTE, &[], "3", "1", None)]));

    // delta_discovery_request: a delta stream.
    let mut first = delta(xds::CLUSTER, &[], &[], "");
    first.node = Some(envoy_node("envoy-east-1", "staging-east"));
    let mut reconnect = delta(xds::ENDPOINT, &["a", "bb", "ccc"], &[], "");
    reconnect.initial_resource_versions.insert("a".into(), "0123456789abcdef0123456789abcdef".into());
    let stream = [
        first.clone(),
        delta(xds::CLUSTER, &[], &[], "1"),
        reconnect,
        delta(xds::ENDPOINT, &["dddd", "*"], &["bb"], "2"),
        delta(xds::ENDPOINT, &[], &["*", "a"], "3"),
        delta(xds::ENDPOINT, &["a"], &[], ""),
    ];
    add("delta_discovery_request", "stream", framed(&stream));
    add("delta_discovery_request", "single", first.encode_to_vec());

    // peer_messages: byte 0 picks the stream.
    let watch = proto::WatchRequest {
        key: "staging_cds".into(),
        type_url: xds::CLUSTER.into(),
        node: envoy_node("envoy-east-1", "staging-east").encode_to_vec(),
        interest: Some(proto::Interest { wildcard: true, names: vec![], ..Default::default() }),
        follower: "relay-2".into(),
        fresh: true,
        canary_report: None,
    };
    let later = proto::WatchRequest {
        interest: Some(proto::Interest {
            wildcard: false,
            names: vec!["b".into(), "a".into(), "b".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let report = proto::WatchRequest {
        canary_report: Some(proto::CanaryReport {
            generation: 4,
            version: "3".into(),
            clients: 3,
            canaries: 2,
            acked: 1,
            nacked: 1,
            answers: vec![proto::CanaryAnswer {
                node_id: "envoy-east-2".into(),
                answer: proto::canary_answer::Answer::Nack.into(),
                nack_message: "unknown lb_policy MAGLEV".into(),
            }],
            cannot_try: false,
        }),
        ..Default::default()
    };
    add("peer_messages", "watch", [vec![0], framed(&[watch, later, report])].concat());
    let updates = [
        proto::KeyUpdate {
            response: clusters_response("1", &["a", "b"]),
            coverage: Some(proto::Interest { wildcard: true, names: vec![], ..Default::default() }),
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            serial: 1,
            do_not_cache_age_ms: 0,
            stale: false,
            candidate: None,
        },
        proto::KeyUpdate {
            response: clusters_response("2", &["b", "c"]),
            coverage: Some(proto::Interest {
                wildcard: false,
                names: vec!["b".into(), "c".into()],
                ..Default::default()
            }),
            traceparent: String::new(),
            serial: 2,
            do_not_cache_age_ms: 0,
            stale: false,
            candidate: Some(proto::Candidate {
                response: clusters_response("3", &["b", "c", "bad"]),
                coverage: Some(proto::Interest { wildcard: true, ..Default::default() }),
                generation: 4,
                serial: 3,
                phase: proto::candidate::Phase::Held.into(),
                rolled_back: true,
                reason: "1 of 1 canaries NACKed the version".into(),
                ..Default::default()
            }),
        },
    ];
    add("peer_messages", "updates", [vec![1], framed(&updates)].concat());
    let reply = proto::StatusReply {
        node: "relay-1".into(),
        keys: vec![proto::KeyStatus {
            key: "staging_cds".into(),
            type_url: xds::CLUSTER.into(),
            version: "1".into(),
            age_seconds: 1.5,
            local_clients: 2,
            nacks: 0,
            source: "peer:relay-2".into(),
            followers: vec!["relay-3".into()],
            stale: false,
            rollout: "held".into(),
        }],
    };
    add("peer_messages", "status", [vec![2], reply.encode_to_vec()].concat());

    // origin_response: byte 0 picks the protocol, byte 1 the subscription.
    let sotw: Vec<DiscoveryResponse> = [("1", &["a", "b"][..]), ("2", &["b", "c"][..]), ("2", &["b", "c"][..])]
        .iter()
        .map(|(version, names)| DiscoveryResponse::decode(clusters_response(version, names)).unwrap())
        .collect();
    add("origin_response", "sotw", [vec![0, 0], framed(&sotw)].concat());
    let endpoints = |version: &str, names: &[&str]| DiscoveryResponse {
        type_url: xds::ENDPOINT.into(),
        version_info: version.into(),
        resources: names
            .iter()
            .map(|n| packed(&ClusterLoadAssignment { cluster_name: n.to_string(), ..Default::default() }))
            .collect(),
        ..Default::default()
    };
    add(
        "origin_response",
        "eds",
        [vec![0, 1], framed(&[endpoints("1", &["a", "b"]), endpoints("2", &["a"])])].concat(),
    );
    let delta_response = |version: &str, names: &[&str], removed: &[&str]| DeltaDiscoveryResponse {
        type_url: xds::CLUSTER.into(),
        system_version_info: version.into(),
        resources: names
            .iter()
            .map(|n| Resource {
                name: n.to_string(),
                version: format!("{n}{version}"),
                resource: Some(packed(&Cluster { name: n.to_string(), ..Default::default() })),
                ..Default::default()
            })
            .collect(),
        removed_resources: removed.iter().map(|s| s.to_string()).collect(),
        nonce: version.into(),
        ..Default::default()
    };
    let deltas = [delta_response("1", &["a", "b"], &[]), delta_response("2", &["c"], &["a"])];
    add("origin_response", "delta", [vec![1, 0], framed(&deltas)].concat());

    // bootstrap and rules: the shipped configuration files.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in
        ["example/config/xds-relay-bootstrap.yaml", "deploy/config/relay-1.yaml", "deploy/config/relay-standalone.yaml"]
    {
        let name = Path::new(file).file_stem().unwrap().to_string_lossy().into_owned();
        add("bootstrap", &name, std::fs::read(root.join(file)).expect("a shipped bootstrap"));
    }
    add("rules", "example", std::fs::read(root.join("example/config/aggregation-rules.yaml")).unwrap());
    add("rules", "deploy", std::fs::read(root.join("deploy/config/aggregation-rules.yaml")).unwrap());
    add("rules", "rich", fuzzing::RICH_RULES.as_bytes().to_vec());

    // keyer: unstructured bytes, from a fixed generator.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    for i in 0..6 {
        let bytes = (0..64 + 32 * i)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        add("keyer", &format!("random-{i}"), bytes);
    }
    out
}

/// Every committed corpus file goes through its target's entry point; every target has a
/// corpus. With `XDS_RELAY_WRITE_CORPUS=1`, the seed files are rewritten first.
#[test]
fn seed_corpus_replays() {
    if std::env::var_os("XDS_RELAY_WRITE_CORPUS").is_some() {
        for (target, name, bytes) in seeds() {
            let dir = corpus_dir(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    for (target, run) in TARGETS {
        let dir = corpus_dir(target);
        let files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .collect();
        assert!(!files.is_empty(), "{target} has a corpus");
        for file in files {
            let bytes = std::fs::read(&file).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&bytes));
            assert!(outcome.is_ok(), "{} fails its target's invariants", file.display());
        }
    }
}

/// The seed inputs themselves (whether or not the files are current).
#[test]
fn seeds_hold_the_invariants() {
    for (target, name, bytes) in seeds() {
        let run = TARGETS.iter().find(|(t, _)| *t == target).unwrap().1;
        let outcome = std::panic::catch_unwind(|| run(&bytes));
        assert!(outcome.is_ok(), "seed {target}/{name}");
    }
}

// === strategies ===

fn names() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(prop::sample::select(vec!["a", "bb", "ccc", "*", "", "dddd"]).prop_map(String::from), 0..5)
}

fn type_url() -> impl Strategy<Value = String> {
    prop::sample::select(fuzzing::TYPE_URLS.to_vec()).prop_map(String::from)
}

fn node() -> impl Strategy<Value = Option<Node>> {
    prop::option::of(
        (
            prop::sample::select(vec!["envoy-east-1", "envoy-x", ""]),
            prop::sample::select(vec!["staging-east", "prod", "staging", ""]),
        )
            .prop_map(|(id, cluster)| envoy_node(id, cluster)),
    )
}

fn nonce() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["", "1", "2", "3", "4"]).prop_map(String::from)
}

fn sotw_request() -> impl Strategy<Value = DiscoveryRequest> {
    (type_url(), names(), nonce(), any::<bool>(), node()).prop_map(|(type_url, names, nonce, nack, node)| {
        DiscoveryRequest {
            type_url,
            resource_names: names,
            version_info: nonce.clone(),
            response_nonce: nonce,
            error_detail: nack.then(|| Status { code: 3, message: "rejected".into(), details: vec![] }),
            node,
            ..Default::default()
        }
    })
}

fn delta_request() -> impl Strategy<Value = DeltaDiscoveryRequest> {
    (type_url(), names(), names(), names(), nonce(), node()).prop_map(
        |(type_url, subscribe, unsubscribe, initial, nonce, node)| DeltaDiscoveryRequest {
            type_url,
            resource_names_subscribe: subscribe,
            resource_names_unsubscribe: unsubscribe,
            initial_resource_versions: initial
                .into_iter()
                .map(|n| (n, "0123456789abcdef0123456789abcdef".into()))
                .collect(),
            response_nonce: nonce,
            node,
            ..Default::default()
        },
    )
}

fn interest() -> impl Strategy<Value = Option<proto::Interest>> {
    prop::option::of((any::<bool>(), names()).prop_map(|(wildcard, names)| proto::Interest {
        wildcard,
        names,
        ..Default::default()
    }))
}

/// A YAML file with one mutation: truncated, a line replaced, or bytes inserted.
fn mutated(files: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (prop::sample::select(files), any::<prop::sample::Index>(), 0..3u8, prop::collection::vec(any::<u8>(), 0..12))
        .prop_map(|(file, at, how, noise)| {
            let at = at.index(file.len() + 1);
            match how {
                0 => file[..at].to_vec(),
                1 => [&file[..at], &noise[..], &file[at..]].concat(),
                _ => {
                    let end = file[at..].iter().position(|b| *b == b'\n').map_or(file.len(), |p| at + p);
                    [&file[..at], &noise[..], &file[end..]].concat()
                }
            }
        })
}

fn seed_files(target: &str) -> Vec<Vec<u8>> {
    seeds().into_iter().filter(|(t, _, _)| *t == target).map(|(_, _, bytes)| bytes).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn raw_bytes_hold_every_invariant(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        for (_, run) in TARGETS {
            run(&bytes);
        }
    }

    #[test]
    fn skimmed_names_are_decoded_names(
        type_url in type_url(),
        parts in prop::collection::vec((prop::sample::select(vec!["a", "b", ""]), any::<bool>()), 0..4),
        noise in prop::collection::vec(any::<u8>(), 0..8),
        with_noise in any::<bool>(),
    ) {
        // Concatenated messages merge: the last name wins.
        let mut value: Vec<u8> = parts
            .iter()
            .flat_map(|(name, wrapped)| if *wrapped {
                Resource { name: name.to_string(), ..Default::default() }.encode_to_vec()
            } else {
                Cluster { name: name.to_string(), alt_stat_name: "s".into(), ..Default::default() }.encode_to_vec()
            })
            .collect();
        if with_noise {
            value.extend(noise);
        }
        fuzzing::wire_skim(&[vec![selector(&type_url)], value].concat());
    }

    #[test]
    fn sotw_streams(requests in prop::collection::vec(sotw_request(), 1..8)) {
        fuzzing::discovery_request(&framed(&requests));
    }

    #[test]
    fn delta_streams(requests in prop::collection::vec(delta_request(), 1..8)) {
        fuzzing::delta_discovery_request(&framed(&requests));
    }

    #[test]
    fn peer_watch_streams(
        key in prop::sample::select(vec!["", "k"]),
        type_url in type_url(),
        node in node(),
        interests in prop::collection::vec(interest(), 1..4),
    ) {
        let requests: Vec<proto::WatchRequest> = interests
            .into_iter()
            .enumerate()
            .map(|(i, interest)| proto::WatchRequest {
                key: if i == 0 { key.to_owned() } else { String::new() },
                type_url: if i == 0 { type_url.clone() } else { String::new() },
                node: node.as_ref().map(Message::encode_to_vec).unwrap_or_default(),
                interest,
                ..Default::default()
            })
            .collect();
        fuzzing::peer_messages(&[vec![0], framed(&requests)].concat());
    }

    #[test]
    fn peer_update_streams(
        updates in prop::collection::vec((names(), interest(), nonce()), 1..5),
    ) {
        let updates: Vec<proto::KeyUpdate> = updates
            .into_iter()
            .map(|(names, coverage, version)| {
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                proto::KeyUpdate { response: clusters_response(&version, &names), coverage, ..Default::default() }
            })
            .collect();
        fuzzing::peer_messages(&[vec![1], framed(&updates)].concat());
    }

    #[test]
    fn mutated_bootstraps(text in mutated(seed_files("bootstrap"))) {
        fuzzing::bootstrap(&text);
    }

    #[test]
    fn mutated_rules(text in mutated(seed_files("rules"))) {
        fuzzing::rules(&text);
    }

    #[test]
    fn arbitrary_nodes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        fuzzing::keyer(&bytes);
    }
}
