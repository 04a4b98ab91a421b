//! Datagrams to many destinations in one flush: `sendmmsg` of one message per
//! destination run (a GSO run where sizes allow, never across destinations or
//! metadata), each datagram's own result kept. A failure concerns its datagrams only:
//! the batch goes on with the next. Shared by both engines, which only wait for the
//! socket to take more when it is full.

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

use super::cmsg::SendMeta;
use super::gso::{gso_refused, plan_links, GsoSuspect, GsoVerdict, MmsgBatch, Targets};

/// Most messages one `sendmmsg` takes (UIO_MAXIOV).
const SEND_SLOTS: usize = 1024;

/// What one [`SendMany::step`] came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Every datagram has its result.
    Done,
    /// Some went; call again.
    Progress,
    /// The send buffer is full: wait until the socket is writable, then call again.
    WouldBlock,
}

/// A batch of datagrams, each with its own destination and metadata, on its way out.
/// Each `sendmmsg` reads the buffers only during the call, so any bytes do (a
/// received datagram's, in the receive ring, included).
pub(crate) struct SendMany<B> {
    bufs: Vec<B>,
    targets: Vec<(SocketAddr, SendMeta)>,
    results: Vec<io::Result<usize>>,
    gso: bool,
    /// A GSO run the kernel refused, being sent again datagram by datagram.
    suspect: Option<GsoSuspect>,
    /// Set when GSO was to blame for a refusal, for the socket to remember.
    gso_refused: bool,
}

impl<B: AsRef<[u8]>> SendMany<B> {
    /// `bufs[i]` goes to `targets[i]` (the two are the same length).
    pub(crate) fn new(bufs: Vec<B>, targets: Vec<(SocketAddr, SendMeta)>, gso: bool) -> Self {
        debug_assert_eq!(bufs.len(), targets.len());
        SendMany {
            results: Vec::with_capacity(bufs.len()),
            bufs,
            targets,
            gso,
            suspect: None,
            gso_refused: false,
        }
    }

    /// One non-blocking `sendmmsg` of what has no result yet. The caller counts the
    /// system call unless the answer is [`Step::Done`].
    pub(crate) fn step(&mut self, fd: RawFd) -> Step {
        let at = self.results.len();
        if at >= self.bufs.len() {
            return Step::Done;
        }
        let targets = Targets::Each(&self.targets);
        let gso = self.gso && self.suspect.is_none();
        let links = plan_links(&self.bufs, at, gso, SEND_SLOTS, &targets);
        let mut batch = MmsgBatch::new(&self.bufs, &links, &targets);
        let step = match batch.send(fd, 0) {
            Ok(sent) if sent > 0 => {
                for link in &links[..sent.min(links.len())] {
                    for buf in &self.bufs[link.first..link.first + link.count] {
                        self.results.push(Ok(buf.as_ref().len()));
                    }
                }
                Step::Progress
            }
            Ok(_) => {
                self.fail(links[0].count, || io::ErrorKind::WriteZero.into());
                Step::Progress
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => Step::WouldBlock,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => Step::Progress,
            Err(err) if links[0].segment.is_some() && gso_refused(&err) => {
                // Planned again datagram by datagram.
                self.suspect = Some(GsoSuspect::new(&links[0]));
                Step::Progress
            }
            Err(err) => {
                // The first message failed (sendmmsg reports a later one's failure on
                // the next call, where it is first): its datagrams only.
                let code = err.raw_os_error();
                let kind = err.kind();
                let mut err = Some(err);
                self.fail(links[0].count, || {
                    err.take().unwrap_or_else(|| match code {
                        Some(code) => io::Error::from_raw_os_error(code),
                        None => kind.into(),
                    })
                });
                Step::Progress
            }
        };
        self.judge_suspect();
        step
    }

    /// Settles a refused GSO run once its datagrams, sent one by one, show whether GSO
    /// was to blame (see [`GsoSuspect`]).
    fn judge_suspect(&mut self) {
        let Some(suspect) = self.suspect else {
            return;
        };
        let first_sent = self
            .results
            .get(suspect.first())
            .map(|result| result.is_ok());
        match suspect.judge(first_sent, self.results.len()) {
            GsoVerdict::Pending => {}
            GsoVerdict::Blamed => {
                self.gso = false;
                self.gso_refused = true;
                self.suspect = None;
            }
            GsoVerdict::Cleared => self.suspect = None,
        }
    }

    fn fail(&mut self, count: usize, mut err: impl FnMut() -> io::Error) {
        for _ in 0..count {
            self.results.push(Err(err()));
        }
    }

    /// The kernel refused GSO for this socket during the batch.
    pub(crate) fn gso_was_refused(&self) -> bool {
        self.gso_refused
    }

    /// Each datagram's result, in order (bytes sent, or why not), and the buffers.
    pub(crate) fn into_parts(self) -> (Vec<io::Result<usize>>, Vec<B>) {
        (self.results, self.bufs)
    }
}
