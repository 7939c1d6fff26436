//! Cluster scale in simulation: N members gossiping over chitchat's in-memory
//! `ChannelTransport` on paused tokio time, with the crate's default config.
//!
//! ```text
//! cargo run --release -p xds-relay-cluster --example scale -- --members 50 --keys 100000 --json
//! ```
//!
//! What it measures, in order:
//!
//! 1. The ring alone (pure, no gossip): heap bytes retained by a [`Ring`] of N members, the CPU
//!    cost of one owner lookup (and the bytes a lookup allocates), and the CPU time to recompute
//!    the owners of every key after a membership change (build the new ring, diff it).
//! 2. The gossip cluster: N members join (seeded with the first `--seeds` of them), turn ready,
//!    and converge; then a steady window, then `--cycles` cycles of three events, each followed
//!    until every member's ring holds exactly the expected members:
//!    - join: member N+1 joins and turns ready at once;
//!    - kill: an established member (not a seed) stops gossiping without a word
//!      ([`Cluster::shutdown`] sends no goodbye), so the others' failure detectors must declare
//!      it dead;
//!    - drain: the newest member gossips [`NodeState::Draining`] (the crate's graceful exit),
//!      then shuts down once it is off every ring;
//!
//!    and a last join, not measured, that brings the ring back to N members.
//!
//!    For each event: the time to converge, the fraction of `--keys` keys whose owner changed
//!    (ring before against ring after), and the gossip bytes each member sent per second
//!    meanwhile; and per kind of event the median and extremes over the cycles.
//!
//! Time is tokio's paused clock: tasks run until all are idle, then the clock jumps to the next
//! timer. Every duration reported for the gossip cluster is therefore *simulated* time (gossip
//! rounds and failure-detector timeouts, as if CPU were free); CPU costs are measured
//! separately, as thread CPU time, which other processes on the machine do not inflate.
//!
//! Bytes are counted by a transport wrapper around `ChannelTransport`: the encoded size of each
//! chitchat envelope (the UDP payload; IP and UDP headers, 28 bytes a datagram, are not included
//! but the datagram counts are reported). The channel transport queues at most 100 datagrams per
//! member and drops the rest, like a full socket buffer; datagrams sent and never received
//! (dropped, or sent to a member that is gone) are reported as lost.

use std::alloc::System;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use async_trait::async_trait;
use chitchat::ChitchatEnvelope;
use chitchat::transport::{ChannelTransport, RecvOutcome, SendOutcome, Socket, Transport};
use clap::Parser;
use cpu_time::{ProcessTime, ThreadTime};
use serde_json::{Value, json};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tokio::time::Instant;
use xds_relay_cluster::config::{DEFAULT_GOSSIP_INTERVAL, DEFAULT_VIRTUAL_NODES};
use xds_relay_cluster::{Cluster, ClusterConfig, ClusterView, FailureDetectorSettings, NodeState, Ring};

/// Counts every heap allocation, so the ring's and the simulation's memory can be measured.
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// The cluster id every simulated member gossips.
const CLUSTER_ID: &str = "xds-relay-scale";
/// The most members a run accepts (their gossip ports must fit above [`FIRST_PORT`]).
const MAX_MEMBERS: usize = 10_000;
/// First gossip port; member `i` gossips on `127.0.0.1:(FIRST_PORT + i)`.
const FIRST_PORT: u16 = 10_001;
/// How long an event's traffic window stays open after convergence, so that datagrams in flight
/// are received; 1 ms is far below a gossip round.
const SETTLE: Duration = Duration::from_millis(1);
/// Repetitions of each CPU measurement; the median is reported.
const CPU_REPEATS: usize = 7;

