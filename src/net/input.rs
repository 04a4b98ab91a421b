//! InputStream: buffered reading from a stream socket, with line reading.

use std::rc::Rc;

use bytes::{Buf, Bytes, BytesMut};

use super::timeouts::{self, Timeouts};
use crate::driver::SharedFd;
use crate::runtime::coop;
use crate::tls::session::TlsSession;
use crate::{Error, Result};

/// How much an InputStream asks the kernel for at a time.
const READ_CHUNK: usize = 64 * 1024;
/// The longest line `read_line` accepts by default.
const DEFAULT_MAX_LINE: usize = 1024 * 1024;

/// A buffered reader over a stream socket, like StreamReader over InputStream.
///
/// Data read past what a call returns stays buffered for the next call, also when a
/// call's future is dropped; dropped while the kernel fills the buffer, what that read
/// receives goes to the socket's next read. A read that fails on the socket's
/// [read timeout](super::StreamSocketControl::set_read_timeout) loses nothing either
/// (what arrived as it gave up is kept for the next call).
///
/// Dropped with bytes still buffered, it gives them back to its socket (or its TLS
/// session), so the next read of the socket, or of the next `input_stream()`, gets them
/// first: `socket.input_stream().read_line()` in a loop loses no line that arrived with
/// the one before.
///
/// It reads while its socket lives: dropping or closing the socket ends the connection.
pub struct InputStream {
    fd: Option<SharedFd>,
    buffer: BytesMut,
    eof: bool,
    max_line: usize,
    /// Reads go through this TLS session when the socket has one.
    tls: Option<Rc<TlsSession>>,
    /// The socket's timeouts (the read timeout applies to every fill).
    timeouts: Rc<Timeouts>,
}

impl InputStream {
    pub(crate) fn new(fd: Option<SharedFd>) -> InputStream {
        InputStream {
            fd,
            buffer: BytesMut::new(),
            eof: false,
            max_line: DEFAULT_MAX_LINE,
            tls: None,
            timeouts: Rc::default(),
        }
    }

    /// Reads within `timeouts`' read timeout, counting into its counts.
    pub(crate) fn with_timeouts(mut self, timeouts: Rc<Timeouts>) -> InputStream {
        self.timeouts = timeouts;
        self
    }

    /// Reads through `tls` (decrypted) instead of from the socket directly.
    pub(crate) fn with_tls(mut self, tls: Option<Rc<TlsSession>>) -> InputStream {
        self.tls = tls;
        self
    }

    /// Sets the longest line [`read_line`](Self::read_line) accepts (default 1 MiB), so a
    /// peer that never sends a newline cannot make the buffer grow without bound. A longer
    /// line (its newline not counted) fails `read_line` with InvalidArgument however its
    /// bytes arrived; they stay buffered, for [`read`](Self::read) to take or skip.
    pub fn set_max_line_length(&mut self, bytes: usize) {
        self.max_line = bytes.max(1);
    }

    /// Reads more bytes into the buffer; false at end of stream.
    async fn fill(&mut self) -> Result<bool> {
        if self.eof {
            return Ok(false);
        }
        if let Some(tls) = &self.tls {
            let buffer = &mut self.buffer;
            let mut copy = |plain: &[u8]| {
                buffer.extend_from_slice(plain);
                plain.len()
            };
            let reading = tls.read_with(&mut copy);
            let n = coop::budgeted(timeouts::within_read_timeout(&self.timeouts, reading)).await?;
            self.eof = n == 0;
            return Ok(n > 0);
        }
        let fd = self
            .fd
            .as_ref()
            .ok_or_else(|| Error::invalid_input("the socket is not connected"))?;
        // Read into the spare capacity split off on its own: if this future is dropped
        // while the kernel fills it, only that part goes with the read, and the bytes
        // already buffered stay. Joining it back is O(1) (same allocation, adjacent).
        self.buffer.reserve(READ_CHUNK);
        let spare = self.buffer.split_off(self.buffer.len());
        let (result, spare) =
            coop::budgeted(timeouts::recv_within(fd, spare, &self.timeouts)).await;
        self.buffer.unsplit(spare);
        let n = result?;
        if n == 0 {
            self.eof = true;
        }
        Ok(n > 0)
    }

    /// The next line without its `\n` (or `\r\n`); `None` at end of stream. A last line
    /// without a newline is returned as a line, as ReadLineAsync does.
    pub async fn read_line(&mut self) -> Result<Option<String>> {
        let mut searched = 0;
        loop {
            if let Some(pos) = self.buffer[searched..].iter().position(|&b| b == b'\n') {
                let end = searched + pos;
                let body = match end.checked_sub(1) {
                    Some(before) if self.buffer[before] == b'\r' => before,
                    _ => end,
                };
                // However the bytes arrived: a long line that came whole in one read is
                // as long as one that came in many.
                if body > self.max_line {
                    return Err(self.line_too_long());
                }
                let mut line = self.buffer.split_to(end + 1);
                line.truncate(line.len() - 1);
                if line.last() == Some(&b'\r') {
                    line.truncate(line.len() - 1);
                }
                return utf8(line.freeze()).map(Some);
            }
            searched = self.buffer.len();
            if searched > self.max_line {
                return Err(self.line_too_long());
            }
            if !self.fill().await? {
                if self.buffer.is_empty() {
                    return Ok(None);
                }
                let line = self.buffer.split().freeze();
                return utf8(line).map(Some);
            }
        }
    }

    fn line_too_long(&self) -> Error {
        Error::invalid_input(format!("line longer than {} bytes", self.max_line))
    }

    /// Up to `max` bytes: what is buffered, else one read. Empty at end of stream, and
    /// at once for `max` 0 (which reads nothing, as a read into an empty buffer does).
    pub async fn read(&mut self, max: usize) -> Result<Bytes> {
        // Otherwise it would wait for the peer's next bytes only to return none of them.
        if max == 0 {
            return Ok(Bytes::new());
        }
        if self.buffer.is_empty() {
            self.fill().await?;
        }
        let n = self.buffer.len().min(max);
        Ok(self.buffer.split_to(n).freeze())
    }

    /// Exactly `n` bytes; an error with status ConnectionClosed if the stream ends first.
    ///
    /// The bytes are gathered in memory until all `n` are there: bound `n` before
    /// passing a length a peer sent (a hostile 4 GiB length would otherwise be held
    /// for), or read a large body in pieces with [`read`](Self::read).
    pub async fn read_exact(&mut self, n: usize) -> Result<Bytes> {
        while self.buffer.len() < n {
            if !self.fill().await? {
                return Err(Error::connection_closed(format!(
                    "read_exact of {n} bytes got {}",
                    self.buffer.len()
                )));
            }
        }
        Ok(self.buffer.split_to(n).freeze())
    }

    /// Bytes buffered and not yet returned.
    pub fn buffered(&self) -> &[u8] {
        self.buffer.chunk()
    }
}

impl Drop for InputStream {
    fn drop(&mut self) {
        let unread = self.buffer.split().freeze();
        match (&self.tls, &self.fd) {
            (Some(tls), _) => tls.unread(unread),
            (None, Some(fd)) => fd.unread(unread),
            (None, None) => {}
        }
    }
}

fn utf8(line: Bytes) -> Result<String> {
    String::from_utf8(line.to_vec())
        .map_err(|err| Error::invalid_input(format!("line is not valid UTF-8: {err}")))
}
