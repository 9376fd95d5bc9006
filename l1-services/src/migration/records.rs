//! TLS 1.3 application-data records sealed and opened by the link itself, once rustls has
//! authenticated both ends and agreed the keys: what the kernel's kTLS does with the keys
//! rustls hands it (`dangerous_extract_secrets`), here in the process, because this kernel has
//! no kTLS. The records are TLS 1.3's own (RFC 8446 §5.2: outer type application_data,
//! version 0x0303, the inner content type after the plaintext, the AEAD nonce the IV XORed
//! with the record's sequence number, the header as associated data), so a peer that keeps
//! rustls reads them as any. What this saves is rustls's buffering: a received record is
//! decrypted where it landed and its plaintext copied once, into the frame buffer; a sent one
//! is sealed in one buffer that goes to the socket as it is, with no allocation per record.
//!
//! Only application data passes after the take-over; a record of another content type
//! (an alert, a key update, a session ticket) ends the connection with an error naming it.
//! Keys are never updated: a connection ends with an error before its key would reach the
//! AEAD's limit (2^24 records, 256 GiB of plaintext, for AES-GCM).

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};

/// Record header: content type, legacy version, length.
pub const HEADER: usize = 5;
/// AEAD tag.
const TAG: usize = 16;
/// Most plaintext in a record (2^14).
pub const MAX_PLAIN: usize = 1 << 14;
/// Most ciphertext after the header a peer may send (RFC 8446 §5.2: 2^14 + 256).
const MAX_CIPHER: usize = MAX_PLAIN + 256;
const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
/// Records one key protects at most (AES-GCM's limit; ChaCha20-Poly1305 allows more).
const KEY_LIMIT: u64 = 1 << 24;

/// Why a record could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A header that is no TLS 1.3 application-data record.
    #[error("malformed TLS record header {0:02x?}")]
    Header([u8; HEADER]),
    /// The record does not authenticate (tampered with, or another key).
    #[error("a TLS record failed authentication")]
    Auth,
    /// The peer sent an alert (close_notify included: the link never closes that way).
    #[error("the peer sent TLS alert {level}/{description}")]
    Alert {
        /// Alert level.
        level: u8,
        /// Alert description.
        description: u8,
    },
    /// A record of a type that is not application data.
    #[error("unexpected TLS record of content type {0} after the handshake")]
    ContentType(u8),
    /// The key protected as many records as it may.
    #[error("the connection's key reached its limit of {KEY_LIMIT} records")]
    KeyLimit,
    /// The negotiated suite is not one this layer knows.
    #[error("no record layer for this cipher suite")]
    Suite,
}

/// One direction: its key, IV and next sequence number.
struct Direction {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl Direction {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Self, RecordError> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(RecordError::Suite),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| RecordError::Suite)?;
        Ok(Direction {
            key: LessSafeKey::new(key),
            iv: iv.as_ref().try_into().map_err(|_| RecordError::Suite)?,
            seq,
        })
    }

    /// The next record's nonce (RFC 8446 §5.3).
    fn nonce(&mut self) -> Result<Nonce, RecordError> {
        if self.seq >= KEY_LIMIT {
            return Err(RecordError::KeyLimit);
        }
        let mut n = self.iv;
        for (b, s) in n[NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(n))
    }
}

/// Both directions of a connection whose records this layer protects.
pub struct Records {
    tx: Direction,
    rx: Direction,
}

/// What [`Records::open`] found at the front of a buffer.
pub enum Opened {
    /// Not a whole record yet.
    Partial,
    /// A record of `len` bytes whose plaintext is `plain` (both from the buffer's start).
    Record {
        /// The plaintext's range in the buffer.
        plain: std::ops::Range<usize>,
        /// The whole record's length.
        len: usize,
    },
}

impl Records {
    /// Takes over from rustls with the secrets and sequence numbers it hands over.
    pub fn new(s: ExtractedSecrets) -> Result<Self, RecordError> {
        Ok(Records {
            tx: Direction::new(s.tx.0, s.tx.1)?,
            rx: Direction::new(s.rx.0, s.rx.1)?,
        })
    }

    /// Starts a record at the end of `out`: returns where, for [`Records::seal`] once the
    /// plaintext (at most [`MAX_PLAIN`] bytes) has been appended.
    pub fn begin(out: &mut Vec<u8>) -> usize {
        let at = out.len();
        out.extend_from_slice(&[0; HEADER]);
        at
    }

    /// Seals the record begun at `at` in place: the plaintext after its header is encrypted,
    /// the header written, the tag appended.
    pub fn seal(&mut self, out: &mut Vec<u8>, at: usize) -> Result<(), RecordError> {
        out.push(APPLICATION_DATA);
        let len = out.len() - at - HEADER + TAG;
        let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        out[at..at + HEADER].copy_from_slice(&header);
        let nonce = self.tx.nonce()?;
        let tag = self
            .tx
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut out[at + HEADER..])
            .map_err(|_| RecordError::Auth)?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Opens the record at the start of `buf` in place, if it is whole there.
    pub fn open(&mut self, buf: &mut [u8]) -> Result<Opened, RecordError> {
        let Some(header) = buf.get(..HEADER) else {
            return Ok(Opened::Partial);
        };
        let header: [u8; HEADER] = header.try_into().expect("5 bytes");
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if header[0] != APPLICATION_DATA || header[1..3] != [3, 3] || len > MAX_CIPHER || len <= TAG
        {
            return Err(RecordError::Header(header));
        }
        if buf.len() < HEADER + len {
            return Ok(Opened::Partial);
        }
        let nonce = self.rx.nonce()?;
        let plain = self
            .rx
            .key
            .open_in_place(nonce, Aad::from(header), &mut buf[HEADER..HEADER + len])
            .map_err(|_| RecordError::Auth)?;
        // The inner content type is the last non-zero byte (zeros after it are padding).
        let end = plain
            .iter()
            .rposition(|&b| b != 0)
            .ok_or(RecordError::ContentType(0))?;
        match plain[end] {
            APPLICATION_DATA => Ok(Opened::Record {
                plain: HEADER..HEADER + end,
                len: HEADER + len,
            }),
            ALERT if end >= 2 => Err(RecordError::Alert {
                level: plain[0],
                description: plain[1],
            }),
            t => Err(RecordError::ContentType(t)),
        }
    }
}

