//! What the server knows of its connections, for `CLIENT LIST|KILL`, `MONITOR` and `SCAN`:
//! shared by every connection, touched once per connection (and per `SCAN` page), never per
//! request unless a monitor is attached.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Lines a monitor may fall behind by before it is closed: a monitor that cannot keep up is
/// dropped, so that it never slows the server nor holds more than this.
pub const MONITOR_BACKLOG: usize = 4096;

/// `SCAN` cursors kept: each names where a page of bucket names ended. The oldest is forgotten
/// first; a forgotten cursor gets a clear error, and the scan starts again from 0.
pub const SCAN_CURSORS: usize = 4096;

/// One connection, as `CLIENT LIST` shows it.
pub struct ClientInfo {
    /// Unique for the server's life, from 1.
    pub id: u64,
    /// The client's address.
    pub peer: SocketAddr,
    /// The server's address it connected to.
    pub local: SocketAddr,
    opened: Instant,
    /// Milliseconds from `opened` to the last request.
    last_request_ms: AtomicU64,
    /// The RESP version the connection chose (2 until `HELLO 3`).
    resp3: AtomicBool,
    details: Mutex<Details>,
    /// Cancelled by `CLIENT KILL`: the connection answers what it has read and closes.
    kill: CancellationToken,
}

/// What a client says about itself.
#[derive(Default)]
struct Details {
    name: Option<Vec<u8>>,
    library: Option<Vec<u8>>,
    library_version: Option<Vec<u8>>,
    in_transaction: bool,
    monitor: bool,
}

impl ClientInfo {
    /// Notes that a request came now.
    pub fn touch(&self) {
        let elapsed = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_request_ms.store(elapsed, Ordering::Relaxed);
    }

    /// Records the connection's name.
    pub fn set_name(&self, name: Option<Vec<u8>>) {
        self.details.lock().name = name;
    }

    /// Records `CLIENT SETINFO`'s library name (`version` false) or version.
    pub fn set_library(&self, version: bool, value: &[u8]) {
        let mut details = self.details.lock();
        let slot = if version {
            &mut details.library_version
        } else {
            &mut details.library
        };
        *slot = Some(value.to_vec());
    }

    /// Records the RESP version chosen.
    pub fn set_resp3(&self, resp3: bool) {
        self.resp3.store(resp3, Ordering::Relaxed);
    }

    /// Records whether a transaction is open.
    pub fn set_in_transaction(&self, open: bool) {
        self.details.lock().in_transaction = open;
    }

    /// Marks the connection as a monitor.
    pub fn set_monitor(&self) {
        self.details.lock().monitor = true;
    }

    /// The connection as a line of `CLIENT LIST`, in Redis's field names.
    #[must_use]
    pub fn describe(&self) -> String {
        let details = self.details.lock();
        let text = |bytes: &Option<Vec<u8>>| {
            bytes
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default()
                .into_owned()
        };
        let age = self.opened.elapsed();
        let idle = age
            .as_millis()
            .saturating_sub(u128::from(self.last_request_ms.load(Ordering::Relaxed)))
            / 1000;
        let flags = if details.monitor {
            "O"
        } else if details.in_transaction {
            "x"
        } else {
            "N"
        };
        let mut line = String::new();
        let _ = write!(
            line,
            "id={} addr={} laddr={} name={} age={} idle={} flags={} db=0 multi={} resp={} lib-name={} lib-ver={}",
            self.id,
            self.peer,
            self.local,
            text(&details.name),
            age.as_secs(),
            idle,
            flags,
            if details.in_transaction { 0 } else { -1 },
            if self.resp3.load(Ordering::Relaxed) {
                3
            } else {
                2
            },
            text(&details.library),
            text(&details.library_version),
        );
        line
    }
}

/// Every connection of a server, the monitors' feed, and the `SCAN` cursors.
pub struct Clients {
    next_id: AtomicU64,
    connected: Mutex<HashMap<u64, Arc<ClientInfo>>>,
    monitors: AtomicUsize,
    feed: broadcast::Sender<Arc<str>>,
    cursors: Mutex<ScanCursors>,
}

impl Default for Clients {
    fn default() -> Self {
        Self {
            next_id: AtomicU64::new(1),
            connected: Mutex::default(),
            monitors: AtomicUsize::new(0),
            feed: broadcast::channel(MONITOR_BACKLOG).0,
            cursors: Mutex::default(),
        }
    }
}

/// A connection's place among [`Clients`]: removed when dropped.
pub struct Registration {
    clients: Arc<Clients>,
    info: Arc<ClientInfo>,
}

impl Registration {
    /// The connection's entry.
    #[must_use]
    pub fn info(&self) -> &Arc<ClientInfo> {
        &self.info
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.clients.connected.lock().remove(&self.info.id);
    }
}

impl Clients {
    /// Adds a connection from `peer` to `local`, which `kill` closes.
    #[must_use]
    pub fn register(
        self: &Arc<Self>,
        peer: SocketAddr,
        local: SocketAddr,
        kill: CancellationToken,
    ) -> Registration {
        let info = Arc::new(ClientInfo {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            peer,
            local,
            opened: Instant::now(),
            last_request_ms: AtomicU64::new(0),
            resp3: AtomicBool::new(false),
            details: Mutex::default(),
            kill,
        });
        self.connected.lock().insert(info.id, Arc::clone(&info));
        Registration {
            clients: Arc::clone(self),
            info,
        }
    }

