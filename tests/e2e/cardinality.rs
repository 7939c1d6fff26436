//! Metric cardinality and kept text are bounded, against a real relay in front of the
//! example management server on loopback: type URLs a client invents share one `type="other"`
//! series; beyond `telemetry.max_key_series` keys share `key="_other"` and the
//! `metric_keys_aggregated` gauge counts them; a client's 100 KiB NACK message is kept cut to
//! 1 KiB in the admin API.

use std::collections::{BTreeMap, BTreeSet};

use crate::support::{OriginProcess, RelayProcess, SOON, bootstrap_yaml, eventually};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use xds_relay::xds;
use xds_relay_example::client::{SotwClient, Transport, node};

/// Every sample line of `/metrics` (no comments).
fn samples(relay: &RelayProcess) -> Vec<String> {
    let text = relay.admin_get("/metrics").expect("/metrics");
    text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).map(str::to_owned).collect()
}

/// For each metric family (name without histogram suffixes), the distinct values of `label`.
fn label_values(samples: &[String], label: &str) -> BTreeMap<String, BTreeSet<String>> {
    let needle = format!("{label}=\"");
    let mut families: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in samples {
        let Some((name, labels)) = line.split_once('{') else { continue };
        let Some(start) = labels.find(&needle) else { continue };
        let value = &labels[start + needle.len()..];
        let value = &value[..value.find('"').unwrap_or(value.len())];
        let family = ["_bucket", "_count", "_sum"].iter().fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
        families.entry(family.to_owned()).or_default().insert(value.to_owned());
    }
    families
}

/// 200 streams each asking for an invented type URL leave one `type="other"` series per
/// family, and no label carries any of the invented names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_type_urls_share_one_other_series() {
    let origin = OriginProcess::start(&[]);
    let relay = RelayProcess::in_front_of(&[origin.xds]);
    let channel = tonic::transport::Endpoint::from_shared(relay.endpoint()).unwrap().connect().await.expect("connect");
    for i in 0..200 {
        let type_url = format!("type.googleapis.com/acme.invented.v{i}.Thing{i}");
        let c = SotwClient::with_channel(channel.clone(), Transport::Ads, node(&format!("n{i}"), "staging"));
        c.subscribe(&type_url, vec![]).await.expect("subscribe");
        // The stream ends (the type maps to no key) or stays open; either way the relay saw it.
        let _ = c.wait_ended(std::time::Duration::from_secs(2)).await;
        let _ = c.send_raw(DiscoveryRequest { type_url, ..Default::default() });
        c.close();
    }
    let samples = samples(&relay);
    assert!(!samples.iter().any(|l| l.contains("acme.invented") || l.contains("Thing")), "an invented name is a label");
    let by_family = label_values(&samples, "type");
    assert!(by_family.values().any(|values| values.contains("other")), "no type=\"other\" series: {by_family:?}");
    let known: BTreeSet<&str> =
        ["lds", "rds", "srds", "vhds", "cds", "eds", "leds", "sds", "rtds", "ecds", "other"].into();
    for (family, values) in &by_family {
        assert!(values.iter().all(|v| known.contains(v.as_str())), "{family}: {values:?}");
    }
    let other: Vec<&String> = samples.iter().filter(|l| l.contains("type=\"other\"")).collect();
    assert_eq!(other, ["xds_relay_mapping_errors_total{type=\"other\"} 200"], "one series counts all 200");
}