/// Where a TLS record starting at `buf` ends, if its header is there (for feeding rustls
/// whole records, so that it holds none half-read when the link takes over).
pub fn record_len(buf: &[u8]) -> Option<usize> {
    let h = buf.get(..HEADER)?;
    Some(HEADER + u16::from_be_bytes([h[3], h[4]]) as usize)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use rustls::{ClientConnection, Connection, ServerConnection};

    use super::*;
    use crate::migration::tls;

    /// Moves what `from` has to send into `to`.
    fn shuttle(from: &mut Connection, to: &mut Connection) {
        let mut b = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut b).unwrap();
        }
        let mut r = &b[..];
        while !r.is_empty() {
            to.read_tls(&mut r).unwrap();
            to.process_new_packets().unwrap();
        }
    }

    /// A client that takes its records over and a server that keeps rustls understand each
    /// other, both ways, with every suite; a flipped bit or a replayed record is refused.
    #[test]
    fn records_sealed_here_are_tls_records_to_rustls_and_back() {
        let dir = std::env::temp_dir().join(format!("spanvmm-records-{}", std::process::id()));
        tls::generate(&dir).unwrap();
        for cipher in tls::Cipher::ALL {
            let mut c = Connection::Client(
                ClientConnection::new(
                    tls::client_config(&dir, cipher).unwrap(),
                    tls::server_name(),
                )
                .unwrap(),
            );
            let mut s = Connection::Server(
                ServerConnection::new(tls::server_config(&dir).unwrap()).unwrap(),
            );
            while c.is_handshaking() || s.is_handshaking() {
                shuttle(&mut c, &mut s);
                shuttle(&mut s, &mut c);
            }
            // Some records through rustls first: the sequence numbers carry over.
            c.writer().write_all(b"hello").unwrap();
            shuttle(&mut c, &mut s);
            s.writer().write_all(b"welcome").unwrap();
            shuttle(&mut s, &mut c);
            let mut got = [0u8; 7];
            c.reader().read_exact(&mut got).unwrap();
            let mut own = Records::new(c.dangerous_extract_secrets().unwrap()).unwrap();
            // Client → server: two records, one full-size, one short.
            let big: Vec<u8> = (0..MAX_PLAIN + 100).map(|i| i as u8).collect();
            let mut wire = Vec::new();
            for part in [&big[..MAX_PLAIN], &big[MAX_PLAIN..]] {
                let at = Records::begin(&mut wire);
                wire.extend_from_slice(part);
                own.seal(&mut wire, at).unwrap();
            }
            let (mut r, mut back) = (&wire[..], Vec::new());
            while !r.is_empty() {
                s.read_tls(&mut r).unwrap();
                s.process_new_packets().unwrap();
                // (Err: WouldBlock once it has given all it holds.)
                let _ = s.reader().read_to_end(&mut back);
            }
            assert_eq!(back, [&b"hello"[..], &big].concat(), "{cipher:?}");
            // Server → client.
            s.writer().write_all(&big[..3000]).unwrap();
            s.writer().write_all(b"!").unwrap();
            let mut wire = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut wire).unwrap();
            }
            let mut plain = Vec::new();
            let mut off = 0;
            let mut tampered = None;
            while off < wire.len() {
                let rec = wire[off..].to_vec();
                match own.open(&mut wire[off..]).unwrap() {
                    Opened::Record { plain: p, len } => {
                        plain.extend_from_slice(&wire[off + p.start..off + p.end]);
                        tampered.get_or_insert(rec[..len].to_vec());
                        off += len;
                    }
                    Opened::Partial => panic!("a whole record is there"),
                }
            }
            assert_eq!(plain, [&big[..3000], b"!"].concat(), "{cipher:?}");
            // The first record again (its sequence number is past) and with a bit flipped.
            let mut rec = tampered.unwrap();
            assert!(matches!(own.open(&mut rec.clone()), Err(RecordError::Auth)));
            let last = rec.len() - 1;
            rec[last] ^= 1;
            assert!(matches!(own.open(&mut rec), Err(RecordError::Auth)));
            // Half a record waits; a header that is no application data is refused.
            let mut half = wire[..3].to_vec();
            assert!(matches!(own.open(&mut half), Ok(Opened::Partial)));
            let mut bad = [22u8, 3, 3, 0, 40].to_vec();
            bad.resize(45, 0);
            assert!(matches!(own.open(&mut bad), Err(RecordError::Header(_))));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
