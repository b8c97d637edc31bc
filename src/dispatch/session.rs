//! What a connection asks about itself and the server: `HELLO`, `AUTH`, `CLIENT`, `CONFIG GET`
//! and `SCAN`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use bytes::{Bytes, BytesMut};
use subtle::ConstantTimeEq;

use super::Dispatcher;
use crate::protocol::{
    ClientKill, ClientRequest, Dialect, ErrorReply, Reply, ReplyValue, encode, encode_page,
};

/// Most names one `SCAN` page looks at, whatever `COUNT` asks: a page costs at most this.
const MAX_SCAN_COUNT: usize = crate::cluster::router::MAX_LISTED;

impl Dispatcher {
    /// `HELLO`: switches the connection's RESP version, authenticates and names it as asked;
    /// the server's description, or why not (and then nothing is changed).
    pub(super) fn hello(
        &mut self,
        version: Option<&[u8]>,
        auth: Option<(&[u8], &[u8])>,
        name: Option<&[u8]>,
    ) -> Result<ReplyValue, ErrorReply> {
        let resp3 = match version {
            None => self.session.resp3,
            Some(b"2") => false,
            Some(b"3") => true,
            Some(_) => {
                return Err(ErrorReply {
                    code: "NOPROTO",
                    message: "unsupported protocol version".to_owned(),
                });
            }
        };
        if let Some((username, password)) = auth {
            self.authenticate(Some(username), password)?;
        } else if !self.session.authenticated {
            return Err(self.no_auth(&crate::protocol::Request::Hello {
                version,
                auth,
                name,
            }));
        }
        if let Some(name) = name {
            if let Reply::Error(error) =
                super::client(&mut self.client_name, ClientRequest::SetName(name))
            {
                return Err(error);
            }
            if let Some(info) = self.client() {
                info.set_name(self.client_name.clone());
            }
        }
        self.session.resp3 = resp3;
        if let Some(info) = self.client() {
            info.set_resp3(resp3);
        }
        let id = self.client().map_or(0, |info| info.id);
        Ok(ReplyValue::Map(vec![
            (ReplyValue::bulk("server"), ReplyValue::bulk("kv")),
            (
                ReplyValue::bulk("version"),
                ReplyValue::bulk(env!("CARGO_PKG_VERSION")),
            ),
            (
                ReplyValue::bulk("proto"),
                ReplyValue::Integer(if resp3 { 3 } else { 2 }),
            ),
            (
                ReplyValue::bulk("id"),
                ReplyValue::Integer(i64::try_from(id).unwrap_or(i64::MAX)),
            ),
            (
                ReplyValue::bulk("mode"),
                ReplyValue::bulk(self.sessions.mode),
            ),
            (ReplyValue::bulk("role"), ReplyValue::bulk("master")),
            (
                ReplyValue::bulk("modules"),
                ReplyValue::Array(Some(Vec::new())),
            ),
        ]))
    }

    /// `AUTH`: whether `password` (for `username`, which can only be `default`) is the
    /// server's. Compared in constant time, so that the time taken tells nothing of how much
    /// of a guess was right.
    pub(super) fn authenticate(
        &mut self,
        username: Option<&[u8]>,
        password: &[u8],
    ) -> Result<(), ErrorReply> {
        let Some(expected) = &self.sessions.password else {
            return Err(ErrorReply::new(
                "AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
            ));
        };
        let user_known = username.is_none_or(|name| name == b"default");
        if user_known && bool::from(password.ct_eq(expected)) {
            self.session.authenticated = true;
            Ok(())
        } else {
            tracing::info!(
                peer = ?self.client().map(|info| info.peer),
                "a client gave a wrong password"
            );
            Err(ErrorReply {
                code: "WRONGPASS",
                message: "invalid username-password pair or user is disabled.".to_owned(),
            })
        }
    }

