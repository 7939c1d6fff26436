//! An exhaustive model of a cache entry's life cycle: every interleaving of two watchers
//! arriving and a TTL sweep, for a key that is new and for a key that exists idle, checked
//! against the cache's invariants. Each step is one critical section of [`super::Cache`] as
//! the code takes it; the model of the earlier design (lookup and counting in two steps, no
//! retired mark) is checked too, to show the model finds the race it had.

/// One entry ever created for the key.
#[derive(Debug, Clone, Default)]
struct EntryModel {
    watchers: usize,
    source: bool,
    retired: bool,
}

/// The cache as far as one key goes.
#[derive(Debug, Clone, Default)]
struct World {
    entries: Vec<EntryModel>,
    /// The entry the map holds for the key.
    in_map: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Design {
    /// Lookup then count in separate steps; sources started without a check.
    Split,
    /// Lookup and count in one step under the map lock; a retired entry refuses a source.
    OneStep,
}

/// A watcher's progress through `Cache::watch` (and the relay's source start).
#[derive(Debug, Clone, Default)]
struct WatcherModel {
    step: usize,
    entry: Option<usize>,
    created: bool,
}

impl WatcherModel {
    fn steps(design: Design) -> usize {
        match design {
            Design::Split => 3,
            Design::OneStep => 2,
        }
    }

    fn advance(&mut self, world: &mut World, design: Design) {
        match (design, self.step) {
            // Lookup or insert (map locked), and in the one-step design count too.
            (_, 0) => {
                let (entry, created) = match world.in_map {
                    Some(entry) => (entry, false),
                    None => {
                        world.entries.push(EntryModel::default());
                        world.in_map = Some(world.entries.len() - 1);
                        (world.entries.len() - 1, true)
                    }
                };
                if design == Design::OneStep {
                    world.entries[entry].watchers += 1;
                }
                (self.entry, self.created) = (Some(entry), created);
            }
            // The split design counts after the lock is released.
            (Design::Split, 1) => world.entries[self.entry.unwrap_or_default()].watchers += 1,
            // Start the source of a new entry (unless it was retired meanwhile).
            (Design::Split, 2) | (Design::OneStep, 1) => {
                let entry = &mut world.entries[self.entry.unwrap_or_default()];
                if self.created && (design == Design::Split || !entry.retired) {
                    entry.source = true;
                }
            }
            _ => unreachable!("no such step"),
        }
        self.step += 1;
    }
}

/// The TTL sweep (map locked): removes the key's entry when it has no watcher.
fn sweep(world: &mut World, design: Design) {
    if let Some(index) = world.in_map.filter(|&i| world.entries[i].watchers == 0) {
        world.in_map = None;
        let entry = &mut world.entries[index];
        entry.source = false;
        entry.retired = design == Design::OneStep;
    }
}

/// Every way the invariants are broken at the end of some interleaving.
fn violations(start: &World, design: Design) -> Vec<String> {
    let mut found = Vec::new();
    let watchers = vec![WatcherModel::default(), WatcherModel::default()];
    explore(start.clone(), watchers, false, design, &mut Vec::new(), &mut found);
    found
}

fn explore(
    world: World,
    watchers: Vec<WatcherModel>,
    swept: bool,
    design: Design,
    trace: &mut Vec<String>,
    found: &mut Vec<String>,
) {
    let done = watchers.iter().all(|w| w.step == WatcherModel::steps(design)) && swept;
    if done {
        for (i, w) in watchers.iter().enumerate() {
            if w.entry != world.in_map {
                found.push(format!("watcher {i} holds an entry that is not in the map after {trace:?}"));
            }
        }
        for (index, entry) in world.entries.iter().enumerate() {
            if entry.source && world.in_map != Some(index) {
                found.push(format!("a source runs for entry {index}, not in the map, after {trace:?}"));
            }
        }
        if let Some(index) = world.in_map
            && world.entries[index].watchers > 0
            && !world.entries[index].source
        {
            found.push(format!("the watched entry has no source after {trace:?}"));
        }
        return;
    }
    for i in 0..watchers.len() {
        if watchers[i].step < WatcherModel::steps(design) {
            let (mut world, mut watchers) = (world.clone(), watchers.clone());
            watchers[i].advance(&mut world, design);
            trace.push(format!("w{i}.{}", watchers[i].step));
            explore(world, watchers, swept, design, trace, found);
            trace.pop();
        }
    }
    if !swept {
        let mut world = world.clone();
        sweep(&mut world, design);
        trace.push("sweep".into());
        explore(world, watchers.clone(), true, design, trace, found);
        trace.pop();
    }
}

fn new_key() -> World {
    World::default()
}

fn idle_key() -> World {
    World { entries: vec![EntryModel { watchers: 0, source: true, retired: false }], in_map: Some(0) }
}

#[test]
fn every_interleaving_keeps_watchers_in_the_map_and_sources_on_them() {
    for (name, start) in [("new key", new_key()), ("idle key", idle_key())] {
        let found = violations(&start, Design::OneStep);
        assert!(found.is_empty(), "{name}: {found:#?}");
    }
}

#[test]
fn the_model_finds_the_race_of_the_split_design() {
    for (name, start) in [("new key", new_key()), ("idle key", idle_key())] {
        let found = violations(&start, Design::Split);
        assert!(!found.is_empty(), "{name}: the split design should break an invariant");
    }
}