#[derive(Parser, Debug)]
#[command(about = "Cluster scale in simulation: join, kill and drain with N members and K keys")]
struct Args {
    /// Members gossiping before the events.
    #[arg(long, default_value_t = 50)]
    members: usize,
    /// Aggregation keys whose owners are compared before and after each event.
    #[arg(long, default_value_t = 100_000)]
    keys: usize,
    /// Members listed as seeds (the first ones); every member is seeded with them.
    #[arg(long, default_value_t = 3)]
    seeds: usize,
    /// Simulated seconds of steady gossip measured before the events (also lets the failure
    /// detectors sample real heartbeat intervals).
    #[arg(long, default_value_t = 30)]
    steady_seconds: u64,
    /// Simulated seconds an event may take to converge before the run fails.
    #[arg(long, default_value_t = 300)]
    within_seconds: u64,
    /// Join, kill and drain cycles; each starts with `--members` members on the ring.
    #[arg(long, default_value_t = 3)]
    cycles: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.members < 3 || args.members > MAX_MEMBERS || args.seeds == 0 || args.seeds >= args.members {
        bail!("need 3 <= --members <= {MAX_MEMBERS} and 1 <= --seeds < --members");
    }
    if args.keys == 0 || args.cycles == 0 || args.cycles > args.members / 2 {
        bail!("need --keys >= 1 and 1 <= --cycles <= --members / 2 (each cycle kills a different member)");
    }
    let keys: Vec<String> = (0..args.keys).map(|i| format!("cluster-{i}/envoy.config.cluster.v3.Cluster")).collect();
    let ring = ring_costs(args.members, &keys);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .context("building the paused tokio runtime")?;
    let gossip = runtime.block_on(simulate(&args, &keys))?;
    let defaults = FailureDetectorSettings::default();
    let report = json!({
        "members": args.members,
        "keys": args.keys,
        "seeds": args.seeds,
        "steady_seconds": args.steady_seconds,
        "time": "paused tokio time: gossip durations are simulated seconds; CPU figures are thread CPU time",
        "config": {
            "gossip_interval_ms": DEFAULT_GOSSIP_INTERVAL.as_millis() as u64,
            "virtual_nodes": DEFAULT_VIRTUAL_NODES,
            "phi_threshold": defaults.phi_threshold,
            "fd_initial_interval_ms": defaults.initial_interval.as_millis() as u64,
            "fd_max_interval_ms": defaults.max_interval.as_millis() as u64,
            "dead_node_grace_s": defaults.dead_node_grace_period.as_secs(),
        },
        "ring": ring,
        "gossip": gossip,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    Ok(())
}

// === ring costs (pure) ===

fn names(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("relay-{i:03}")).collect()
}

/// Memory and CPU of the ring alone, for `members` members and `keys`.
fn ring_costs(members: usize, keys: &[String]) -> Value {
    let before = names(0..members);
    let after = names(0..members + 1);

    let region = Region::new(GLOBAL);
    let ring = Ring::build(&before, DEFAULT_VIRTUAL_NODES);
    let change = region.change();
    let ring_bytes = change.bytes_allocated as i64 - change.bytes_deallocated as i64;
    let build_peak_bytes = change.bytes_allocated;

    // Lookups: what they allocate (nothing: the owner is borrowed from the ring), and CPU per key.
    let lookup_all = || keys.iter().filter(|key| ring.owner(key).is_some()).count();
    let region = Region::new(GLOBAL);
    let owned = lookup_all();
    let lookup_alloc = region.change();
    assert_eq!(owned, keys.len(), "every key has an owner");
    let lookup = median_cpu(|| {
        std::hint::black_box(lookup_all());
    });

    // A membership change: build the new ring and diff the owners of every key.
    let mut moved = 0;
    let recompute = median_cpu(|| {
        let new_ring = Ring::build(&after, DEFAULT_VIRTUAL_NODES);
        moved = xds_relay_cluster::ownership_changes(&ring, &new_ring, keys.iter().map(String::as_str)).len();
    });
    let build = median_cpu(|| drop(Ring::build(&after, DEFAULT_VIRTUAL_NODES)));
    let vnodes = members * DEFAULT_VIRTUAL_NODES as usize;
    json!({
        "heap_bytes": ring_bytes,
        "build_allocated_bytes": build_peak_bytes,
        "bytes_per_member": ring_bytes as f64 / members as f64,
        "bytes_per_vnode": ring_bytes as f64 / vnodes as f64,
        "vnodes": vnodes,
        "lookup_ns_per_key": lookup.as_nanos() as f64 / keys.len() as f64,
        "lookup_alloc_bytes_per_key": lookup_alloc.bytes_allocated as f64 / keys.len() as f64,
        "build_ms": build.as_secs_f64() * 1e3,
        "recompute_ms": recompute.as_secs_f64() * 1e3,
        "recompute_moved_keys": moved,
    })
}

/// The median thread CPU time of `CPU_REPEATS` runs of `work`.
fn median_cpu(mut work: impl FnMut()) -> Duration {
    let mut runs: Vec<Duration> = (0..CPU_REPEATS)
        .map(|_| {
            let start = ThreadTime::now();
            work();
            start.elapsed()
        })
        .collect();
    runs.sort();
    runs[CPU_REPEATS / 2]
}

// === counting transport ===

/// Datagrams and bytes one member sent and received.
#[derive(Debug, Clone, Copy, Default)]
struct Traffic {
    sent_bytes: u64,
    sent: u64,
    received_bytes: u64,
    received: u64,
}

type TrafficTable = Arc<Mutex<HashMap<SocketAddr, Traffic>>>;

/// `ChannelTransport` with per-member counts of what each socket sends and receives.
#[derive(Clone, Default)]
struct CountingTransport {
    inner: ChannelTransport,
    traffic: TrafficTable,
}

impl CountingTransport {
    fn snapshot(&self) -> HashMap<SocketAddr, Traffic> {
        self.traffic.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

#[async_trait]
impl Transport for CountingTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let inner = self.inner.open(listen_addr).await?;
        let addr = inner.local_addr()?;
        Ok(Box::new(CountingSocket { inner, addr, traffic: self.traffic.clone() }))
    }
}

struct CountingSocket {
    inner: Box<dyn Socket>,
    addr: SocketAddr,
    traffic: TrafficTable,
}

impl CountingSocket {
    fn count(&self, update: impl FnOnce(&mut Traffic)) {
        update(self.traffic.lock().unwrap_or_else(PoisonError::into_inner).entry(self.addr).or_default());
    }
}

#[async_trait]
impl Socket for CountingSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.addr)
    }

    async fn send(&mut self, to: SocketAddr, envelope: ChitchatEnvelope) -> anyhow::Result<SendOutcome> {
        let outcome = self.inner.send(to, envelope).await?;
        self.count(|t| {
            t.sent += 1;
            t.sent_bytes += outcome.num_bytes_sent as u64;
        });
        Ok(outcome)
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        let outcome = self.inner.recv().await?;
        self.count(|t| {
            t.received += 1;
            t.received_bytes += outcome.num_bytes_received as u64;
        });
        Ok(outcome)
    }
}

