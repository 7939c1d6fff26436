//! Sealed gossip between relay processes on 127.0.0.x: relays sharing a key file form a
//! cluster, a relay with another key never joins it, and datagrams that are not sealed with a
//! cluster key are dropped and counted in `/metrics`.

use crate::support;

use std::net::UdpSocket;

use crate::support::{OriginProcess, RelayProcess, SOON, eventually, tempdir};

/// Two 32-byte keys, base64.
const KEY: &str = "ERERERERERERERERERERERERERERERERERERERERERE=";
const OTHER_KEY: &str = "MzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzM=";

/// The value of the series `name{labels}` in a Prometheus text scrape.
fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The names of the alive, ready members `relay` sees.
fn ready_members(relay: &RelayProcess) -> Option<Vec<String>> {
    let view = relay.admin_json("/api/cluster");
    Some(
        view["members"]
            .as_array()?
            .iter()
            .filter(|m| m["alive"] == true && m["state"] == "ready")
            .map(|m| m["name"].as_str().unwrap_or_default().to_owned())
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_with_the_key_form_a_cluster_and_count_rejected_gossip() {
    let origin = OriginProcess::start(&[]);
    let keys = tempdir::Dir::new("gossip-keys");
    let key_file = keys.0.join("gossip.keys");
    std::fs::write(&key_file, format!("# cluster key\n{KEY}\n")).unwrap();
    let other_file = keys.0.join("other.keys");
    std::fs::write(&other_file, format!("{OTHER_KEY}\n")).unwrap();

    let gossip: Vec<(String, u16)> = (0..4)
        .map(|i| {
            let ip = format!("127.0.0.{}", i + 2);
            let port = support::free_udp_port(&ip);
            (ip, port)
        })
        .collect();
    let seeds: Vec<String> = gossip.iter().map(|(ip, port)| format!("{ip}:{port}")).collect();
    let start = |i: usize, file: &std::path::Path| {
        let (ip, port) = &gossip[i];
        let bootstrap = support::cluster_bootstrap(origin.xds, &format!("relay-{}", i + 1), ip, *port, &seeds[..3]);
        RelayProcess::start(&format!("{bootstrap}  gossip_keys_file: \"{}\"\n", file.display()))
    };
    let relays: Vec<RelayProcess> = (0..3).map(|i| start(i, &key_file)).collect();
    let expected = ["relay-1", "relay-2", "relay-3"];
    for relay in &relays {
        eventually("the sealed cluster to converge", SOON, || (ready_members(relay)? == expected).then_some(())).await;
    }
    // A relay with another key, seeded with the others, is never let in.
    let intruder = start(3, &other_file);
    eventually("the others to reject the intruder's datagrams", SOON, || {
        let text = relays[0].admin_get("/metrics").ok()?;
        (metric(&text, "xds_relay_gossip_rejected_total{reason=\"no_key\"}")? >= 5).then_some(())
    })
    .await;
    for relay in &relays {
        assert_eq!(ready_members(relay).unwrap(), expected, "the intruder never appears");
    }
    assert_eq!(ready_members(&intruder).unwrap(), ["relay-4"], "the intruder sees only itself");

    // Garbage and a plaintext chitchat header sent to relay-1's gossip port.
    let text = relays[0].admin_get("/metrics").unwrap();
    assert!(metric(&text, "xds_relay_gossip_datagrams_total{direction=\"in\"}").unwrap() > 0, "{text}");
    let malformed_before = metric(&text, "xds_relay_gossip_rejected_total{reason=\"malformed\"}").unwrap();
    let plaintext_before = metric(&text, "xds_relay_gossip_rejected_total{reason=\"plaintext\"}").unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let target = format!("{}:{}", gossip[0].0, gossip[0].1);
    for _ in 0..3 {
        socket.send_to(b"definitely not gossip", &target).unwrap();
    }
    socket.send_to(&[0x53, 0xb0, 0x00, 0x00], &target).unwrap();
    eventually("the rejections in /metrics", SOON, || {
        let text = relays[0].admin_get("/metrics").ok()?;
        let malformed = metric(&text, "xds_relay_gossip_rejected_total{reason=\"malformed\"}")?;
        let plaintext = metric(&text, "xds_relay_gossip_rejected_total{reason=\"plaintext\"}")?;
        (malformed >= malformed_before + 3 && plaintext > plaintext_before).then_some(())
    })
    .await;
    for relay in &relays {
        assert_eq!(ready_members(relay).unwrap(), expected, "membership unharmed");
    }
}
