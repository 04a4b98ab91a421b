//! The pre-shared key: 32 bytes, written as 64 hexadecimal characters in a file.

use std::fmt;
use std::path::Path;

use crate::{Error, Result};

/// The most bytes a key file may hold: the key and whitespace around it.
const KEY_FILE_MAX: u64 = 4096;

/// A 32-byte pre-shared key. Its bytes never appear in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct PresharedKey([u8; 32]);

impl PresharedKey {
    /// The key from its bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> PresharedKey {
        PresharedKey(bytes)
    }

    /// Parses 64 hexadecimal characters (surrounding whitespace, such as a final
    /// newline, is ignored); anything else is an error saying what is wrong.
    pub fn from_hex(text: &str) -> std::result::Result<PresharedKey, String> {
        let text = text.trim();
        if text.len() != 64 {
            return Err(format!(
                "a key is 64 hexadecimal characters (32 bytes), not {} characters",
                text.chars().count()
            ));
        }
        let mut key = [0u8; 32];
        for (i, pair) in text.as_bytes().chunks(2).enumerate() {
            let digit = |c: u8| (c as char).to_digit(16);
            match (digit(pair[0]), digit(pair[1])) {
                (Some(high), Some(low)) => key[i] = (high * 16 + low) as u8,
                _ => {
                    return Err(format!(
                        "a key is 64 hexadecimal characters; character {} is not one",
                        i * 2 + 1 + digit(pair[0]).is_some() as usize
                    ))
                }
            }
        }
        Ok(PresharedKey(key))
    }

    /// Reads the key from `path` (see [`from_hex`](Self::from_hex)); a missing or
    /// unreadable file and bad contents are errors with the file's status.
    pub fn from_file(path: &Path) -> Result<PresharedKey> {
        let read_error = |e| Error::io(format!("read the key file {}", path.display()), e);
        // A key with its whitespace is a few dozen bytes: reading stops past this, so
        // /dev/zero or a huge file cannot hold the caller or fill its memory.
        let mut text = Vec::new();
        read_limited(path, KEY_FILE_MAX + 1, &mut text).map_err(read_error)?;
        if text.len() as u64 > KEY_FILE_MAX {
            return Err(Error::invalid_file(
                path,
                format!("a key is 64 hexadecimal characters, not over {KEY_FILE_MAX} bytes"),
            ));
        }
        let text = String::from_utf8(text).map_err(|_| {
            Error::invalid_file(path, "a key is 64 hexadecimal characters, not binary data")
        })?;
        // A byte-order mark, as some editors begin a text file with, is no part of the
        // key (as the line end after it is not).
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        PresharedKey::from_hex(text).map_err(|why| Error::invalid_file(path, why))
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// How long a file that is a pipe may take to deliver what it holds.
const PIPE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Appends to `text` what `path` holds, up to `limit` bytes. Opened plain, a FIFO no one
/// writes to (a `mkfifo` left where the key file was meant to be) would hold the open
/// forever: opened non-blocking it reads as empty instead. One whose writer has not
/// written yet (`--key <(cat key)`) is read as it comes, for [`PIPE_WAIT`] at most: a
/// writer that holds the pipe open and never writes is an error, not a hang.
pub(crate) fn read_limited(path: &Path, limit: u64, text: &mut Vec<u8>) -> std::io::Result<()> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let mut reader = (&file).take(limit);
    let mut waiting: Option<(mio::Poll, std::time::Instant)> = None;
    loop {
        match reader.read_to_end(text) {
            Ok(_) => return Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                let (poll, deadline) = match &mut waiting {
                    Some(waiting) => waiting,
                    None => {
                        let poll = mio::Poll::new()?;
                        poll.registry().register(
                            &mut mio::unix::SourceFd(&file.as_raw_fd()),
                            mio::Token(0),
                            mio::Interest::READABLE,
                        )?;
                        waiting.insert((poll, std::time::Instant::now() + PIPE_WAIT))
                    }
                };
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "it is a pipe that gave nothing more for {PIPE_WAIT:?} (a writer that \
                             keeps it open and never writes?)"
                        ),
                    ));
                }
                let mut events = mio::Events::with_capacity(1);
                match poll.poll(&mut events, Some(left)) {
                    Err(err) if err.kind() != std::io::ErrorKind::Interrupted => return Err(err),
                    _ => {}
                }
            }
            Err(err) => return Err(err),
        }
    }
}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_that_begins_with_a_byte_order_mark_is_read() {
        let dir = std::env::temp_dir().join(format!("ringsock-key-bom-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        std::fs::write(&path, format!("\u{feff}{}\r\n", "1f".repeat(32))).unwrap();
        let key = PresharedKey::from_file(&path).unwrap();
        assert_eq!(key.as_bytes(), &[0x1f; 32]);
        // Only at the start: one inside the key is a bad character, as before.
        std::fs::write(
            &path,
            format!("{}\u{feff}{}", "1f".repeat(16), "1f".repeat(16)),
        )
        .unwrap();
        assert!(PresharedKey::from_file(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn parses_64_hex_characters_and_nothing_else() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        let key = PresharedKey::from_hex(&format!("{hex}\n")).unwrap();
        assert_eq!(key.as_bytes()[1], 0x11);
        assert_eq!(key.as_bytes()[31], 0xff);
        assert!(PresharedKey::from_hex(&hex[..62])
            .unwrap_err()
            .contains("not 62"));
        assert!(PresharedKey::from_hex(&format!("{hex}00")).is_err());
        let bad = format!("{}g", &hex[..63]);
        assert!(PresharedKey::from_hex(&bad)
            .unwrap_err()
            .contains("character 64"));
        assert!(PresharedKey::from_hex("").is_err());
        assert_eq!(format!("{key:?}"), "PresharedKey(..)");
    }

    #[test]
    fn a_pipe_whose_writer_never_finishes_is_an_error_not_a_hang() {
        let dir = std::env::temp_dir().join(format!("ringsock-key-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .unwrap();
        assert!(made.success());
        // Opened for reading and writing, a FIFO has a writer at once, which writes a
        // part and then neither writes nor closes.
        let holder = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut &holder, b"1f1f").unwrap();
        let mut text = Vec::new();
        let err = read_limited(&path, 100, &mut text).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        assert_eq!(text, b"1f1f");
        drop(holder);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