/// Gossip traffic between two snapshots, per member and per simulated second.
fn traffic_rates(
    before: &HashMap<SocketAddr, Traffic>,
    after: &HashMap<SocketAddr, Traffic>,
    members: usize,
    seconds: f64,
) -> Value {
    let delta = |addr: &SocketAddr, t: &Traffic| {
        let b = before.get(addr).copied().unwrap_or_default();
        Traffic {
            sent_bytes: t.sent_bytes - b.sent_bytes,
            sent: t.sent - b.sent,
            received_bytes: t.received_bytes - b.received_bytes,
            received: t.received - b.received,
        }
    };
    let deltas: Vec<Traffic> = after.iter().map(|(addr, t)| delta(addr, t)).collect();
    let total = |f: fn(&Traffic) -> u64| deltas.iter().map(f).sum::<u64>();
    let max = |f: fn(&Traffic) -> u64| deltas.iter().map(f).max().unwrap_or(0);
    let per_member_second = |v: u64| v as f64 / members as f64 / seconds;
    let (sent, received) = (total(|t| t.sent), total(|t| t.received));
    json!({
        "seconds": seconds,
        "bytes_per_s_per_member": per_member_second(total(|t| t.sent_bytes)),
        "datagrams_per_s_per_member": per_member_second(sent),
        "max_member_sent_bytes_per_s": max(|t| t.sent_bytes) as f64 / seconds,
        "max_member_received_bytes_per_s": max(|t| t.received_bytes) as f64 / seconds,
        "mean_datagram_bytes": total(|t| t.sent_bytes) as f64 / sent.max(1) as f64,
        "datagrams_lost": sent.saturating_sub(received),
    })
}

// === the gossip simulation ===

fn gossip_addr(index: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], FIRST_PORT + index as u16))
}