    /// `CLIENT ID|INFO|LIST|KILL|SETINFO`: the reply, or `None` for what the plain
    /// [`client`](super::client) answers.
    pub(super) fn client_request(&mut self, request: ClientRequest<'_>) -> Option<ReplyValue> {
        let info = self.client();
        let reply = match request {
            ClientRequest::Id => {
                ReplyValue::Integer(info.map_or(0, |info| i64::try_from(info.id).unwrap_or(0)))
            }
            ClientRequest::Info => {
                ReplyValue::bulk(info.map_or_else(String::new, |info| info.describe() + "\n"))
            }
            ClientRequest::List => ReplyValue::bulk(self.sessions.clients.list()),
            ClientRequest::Kill(kill) => {
                let clients = &self.sessions.clients;
                let same_address = |address: &[u8], info: &super::clients::ClientInfo| {
                    info.peer.to_string().as_bytes() == address
                };
                match kill {
                    ClientKill::Address(address) => {
                        match clients.kill(|info| same_address(address, info)) {
                            0 => ReplyValue::Error("ERR No such client".to_owned()),
                            _ => ReplyValue::Simple("OK".to_owned()),
                        }
                    }
                    ClientKill::AddressFilter(address) => ReplyValue::Integer(
                        i64::try_from(clients.kill(|info| same_address(address, info)))
                            .unwrap_or(0),
                    ),
                    ClientKill::Id(id) => ReplyValue::Integer(
                        i64::try_from(clients.kill(|info| info.id == id)).unwrap_or(0),
                    ),
                }
            }
            ClientRequest::SetInfo { attribute, value } => {
                let version = if attribute.eq_ignore_ascii_case(b"LIB-VER") {
                    true
                } else if attribute.eq_ignore_ascii_case(b"LIB-NAME") {
                    false
                } else {
                    return Some(ReplyValue::Error(format!(
                        "ERR Unrecognized option '{}'",
                        String::from_utf8_lossy(attribute)
                    )));
                };
                if value.len() > super::MAX_CLIENT_NAME
                    || !value.iter().all(|&byte| (b'!'..=b'~').contains(&byte))
                {
                    return Some(ReplyValue::Error(format!(
                        "ERR {} cannot contain spaces, newlines or special characters, and is at most {} bytes",
                        String::from_utf8_lossy(attribute),
                        super::MAX_CLIENT_NAME
                    )));
                }
                if let Some(info) = info {
                    info.set_library(version, value);
                }
                ReplyValue::Simple("OK".to_owned())
            }
            ClientRequest::SetName(_) | ClientRequest::GetName => return None,
        };
        Some(reply)
    }

    /// `CONFIG GET pattern`: the settings whose names match, as a map.
    pub(super) fn config_get(&self, pattern: &[u8]) -> ReplyValue {
        let matcher = glob(pattern);
        ReplyValue::Map(
            self.sessions
                .settings
                .iter()
                .filter(|(name, _)| matcher.as_ref().is_some_and(|m| m(name.as_bytes())))
                .map(|(name, value)| (ReplyValue::bulk(*name), ReplyValue::bulk(value.clone())))
                .collect(),
        )
    }

    /// `SCAN`: a page of bucket names after where `cursor`'s page ended, those matching
    /// `pattern`, and the cursor of the next page (0: this was the last).
    pub(super) async fn scan(
        &mut self,
        cursor: u64,
        pattern: Option<&[u8]>,
        count: Option<usize>,
        dialect: Dialect,
        out: &mut BytesMut,
    ) {
        let clients = std::sync::Arc::clone(&self.sessions.clients);
        let after = match cursor {
            0 => None,
            cursor => match clients.scan_resume(cursor) {
                Some(name) => Some(name),
                None => {
                    self.stats.count_error(
                        crate::protocol::Request::Scan {
                            cursor,
                            pattern,
                            count,
                        }
                        .command_slot(),
                    );
                    let error = ErrorReply::new(
                        "invalid cursor: pass 0, or a cursor a recent SCAN gave (the server keeps the last 4096)",
                    );
                    encode(&Reply::Error(error), dialect, out);
                    return;
                }
            },
        };
        let limit = count.unwrap_or(self.page_size).clamp(1, MAX_SCAN_COUNT);
        let names: Vec<Vec<u8>> = match &self.router {
            Some(router) => match router.bucket_names(after.as_deref(), limit).await {
                Some(names) => names,
                None => {
                    encode(&Reply::Error(ErrorReply::unavailable()), dialect, out);
                    return;
                }
            },
            None => self
                .registry()
                .view()
                .names(after.as_deref(), limit)
                .iter()
                .map(|name| name.as_bytes().to_vec())
                .collect(),
        };
        let next = match names.last() {
            Some(last) if names.len() == limit => clients.scan_cursor(last.clone()),
            _ => 0,
        };
        let matcher = pattern.map(glob);
        let page: Vec<Bytes> = names
            .into_iter()
            .filter(|name| match &matcher {
                None => true,
                Some(matcher) => matcher.as_ref().is_some_and(|m| m(name)),
            })
            .map(Bytes::from)
            .collect();
        encode_page(next, &page, dialect, out);
    }
}

/// A matcher for the glob `pattern` (`*`, `?`, `[…]`, as Redis's `MATCH` and `CONFIG GET`
/// take), over bytes; `None` if the pattern is not a glob, which then matches nothing.
fn glob(pattern: &[u8]) -> Option<impl Fn(&[u8]) -> bool> {
    let pattern = std::str::from_utf8(pattern).ok()?;
    let matcher = globset::GlobBuilder::new(pattern)
        .literal_separator(false)
        .backslash_escape(true)
        .build()
        .ok()?
        .compile_matcher();
    // Names are bytes; globset matches paths, which on Unix are bytes too.
    Some(move |name: &[u8]| matcher.is_match(Path::new(OsStr::from_bytes(name))))
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn globs_match_bytes_as_redis_patterns_do() {
        let matches = |pattern: &[u8], name: &[u8]| glob(pattern).is_some_and(|m| m(name));
        assert!(matches(b"max*", b"maxmemory"));
        assert!(matches(b"*", b"a/b"));
        assert!(matches(b"b?g", b"bag"));
        assert!(matches(b"user:[0-9]*", b"user:7\xff"));
        assert!(!matches(b"max*", b"timeout"));
    }
}
