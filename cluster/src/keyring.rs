//! [`Keyring`]: the shared cluster keys that seal gossip, read from a key file.
//!
//! Role: parse and validate the key file, and hold the keys ready for the AEAD (see
//! [`seal`](crate::seal) for the datagram format).
//!
//! Key file format: one key per line, the standard base64 encoding (with padding) of 32 random
//! bytes (e.g. `head -c 32 /dev/urandom | base64`). Blank lines and lines starting with `#` are
//! ignored; surrounding whitespace is trimmed. The **first** key is the primary: it seals every
//! outgoing datagram. **Every** key opens: a datagram names the key that sealed it by a key id
//! (the first 4 bytes of the SHA-256 of the key), so opening never tries keys in turn.
//!
//! Rotation (as memberlist's keyring, one file edit per step, applied on every node before the
//! next step; the file is re-read every few seconds):
//!
//! 1. *install*: append the new key on every node (all nodes still seal with the old key and
//!    now open both);
//! 2. *switch*: move the new key to the first line on every node (nodes that switched seal with
//!    the new key, which every node already opens);
//! 3. *remove*: delete the old key on every node (no node seals with it any more).
//!
//! No step leaves two nodes unable to open each other's datagrams, so no step partitions the
//! cluster.
//!
//! Invariants: a [`Keyring`] holds at least one key, no two keys with the same key id, and its
//! errors name the file and the line.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{CHACHA20_POLY1305, LessSafeKey, UnboundKey};
use ring::digest::{SHA256, digest};

/// Length of a gossip key in bytes (ChaCha20-Poly1305 takes 256-bit keys).
pub const KEY_LEN: usize = 32;
/// Length of a key id in bytes.
pub const KEY_ID_LEN: usize = 4;

/// Largest key file read (64 KiB: hundreds of keys).
pub const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

/// Why a key file cannot be used. Messages name the file and, for a bad key, the line.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// The file cannot be read.
    #[error("cannot read gossip key file {path}")]
    Read {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A line is not a valid key.
    #[error("gossip key file {path}, line {line}: {reason}")]
    Line {
        /// The key file.
        path: PathBuf,
        /// The line number, from 1.
        line: usize,
        /// What is wrong with the line.
        reason: String,
    },
    /// The file holds no key.
    #[error("gossip key file {path}: no key (one base64-encoded 32-byte key per line expected)")]
    Empty {
        /// The key file.
        path: PathBuf,
    },
}

/// One key of the ring: its id and the AEAD key.
pub(crate) struct GossipKey {
    pub(crate) id: [u8; KEY_ID_LEN],
    pub(crate) aead: LessSafeKey,
}

impl GossipKey {
    /// A key from its 32 raw bytes.
    pub(crate) fn new(bytes: &[u8; KEY_LEN]) -> Self {
        let id = key_id(bytes);
        // ChaCha20-Poly1305 accepts any 32-byte key; `new` fails only on a wrong length.
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, bytes).expect("a 32-byte chacha20-poly1305 key");
        GossipKey { id, aead: LessSafeKey::new(unbound) }
    }
}

/// The key id of a key: the first 4 bytes of its SHA-256. Not secret.
pub fn key_id(key: &[u8]) -> [u8; KEY_ID_LEN] {
    let hash = digest(&SHA256, key);
    let mut id = [0; KEY_ID_LEN];
    id.copy_from_slice(&hash.as_ref()[..KEY_ID_LEN]);
    id
}

/// The keys that seal and open gossip: the first one seals, all of them open.
pub struct Keyring {
    keys: Vec<GossipKey>,
}

impl Keyring {
    /// Reads and parses a key file (see the module docs for the format).
    ///
    /// # Errors
    ///
    /// [`KeyringError`] naming the file, and the line for a bad key.
    pub fn load(path: &Path) -> Result<Keyring, KeyringError> {
        Self::parse(&Self::read(path)?, path)
    }