/// The crate's default config for member `index`, seeded with the first `seeds` members.
fn member_config(index: usize, seeds: usize) -> ClusterConfig {
    let gossip = gossip_addr(index);
    let mut config = ClusterConfig::defaults_for(
        format!("relay-{index:03}"),
        CLUSTER_ID,
        gossip,
        SocketAddr::from(([127, 0, 0, 2], gossip.port())),
        SocketAddr::from(([127, 0, 0, 3], gossip.port())),
    );
    config.seeds = (0..seeds).map(|i| gossip_addr(i).to_string()).collect();
    config
}

async fn join_ready(transport: &CountingTransport, index: usize, seeds: usize) -> anyhow::Result<Cluster> {
    let cluster = Cluster::join_with_transport(member_config(index, seeds), transport)
        .await
        .with_context(|| format!("member {index} joining"))?;
    cluster.set_state(NodeState::Ready).await;
    Ok(cluster)
}

/// Waits until every one of `nodes` sees exactly `expected` (sorted) on its ring, all at once,
/// and returns the simulated time since `start`.
async fn converge(
    nodes: &[&Cluster],
    expected: &[String],
    start: Instant,
    within: Duration,
    what: &str,
) -> anyhow::Result<Duration> {
    let deadline = start + within;
    let holds = |view: &ClusterView| view.ring.members() == expected;
    loop {
        for node in nodes {
            let mut views = node.watch();
            while !holds(&views.borrow_and_update()) {
                tokio::time::timeout_at(deadline, views.changed())
                    .await
                    .with_context(|| {
                        format!(
                            "{what}: {} did not converge within {within:?}: ring {:?}",
                            node.self_name(),
                            node.view().ring.members()
                        )
                    })?
                    .context("cluster handle dropped")?;
            }
        }
        if nodes.iter().all(|node| holds(&node.view())) {
            return Ok(start.elapsed());
        }
    }
}

/// The fraction of `keys` whose owner differs between two rings.
fn moved_fraction(before: &Ring, after: &Ring, keys: &[String]) -> (usize, f64) {
    let moved = xds_relay_cluster::ownership_changes(before, after, keys.iter().map(String::as_str)).len();
    (moved, moved as f64 / keys.len() as f64)
}

fn net_heap() -> i64 {
    let stats = GLOBAL.stats();
    stats.bytes_allocated as i64 - stats.bytes_deallocated as i64
}

/// One event's measurements.
struct Event<'a> {
    name: &'static str,
    start: Instant,
    ring_before: Ring,
    traffic_before: HashMap<SocketAddr, Traffic>,
    transport: &'a CountingTransport,
    keys: &'a [String],
}

impl<'a> Event<'a> {
    fn begin(name: &'static str, observer: &Cluster, transport: &'a CountingTransport, keys: &'a [String]) -> Self {
        Event {
            name,
            start: Instant::now(),
            ring_before: observer.view().ring.clone(),
            traffic_before: transport.snapshot(),
            transport,
            keys,
        }
    }

    /// The event's figures, `converged` after it began with `ring_after` on every member. First
    /// lets every datagram already sent be received (tasks run until idle before the paused clock
    /// moves), so datagrams still queued at convergence do not count as lost.
    async fn end(self, converged: Duration, ring_after: Ring, ideal: f64, members: usize) -> Value {
        tokio::time::sleep(SETTLE).await;
        let seconds = self.start.elapsed().as_secs_f64();
        let traffic = traffic_rates(&self.traffic_before, &self.transport.snapshot(), members, seconds);
        let (moved, fraction) = moved_fraction(&self.ring_before, &ring_after, self.keys);
        json!({
            "event": self.name,
            "converge_s": converged.as_secs_f64(),
            "ring_members_before": self.ring_before.members().len(),
            "ring_members_after": ring_after.members().len(),
            "moved_keys": moved,
            "moved_fraction": fraction,
            "ideal_fraction": ideal,
            "traffic": traffic,
        })
    }
}

