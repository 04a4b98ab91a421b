//! TunDevice: one queue of a TUN interface on the runtime's engine.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::future::poll_fn;

use bytes::Bytes;

use super::coalesce::Coalescer;
use super::segment::{self, Room, SegmentError};
use super::vnet::{VnetHeader, VNET_HDR_LEN};
use crate::driver::ops_file::{self, PacketReader};
use crate::driver::tun_sys::{self, QueueFlags};
use crate::driver::SharedFd;
use crate::net::turn::Turnstile;
use crate::{Error, Result};

/// Largest packet a queue hands over: a 64 KiB super-segment after its header.
const READ_BUFFER: usize = VNET_HDR_LEN + 65535;
/// Read buffers kept for reuse.
const MAX_SPARE_BUFFERS: usize = 256;

/// How a TUN interface is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunOptions {
    /// Ask for offloads: IFF_VNET_HDR, and TUNSETOFFLOAD with checksum, TSO4/6 and
    /// USO4/6 (default on). What the kernel granted is [`TunDevice::offloads`]; where it
    /// refuses, packets come and go plain through the same calls.
    pub offloads: bool,
    /// IFF_MULTI_QUEUE, so more queues can be opened on the interface, one per thread
    /// ([`TunDevice::open_queue`]; default on). An interface made without it cannot be
    /// attached with it, and the other way round.
    pub multi_queue: bool,
    /// The MTU to set, if any.
    pub mtu: Option<u32>,
    /// Bring the interface up (default on).
    pub up: bool,
}

impl Default for TunOptions {
    fn default() -> Self {
        TunOptions {
            offloads: true,
            multi_queue: true,
            mtu: None,
            up: true,
        }
    }
}

/// The offloads a queue runs with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunOffloads {
    /// Packets carry a virtio-net header (IFF_VNET_HDR): frames written may be
    /// super-segments, and reads carry the header.
    pub vnet_hdr: bool,
    /// Reads may carry partial checksums (TUN_F_CSUM).
    pub checksum: bool,
    /// Reads may be TCP super-segments (TUN_F_TSO4 | TUN_F_TSO6).
    pub tso: bool,
    /// Reads may be UDP super-datagrams (TUN_F_USO4 | TUN_F_USO6, Linux 6.2).
    pub uso: bool,
}

/// Counters of one queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunStats {
    /// Frames read (a super-segment counts one).
    pub frames_read: u64,
    /// Bytes read, headers included.
    pub bytes_read: u64,
    /// Packets given to [`TunDevice::write`].
    pub packets_written: u64,
    /// Frames the kernel took (a super-segment counts one).
    pub frames_written: u64,
    /// Frames the kernel refused.
    pub write_errors: u64,
    /// Batches flushed.
    pub flushes: u64,
}

/// One frame read from a queue: a packet, after its virtio-net header when the queue
/// has one.
pub struct TunFrame {
    buf: Vec<u8>,
    vnet_hdr: bool,
}

impl TunFrame {
    /// The virtio-net header ([`VnetHeader::PLAIN`] on a queue without one); `None` if
    /// it names an offload this reader did not declare.
    pub fn header(&self) -> Option<VnetHeader> {
        if self.vnet_hdr {
            VnetHeader::parse(&self.buf)
        } else {
            Some(VnetHeader::PLAIN)
        }
    }

    /// The IP packet (a super-segment with offloads).
    pub fn packet(&self) -> &[u8] {
        if self.vnet_hdr {
            self.buf.get(VNET_HDR_LEN..).unwrap_or(&[])
        } else {
            &self.buf
        }
    }

    /// Hands each plain packet of this frame to `emit`, in a new buffer shaped by
    /// `room` (a super-segment is cut into segments, a partial checksum completed; see
    /// [`segment::segment`]); returns how many.
    pub fn segments(
        &self,
        room: Room,
        emit: &mut dyn FnMut(Vec<u8>),
    ) -> std::result::Result<usize, SegmentError> {
        let header = self
            .header()
            .ok_or_else(|| SegmentError::new("an undeclared offload type"))?;
        segment::segment(&header, self.packet(), room, emit)
    }

    /// The buffer, for [`TunDevice::recycle`].
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }
}

impl fmt::Debug for TunFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunFrame")
            .field("header", &self.header())
            .field("len", &self.packet().len())
            .finish()
    }
}

/// One queue of a TUN interface (IFF_TUN | IFF_NO_PI: IP packets, no link header), on
/// the engine of the runtime that first uses it, like a socket.
///
/// Packets are read in batches ([`recv_batch`](Self::recv_batch)); written by queuing
/// them ([`write`](Self::write)) and sending the queue with [`flush`](Self::flush): on
/// io_uring one WRITE per frame, all submitted together; on epoll one `write(2)` each.
/// With offloads, reads may be super-segments ([`TunFrame::segments`] cuts them) and
/// a flush joins the queued segments of each TCP flow into super-segments.
///
/// Addresses and routes are the user's (`ip addr`, `ip route`). An interface this
/// value created goes away when its last queue is dropped; one it attached to stays.
pub struct TunDevice {
    fd: SharedFd,
    name: String,
    created: bool,
    options: TunOptions,
    offloads: TunOffloads,
    reader: RefCell<PacketReader>,
    turn: Turnstile,
    spare: RefCell<Vec<Vec<u8>>>,
    pending: RefCell<Pending>,
    stats: Cell<TunStats>,
}