/// With `telemetry.max_key_series: 5` and 20 keys open, each per-key family has at most 5
/// keys of its own plus `_other`, `_other` counts the other 15 keys' clients, and the gauge
/// says 15; once a key with its own series is evicted, its slot goes to the next new key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_beyond_max_key_series_share_the_other_label() {
    let origin = OriginProcess::start(&[]);
    let mut bootstrap = bootstrap_yaml(&[origin.xds], "", "  ttl: 1s\n  max_entries: 100");
    bootstrap.push_str("telemetry:\n  max_key_series: 5\n");
    let relay = RelayProcess::start(&bootstrap);
    let version = origin.version();

    let mut clients = Vec::new();
    for i in 0..20 {
        let c = SotwClient::connect(&relay.endpoint(), Transport::Ads, node(&format!("n{i}"), &format!("c{i}-x")))
            .await
            .expect("connect");
        c.subscribe(xds::CLUSTER, vec![]).await.expect("subscribe");
        c.wait_for(xds::CLUSTER, SOON, |r| r.version_info == version).await.expect("served");
        clients.push(c);
    }
    let samples = samples(&relay);
    let by_family = label_values(&samples, "key");
    assert!(!by_family.is_empty(), "no per-key series");
    for (family, keys) in &by_family {
        assert!(keys.len() <= 6, "{family} has {} key labels: {keys:?}", keys.len());
    }
    let clients_by_key = &by_family["xds_relay_key_clients"];
    assert_eq!(clients_by_key.len(), 6, "{clients_by_key:?}");
    assert!(samples.contains(&"xds_relay_metric_keys_aggregated 15".to_owned()), "{samples:#?}");
    assert!(samples.contains(&"xds_relay_key_clients{key=\"_other\"} 15".to_owned()), "{samples:#?}");
    assert!(samples.contains(&"xds_relay_upstream_connected{key=\"_other\"} 15".to_owned()), "{samples:#?}");

    // The first client's key had its own series: it leaves, the key expires, and a new key
    // takes the freed slot while the aggregated keys stay aggregated.
    let own: Vec<String> = clients_by_key.iter().filter(|k| *k != "_other").cloned().collect();
    let first = clients.remove(0);
    first.close();
    assert!(own.contains(&"c0_cds".to_owned()), "{own:?}");
    eventually("c0_cds evicted and its series gone", SOON, || {
        let text = relay.admin_get("/metrics").ok()?;
        (!text.contains("key=\"c0_cds\"")).then_some(())
    })
    .await;
    let late = SotwClient::connect(&relay.endpoint(), Transport::Ads, node("late", "late-x")).await.expect("connect");
    late.subscribe(xds::CLUSTER, vec![]).await.expect("subscribe");
    late.wait_for(xds::CLUSTER, SOON, |r| r.version_info == version).await.expect("served");
    let text = relay.admin_get("/metrics").expect("/metrics");
    assert!(text.contains("xds_relay_key_clients{key=\"late_cds\"} 1"), "the freed slot is reused: {text}");
    assert!(text.contains("xds_relay_metric_keys_aggregated 15"), "{text}");
}

/// A client NACKs with a 100 KiB message: the admin API shows it cut to 1 KiB with a marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_nack_message_is_kept_truncated() {
    let origin = OriginProcess::start(&[]);
    let relay = RelayProcess::in_front_of(&[origin.xds]);
    let c = SotwClient::connect(&relay.endpoint(), Transport::Ads, node("envoy-n", "staging")).await.expect("connect");
    let huge = "é".repeat(50 * 1024);
    c.set_nack(xds::CLUSTER, Some(huge.clone()));
    c.subscribe(xds::CLUSTER, vec![]).await.expect("subscribe");
    c.wait_for(xds::CLUSTER, SOON, |r| !r.resources.is_empty()).await.expect("served");
    let message = eventually("the NACK in the cache view", SOON, || {
        let dump = relay.admin_json("/cache/staging_cds?verbose=true");
        dump["Cache"][0]["Requests"][0]["last_nack"]["message"].as_str().map(str::to_owned)
    })
    .await;
    let (kept, marker) = message.split_once('…').expect("truncation marker");
    assert!(kept.len() <= 1024 && kept.len() >= 1022, "{} bytes kept", kept.len());
    assert!(huge.starts_with(kept));
    assert_eq!(marker, format!(" (truncated, {} bytes)", huge.len()));
    let body = relay.admin_get("/cache/staging_cds?verbose=true").expect("cache view");
    assert!(body.len() < 8 * 1024, "the view holds {} bytes", body.len());
}