async fn simulate(args: &Args, keys: &[String]) -> anyhow::Result<Value> {
    let n = args.members;
    let within = Duration::from_secs(args.within_seconds);
    let transport = CountingTransport::default();
    let heap_before = net_heap();
    let cpu_start = ProcessTime::now();
    let sim_start = Instant::now();

    // Start: N members join and turn ready.
    let mut nodes = Vec::with_capacity(n + 2);
    for index in 0..n {
        nodes.push(join_ready(&transport, index, args.seeds).await?);
    }
    let mut ring_names = names(0..n);
    let start_converge = converge(&nodes.iter().collect::<Vec<_>>(), &ring_names, sim_start, within, "start").await?;

    // Steady state.
    let steady_before = transport.snapshot();
    let steady_cpu = ProcessTime::now();
    tokio::time::sleep(Duration::from_secs(args.steady_seconds)).await;
    let steady_cpu = steady_cpu.elapsed();
    let steady = traffic_rates(&steady_before, &transport.snapshot(), n, args.steady_seconds as f64);
    let heap_steady = net_heap() - heap_before;

    // Each cycle starts and ends with N members on the ring: join, kill, drain, then one more
    // join (not measured) to restore N.
    let mut events = Vec::new();
    let mut next_index = n;
    let (mut leave_dead_max, mut leave_moved) = (Duration::ZERO, 0);
    for cycle in 0..args.cycles {
        // Join: a new member.
        let event = Event::begin("join", &nodes[0], &transport, keys);
        nodes.push(join_ready(&transport, next_index, args.seeds).await?);
        ring_names.push(format!("relay-{next_index:03}"));
        next_index += 1;
        ring_names.sort();
        let took = converge(&nodes.iter().collect::<Vec<_>>(), &ring_names, event.start, within, "join").await?;
        let ideal = 1.0 / ring_names.len() as f64;
        events.push(event.end(took, nodes[0].view().ring.clone(), ideal, nodes.len()).await);

        // Kill: an established member that is not a seed (one of the first N, a different one
        // each cycle) stops gossiping, without a goodbye.
        let victim_name = format!("relay-{:03}", (n / 2 + cycle).max(args.seeds).min(n - 1));
        let victim_position =
            nodes.iter().position(|node| node.self_name() == victim_name).context("the kill victim is running")?;
        let event = Event::begin("kill", &nodes[0], &transport, keys);
        nodes.remove(victim_position).shutdown().await;
        let ideal = 1.0 / ring_names.len() as f64;
        ring_names.retain(|name| *name != victim_name);
        let took = converge(&nodes.iter().collect::<Vec<_>>(), &ring_names, event.start, within, "kill").await?;
        events.push(event.end(took, nodes[0].view().ring.clone(), ideal, nodes.len()).await);

        // Drain: the newest member (the one a scale-down removes) gossips draining and is taken
        // off every ring (its own too); then it leaves.
        let drained = nodes.pop().context("a member to drain")?;
        let drained_name = drained.self_name().to_string();
        let event = Event::begin("drain", &nodes[0], &transport, keys);
        drained.set_state(NodeState::Draining).await;
        let ideal = 1.0 / ring_names.len() as f64;
        ring_names.retain(|name| *name != drained_name);
        let everyone: Vec<&Cluster> = nodes.iter().chain([&drained]).collect();
        let took = converge(&everyone, &ring_names, event.start, within, "drain").await?;
        let ring_drained = nodes[0].view().ring.clone();
        events.push(event.end(took, ring_drained.clone(), ideal, everyone.len()).await);
        // The drained member leaves: the ring must not change again when it is declared dead.
        let leave_start = Instant::now();
        drained.shutdown().await;
        let dead = tokio::time::timeout(within, async {
            for node in &nodes {
                let mut views = node.watch();
                while views.borrow_and_update().member(&drained_name).is_some_and(|m| m.alive) {
                    views.changed().await.context("cluster handle dropped")?;
                }
            }
            anyhow::Ok(leave_start.elapsed())
        })
        .await
        .context("the drained member was not declared dead in time")??;
        leave_dead_max = leave_dead_max.max(dead);
        leave_moved += moved_fraction(&ring_drained, &nodes[0].view().ring, keys).0;

        // Restore N members, and let the failure detectors sample the newcomer before the next
        // cycle.
        nodes.push(join_ready(&transport, next_index, args.seeds).await?);
        ring_names.push(format!("relay-{next_index:03}"));
        next_index += 1;
        ring_names.sort();
        converge(&nodes.iter().collect::<Vec<_>>(), &ring_names, Instant::now(), within, "restore").await?;
        tokio::time::sleep(Duration::from_secs(args.steady_seconds / 3)).await;
    }

    let simulated = sim_start.elapsed();
    let cpu = cpu_start.elapsed();
    for node in nodes {
        node.shutdown().await;
    }
    let summary: Vec<Value> = ["join", "kill", "drain"].iter().map(|name| summarize(name, &events)).collect();
    Ok(json!({
        "start_converge_s": start_converge.as_secs_f64(),
        "steady": steady,
        "steady_cpu_ms_per_member_per_s": steady_cpu.as_secs_f64() * 1e3 / n as f64 / args.steady_seconds as f64,
        "heap_bytes_per_member": heap_steady as f64 / n as f64,
        "heap_bytes_per_member_pair": heap_steady as f64 / (n * n) as f64,
        "cycles": args.cycles,
        "summary": summary,
        "events": events,
        "drained_leave_dead_max_s": leave_dead_max.as_secs_f64(),
        "drained_leave_moved_keys": leave_moved,
        "simulated_s": simulated.as_secs_f64(),
        "cpu_s": cpu.as_secs_f64(),
    }))
}