    /// Every connection as `CLIENT LIST` shows it, oldest first.
    #[must_use]
    pub fn list(&self) -> String {
        let mut connected: Vec<Arc<ClientInfo>> = self.connected.lock().values().cloned().collect();
        connected.sort_by_key(|info| info.id);
        connected
            .iter()
            .map(|info| info.describe() + "\n")
            .collect()
    }

    /// Closes the connections `matches` picks; how many.
    pub fn kill(&self, matches: impl Fn(&ClientInfo) -> bool) -> usize {
        let connected = self.connected.lock();
        let mut killed = 0;
        for info in connected.values().filter(|info| matches(info)) {
            info.kill.cancel();
            killed += 1;
        }
        killed
    }

    /// Whether any monitor is attached: the one check a request pays when none is.
    #[must_use]
    pub fn monitored(&self) -> bool {
        self.monitors.load(Ordering::Relaxed) > 0
    }

    /// Attaches a monitor: the lines it is to send, until it is dropped.
    #[must_use]
    pub fn monitor(self: &Arc<Self>) -> Monitor {
        self.monitors.fetch_add(1, Ordering::Relaxed);
        Monitor {
            clients: Arc::clone(self),
            feed: self.feed.subscribe(),
        }
    }

    /// Sends one request, its words as sent, from `peer` to the monitors, as Redis shows it:
    /// `+<unix time> [0 <peer>] "word" "word"`.
    pub fn publish(&self, peer: SocketAddr, words: &[&[u8]], more: bool) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut line = format!("+{}.{:06} [0 {peer}]", now.as_secs(), now.subsec_micros());
        for word in words {
            line.push_str(" \"");
            for &byte in *word {
                match byte {
                    b'"' => line.push_str("\\\""),
                    b'\\' => line.push_str("\\\\"),
                    b' '..=b'~' => line.push(char::from(byte)),
                    other => {
                        let _ = write!(line, "\\x{other:02x}");
                    }
                }
            }
            line.push('"');
        }
        if more {
            line.push_str(" ...");
        }
        line.push_str("\r\n");
        // No receiver (the last monitor just left) is not an error.
        let _ = self.feed.send(Arc::from(line));
    }

    /// Remembers that a `SCAN` page ended at `name`; the cursor that resumes after it.
    pub fn scan_cursor(&self, name: Vec<u8>) -> u64 {
        self.cursors.lock().insert(name)
    }

    /// Where the page of `cursor` resumes: after the name it remembers; `None` if it was
    /// never given or has been forgotten.
    #[must_use]
    pub fn scan_resume(&self, cursor: u64) -> Option<Vec<u8>> {
        self.cursors.lock().get(cursor)
    }
}

/// An attached monitor's feed; detaches when dropped.
pub struct Monitor {
    clients: Arc<Clients>,
    feed: broadcast::Receiver<Arc<str>>,
}

impl Monitor {
    /// The next line to send; `None` once the monitor has fallen more than
    /// [`MONITOR_BACKLOG`] lines behind (it is to be closed).
    pub async fn next(&mut self) -> Option<Arc<str>> {
        // Lagged or closed: either way the monitor ends.
        self.feed.recv().await.ok()
    }
}

impl Monitor {
    /// A line that is ready now, if any.
    pub fn ready(&mut self) -> Option<Arc<str>> {
        self.feed.try_recv().ok()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.clients.monitors.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The last [`SCAN_CURSORS`] cursors given, each the name its page ended at. Cursors are
/// random, so one client cannot walk another's scan by guessing, and never 0 (which starts a
/// scan).
#[derive(Default)]
struct ScanCursors {
    names: HashMap<u64, Vec<u8>>,
    order: std::collections::VecDeque<u64>,
}

impl ScanCursors {
    fn insert(&mut self, name: Vec<u8>) -> u64 {
        let cursor = loop {
            let candidate = fastrand::u64(1..=i64::MAX as u64);
            if !self.names.contains_key(&candidate) {
                break candidate;
            }
        };
        if self.order.len() == SCAN_CURSORS
            && let Some(oldest) = self.order.pop_front()
        {
            self.names.remove(&oldest);
        }
        self.names.insert(cursor, name);
        self.order.push_back(cursor);
        cursor
    }

    fn get(&self, cursor: u64) -> Option<Vec<u8>> {
        self.names.get(&cursor).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_cursors_are_bounded_and_the_oldest_go_first() {
        let mut cursors = ScanCursors::default();
        let first = cursors.insert(b"a".to_vec());
        assert_eq!(cursors.get(first), Some(b"a".to_vec()));
        for index in 0..SCAN_CURSORS {
            assert_ne!(cursors.insert(index.to_string().into_bytes()), 0);
        }
        assert_eq!(cursors.get(first), None);
        assert_eq!(cursors.names.len(), SCAN_CURSORS);
    }

    #[tokio::test]
    async fn a_monitor_that_falls_behind_is_let_go() {
        let clients = Arc::new(Clients::default());
        let mut monitor = clients.monitor();
        assert!(clients.monitored());
        let peer = SocketAddr::from(([127, 0, 0, 1], 5000));
        clients.publish(peer, &[b"GET", b"b", b"k\"\x01"], false);
        let line = monitor.next().await.expect("a line");
        assert!(line.ends_with(" [0 127.0.0.1:5000] \"GET\" \"b\" \"k\\\"\\x01\"\r\n"));
        for _ in 0..=MONITOR_BACKLOG {
            clients.publish(peer, &[b"PING"], false);
        }
        assert_eq!(monitor.next().await, None);
        drop(monitor);
        assert!(!clients.monitored());
    }
}
