//! Reading the kernel log: `/dev/kmsg` one record per `read()` (non-blocking, so the thread sees
//! shutdown; `EPIPE` = records overwritten before we read them: counted, go on), or a regular
//! file read from its start and then followed (polled for growth; truncation or replacement by
//! rotation reopens it from the start). Lines are bounded: beyond [`MAX_LINE_BYTES`] the rest of
//! a line is skipped and the line counted `oversized`.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::parse::MAX_LINE_BYTES;

/// What one read step gave.
pub enum Step {
    /// Nothing new now (EOF or EAGAIN): wait and call again.
    Idle,
    /// Progress was made (lines handed over).
    Read,
}

/// A source of lines.
pub enum Reader {
    Device {
        file: File,
        buf: Vec<u8>,
    },
    File {
        file: File,
        path: std::path::PathBuf,
        ino: u64,
        pos: u64,
        buf: Vec<u8>,
        /// Bytes of `buf` already known to hold no newline.
        line: Vec<u8>,
        /// Skipping the rest of an oversized line.
        skipping: bool,
    },
}

/// Callbacks of [`Reader::step`].
pub trait Sink {
    fn line(&mut self, raw: &[u8]);
    fn oversized(&mut self);
    fn overwritten(&mut self);
}

impl Reader {
    /// Opens `path`: a character device is read as `/dev/kmsg`, anything else as a file.
    pub fn open(path: &Path) -> std::io::Result<Reader> {
        let meta = std::fs::metadata(path)?;
        if meta.file_type().is_char_device() {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(path)?;
            return Ok(Reader::Device {
                file,
                buf: vec![0; 16 * 1024],
            });
        }
        let file = File::open(path)?;
        Ok(Reader::File {
            file,
            path: path.to_owned(),
            ino: meta.ino(),
            pos: 0,
            buf: vec![0; 64 * 1024],
            line: Vec::with_capacity(1024),
            skipping: false,
        })
    }

    /// Reads what is there now (at most ~1 MiB per call), handing lines to `sink`.
    pub fn step(&mut self, sink: &mut dyn Sink) -> std::io::Result<Step> {
        match self {
            Reader::Device { file, buf } => {
                let mut any = false;
                for _ in 0..1024 {
                    match file.read(buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            any = true;
                            let rec = &buf[..n];
                            let rec = rec.strip_suffix(b"\n").unwrap_or(rec);
                            // Continuation lines (`\n KEY=value`) belong to the record: only
                            // the first line is the message.
                            let first = rec.split(|&b| b == b'\n').next().unwrap_or(rec);
                            sink.line(first);
                        }
                        Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => {
                            any = true;
                            sink.overwritten();
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(if any { Step::Read } else { Step::Idle })
            }
            Reader::File {
                file,
                path,
                ino,
                pos,
                buf,
                line,
                skipping,
            } => {
                let mut any = false;
                for _ in 0..16 {
                    let n = file.read(buf)?;
                    if n == 0 {
                        break;
                    }
                    any = true;
                    *pos += n as u64;
                    let mut chunk = &buf[..n];
                    while let Some(i) = chunk.iter().position(|&b| b == b'\n') {
                        let (head, rest) = (&chunk[..i], &chunk[i + 1..]);
                        if *skipping {
                            *skipping = false;
                        } else if line.is_empty() {
                            if head.len() > MAX_LINE_BYTES {
                                sink.oversized();
                            } else {
                                sink.line(head);
                            }
                        } else if line.len() + head.len() > MAX_LINE_BYTES {
                            sink.oversized();
                            line.clear();
                        } else {
                            line.extend_from_slice(head);
                            sink.line(line);
                            line.clear();
                        }
                        chunk = rest;
                    }
                    if !*skipping {
                        if line.len() + chunk.len() > MAX_LINE_BYTES {
                            sink.oversized();
                            line.clear();
                            *skipping = true;
                        } else {
                            line.extend_from_slice(chunk);
                        }
                    }
                }
                if !any {
                    // Truncated (copytruncate) or replaced (rotation): start again.
                    match std::fs::metadata(&*path) {
                        Ok(m) if m.ino() != *ino || m.len() < *pos => {
                            *file = File::open(&*path)?;
                            *ino = m.ino();
                            *pos = 0;
                            line.clear();
                            *skipping = false;
                            return Ok(Step::Read);
                        }
                        Ok(_) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(if any { Step::Read } else { Step::Idle })
            }
        }
    }
}