    /// Reads the text of a key file, refusing one larger than [`MAX_KEY_FILE_BYTES`] (a key
    /// file is a few lines; a huge one is an error, not a read that fills memory).
    ///
    /// # Errors
    ///
    /// [`KeyringError::Read`] naming the file.
    pub fn read(path: &Path) -> Result<String, KeyringError> {
        use std::io::Read as _;
        let read = || -> std::io::Result<String> {
            let mut text = String::new();
            std::fs::File::open(path)?.take(MAX_KEY_FILE_BYTES + 1).read_to_string(&mut text)?;
            if text.len() as u64 > MAX_KEY_FILE_BYTES {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("the file is larger than the {MAX_KEY_FILE_BYTES}-byte limit"),
                ));
            }
            Ok(text)
        };
        read().map_err(|source| KeyringError::Read { path: path.to_owned(), source })
    }

    /// Parses the text of a key file; `path` only names the file in errors.
    ///
    /// # Errors
    ///
    /// [`KeyringError::Line`] for a line that is not base64 of exactly 32 bytes or repeats an
    /// earlier key (or its key id), [`KeyringError::Empty`] when no line holds a key.
    pub fn parse(text: &str, path: &Path) -> Result<Keyring, KeyringError> {
        let mut keys: Vec<(usize, GossipKey)> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line_no = index + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let invalid = |reason: String| KeyringError::Line { path: path.to_owned(), line: line_no, reason };
            let bytes = STANDARD.decode(line).map_err(|e| invalid(format!("not base64: {e}")))?;
            let bytes: [u8; KEY_LEN] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| invalid(format!("key is {} bytes, expected {KEY_LEN}", bytes.len())))?;
            let key = GossipKey::new(&bytes);
            if let Some((first, _)) = keys.iter().find(|(_, k)| k.id == key.id) {
                return Err(invalid(format!("same key (or key id) as line {first}")));
            }
            keys.push((line_no, key));
        }
        if keys.is_empty() {
            return Err(KeyringError::Empty { path: path.to_owned() });
        }
        Ok(Keyring { keys: keys.into_iter().map(|(_, key)| key).collect() })
    }

    /// A keyring of raw keys, the first one primary.
    ///
    /// # Panics
    ///
    /// If `keys` is empty.
    pub fn from_keys(keys: &[[u8; KEY_LEN]]) -> Keyring {
        assert!(!keys.is_empty(), "a keyring needs at least one key");
        Keyring { keys: keys.iter().map(GossipKey::new).collect() }
    }

    /// The key that seals.
    pub(crate) fn primary(&self) -> &GossipKey {
        &self.keys[0]
    }

    /// The key with this id, if installed.
    pub(crate) fn find(&self, id: [u8; KEY_ID_LEN]) -> Option<&GossipKey> {
        self.keys.iter().find(|key| key.id == id)
    }

    /// The key ids, primary first (hex, for logs).
    pub fn key_ids(&self) -> Vec<String> {
        self.keys.iter().map(|key| hex(&key.id)).collect()
    }

    /// How many keys are installed.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: a keyring holds at least one key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Key ids only: never the keys.
        f.debug_struct("Keyring").field("key_ids", &self.key_ids()).finish()
    }
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(bytes: &[u8]) -> String {
        STANDARD.encode(bytes)
    }

    #[test]
    fn an_endless_key_file_is_refused() {
        let error = Keyring::load(Path::new("/dev/zero")).unwrap_err();
        assert!(error.to_string().contains("/dev/zero"), "{error}");
    }

    #[test]
    fn parses_keys_in_order_skipping_comments_and_blanks() {
        let text = format!("# cluster keys\n\n  {}  \n# old\n{}\n", b64(&[1; 32]), b64(&[2; 32]));
        let ring = Keyring::parse(&text, Path::new("k")).unwrap();
        assert_eq!(ring.len(), 2);
        assert_eq!(ring.primary().id, key_id(&[1; 32]));
        assert!(ring.find(key_id(&[2; 32])).is_some());
        assert!(ring.find(key_id(&[3; 32])).is_none());
        assert_eq!(ring.key_ids()[0], hex(&key_id(&[1; 32])));
        assert!(!format!("{ring:?}").contains(&b64(&[1; 32])), "debug never shows a key");
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let path = Path::new("/etc/xds-relay/gossip.keys");
        let cases = [
            (format!("# c\n{}\nnot-base64!\n", b64(&[1; 32])), Some(3), "not base64"),
            (format!("\n{}\n", b64(&[1; 16])), Some(2), "16 bytes, expected 32"),
            (format!("{}\n{}\n", b64(&[1; 32]), b64(&[1; 32])), Some(2), "as line 1"),
            ("# only comments\n\n".to_string(), None, "no key"),
        ];
        for (text, line, reason) in cases {
            let error = Keyring::parse(&text, path).unwrap_err();
            let message = error.to_string();
            assert!(message.contains("/etc/xds-relay/gossip.keys"), "{message}");
            assert!(message.contains(reason), "{message}");
            match (error, line) {
                (KeyringError::Line { line: got, .. }, Some(want)) => assert_eq!(got, want),
                (KeyringError::Empty { .. }, None) => {}
                (other, _) => panic!("unexpected {other:?}"),
            }
        }
        let missing = Keyring::load(Path::new("/nonexistent/gossip.keys")).unwrap_err();
        assert!(matches!(missing, KeyringError::Read { .. }));
        assert!(missing.to_string().contains("/nonexistent/gossip.keys"));
    }
}
