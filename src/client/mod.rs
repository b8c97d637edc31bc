//! A client for kv, used by `kv cli`, `kv bench` and the tests.
//!
//! It speaks RESP by default, so that keys and values are binary-safe, or the guide's line
//! protocol; either way it can pipeline: queue several requests, send them in one write, then
//! read their replies in order, each as the [`ReplyValue`] RESP would give.

pub mod cli;
mod render;
pub mod status;

use std::collections::VecDeque;
use std::io;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};

pub use render::{render, render_raw};

use crate::protocol::{
    Dialect, LineReplyShape, ProtocolError, ReplyValue, encode_request, parse_line_reply,
    parse_reply,
};

/// The largest reply the client accepts: a bound against a misbehaving server.
const MAX_REPLY_LEN: usize = 512 * 1024 * 1024;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection failed.
    #[error("connection failed")]
    Io(#[from] io::Error),
    /// The server closed the connection.
    #[error("server closed the connection")]
    Closed,
    /// The server's bytes were not RESP.
    #[error("bad reply: {0}")]
    Protocol(#[from] ProtocolError),
    /// The bucket does not exist.
    #[error("bucket not found")]
    NotFound,
    /// The server answered with an error.
    #[error("{0}")]
    Server(String),
    /// A reply of a kind the command never gives.
    #[error("unexpected reply {0:?}")]
    Unexpected(ReplyValue),
    /// A word the line protocol cannot carry (empty, or holding a blank or a line break).
    #[error("the line protocol cannot send an empty word or one with blanks or line breaks")]
    Unsendable,
}

/// A connection to a kv server.
///
/// ```no_run
/// # #[tokio::main]
/// # async fn main() -> Result<(), kv::client::ClientError> {
/// let mut client = kv::client::Client::connect("127.0.0.1:4040").await?;
/// client.create(b"shopping").await?;
/// client.put(b"shopping", b"milk", b"1").await?;
/// assert_eq!(client.get(b"shopping", b"milk").await?.as_deref(), Some(&b"1"[..]));
/// # Ok(())
/// # }
/// ```
pub struct Client {
    stream: TcpStream,
    dialect: Dialect,
    input: BytesMut,
    output: BytesMut,
    /// Requests queued and not yet sent.
    queued: usize,
    /// Replies sent for and not yet read, each with its shape (which the line protocol needs
    /// to read it).
    unread: VecDeque<LineReplyShape>,
    /// A request the line protocol cannot carry was queued: the next send fails.
    unsendable: bool,
}

impl Client {
    /// Connects to `address`, to speak RESP.
    ///
    /// # Errors
    /// If the connection cannot be made.
    pub async fn connect(address: impl ToSocketAddrs) -> Result<Self, ClientError> {
        Self::connect_with(address, Dialect::Resp).await
    }

    /// Connects to `address`, to speak `dialect`.
    ///
    /// # Errors
    /// If the connection cannot be made.
    pub async fn connect_with(
        address: impl ToSocketAddrs,
        dialect: Dialect,
    ) -> Result<Self, ClientError> {
        let stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            dialect,
            input: BytesMut::with_capacity(16 * 1024),
            output: BytesMut::with_capacity(16 * 1024),
            queued: 0,
            unread: VecDeque::new(),
            unsendable: false,
        })
    }

    /// Queues a request (its words) without sending it.
    pub fn queue(&mut self, words: &[&[u8]]) {
        match self.dialect {
            Dialect::Resp | Dialect::Resp3 => encode_request(words, &mut self.output),
            Dialect::Line => {
                let carried = |word: &&[u8]| {
                    !word.is_empty()
                        && !word
                            .iter()
                            .any(|byte| matches!(byte, b' ' | b'\t' | b'\r' | b'\n'))
                };
                self.unsendable |= !words.iter().all(carried);
                for (position, word) in words.iter().enumerate() {
                    if position > 0 {
                        self.output.extend_from_slice(b" ");
                    }
                    self.output.extend_from_slice(word);
                }
                self.output.extend_from_slice(b"\n");
            }
        }
        self.unread.push_back(LineReplyShape::of(words));
        self.queued += 1;
    }

    /// Sends every queued request in one write; returns how many there were. Their replies are
    /// read with [`read_reply`](Self::read_reply), in order.
    ///
    /// # Errors
    /// If the connection fails, or a queued request cannot be sent in the line protocol
    /// (then nothing is sent).
    pub async fn send(&mut self) -> Result<usize, ClientError> {
        if std::mem::take(&mut self.unsendable) {
            self.output.clear();
            let sent_before = self.unread.len() - self.queued;
            self.unread.truncate(sent_before);
            self.queued = 0;
            return Err(ClientError::Unsendable);
        }
        self.stream.write_all(&self.output).await?;
        self.output.clear();
        Ok(std::mem::take(&mut self.queued))
    }

    /// Sends every queued request in one write and reads their replies, in order.
    ///
    /// # Errors
    /// If the connection fails or a reply is malformed. Error replies are returned as
    /// [`ReplyValue::Error`], not as errors.
    pub async fn flush(&mut self) -> Result<Vec<ReplyValue>, ClientError> {
        let count = self.send().await?;
        let mut replies = Vec::with_capacity(count);
        while replies.len() < count {
            replies.push(self.read_reply().await?);
        }
        Ok(replies)
    }

    /// Sends one request and returns its reply as it came.
    ///
    /// # Errors
    /// If the connection fails or the reply is malformed.
    pub async fn call(&mut self, words: &[&[u8]]) -> Result<ReplyValue, ClientError> {
        self.queue(words);
        let mut replies = self.flush().await?;
        replies.pop().ok_or(ClientError::Closed)
    }

    /// The reply to the oldest request sent and not yet answered.
    ///
    /// # Errors
    /// If the connection fails or closes, or the reply is malformed.
    pub async fn read_reply(&mut self) -> Result<ReplyValue, ClientError> {
        let shape = self
            .unread
            .front()
            .copied()
            .unwrap_or(LineReplyShape::Status);
        loop {
            let parsed = match self.dialect {
                Dialect::Resp | Dialect::Resp3 => parse_reply(&self.input, MAX_REPLY_LEN)?,
                Dialect::Line => parse_line_reply(&self.input, shape, MAX_REPLY_LEN)?,
            };
            if let Some((reply, consumed)) = parsed {
                self.input.advance(consumed);
                self.unread.pop_front();
                return Ok(reply);
            }
            if self.stream.read_buf(&mut self.input).await? == 0 {
                return Err(ClientError::Closed);
            }
        }
    }

    /// `CREATE bucket`.
    ///
    /// # Errors
    /// [`ClientError::Server`] if the server refuses (bucket limit, name too long).
    pub async fn create(&mut self, bucket: &[u8]) -> Result<(), ClientError> {
        expect_ok(self.call(&[b"CREATE", bucket]).await?)
    }

    /// `PUT bucket key value`.
    ///
    /// # Errors
    /// [`ClientError::NotFound`] if the bucket does not exist.
    pub async fn put(
        &mut self,
        bucket: &[u8],
        key: &[u8],
        value: &[u8],
    ) -> Result<(), ClientError> {
        expect_ok(self.call(&[b"PUT", bucket, key, value]).await?)
    }

    /// `GET bucket key`: the value, or `None` if the key is absent.
    ///
    /// # Errors
    /// [`ClientError::NotFound`] if the bucket does not exist.
    pub async fn get(&mut self, bucket: &[u8], key: &[u8]) -> Result<Option<Bytes>, ClientError> {
        match check(self.call(&[b"GET", bucket, key]).await?)? {
            ReplyValue::Bulk(value) => Ok(value),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// `DELETE bucket key`.
    ///
    /// # Errors
    /// [`ClientError::NotFound`] if the bucket does not exist.
    pub async fn delete(&mut self, bucket: &[u8], key: &[u8]) -> Result<(), ClientError> {
        expect_ok(self.call(&[b"DELETE", bucket, key]).await?)
    }

    /// `DROP bucket`.
    ///
    /// # Errors
    /// [`ClientError::NotFound`] if the bucket does not exist.
    pub async fn drop_bucket(&mut self, bucket: &[u8]) -> Result<(), ClientError> {
        expect_ok(self.call(&[b"DROP", bucket]).await?)
    }

    /// `INFO`: the server's counters as `name:value` lines.
    ///
    /// # Errors
    /// If the connection fails.
    pub async fn info(&mut self) -> Result<String, ClientError> {
        match check(self.call(&[b"INFO"]).await?)? {
            ReplyValue::Bulk(Some(text)) => Ok(String::from_utf8_lossy(&text).into_owned()),
            other => Err(ClientError::Unexpected(other)),
        }
    }

    /// One counter from `INFO`.
    ///
    /// # Errors
    /// If the connection fails or the server has no such counter.
    pub async fn info_field(&mut self, name: &str) -> Result<u64, ClientError> {
        let info = self.info().await?;
        info.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':')?.parse().ok())
            .ok_or_else(|| ClientError::Server(format!("no counter {name} in INFO")))
    }
}

/// Turns error replies into errors.
fn check(reply: ReplyValue) -> Result<ReplyValue, ClientError> {
    match reply {
        ReplyValue::Error(message) if message.starts_with("NOTFOUND") => Err(ClientError::NotFound),
        ReplyValue::Error(message) => Err(ClientError::Server(message)),
        other => Ok(other),
    }
}

fn expect_ok(reply: ReplyValue) -> Result<(), ClientError> {
    match check(reply)? {
        ReplyValue::Simple(text) if text == "OK" => Ok(()),
        other => Err(ClientError::Unexpected(other)),
    }
}
