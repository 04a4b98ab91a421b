//! How an [`OutputStream`](super::OutputStream) sends a batch: as one byte stream, as
//! one datagram per write, or encrypted through a TLS session.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;

use bytes::Bytes;

use crate::driver::ops::{self, BatchReport, Progress};
use crate::driver::ops_datagram::{self, PostLedger, SendMeta};
use crate::driver::SharedFd;
use crate::tls::session::TlsSession;
use crate::{Error, Result};

/// The kind of socket an output stream writes to.
pub(crate) enum Transport {
    /// A stream socket: the writes are one byte stream, sent in order, every byte.
    Stream,
    /// A datagram socket: each write is one datagram, never merged with another.
    Datagram {
        /// Where each datagram goes; `None` on a connected socket.
        dest: Option<SocketAddr>,
        /// What every datagram of the stream carries (source address, traffic class).
        meta: SendMeta,
        /// UDP GSO for runs of equal-sized datagrams (shared with the socket's control,
        /// switched off for good when the kernel or device refuses it).
        gso: Rc<Cell<bool>>,
        /// The largest datagram the socket's family can carry.
        max_payload: usize,
        /// The socket's posted sends: those queued go before the stream's.
        posts: Rc<PostLedger>,
    },
    /// A stream socket with TLS: a batch's writes are encrypted into records together,
    /// and those records are submitted together.
    Tls(Rc<TlsSession>),
}

impl Transport {
    /// Refuses, before queueing, a write the transport can never send.
    pub(crate) fn check_write(&self, len: usize) -> Result<()> {
        match self {
            Transport::Datagram { max_payload, .. } if len > *max_payload => {
                Err(Error::from_errno(
                    format!("write of a {len}-byte datagram (at most {max_payload} fit in one)"),
                    libc::EMSGSIZE,
                ))
            }
            _ => Ok(()),
        }
    }

    /// Sends one batch of `total` bytes (see `ops::send_stream_batch` and `ops_datagram::send_batch`).
    pub(crate) async fn send_batch(
        &self,
        fd: &SharedFd,
        bufs: Vec<Bytes>,
        total: usize,
        report: &mut BatchReport,
    ) -> (io::Result<()>, Progress, Vec<Bytes>) {
        match self {
            Transport::Stream => ops::send_stream_batch(fd, bufs, total, report).await,
            Transport::Datagram {
                dest,
                meta,
                gso,
                posts,
                ..
            } => ops_datagram::send_batch(fd, bufs, *dest, meta, gso, posts, report).await,
            Transport::Tls(session) => session.send_batch(bufs, report).await,
        }
    }
}