/// Packets queued for the next flush.
#[derive(Default)]
struct Pending {
    coalescer: Coalescer,
    frames: Vec<Bytes>,
}

impl TunDevice {
    /// Opens a queue of the TUN interface `name`, creating the interface if there is
    /// none (in this thread's network namespace). Root or CAP_NET_ADMIN is needed.
    pub fn create(name: &str, options: TunOptions) -> Result<TunDevice> {
        let created = !tun_sys::interface_exists(name);
        let device = TunDevice::open(name, options, created)?;
        if let Some(mtu) = options.mtu {
            device.set_mtu(mtu)?;
        }
        if options.up {
            device.set_up(true)?;
        }
        Ok(device)
    }

    /// Whether `name` is one the kernel takes for an interface (1 to 15 bytes, not `.`
    /// or `..`, no `/`, `:`, whitespace or NUL; a template such as `vpn%d` is one):
    /// else the InvalidArgument error [`create`](Self::create) would fail with, before
    /// anything is opened.
    pub fn check_name(name: &str) -> Result<()> {
        tun_sys::check_name(name)
            .map_err(|e| Error::io(format!("open the TUN interface {name:?}"), e))
    }

    fn open(name: &str, options: TunOptions, created: bool) -> Result<TunDevice> {
        let flags = QueueFlags {
            vnet_hdr: options.offloads,
            multi_queue: options.multi_queue,
            blocking: false,
        };
        let (fd, name) = tun_sys::open_queue(name, flags)
            .map_err(|e| Error::io(format!("open the TUN interface {name:?}"), e))?;
        let offloads = if options.offloads {
            negotiate_offloads(&fd)
        } else {
            TunOffloads::default()
        };
        Ok(TunDevice {
            fd: SharedFd::new(fd),
            name,
            created,
            options,
            offloads,
            reader: RefCell::new(PacketReader::default()),
            turn: Turnstile::default(),
            spare: RefCell::new(Vec::new()),
            pending: RefCell::new(Pending::default()),
            stats: Cell::new(TunStats::default()),
        })
    }

