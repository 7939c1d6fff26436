//! What the cache reports and carries for the layers above it, without knowing them: the
//! node's telemetry implements [`CacheHooks`] and [`KeyHooks`], and a state's trace context
//! rides in an [`Attachment`] the cache never reads.

use std::any::Any;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;

use super::KeyState;

/// The cache's events, and the per-key handles each entry carries for its users.
pub trait CacheHooks: Send + Sync + 'static {
    /// What each entry carries for its users and reports its watchers into.
    type Key: KeyHooks;

    /// A new entry of `key` (holding `type_url` resources); called under the cache's map
    /// lock, in the step that inserts it.
    fn key_created(&self, key: &str, type_url: &str) -> Self::Key;

    /// The entry of `key` left the cache; called under the map lock, in the step that removes
    /// it (a new entry of the same key, created under the same lock, comes after).
    fn key_retired(&self, key: &str);

    /// The cache now holds `count` entries.
    fn entries(&self, count: usize);

    /// An entry was evicted; `reason` is [`super::EvictionReason::label`].
    fn evicted(&self, reason: &'static str);
}

/// What a key's watchers report: clients coming and going, and their ACKs and NACKs.
pub trait KeyHooks: Send + Sync + 'static {
    /// A watcher (a downstream stream or a follower) started watching the key.
    fn client_joined(&self);
    /// A watcher stopped watching the key.
    fn client_left(&self);
    /// A watcher's client ACKed a version.
    fn acked(&self);
    /// A watcher's client NACKed a version.
    fn nacked(&self);
}

/// Where the states an entry accepts from a live source go on to be kept (the node's store
/// of last-known-good states), and what it hears of entries leaving the cache for good.
pub trait Keeper: Send + Sync + 'static {
    /// A live source's state was accepted into the entry of `key` (sent upstream as `node`):
    /// `state` is its new current state. Called after the watchers were woken; must not block.
    fn accepted(&self, key: &str, type_url: &str, node: &Node, state: &Arc<KeyState>);

    /// The entry of `key` was evicted (TTL, `max_entries`) or cleared: what was kept of it
    /// goes too. Not called at shutdown.
    fn removed(&self, key: &str);
}

/// A value the cache carries with a state for the layers above it (the version's trace
/// context); cheap to clone, absent by default. Reading it back as another type than the one
/// stored gives `None`, as an absent one does.
#[derive(Clone, Default)]
pub struct Attachment(Option<Arc<dyn Any + Send + Sync>>);

impl Attachment {
    /// An attachment holding `value`.
    pub fn new<T: Any + Send + Sync>(value: T) -> Self {
        Self(Some(Arc::new(value)))
    }

    /// The value, if one of type `T` is attached.
    pub fn get<T: Any>(&self) -> Option<&T> {
        self.0.as_deref().and_then(|value| value.downcast_ref())
    }
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Attachment(..)" } else { "Attachment(none)" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attachment_gives_back_only_what_was_stored() {
        let attached = Attachment::new(7_u32);
        assert_eq!(attached.get::<u32>(), Some(&7));
        assert_eq!(attached.get::<String>(), None);
        assert_eq!(Attachment::default().get::<u32>(), None);
    }
}