/// Median and extremes of one kind of event over the cycles.
fn summarize(name: &str, events: &[Value]) -> Value {
    let of = |field: &str| -> Vec<f64> {
        let mut values: Vec<f64> = events
            .iter()
            .filter(|e| e["event"] == name)
            .map(|e| field.split('.').fold(e, |v, part| &v[part]).as_f64().unwrap_or(f64::NAN))
            .collect();
        values.sort_by(f64::total_cmp);
        values
    };
    let stats = |values: Vec<f64>| {
        json!({
            "median": values.get(values.len() / 2),
            "min": values.first(),
            "max": values.last(),
        })
    };
    json!({
        "event": name,
        "converge_s": stats(of("converge_s")),
        "moved_fraction": stats(of("moved_fraction")),
        "ideal_fraction": stats(of("ideal_fraction")),
        "bytes_per_s_per_member": stats(of("traffic.bytes_per_s_per_member")),
        "datagrams_lost": stats(of("traffic.datagrams_lost")),
    })
}

// === text output ===

fn print_text(report: &Value) {
    let ring = &report["ring"];
    let gossip = &report["gossip"];
    println!("{} members, {} keys, {} seeds; {}", report["members"], report["keys"], report["seeds"], report["time"]);
    println!("config: {}", report["config"]);
    println!(
        "ring: {} B heap ({:.0} B/member, {:.1} B/vnode); lookup {:.0} ns/key, {} B allocated/key; recompute owners of all keys {:.1} ms (build {:.2} ms)",
        ring["heap_bytes"],
        ring["bytes_per_member"].as_f64().unwrap_or_default(),
        ring["bytes_per_vnode"].as_f64().unwrap_or_default(),
        ring["lookup_ns_per_key"].as_f64().unwrap_or_default(),
        ring["lookup_alloc_bytes_per_key"],
        ring["recompute_ms"].as_f64().unwrap_or_default(),
        ring["build_ms"].as_f64().unwrap_or_default(),
    );
    println!("start: converged in {:.1} s (simulated)", gossip["start_converge_s"].as_f64().unwrap_or_default());
    println!("steady: {}", gossip["steady"]);
    println!(
        "simulation CPU per member per simulated second: {:.2} ms",
        gossip["steady_cpu_ms_per_member_per_s"].as_f64().unwrap_or_default()
    );
    println!(
        "heap of the simulation: {:.0} B/member ({:.0} B per member pair)",
        gossip["heap_bytes_per_member"].as_f64().unwrap_or_default(),
        gossip["heap_bytes_per_member_pair"].as_f64().unwrap_or_default()
    );
    for event in gossip["events"].as_array().into_iter().flatten() {
        println!(
            "{}: converged in {:.2} s, moved {} keys ({:.4}; ideal {:.4}), traffic {}",
            event["event"].as_str().unwrap_or_default(),
            event["converge_s"].as_f64().unwrap_or_default(),
            event["moved_keys"],
            event["moved_fraction"].as_f64().unwrap_or_default(),
            event["ideal_fraction"].as_f64().unwrap_or_default(),
            event["traffic"],
        );
    }
    println!(
        "drained members left: declared dead within {:.2} s, {} keys moved",
        gossip["drained_leave_dead_max_s"].as_f64().unwrap_or_default(),
        gossip["drained_leave_moved_keys"]
    );
}