    /// Another queue of the same interface, with the same options (needs
    /// [`TunOptions::multi_queue`]): for another thread's runtime.
    pub fn open_queue(&self) -> Result<TunDevice> {
        if !self.options.multi_queue {
            return Err(Error::invalid_input(
                "another queue needs an interface opened with multi_queue",
            ));
        }
        TunDevice::open(&self.name, self.options, false)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this queue created the interface (it goes away with its last queue).
    pub fn created(&self) -> bool {
        self.created
    }

    /// The offloads the kernel granted.
    pub fn offloads(&self) -> TunOffloads {
        self.offloads
    }

    /// The queue's counters.
    pub fn stats(&self) -> TunStats {
        self.stats.get()
    }

    /// Sets the interface's MTU.
    pub fn set_mtu(&self, mtu: u32) -> Result<()> {
        tun_sys::set_mtu(&self.name, mtu)
            .map_err(|e| Error::io(format!("set the MTU of {} to {mtu}", self.name), e))
    }

    /// The interface's MTU.
    pub fn mtu(&self) -> Result<u32> {
        tun_sys::mtu(&self.name).map_err(|e| Error::io(format!("get the MTU of {}", self.name), e))
    }

    /// Brings the interface up or down.
    pub fn set_up(&self, up: bool) -> Result<()> {
        tun_sys::set_up(&self.name, up).map_err(|e| {
            Error::io(
                format!("set {} {}", self.name, if up { "up" } else { "down" }),
                e,
            )
        })
    }

    /// Whether the interface is up.
    pub fn is_up(&self) -> Result<bool> {
        tun_sys::is_up(&self.name)
            .map_err(|e| Error::io(format!("get the flags of {}", self.name), e))
    }

    /// Waits until at least one frame is there, then appends every ready frame, up to
    /// `max`, to `out` and returns how many. Receives take turns.
    pub async fn recv_batch(&self, out: &mut Vec<TunFrame>, max: usize) -> Result<usize> {
        let _turn = self.turn.take().await;
        let mut bufs = Vec::new();
        let result = poll_fn(|cx| {
            let mut new_buf = || {
                self.spare
                    .borrow_mut()
                    .pop()
                    .unwrap_or_else(|| Vec::with_capacity(READ_BUFFER))
            };
            self.reader
                .borrow_mut()
                .poll_read(&self.fd, cx, &mut new_buf, &mut bufs, max)
        })
        .await;
        let mut stats = self.stats.get();
        let n = bufs.len();
        for buf in bufs {
            stats.frames_read += 1;
            stats.bytes_read += buf.len() as u64;
            out.push(TunFrame {
                buf,
                vnet_hdr: self.offloads.vnet_hdr,
            });
        }
        self.stats.set(stats);
        match result {
            Ok(()) => Ok(n),
            Err(_) if n > 0 => Ok(n),
            Err(err) => Err(self.queue_error(format!("read from {}", self.name), err)),
        }
    }

    /// The next frame.
    pub async fn recv(&self) -> Result<TunFrame> {
        let mut one = Vec::with_capacity(1);
        self.recv_batch(&mut one, 1).await?;
        one.pop()
            .ok_or_else(|| Error::io("read", std::io::ErrorKind::UnexpectedEof.into()))
    }

    /// Gives a frame's buffer back for later reads.
    pub fn recycle(&self, frame: TunFrame) {
        let mut buf = frame.buf;
        let mut spare = self.spare.borrow_mut();
        if spare.len() < MAX_SPARE_BUFFERS && buf.capacity() >= READ_BUFFER {
            buf.clear();
            spare.push(buf);
        }
    }

    /// Queues one plain IP packet for the next [`flush`](Self::flush). With offloads,
    /// consecutive TCP segments of one flow queued before a flush leave as one
    /// super-segment.
    pub fn write(&self, packet: &[u8]) {
        let mut stats = self.stats.get();
        stats.packets_written += 1;
        self.stats.set(stats);
        let mut pending = self.pending.borrow_mut();
        if self.offloads.vnet_hdr {
            pending.coalescer.push(packet);
        } else {
            pending.frames.push(Bytes::copy_from_slice(packet));
        }
    }

    /// Writes every queued packet. Frames the kernel refuses are counted
    /// ([`TunStats::write_errors`]) and do not stop the others; the first refusal is
    /// the error, after all were tried.
    pub async fn flush(&self) -> Result<()> {
        let frames = {
            let mut pending = self.pending.borrow_mut();
            let Pending { coalescer, frames } = &mut *pending;
            coalescer.finish(frames);
            std::mem::take(frames)
        };
        if frames.is_empty() {
            return Ok(());
        }
        let (outcome, _) = ops_file::write_packets(&self.fd, frames).await;
        let outcome =
            outcome.map_err(|e| self.queue_error(format!("write to {}", self.name), e))?;
        let mut stats = self.stats.get();
        stats.flushes += 1;
        stats.frames_written += outcome.written as u64;
        stats.write_errors += outcome.refused as u64;
        self.stats.set(stats);
        match outcome.first_error {
            None => Ok(()),
            Some(err) => Err(self.queue_error(
                format!(
                    "write {} of {} frames to {}",
                    outcome.refused,
                    outcome.refused + outcome.written,
                    self.name
                ),
                err,
            )),
        }
    }

    /// The error of a read or write: the kernel's EBADFD, which only says "File
    /// descriptor in bad state", means the interface went away under the queue (`ip
    /// link del`), for good: said so, as a network that is down.
    fn queue_error(&self, context: String, err: std::io::Error) -> Error {
        if err.raw_os_error() != Some(libc::EBADFD) {
            return Error::io(context, err);
        }
        Error::io(
            format!("{context}: {} was deleted", self.name),
            std::io::Error::from_raw_os_error(libc::ENETDOWN),
        )
    }
}

/// Opens a plain, blocking queue of the TUN interface `name` (created if there is none;
/// no offloads, not multi-queue) as a file: one packet per `read` and per `write`, for
/// code outside any runtime, such as a one-system-call-per-packet baseline. The
/// interface goes away when the file is closed, if this call created it.
pub fn open_blocking(name: &str) -> Result<std::fs::File> {
    let flags = QueueFlags {
        vnet_hdr: false,
        multi_queue: false,
        blocking: true,
    };
    let (fd, _) = tun_sys::open_queue(name, flags)
        .map_err(|e| Error::io(format!("open the TUN interface {name:?}"), e))?;
    Ok(std::fs::File::from(fd))
}

impl fmt::Debug for TunDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunDevice")
            .field("name", &self.name)
            .field("offloads", &self.offloads)
            .finish()
    }
}

/// Declares the most this reader takes, then less where the kernel refuses: USO came in
/// Linux 6.2, TSO and checksum offload long before.
fn negotiate_offloads(fd: &std::os::fd::OwnedFd) -> TunOffloads {
    use std::os::fd::AsRawFd;
    let tso = libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    let uso = libc::TUN_F_USO4 | libc::TUN_F_USO6;
    let tries = [
        (libc::TUN_F_CSUM | tso | uso, true, true),
        (libc::TUN_F_CSUM | tso, true, false),
        (libc::TUN_F_CSUM, false, false),
    ];
    for (flags, tso, uso) in tries {
        if tun_sys::set_offload(fd.as_raw_fd(), flags).is_ok() {
            return TunOffloads {
                vnet_hdr: true,
                checksum: true,
                tso,
                uso,
            };
        }
    }
    TunOffloads {
        vnet_hdr: true,
        ..TunOffloads::default()
    }
}
